"""Resuming a killed training run from its newest complete checkpoint.

HF ``Trainer`` writes ``checkpoint-<step>/`` (weights, optimizer, scheduler, RNG states, then
``trainer_state.json``) without marking the end, so a process killed while saving leaves a
folder that looks like a checkpoint. ``MetricsCallback.on_save`` therefore writes ``MARKER``
once every process has finished the save (files synced first); only folders with the marker
and a readable ``trainer_state.json`` of the same step are resumed from.

Before the resumed run continues, ``prepare_resume`` drops the rows of ``metrics.jsonl`` and
``rollouts.rank<k>.jsonl`` of steps after the checkpoint (the killed attempt's last steps are
played again), together with any cut line, and removes later checkpoint folders, so the
finished run holds each step exactly once.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from awm_core.errors import ResumeError

MARKER = "awm-complete.json"
PREFIX = "checkpoint-"
METRICS = "metrics.jsonl"
RESULT = "result.json"
LOCK = "train.lock"


def hold_run_lock(run_dir: str | Path) -> int:
    """Lock the run folder for this process's lifetime (the kernel drops it when the process dies,
    SIGKILL included); a ``ResumeError`` when another live process holds it."""
    import fcntl

    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ResumeError(f"training run {Path(run_dir).name.removeprefix('train-')} is still running "
                          f"(a process holds {path}); stop it before resuming") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def run_is_active(run_dir: str | Path) -> bool:
    """Whether a live training process holds the run folder's lock."""
    import fcntl

    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def mark_complete(checkpoint: str | Path, step: int) -> None:
    """Sync a finished checkpoint's files, then write its completion marker (main process, after
    every process saved)."""
    checkpoint = Path(checkpoint)
    for f in sorted(checkpoint.rglob("*")):
        if f.is_file():
            _fsync(f)
    _write_atomic(checkpoint / MARKER, json.dumps({"step": int(step)}))


def _step_of(folder: Path) -> int | None:
    suffix = folder.name[len(PREFIX):]
    return int(suffix) if folder.name.startswith(PREFIX) and suffix.isdigit() else None


def is_complete(folder: Path) -> bool:
    step = _step_of(folder)
    try:
        marked = json.loads((folder / MARKER).read_text()).get("step")
        state = json.loads((folder / "trainer_state.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return False
    return step is not None and marked == step == state


def last_checkpoint(checkpoint_dir: str | Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete checkpoint, or None."""
    checkpoint_dir = Path(checkpoint_dir)
    found = [(_step_of(p), p) for p in checkpoint_dir.glob(PREFIX + "*") if p.is_dir()] \
        if checkpoint_dir.is_dir() else []
    complete = sorted((s, p) for s, p in found if s is not None and is_complete(p))
    return complete[-1] if complete else None


def truncate_jsonl(path: str | Path, last_step: int) -> int:
    """Keep the rows of steps <= ``last_step`` (a line cut by the kill goes too); returns how many
    rows were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
            keep = int(row["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped or kept and not path.read_text().endswith("\n"):  # the next append must start a line
        _write_atomic(path, "".join(x + "\n" for x in kept))
    return dropped


def require_resumable(run_dir: str | Path, checkpoint_dir: str | Path, save_steps: int) -> tuple[int, Path]:
    """The checkpoint to resume ``run_dir`` from; a ``ResumeError`` says why there is none."""
    run_dir = Path(run_dir)
    name = run_dir.name.removeprefix("train-")
    if (run_dir / RESULT).exists():
        raise ResumeError(f"training run {name} already finished ({run_dir / RESULT}); nothing to resume")
    found = last_checkpoint(checkpoint_dir)
    if found is None:
        why = ("save_steps is 0, so the run only saves at the end" if not save_steps else
               f"it died before its first save (save_steps = {save_steps})")
        raise ResumeError(f"training run {name} has no complete checkpoint in {checkpoint_dir}: {why}; "
                          "start a new run instead")
    return found


def prepare_resume(run_dir: str | Path, checkpoint_dir: str | Path, save_steps: int) -> tuple[int, Path]:
    """Pick the checkpoint, drop the rows and checkpoint folders of later steps (main process,
    before any process trains). Returns (step, checkpoint folder)."""
    run_dir, checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
    step, folder = require_resumable(run_dir, checkpoint_dir, save_steps)
    for path in [run_dir / METRICS, *sorted(run_dir.glob("rollouts.rank*.jsonl"))]:
        truncate_jsonl(path, step)
    for p in checkpoint_dir.glob(PREFIX + "*"):
        s = _step_of(p)
        if p.is_dir() and s is not None and s > step:
            shutil.rmtree(p, ignore_errors=True)
    return step, folder


__all__ = ["MARKER", "LOCK", "ResumeError", "hold_run_lock", "run_is_active", "mark_complete", "is_complete",
           "last_checkpoint", "truncate_jsonl", "require_resumable", "prepare_resume"]

"""A training run killed with SIGKILL mid-run resumes from its last complete checkpoint.

The counter application of test_train_grpo.py is published in a catalog with a passing gate
report; the flow's own ``prepare_run`` makes the run folder and ``launch_command`` the
``accelerate launch`` command line. The run (4 steps, a checkpoint every step) is killed, whole
process group, as soon as step 2 is in ``metrics.jsonl``; a half-written checkpoint folder, an
episode of the step after the checkpoint and a cut metrics line are added on top. ``run_train(resume=run_id)`` then relaunches it and publishes:
every step's metrics and episodes exist exactly once, in the folder and in the catalog, and the
resumed part continued the checkpoint's optimizer, scheduler and trainer state.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter

import pytest

from awm_core.models import utcnow
from awm_core.train.config import TrainConfig
from awm_core.train.resume import run_is_active
from test_train_grpo import counter_environment

STEPS = 4


@pytest.fixture
def counter_catalog(awm_home):
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    settings = get_settings()
    with Catalog.open(settings) as cat:
        with cat.publish(message="counter environment") as pub:
            pub.add_environments([counter_environment()])
        snapshot = pub.snapshot_id
        with cat.publish(message="gate passed") as pub:
            pub.add_quality_report({"report_id": uuid.uuid4().hex, "snapshot": snapshot, "passed": True,
                                    "statistics": {}, "results": [], "created_at": utcnow()})
    return settings, snapshot


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _kill_after_step(cmd, env, run_dir, step, timeout=400):
    """Start the training process group; SIGKILL all of it once ``step`` is in metrics.jsonl."""
    with open(run_dir / "launch.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() \
                else []
            if any(json.loads(x)["step"] >= step for x in lines if x.endswith("}")):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                while run_is_active(run_dir):  # the trainer child is gone once its folder lock is
                    assert time.monotonic() < deadline, "the killed trainer never exited"
                    time.sleep(0.05)
                return
            assert proc.poll() is None, "training ended before it could be killed:\n" + \
                (run_dir / "launch.log").read_text()[-3000:]
            time.sleep(0.1)
        pytest.fail(f"step {step} never reached:\n" + (run_dir / "launch.log").read_text()[-3000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_killed_run_resumes_from_its_last_checkpoint_and_publishes_each_step_once(counter_catalog):
    import torch

    from awm_core.train.resume import MARKER, last_checkpoint
    from flows.train import launch_command, prepare_run, publish_run, run_train
    from storage.catalog import Catalog

    settings, snapshot = counter_catalog
    cfg = TrainConfig(model="random:tiny", snapshot=snapshot, split="all", group_size=2, tasks_per_step=2,
                      max_turns=2, window=1, interface="direct", learning_rate=1e-3, steps=STEPS, save_steps=1,
                      max_tokens=8, max_prompt_tokens=1024, max_tokens_per_microbatch=4096, sandbox_workers=1)
    run_id = uuid.uuid4().hex[:12]
    run_dir, _, _ = prepare_run(cfg, settings, run_id)
    cmd, env = launch_command(run_dir, cfg)
    _kill_after_step(cmd, env, run_dir, step=2)

    ckpts = run_dir / "checkpoints"
    step, folder = last_checkpoint(ckpts)
    assert 1 <= step < STEPS and not (run_dir / "result.json").exists()
    # what a kill during a save leaves: a later folder with a trainer state but no completion mark
    partial = ckpts / f"checkpoint-{step + 1}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(folder, partial)
    (partial / MARKER).unlink()
    state = json.loads((partial / "trainer_state.json").read_text())
    (partial / "trainer_state.json").write_text(json.dumps({**state, "global_step": step + 1}))
    with open(run_dir / "rollouts.rank0.jsonl", "a") as fh:  # an episode of the step the kill cut short
        fh.write(json.dumps({**_rows(run_dir / "rollouts.rank0.jsonl")[-1], "step": step + 1}) + "\n")
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "loss": 0.')  # a line cut by the kill
    assert last_checkpoint(ckpts)[0] == step

    lines: list[str] = []
    summary = run_train(None, settings, resume=run_id, on_line=lines.append)
    assert any(x.startswith(f"resuming from {folder}") for x in lines), lines
    assert summary["run_id"] == run_id and summary["steps"] == STEPS
    assert list(settings.runs_dir.glob("train-*")) == [run_dir]  # no new run folder

    metrics = _rows(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    episodes = _rows(run_dir / "rollouts.rank0.jsonl")
    per_step = Counter(e["step"] for e in episodes)
    assert per_step == {s: cfg.episodes_per_step for s in range(1, STEPS + 1)}
    assert set(Counter((e["step"], e["env_id"], e["task_idx"]) for e in episodes).values()) == {cfg.group_size}

    # the resumed part continued the checkpoint: AdamW's and the scheduler's step counts and the
    # trainer's log history run through all steps instead of restarting at 1
    last = ckpts / f"checkpoint-{STEPS}"
    optim = torch.load(last / "optimizer.pt", weights_only=False)
    assert {int(s["step"]) for s in optim["state"].values()} == {STEPS}
    assert torch.load(last / "scheduler.pt", weights_only=False)["last_epoch"] == STEPS
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, STEPS + 1))
    assert all((ckpts / f"checkpoint-{s}" / MARKER).exists() for s in range(1, STEPS + 1))
    assert (ckpts / "final" / "model.safetensors").exists()
    tokenizers = [json.loads((ckpts / f"checkpoint-{s}" / "tokenizer.json").read_text())["model"]["vocab"]
                  for s in (1, STEPS)]
    assert tokenizers[0] == tokenizers[1]  # the tokenizer trained again at relaunch has the same ids

    def catalog_counts():
        with Catalog.open(settings, read_only=True) as cat:
            steps = [r["step"] for r in cat.rows("SELECT step FROM training_runs WHERE run_id = ? ORDER BY step",
                                                 params=[run_id])]
            ids = [r["rollout_id"] for r in cat.rows("SELECT rollout_id FROM rollouts WHERE run_id = ?",
                                                     params=[run_id])]
        return steps, sorted(ids)

    steps, ids = catalog_counts()
    assert steps == list(range(1, STEPS + 1))
    assert len(ids) == len(set(ids)) == STEPS * cfg.episodes_per_step
    publish_run(run_dir, settings)  # publishing the same folder again adds nothing
    assert catalog_counts() == (steps, ids)
    with Catalog.open(settings, read_only=True) as cat:
        made = [x["made_by"] for x in cat.snapshots() if (x["made_by"] or {}).get("train_run_id") == run_id]
    assert made and all(m["sandbox"]["seccomp"] and m["sandbox"]["landlock"] for m in made), made


def test_resume_refuses_unknown_finished_and_checkpointless_runs(awm_home, capsys):
    from awm_core.settings import get_settings
    from awm_core.train.resume import hold_run_lock
    from flows.cli import main

    settings = get_settings()
    assert main(["train", "--resume", "nosuchrun", "--no-flow"]) == 1
    assert "no training run 'nosuchrun'" in capsys.readouterr().err

    never_saved = settings.runs_dir / "train-abc123"
    never_saved.mkdir(parents=True)
    (never_saved / "run.json").write_text(json.dumps({"run_id": "abc123", "snapshot": 1, "new_splits": []}))
    TrainConfig(save_steps=0).save(never_saved / "config.json")
    assert main(["train", "--resume", "other"]) == 1
    assert "runs there: abc123" in capsys.readouterr().err
    assert main(["train", "--resume", "abc123"]) == 1
    assert "no complete checkpoint" in (err := capsys.readouterr().err) and "save_steps is 0" in err
    TrainConfig(save_steps=5).save(never_saved / "config.json")
    assert main(["train", "--resume", "abc123"]) == 1
    assert "died before its first save (save_steps = 5)" in capsys.readouterr().err
    lock = hold_run_lock(never_saved)  # what a launcher that is still training holds
    try:
        assert main(["train", "--resume", "abc123"]) == 1
        assert "is still running" in capsys.readouterr().err
    finally:
        os.close(lock)
    (never_saved / "result.json").write_text("{}")
    assert main(["train", "--resume", "abc123"]) == 1
    assert "already finished" in capsys.readouterr().err
    assert main(["train", "--resume", "abc123", "--preset", "tiny"]) == 1
    assert "drop --preset" in capsys.readouterr().err

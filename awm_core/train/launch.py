"""Entry point that ``accelerate launch`` runs on every process: ``-m awm_core.train.launch RUN_DIR [--resume]``.

The run folder is self-contained, so training needs no catalog, no Prefect and no network:
``config.json`` (a ``TrainConfig``), ``environments.jsonl`` (one Environment bundle per line)
and ``tasks.json`` (``[[env_id, task_idx, text], ...]``). ``write_run_dir`` makes one.
Rank 0 writes ``result.json`` at the end; a crash leaves the metrics and rollouts already
written (each line is flushed and synced). ``--resume`` continues a killed run from its newest
complete checkpoint (``awm_core.train.resume``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from awm_core.models import Environment
from awm_core.train.config import TrainConfig


def write_run_dir(run_dir: str | Path, config: TrainConfig, environments: Sequence[Environment],
                  tasks: Sequence[tuple[str, int, str]]) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    with open(run_dir / "environments.jsonl", "w") as fh:
        for env in environments:
            fh.write(env.model_dump_json() + "\n")
    (run_dir / "tasks.json").write_text(json.dumps([list(t) for t in tasks]))
    return run_dir


def read_run_dir(run_dir: str | Path) -> tuple[TrainConfig, list[Environment], list[tuple[str, int, str]]]:
    run_dir = Path(run_dir)
    config = TrainConfig.load(run_dir / "config.json")
    envs = [Environment.from_json(line) for line in (run_dir / "environments.jsonl").read_text().splitlines()
            if line.strip()]
    tasks = [(e, int(i), t) for e, i, t in json.loads((run_dir / "tasks.json").read_text())]
    return config, envs, tasks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    resume = "--resume" in argv
    argv = [a for a in argv if a != "--resume"]
    if len(argv) != 1:
        print("usage: accelerate launch -m awm_core.train.launch RUN_DIR [--resume]", file=sys.stderr)
        return 2
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from awm_core.settings import load_settings
    from awm_core.train.trainer import run_training

    run_dir = Path(argv[0])
    config, envs, tasks = read_run_dir(run_dir)
    main_process = os.environ.get("RANK", "0") == "0"
    if main_process:  # held until this process ends: a second launch on the folder is refused
        from awm_core.train.resume import hold_run_lock

        hold_run_lock(run_dir)
    result: dict[str, Any] = run_training(config, envs, tasks, run_dir, load_settings(), resume=resume)
    if main_process:  # written whole or not at all: its presence means the run finished
        tmp = run_dir / "result.json.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, run_dir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

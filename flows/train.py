"""The train flow: GRPO on a gated catalog snapshot under ``accelerate launch``.

1. Refuse a snapshot without a passing quality-gate report (``GateRefused``).
2. Pick the split's tasks (the snapshot's stored split, or a new one that is published with
   the run), skipping tasks validation dropped and tasks without a verifier.
3. Write a self-contained run folder under ``AWM_HOME/runs/train-<run id>`` and run
   ``accelerate launch --config_file deployments/accelerate/<name>.yaml -m awm_core.train.launch``
   on it; every progress line goes to the Prefect log as it arrives.
4. Publish, as one catalog snapshot: per-step metrics (``training_runs``), the training
   episodes (``rollouts``), the split if it was new, and task telemetry (``task_telemetry``):
   tasks every episode completed (``always_solved``), tasks none did (``never_solved``) and
   tasks with environment errors (``env_errors``), for the next generation run to retire or
   regenerate.
5. Artifacts: the reward curve (image), a summary (markdown) and the per-step table.

``publish_run(run_dir)`` does step 4 alone, for a run folder whose flow died.
``run_train(None, resume=run_id)`` (flow parameter ``resume``) relaunches a killed run's folder
from its newest complete checkpoint (``awm_core.train.resume``), then publishes it once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger

from awm_core.agent import make_splits
from awm_core.agent.evaluation import plan_tasks
from awm_core.curation import task_telemetry_rows
from awm_core.errors import AWMError, GateRefused, SettingsError
from awm_core.report import data_uri, reward_curves_png
from awm_core.settings import Settings, get_settings
from awm_core.train.config import ACCELERATE_CONFIGS, TrainConfig
from awm_core.train.launch import read_run_dir, write_run_dir
from flows.artifacts import Report, publish_report

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_DIR = REPO / "deployments" / "accelerate"


def accelerate_config_path(name: str) -> Path:
    path = ACCELERATE_DIR / f"{name}.yaml" if name in ACCELERATE_CONFIGS else Path(name)
    if not path.exists():
        raise SettingsError(f"accelerate config {name!r} not found (use {', '.join(ACCELERATE_CONFIGS)} or a path)")
    return path


def resolve_snapshot(cat: Any, snapshot: int | None) -> int:
    """The snapshot to train on; refuses one whose newest gate report did not pass."""
    if snapshot is None:
        snapshot = cat.latest_gated_snapshot()
        if snapshot is None:
            raise GateRefused("no catalog snapshot has a passing quality-gate report; run `awm gate` first")
        return snapshot
    if not cat.gate_passed(int(snapshot)):
        raise GateRefused(f"snapshot {snapshot} has no passing quality-gate report; run `awm gate --snapshot "
                          f"{snapshot}` and fix what it reports before training on it")
    return int(snapshot)


def prepare_run(config: TrainConfig, settings: Settings, run_id: str) -> tuple[Path, int, list[dict[str, Any]]]:
    """Gate check, task plan and run folder. Returns (run folder, snapshot, split rows to publish)."""
    from storage.catalog import Catalog

    from awm_core.agent import check_conversation_mode
    from awm_core.interop.benchmarks import benchmark_categories, is_benchmark, trainable_tasks

    benchmark = is_benchmark(config.split)
    with Catalog.open(settings, read_only=True) as cat:
        if benchmark:
            # An imported benchmark is checked by its own ground-truth replay on import, not by the
            # gate for synthesized environments.
            snapshot = config.snapshot if config.snapshot is not None else cat.environment_snapshot()
            wanted = benchmark_categories(config.split)
            environments = [e for e in cat.environments(snapshot=snapshot)
                            if e.scenario.category in wanted and trainable_tasks(e)]
            stored = [{"env_id": e.id, "task_idx": i, "split": config.split, "seed": None}
                      for e in environments for i in trainable_tasks(e)]
        else:
            snapshot = resolve_snapshot(cat, config.snapshot)
            environments = list(cat.environments(snapshot=snapshot))
            stored = cat.rows("SELECT env_id, task_idx, split, seed FROM splits WHERE snapshot = ?", params=[snapshot])
    new_splits: list[dict[str, Any]] = []
    if not stored and not benchmark:
        stored = make_splits({e.id: [t.idx for t in e.tasks] for e in environments}, seed=config.split_seed,
                             by="environment")
        new_splits = [{"snapshot": snapshot, **r} for r in stored]
    by_id = {e.id: e for e in environments}
    plan, _ = plan_tasks(by_id, stored, "all" if benchmark else config.split)
    tasks = [(env_id, i, by_id[env_id].task(i).text) for env_id, idxs in plan.items() for i in idxs]
    if not tasks:
        raise AWMError(f"snapshot {snapshot} has no trainable task in split {config.split!r} "
                       "(tasks need a verifier and must not be dropped by validation)")
    # Conversation mode on a snapshot without user scenarios: one clear line here, not inside the launched run.
    check_conversation_mode(config.mode, [(by_id[e], by_id[e].task(int(i))) for e, i, _ in tasks], snapshot)
    used = {e for e, _, _ in tasks}
    run_dir = settings.runs_dir / f"train-{run_id}"
    config = config.replace(snapshot=snapshot, run_name=config.run_name or run_id)
    write_run_dir(run_dir, config, [e for e in environments if e.id in used], tasks)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "snapshot": snapshot,
                                                  "new_splits": new_splits}, default=str))
    return run_dir, snapshot, new_splits


def launch_command(run_dir: Path, config: TrainConfig, resume: bool = False) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command line and environment that train ``run_dir``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(accelerate_config_path(config.accelerate_config)), "-m", "awm_core.train.launch", str(run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
               p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return cmd + (["--resume"] if resume else []), env


def launch(run_dir: Path, config: TrainConfig, on_line: Callable[[str], None], resume: bool = False) -> None:
    """``accelerate launch`` the trainer on ``run_dir`` (``resume``: from its newest complete
    checkpoint); raises with the output's tail on failure."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "trl", "accelerate", "datasets")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise AWMError(f"training needs {', '.join(missing)}: install the train extra (pip install -e '.[train]')")
    cmd, env = launch_command(run_dir, config, resume)
    tail: list[str] = []
    with open(run_dir / "launch.log", "a" if resume else "w") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip()
                tail = (tail + [line])[-60:]
                if line.startswith(("step ", "warm start", "resuming from")) or "Error" in line:
                    on_line(line)
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if code != 0:
        raise AWMError(f"training exited with code {code}; last output:\n" + "\n".join(tail[-25:]))


def _stop(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: everything before it is intact
            continue
    return out


def metric_rows(run_id: str, snapshot: int, config: TrainConfig, metrics: list[dict[str, Any]],
                checkpoint_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for m in metrics:
        step = int(m["step"])
        ckpt = checkpoint_dir / f"checkpoint-{step}"
        if step == config.steps and (checkpoint_dir / "final").exists():
            ckpt = checkpoint_dir / "final"
        rows.append({
            "run_id": run_id, "step": step, "snapshot": snapshot,
            "reward_mean": m.get("reward"), "reward_std": m.get("reward_std"),
            "completion_rate": m.get("awm/completion_rate"), "format_error_rate": m.get("awm/format_error_rate"),
            "env_error_rate": m.get("awm/env_error_rate"), "kl": m.get("kl"),
            "tokens": int(m.get("awm/train_tokens") or 0), "rollout_s": m.get("awm/rollout_s"),
            "update_s": m.get("update_s"), "config_json": json.dumps({**config.to_dict(), "metrics": m}),
            "checkpoint": str(ckpt) if ckpt.exists() else None, "created_at": datetime.now(timezone.utc),
        })
    return rows


def rollout_rows(run_id: str, snapshot: int, config: TrainConfig, episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's episodes (as ``EpisodeResult.row`` wrote them) as ``rollouts`` rows."""
    from awm_core.agent.evaluation import EpisodeKey, rollout_row

    counter: dict[tuple, int] = defaultdict(int)
    rows = []
    for e in episodes:
        step = (e["step"], e["env_id"], e["task_idx"])
        counter[step] += 1
        idx = counter[step] - 1
        key = EpisodeKey(run_id, snapshot, e["env_id"], e["task_idx"], config.split, "grpo", config.model, idx,
                         e.get("mode") or "message")
        # Runs written before the rows carried the interface and window have them in the config only.
        columns = {"interface": config.interface, "window": config.window, **e}
        rows.append(rollout_row(key, columns=columns,
                                rollout_id=f"{run_id}/{e['step']}/{e['rank']}/{e['env_id']}/{e['task_idx']}/{idx}"))
    return rows


def _json_or_none(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def publish_run(run_dir: str | Path, settings: Settings | None = None, flow_run_id: str | None = None) -> dict[str, Any]:
    """Publish a run folder's metrics, episodes, new split and telemetry as one catalog snapshot."""
    from storage.catalog import Catalog, made_by

    settings = settings or get_settings()
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    config, _, _ = read_run_dir(run_dir)
    run_id, snapshot = info["run_id"], int(info["snapshot"])
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else run_dir / "checkpoints"
    metrics = _jsonl(run_dir / "metrics.jsonl")
    episodes = [e for p in sorted(run_dir.glob("rollouts.rank*.jsonl")) for e in _jsonl(p)]
    m_rows = metric_rows(run_id, snapshot, config, metrics, ckpt_dir)
    r_rows = rollout_rows(run_id, snapshot, config, episodes)
    t_rows = task_telemetry_rows(run_id, r_rows)
    with Catalog.open(settings) as cat:
        with cat.publish(made_by=made_by(settings, flow_run_id, train_run_id=run_id, trained_snapshot=snapshot,
                                         sandbox=_json_or_none(run_dir / "sandbox.json")),
                         message=f"train run {run_id} on snapshot {snapshot}: {len(m_rows)} steps") as pub:
            pub.add_training_metrics(m_rows)
            pub.add_rollouts(r_rows)
            pub.add_task_telemetry(t_rows)
            if info.get("new_splits"):
                pub.add_splits(info["new_splits"])
    final = ckpt_dir / "final"
    # Recorded so a resume refuses a run whose rows are already in the catalog (republishing the
    # same folder is harmless: training_runs replace by (run_id, step), rollouts keep their ids).
    info["published"] = {"catalog_snapshot": pub.snapshot_id, "steps": len(m_rows),
                         "finished": (run_dir / "result.json").exists()}
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info, default=str))
    os.replace(tmp, run_dir / "run.json")
    return {"run_id": run_id, "snapshot": snapshot, "catalog_snapshot": pub.snapshot_id, "steps": len(m_rows),
            "episodes": len(episodes), "telemetry": len(t_rows), "run_dir": str(run_dir),
            "final_checkpoint": str(final) if final.exists() else None, "metrics": metrics}


STEP_COLUMNS = ("step", "reward", "reward_std", "awm/completion_rate", "awm/format_error_rate", "awm/env_error_rate",
                "kl", "awm/train_tokens", "awm/rollout_s", "update_s")


def summary_markdown(summary: dict[str, Any], config: TrainConfig, image_src: str | None = None) -> str:
    last = summary["metrics"][-1] if summary["metrics"] else {}

    def f(v: Any, fmt: str = "{:.3f}") -> str:
        return "n/a" if v is None else fmt.format(v)

    return "\n".join([
        f"# Training run {summary['run_id']}", "",
        f"Snapshot {summary['snapshot']}, split `{config.split}`, model `{config.model}`, {summary['steps']} steps, "
        f"{summary['episodes']} episodes (group {config.group_size} x {config.tasks_per_step} tasks per step, "
        f"window {config.window}, max {config.max_turns} turns).", "",
        f"Last step: reward {f(last.get('reward'))} ± {f(last.get('reward_std'))}, completion rate "
        f"{f(last.get('awm/completion_rate'), '{:.0%}')}, format errors {f(last.get('awm/format_error_rate'), '{:.0%}')}, "
        f"environment errors {f(last.get('awm/env_error_rate'), '{:.0%}')}.", "",
        f"Final checkpoint: `{summary['final_checkpoint']}`; task telemetry rows: {summary['telemetry']}; "
        f"catalog snapshot {summary['catalog_snapshot']}.",
        *(["", f"![reward per step]({image_src})"] if image_src else []),
    ])


def resume_target(settings: Settings, run_id: str) -> tuple[Path, TrainConfig, int]:
    """(run folder, its config, checkpoint step) of a run that can be resumed; ``ResumeError``
    names what is wrong otherwise (unknown run, finished or published run, no checkpoint)."""
    from awm_core.train.resume import LOCK, ResumeError, require_resumable, run_is_active

    run_dir = settings.runs_dir / f"train-{run_id}"
    if not (run_dir / "run.json").exists():
        known = sorted(p.name[len("train-"):] for p in settings.runs_dir.glob("train-*")
                       if (p / "run.json").exists()) if settings.runs_dir.is_dir() else []
        raise ResumeError(f"no training run {run_id!r} in {settings.runs_dir}; runs there: "
                          f"{', '.join(known) if known else 'none'}")
    if run_is_active(run_dir):
        raise ResumeError(f"training run {run_id} is still running (a process holds {run_dir / LOCK}); "
                          "stop it before resuming")
    info = json.loads((run_dir / "run.json").read_text())
    published = info.get("published")
    if published and published.get("finished"):
        raise ResumeError(f"training run {run_id} already finished and was published (catalog snapshot "
                          f"{published['catalog_snapshot']}); nothing to resume")
    if (run_dir / "result.json").exists():
        raise ResumeError(f"training run {run_id} already finished; publish it with awm train --publish {run_dir}")
    if published:
        raise ResumeError(f"training run {run_id} was published unfinished (catalog snapshot "
                          f"{published['catalog_snapshot']}, {published['steps']} steps); resuming would publish "
                          "its replayed steps over those rows: start a new run")
    config = TrainConfig.load(run_dir / "config.json")
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else run_dir / "checkpoints"
    step, _ = require_resumable(run_dir, ckpt_dir, config.save_steps)
    return run_dir, config, step


def run_train(config: TrainConfig | None, settings: Settings | None = None, *, flow_run_id: str | None = None,
              on_line: Callable[[str], None] = print, resume: str | None = None) -> dict[str, Any]:
    """The flow's work as a plain function: prepare, launch, publish. ``resume``: a run id whose
    folder is relaunched from its newest complete checkpoint (its own config, tasks and split; no
    new run id), then published once."""
    settings = settings or get_settings()
    if resume:
        if config is not None:
            raise SettingsError("a resumed run keeps the settings in its folder: give a run id or a config, not both")
        run_dir, config, step = resume_target(settings, resume)
        on_line(f"resuming training run {resume} from step {step} of {config.steps}: {run_dir}")
        launch(run_dir, config, on_line, resume=True)
    else:
        if config is None:
            raise SettingsError("run_train needs a config (or a run id to resume)")
        run_id = uuid.uuid4().hex[:12]
        run_dir, snapshot, _ = prepare_run(config, settings, run_id)
        on_line(f"training run {run_id} on snapshot {snapshot}: {run_dir}")
        launch(run_dir, config, on_line)
    summary = publish_run(run_dir, settings, flow_run_id)
    reward_curves_png({"run": summary["metrics"]}, run_dir / "reward_curve.png")
    summary["reward_curve"] = str(run_dir / "reward_curve.png")
    return summary


@flow(name="train")
def train(snapshot: int | None = None, config: dict[str, Any] | None = None, preset: str | None = None,
          resume: str | None = None) -> dict[str, Any]:
    """GRPO training on a gated snapshot. ``config`` holds ``TrainConfig`` fields (and may name a
    ``preset``); ``snapshot`` overrides the config's; with neither config nor preset the ``tiny``
    preset runs. ``resume``: the id of a killed run to continue from its last checkpoint (the
    run's own settings; give no other parameter)."""
    from prefect.runtime import flow_run

    log = get_run_logger()
    if resume and (snapshot is not None or config or preset):
        raise SettingsError("resume takes the run's own settings: give no snapshot, config or preset with it")
    data = dict(config or {})
    if preset or not data:
        # No settings at all (a bare trigger) runs the small CPU preset rather than the dataclass
        # defaults, which describe a 1024-episode step.
        data.setdefault("preset", preset or "tiny")
    if snapshot is not None:
        data["snapshot"] = int(snapshot)
    cfg = None if resume else TrainConfig.from_dict(data, source="train parameters")
    summary = run_train(cfg, flow_run_id=str(flow_run.id) if flow_run.id else None, on_line=log.info, resume=resume)
    cfg = cfg or TrainConfig.load(Path(summary["run_dir"]) / "config.json")
    png = Path(summary["reward_curve"]).read_bytes()
    publish_report(Report(
        key="train-summary", markdown=summary_markdown(summary, cfg, data_uri(png)),
        description=f"training run {summary['run_id']}",
        tables={"train-steps": ([{k: m.get(k) for k in STEP_COLUMNS} for m in summary["metrics"]], "per-step metrics")},
        chart=png, chart_key="train-reward-curve", chart_description=f"reward per step of run {summary['run_id']}"),
        log)
    log.info("training run %s done: %s steps, final checkpoint %s", summary["run_id"], summary["steps"],
             summary["final_checkpoint"])
    return {k: v for k, v in summary.items() if k != "metrics"}

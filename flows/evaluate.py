"""The ``evaluate`` flow: run a policy on a catalog snapshot's tasks and record the rollouts.

One ``SandboxPool`` serves every episode; the engine (``awm_core.agent.evaluation``) runs one
Prefect task per environment (``tasks/evaluation.py``) and streams each finished episode to
``AWM_HOME/runs/<run_id>/rollouts.jsonl`` at once, so nothing is lost if the process dies. At the
end all rollouts (and the per-call timings) are published to the catalog as ONE snapshot, and
the summary (``awm_core.agent.eval_summary``) as Prefect artifacts: markdown report, table by
environment, image of the reward distribution, and a progress bar while it runs.

``config.mode`` says how synthesized tasks are played: ``message`` (one message, the default) or
``conversation`` (with the user simulator, for tasks with a user scenario; refused when no planned
task has one); each rollout row records its episode's ``mode``. The summary compares the two modes
when the catalog holds the same policy's rollouts of the other mode on the same snapshot
(``evaluation_summary``).

``run_evaluation`` is the same work without Prefect (tests, notebooks); ``evaluate`` is the
flow, whose parameters are ``EvalConfig``'s fields; ``awm eval`` builds that config from its options.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from awm_core.agent import LLMJudge, check_conversation_mode, check_user_role, make_splits, plays_as_conversation
from awm_core.agent.eval_summary import reward_plot_png, summarize, summary_markdown
from awm_core.agent.evaluation import (
    EvalConfig, EvalResult, EvalRun, add_progress_listener, plan_tasks, remove_progress_listener, thread_runner,
)
from awm_core.curation import task_telemetry_rows
from awm_core.errors import AWMError
from awm_core.models import Environment
from awm_core.report import data_uri
from awm_core.settings import Settings, get_settings
from flows.artifacts import Report, publish_report

def stored_split_rows(catalog: Any, snapshot: int) -> list[dict[str, Any]]:
    return catalog.rows("SELECT env_id, task_idx, split, seed FROM splits WHERE snapshot = ?", params=[snapshot])


def split_rows_for(catalog: Any, environments: dict[str, Environment], snapshot: int,
                   config: EvalConfig) -> tuple[list[dict[str, Any]], bool]:
    """The split rows stored for ``snapshot``, or a new default split (and True: it must be published)."""
    stored = stored_split_rows(catalog, snapshot)
    if stored:
        return stored, False
    rows = make_splits({e: [t.idx for t in env.tasks] for e, env in environments.items()}, seed=config.seed,
                       by=config.split_by)
    return [{"snapshot": snapshot, **r} for r in rows], True


def run_evaluation(config: EvalConfig, *, settings: Settings | None = None, run_id: str | None = None,
                   flow_run_id: str | None = None, runner: Callable | None = None,
                   on_update: Callable[[dict[str, Any]], None] | None = None, log: Any = None) -> EvalResult:
    """Load the snapshot, run every planned episode, publish the rollouts as one snapshot.

    ``runner(run, plan)`` runs the environments and returns ``[(rows, calls, failures), ...]``; the
    default runs them on threads. The flow passes one that submits a Prefect task per environment.
    """
    from awm_core.runtime import SandboxPool
    from storage.catalog import Catalog, made_by

    settings = settings or get_settings()
    config = config.for_benchmark()
    run_id = run_id or f"eval-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    started = time.perf_counter()
    with Catalog.open(settings, read_only=True) as cat:
        snapshot = config.snapshot if config.snapshot is not None else cat.environment_snapshot()
        ids = cat.environment_ids(snapshot)
        if config.env_ids:
            unknown = sorted(set(config.env_ids) - set(ids))
            if unknown:
                raise AWMError(f"environment(s) {', '.join(unknown)} not in snapshot {snapshot}")
            ids = [i for i in ids if i in set(config.env_ids)]
        wanted = config.benchmark_categories()
        if wanted is not None:
            of = {r["env_id"]: r["category"] for r in cat.rows("SELECT env_id, category FROM scenarios",
                                                                 snapshot=snapshot)}
            ids = [i for i in ids if of.get(i) in wanted]
            if not ids:
                raise AWMError(f"snapshot {snapshot} holds no environments of {config.benchmark}; "
                               f"import them first: awm import {config.benchmark.partition(':')[0]}")
        if not ids:
            raise AWMError(f"snapshot {snapshot} holds no environments to evaluate")
        environments = {e: cat.get_environment(e, snapshot) for e in ids}
        if config.split == "all":  # no split needed, but rows still name the side a stored split gives them
            split_rows, new_split = stored_split_rows(cat, snapshot), False
        else:
            split_rows, new_split = split_rows_for(cat, environments, snapshot, config)
    plan, notes = plan_tasks(environments, [] if config.split == "all" else split_rows, config.split,
                             need_solution=config.policy == "reference", max_per_env=config.max_tasks_per_env)
    if log:
        for n in notes[:20]:
            log.warning("skipped %s", n)
    planned = [(environments[e], environments[e].task(i)) for e, idxs in plan.items() for i in idxs]
    one_message = check_conversation_mode(config.mode, planned, snapshot)
    if one_message and log:
        log.warning("%d task(s) have no user scenario and are played as one message (%s%s)", len(one_message),
                    ", ".join(t.id for t in one_message[:5]), ", ..." if len(one_message) > 5 else "")
    if config.user == "llm":
        check_user_role(settings, [t for env, t in planned if plays_as_conversation(env, t, config.mode)])
    total = sum(len(v) for v in plan.values()) * config.episodes_per_task
    if total == 0:
        raise AWMError(f"no tasks to evaluate in snapshot {snapshot} (split {config.split!r}, policy {config.policy!r})"
                       + (f"; skipped: {'; '.join(notes[:5])}" if notes else ""))
    split_of = {(r["env_id"], int(r["task_idx"])): r["split"] for r in split_rows}
    result = EvalResult(run_id=run_id, snapshot=snapshot, new_split_rows=split_rows if new_split else [])
    judge = None
    if config.judge:
        judge = LLMJudge.from_settings(settings, ledger=settings.runs_dir / run_id / "llm_calls.jsonl")
    gen = settings.generation
    dask_address = config.dask_address or (gen.dask_address if gen.task_runner == "dask" else None)
    if dask_address:
        from flows.scaleout import dask_eval_runner

        runner = dask_eval_runner(dask_address)
    with SandboxPool(settings.sandbox) as pool:
        sandbox = pool.protections()
        run = EvalRun(config, settings, environments, split_of, pool=pool, run_id=run_id, snapshot=snapshot,
                      judge=judge, total=total, on_update=on_update)
        try:
            if log:
                log.info("evaluating %d episode(s) on %d environment(s) of snapshot %d; rollouts stream to %s",
                         total, len(plan), snapshot, run.jsonl)
            parts = (runner or thread_runner)(run, plan)
        finally:
            run.close()
    for rows, calls, failures in parts:
        result.rows.extend(rows)
        result.tool_calls.extend(calls)
        result.failures.extend(failures)
    if not result.rows:
        raise AWMError(f"every episode failed; first failure: {result.failures[0] if result.failures else '?'}")
    result.rows.sort(key=lambda r: r["rollout_id"])
    with Catalog.open(settings) as cat:
        extra = {"dask_workers": sorted(run.workers)} if dask_address else {}
        with cat.publish(made_by=made_by(settings, flow_run_id, evaluate_run=run_id, sandbox=sandbox, **extra),
                         message=f"evaluate {config.policy} ({run.model}) on snapshot {snapshot}: "
                                 f"{len(result.rows)} rollout(s)") as pub:
            pub.add_rollouts(result.rows)
            pub.add_tool_calls(result.tool_calls)
            pub.add_task_telemetry(task_telemetry_rows(run_id, result.rows))
            if result.new_split_rows:
                pub.add_splits(result.new_split_rows)
            if judge is not None and (settings.runs_dir / run_id / "llm_calls.jsonl").exists():
                from awm_core.llm import read_ledger

                pub.add_llm_calls(read_ledger(settings.runs_dir / run_id / "llm_calls.jsonl"))
        result.published_snapshot = pub.snapshot_id
    result.wall_s = time.perf_counter() - started
    return result


def other_mode_rows(catalog: Any, result: EvalResult, config: EvalConfig, settings: Settings) -> list[dict[str, Any]]:
    """Rollouts of earlier runs of the same policy and model on the same snapshot in the other mode(s) than
    ``config.mode`` (a row without a mode is a message), for the summary's message vs conversation table."""
    return catalog.rows(
        "SELECT run_id, env_id, task_idx, coalesce(mode, 'message') AS mode, reward, label FROM rollouts "
        "WHERE snapshot = ? AND policy = ? AND model = ? AND run_id <> ? AND coalesce(mode, 'message') <> ?",
        params=[result.snapshot, config.policy, config.model_name(settings), result.run_id, config.mode])


def evaluation_summary(result: EvalResult, config: EvalConfig, settings: Settings) -> dict[str, Any]:
    """``summarize`` with the snapshot's categories and, where the catalog holds them, the same policy's
    rollouts in the other mode (``other_mode_rows``) for the message vs conversation table."""
    from storage.catalog import Catalog

    with Catalog.open(settings, read_only=True) as cat:
        categories = {r["env_id"]: r["category"] for r in cat.rows("SELECT env_id, category FROM scenarios",
                                                                     snapshot=result.snapshot)}
        others = other_mode_rows(cat, result, config, settings)
    return summarize(result, categories=categories, mode=config.mode, other_rows=others)


class _ProgressArtifact:
    """Updates a Prefect progress artifact at most once a second, never backwards."""

    def __init__(self):
        from prefect.artifacts import create_progress_artifact

        self.id = create_progress_artifact(progress=0.0, key="evaluation-progress", description="episodes done")
        self.last = 0.0
        self.sent = 0.0
        self._lock = threading.Lock()

    def __call__(self, state: dict[str, Any]) -> None:
        value = 100.0 * state["done"] / max(1, state["total"])
        now = time.monotonic()
        if value < 100.0 and now - self.last < 1.0:
            return
        self.set(value)

    def set(self, value: float) -> None:
        # Episode threads report concurrently; the lock keeps a late, lower value from landing last.
        with self._lock:
            if value <= self.sent:
                return
            self.last = time.monotonic()
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self.id, progress=value)
                self.sent = value
            except Exception:
                pass


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=32))
@EvalConfig.as_parameters
def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run ``config.policy`` on the tasks of ``config.split`` in ``config.snapshot`` (latest by
    default) and publish the rollouts. Policies: ``reference`` (replays reference solutions; should
    score 1.0), ``random`` (random schema-valid calls), ``openai`` (an OpenAI-compatible endpoint
    with native tool calls) and ``openai-text`` (the same endpoint without tools; the model writes
    ``<tool_call>`` blocks). Returns the summary (see ``awm_core.agent.eval_summary.summarize``).
    """
    from prefect.runtime import flow_run

    from tasks.evaluation import prefect_runner

    log = get_run_logger()
    settings = get_settings()
    progress = _ProgressArtifact()
    result = run_evaluation(config, settings=settings, flow_run_id=str(flow_run.id) if flow_run.id else None,
                            runner=prefect_runner, on_update=progress, log=log)
    progress.set(100.0)
    summary = evaluation_summary(result, config, settings)
    png = reward_plot_png(result.rows)
    (settings.runs_dir / result.run_id / "reward_distribution.png").write_bytes(png)
    (settings.runs_dir / result.run_id / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    publish_report(Report(
        key="evaluation-summary", markdown=summary_markdown(summary, config.for_benchmark(), data_uri(png)),
        description=f"evaluate {config.policy} on snapshot {summary['snapshot']}",
        tables={"evaluation-by-scenario": (summary["by_scenario"],
                                           "reward, completion rate and mean turns per scenario")},
        chart=png, chart_key="evaluation-reward-distribution",
        chart_description="episodes per reward value, by outcome label"), log)
    o = summary["overall"]
    log.info("%d episode(s): mean reward %.3f, completion %.1f%%, %d failed; rollouts in snapshot %s",
             o["episodes"], o["mean_reward"], 100 * o["completion_rate"], o["failed"], result.published_snapshot)
    return summary


def publish_splits(settings: Settings | None = None, snapshot: int | None = None, *, by: str = "environment",
                   seed: int = 0, ratio: float = 0.8, flow_run_id: str | None = None) -> dict[str, Any]:
    """Make the train/val split of ``snapshot``'s tasks and store it in the splits table (one publish)."""
    from storage.catalog import Catalog, made_by

    settings = settings or get_settings()
    with Catalog.open(settings) as cat:
        snap = snapshot if snapshot is not None else cat.environment_snapshot()
        tasks = defaultdict(list)
        # SELECT *: snapshots from before curation have no retired_reason column.
        for r in cat.rows("SELECT * FROM tasks WHERE dropped_reason IS NULL", snapshot=snap):
            if not r.get("retired_reason"):
                tasks[r["env_id"]].append(r["task_idx"])
        if not tasks:
            raise AWMError(f"snapshot {snap} has no tasks to split")
        rows = [{"snapshot": snap, **r} for r in make_splits(tasks, seed=seed, ratio=ratio, by=by)]
        with cat.publish(made_by=made_by(settings, flow_run_id, split_by=by, seed=seed, ratio=ratio),
                         message=f"splits of snapshot {snap} by {by} (seed {seed}, ratio {ratio})") as pub:
            pub.add_splits(rows)
    counts = Counter(r["split"] for r in rows)
    return {"snapshot": snap, "published_snapshot": pub.snapshot_id, "by": by, "seed": seed, "ratio": ratio,
            "train": counts["train"], "val": counts["val"],
            "environments": {s: len({r["env_id"] for r in rows if r["split"] == s}) for s in ("train", "val")}}


__all__ = ["EvalConfig", "EvalResult", "add_progress_listener", "evaluate", "evaluation_summary", "other_mode_rows",
           "publish_splits", "remove_progress_listener", "run_evaluation", "summarize", "summary_markdown"]

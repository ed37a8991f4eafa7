"""The ``evaluate`` flow: run a policy on a catalog snapshot's tasks and record the rollouts.

One ``SandboxPool`` serves every episode. Episodes are grouped one Prefect task per environment
(a task run costs about 10 ms, an episode with a scripted policy a few ms) and run in parallel
on a shared thread pool of ``concurrency`` threads. Each finished episode is appended to
``AWM_HOME/runs/<run_id>/rollouts.jsonl`` at once, so nothing is lost if the process dies; at
the end all rollouts (and the per-call timings) are published to the catalog as ONE snapshot,
and a summary is published as Prefect artifacts: markdown report, table by environment, image
of the reward distribution, and a progress bar while it runs.

``run_evaluation`` is the same work without Prefect tasks (used by the flow's tasks and tests);
``evaluate`` is the flow; ``awm eval`` calls the flow with a progress display.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import statistics
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from awm_core.agent import (
    LLMJudge, OpenAIChatPolicy, RandomPolicy, ReferencePolicy, TextToolCallPolicy, make_splits, reward_for,
    run_episode, select, verify_episode,
)
from awm_core.agent.interfaces import INTERFACES
from awm_core.agent.rewards import LABELS
from awm_core.errors import AWMError
from awm_core.models import Environment
from awm_core.settings import Settings, get_settings

POLICIES = ("reference", "random", "openai", "openai-text")
SPLITS = ("all", "train", "val")
SPLIT_BY = ("environment", "task")


# --------------------------------------------------------------------------- parameters


@dataclass
class EvalConfig:
    """The evaluate flow's parameters, checked up front so a typo fails before any work."""

    snapshot: int | None = None
    split: str = "val"
    policy: str = "reference"
    base_url: str | None = None
    model: str | None = None
    episodes_per_task: int = 1
    concurrency: int = 8
    window: int | None = 3
    interface: str = "direct"
    max_turns: int = 20
    judge: bool = False
    env_ids: list[str] | None = None
    split_by: str = "environment"
    seed: int = 0
    max_tasks_per_env: int | None = None

    def check(self) -> None:
        problems = []
        if self.policy not in POLICIES:
            problems.append(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.split not in SPLITS:
            problems.append(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.split_by not in SPLIT_BY:
            problems.append(f"split_by must be one of {', '.join(SPLIT_BY)}, got {self.split_by!r}")
        if self.interface not in INTERFACES:
            problems.append(f"interface must be one of {', '.join(INTERFACES)}, got {self.interface!r}")
        for name in ("episodes_per_task", "concurrency", "max_turns"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.window is not None and self.window < 0:
            problems.append(f"window must be >= 0 or None (keep all turns), got {self.window}")
        if self.max_tasks_per_env is not None and self.max_tasks_per_env < 1:
            problems.append(f"max_tasks_per_env must be at least 1, got {self.max_tasks_per_env}")
        if problems:
            raise AWMError("invalid evaluate parameters: " + "; ".join(problems))

    def model_name(self, settings: Settings) -> str:
        if self.policy == "reference":
            return "reference-solution"
        if self.policy == "random":
            return f"random-seed{self.seed}"
        return self.model or settings.llm.policy.model


# --------------------------------------------------------------------------- progress


_listeners: list[Callable[[dict[str, Any]], None]] = []


def add_progress_listener(fn: Callable[[dict[str, Any]], None]) -> None:
    """Call ``fn({"done", "total", "failed", "mean_reward", "completed"})`` after every episode."""
    _listeners.append(fn)


def remove_progress_listener(fn: Callable[[dict[str, Any]], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


class _Progress:
    def __init__(self, total: int, on_update: Callable[[dict[str, Any]], None] | None = None):
        self.total = total
        self.done = self.failed = self.completed = 0
        self.reward_sum = 0.0
        self._lock = threading.Lock()
        self._on_update = on_update

    def add(self, row: dict[str, Any] | None) -> None:
        with self._lock:
            self.done += 1
            if row is None:
                self.failed += 1
            else:
                self.reward_sum += row["reward"]
                self.completed += row["label"] == "completed"
            scored = self.done - self.failed
            state = {"done": self.done, "total": self.total, "failed": self.failed, "completed": self.completed,
                     "mean_reward": self.reward_sum / scored if scored else None}
        for fn in list(_listeners):
            try:
                fn(state)
            except Exception:  # a display must never break a run
                pass
        if self._on_update is not None:
            self._on_update(state)


# --------------------------------------------------------------------------- rows


def rollout_row(*, run_id: str, snapshot: int, env_id: str, task_idx: int, split: str | None, policy: str,
                model: str, episode_idx: int, episode, outcome, duration_s: float) -> dict[str, Any]:
    """A row of the catalog's ``rollouts`` table."""
    error = outcome.error or episode.error
    if episode.termination not in ("final_answer",) and not error:
        error = episode.termination
    return {
        "rollout_id": f"{run_id}/{env_id}/{task_idx}/{episode_idx}", "run_id": run_id, "snapshot": snapshot,
        "env_id": env_id, "task_idx": task_idx, "split": split, "policy": policy, "model": model,
        "episode_idx": episode_idx, "reward": outcome.reward, "label": outcome.label, "env_error": outcome.env_error,
        "turns": len(episode.turns), "prompt_tokens": episode.prompt_tokens,
        "completion_tokens": episode.completion_tokens, "tool_calls": episode.tool_call_count,
        "duration_s": duration_s, "env_time_s": episode.env_s, "initial_digest": episode.initial_digest,
        "final_digest": episode.final_digest, "final_answer": episode.final_answer, "error": error,
        "termination": episode.termination, "interface": episode.interface, "window": episode.window,
        "verifier_evidence": outcome.verifier_evidence, "judge_reasoning": outcome.judge_reasoning,
        "messages_json": json.dumps(episode.messages, ensure_ascii=False, default=str),
        "created_at": datetime.now(timezone.utc),
    }


def tool_call_rows(rollout_id: str, env_id: str, episode) -> list[dict[str, Any]]:
    """Rows of the catalog's ``tool_calls`` table (one per call the episode made)."""
    rows, i = [], 0
    for turn in episode.turns:
        for r in turn.results:
            rows.append({"rollout_id": rollout_id, "call_idx": i, "env_id": env_id, "tool": r.tool or "list_tools",
                         "ok": r.ok, "error_kind": r.error_kind, "latency_s": r.env_s,
                         "created_at": datetime.now(timezone.utc)})
            i += 1
    return rows


def load_failure_row(*, run_id: str, snapshot: int, env_id: str, task_idx: int, split: str | None, policy: str,
                     model: str, episode_idx: int, error: str, settings: Settings) -> dict[str, Any]:
    """An environment that does not load still gets its rollouts, as environment errors."""
    return {
        "rollout_id": f"{run_id}/{env_id}/{task_idx}/{episode_idx}", "run_id": run_id, "snapshot": snapshot,
        "env_id": env_id, "task_idx": task_idx, "split": split, "policy": policy, "model": model,
        "episode_idx": episode_idx, "reward": reward_for("environment_error", settings), "label": "environment_error",
        "env_error": True, "turns": 0, "prompt_tokens": 0, "completion_tokens": 0, "tool_calls": 0,
        "duration_s": 0.0, "env_time_s": 0.0, "initial_digest": None, "final_digest": None, "final_answer": None,
        "error": f"environment failed to load: {error}", "messages_json": "[]", "created_at": datetime.now(timezone.utc),
    }


# --------------------------------------------------------------------------- the run


@dataclass
class EvalResult:
    run_id: str
    snapshot: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    new_split_rows: list[dict[str, Any]] = field(default_factory=list)
    published_snapshot: int | None = None
    wall_s: float = 0.0


class EvalRun:
    """What one evaluation shares: the pool, the environments, the policy, the judge, the output file."""

    def __init__(self, config: EvalConfig, settings: Settings, environments: dict[str, Environment],
                 split_of: dict[tuple[str, int], str], *, pool: Any, run_id: str, snapshot: int,
                 judge: LLMJudge | None = None, total: int = 0,
                 on_update: Callable[[dict[str, Any]], None] | None = None):
        self.config = config
        self.settings = settings
        self.environments = environments
        self.split_of = split_of
        self.pool = pool
        self.run_id = run_id
        self.snapshot = snapshot
        self.judge = judge
        self.model = config.model_name(settings)
        self.out_dir = settings.runs_dir / run_id
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "rollouts.jsonl"
        self._write_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="episode")
        self.progress = _Progress(total, on_update)
        self._client = self._make_client()

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def _make_client(self):
        """The endpoint client shared by the episodes of openai policies (one connection pool)."""
        c, role = self.config, self.settings.llm.policy
        if c.policy not in ("openai", "openai-text"):
            return None
        base_url = c.base_url or role.base_url
        if not base_url:
            raise AWMError(f"policy {c.policy!r} needs an endpoint: pass base_url (awm eval --base-url URL) or set "
                           "AWM_LLM__POLICY__BASE_URL")
        import openai

        api_key = role.api_key.get_secret_value() if role.api_key else None
        return openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=role.timeout_s, max_retries=2)

    def policy_for(self, env: Environment, task_idx: int, episode_idx: int):
        c, role = self.config, self.settings.llm.policy
        if c.policy in ("openai", "openai-text"):
            headers = EpisodeHeaders(env.id, task_idx)
            kw = dict(temperature=role.temperature, max_tokens=min(role.max_tokens, 4096), headers=headers,
                      client=self._client)
            if c.policy == "openai":
                return OpenAIChatPolicy(None, self.model, **kw)
            return TextToolCallPolicy.for_endpoint(None, self.model, **kw)
        if c.policy == "reference":
            return ReferencePolicy(env.solution(task_idx))
        # str hashes change per process; a digest keeps random runs reproducible.
        key = f"{c.seed}/{env.id}/{task_idx}/{episode_idx}".encode()
        return RandomPolicy(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))

    def run_environment(self, env_id: str, task_idxs: list[int]) -> tuple[list[dict], list[dict], list[str]]:
        """Every episode of one environment (on the shared thread pool); rows, tool-call rows, failures."""
        env = self.environments[env_id]
        jobs = [(i, k) for i in task_idxs for k in range(self.config.episodes_per_task)]
        try:
            handle = self.pool.load(env)
        except AWMError as exc:
            rows = [load_failure_row(run_id=self.run_id, snapshot=self.snapshot, env_id=env_id, task_idx=i,
                                     split=self.split_of.get((env_id, i)), policy=self.config.policy, model=self.model,
                                     episode_idx=k, error=str(exc)[:2000], settings=self.settings) for i, k in jobs]
            for row in rows:
                self._record(row, None, None)
            return rows, [], []
        futures = [self.executor.submit(self.run_one, env, handle, i, k) for i, k in jobs]
        rows, calls, failures = [], [], []
        for f in futures:
            row, call_rows, failure = f.result()
            if row is not None:
                rows.append(row)
                calls.extend(call_rows)
            if failure:
                failures.append(failure)
        return rows, calls, failures

    def run_one(self, env: Environment, handle: Any, task_idx: int, episode_idx: int):
        started = time.perf_counter()
        try:
            with handle.open_session() as session:
                episode = run_episode(self.policy_for(env, task_idx, episode_idx), session, env.task(task_idx),
                                      handle.tools(), interface=self.config.interface,
                                      max_turns=self.config.max_turns, window=self.config.window)
            outcome = verify_episode(self.pool, env, task_idx, episode, self.settings, judge=self.judge)
        except Exception as exc:  # the policy endpoint failed: no verdict to record for this episode
            failure = f"{env.id}/{task_idx}/{episode_idx}: {type(exc).__name__}: {exc}"
            self._record(None, None, failure)
            return None, [], failure
        row = rollout_row(run_id=self.run_id, snapshot=self.snapshot, env_id=env.id, task_idx=task_idx,
                          split=self.split_of.get((env.id, task_idx)), policy=self.config.policy, model=self.model,
                          episode_idx=episode_idx, episode=episode, outcome=outcome,
                          duration_s=time.perf_counter() - started)
        call_rows = tool_call_rows(row["rollout_id"], env.id, episode)
        self._record(row, {"termination": episode.termination, "interface": episode.interface,
                           "window": episode.window, "policy_s": episode.policy_s, "loop_s": episode.loop_s,
                           "verifier_evidence": outcome.verifier_evidence, "judge_reasoning": outcome.judge_reasoning,
                           "verdict": outcome.verdict, "turn_details": [t.to_dict() for t in episode.turns]}, None)
        return row, call_rows, None

    def _record(self, row: dict | None, extra: dict | None, failure: str | None) -> None:
        line = {"failure": failure} if row is None else {**row, **(extra or {})}
        text = json.dumps(line, ensure_ascii=False, default=str)
        with self._write_lock:
            with open(self.jsonl, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        self.progress.add(row)


class EpisodeHeaders:
    """Per-request headers of an episode's policy calls: stage ``policy.<task_idx>``, the
    environment, and the turn as attempt. A gateway can trace by them, and the project's fixture
    server answers by them, so recorded policy conversations replay offline."""

    def __init__(self, env_id: str, task_idx: int):
        self.env_id, self.task_idx, self.turn = env_id, task_idx, 0

    def __call__(self, messages: list[dict[str, Any]]) -> dict[str, str]:
        self.turn += 1
        return {"X-AWM-Stage": f"policy.{self.task_idx}", "X-AWM-Scenario": self.env_id,
                "X-AWM-Attempt": str(self.turn)}


def plan_tasks(environments: dict[str, Environment], config: EvalConfig,
               split_rows: list[dict[str, Any]]) -> tuple[dict[str, list[int]], list[str]]:
    """The tasks to run per environment, and notes on what was left out and why."""
    chosen = select(split_rows, config.split) if split_rows else {e: [t.idx for t in env.tasks]
                                                                   for e, env in environments.items()}
    plan, notes = {}, []
    for env_id, idxs in chosen.items():
        env = environments.get(env_id)
        if env is None:
            continue
        dropped = set(env.validation.dropped_tasks) if env.validation else set()
        keep = []
        for i in idxs:
            if i in dropped:
                continue
            if env.verifier(i) is None:
                notes.append(f"{env_id}/{i}: no verifier")
            elif config.policy == "reference" and env.solution(i) is None:
                notes.append(f"{env_id}/{i}: no reference solution")
            else:
                keep.append(i)
        if config.max_tasks_per_env:
            keep = keep[: config.max_tasks_per_env]
        if keep:
            plan[env_id] = keep
    return plan, notes


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

    config.check()
    settings = settings or get_settings()
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
        if not ids:
            raise AWMError(f"snapshot {snapshot} holds no environments to evaluate")
        environments = {e: cat.get_environment(e, snapshot) for e in ids}
        if config.split == "all":  # no split needed, but rows still name the side a stored split gives them
            split_rows, new_split = stored_split_rows(cat, snapshot), False
        else:
            split_rows, new_split = split_rows_for(cat, environments, snapshot, config)
    plan, notes = plan_tasks(environments, config, [] if config.split == "all" else split_rows)
    if log:
        for n in notes[:20]:
            log.warning("skipped %s", n)
    total = sum(len(v) for v in plan.values()) * config.episodes_per_task
    if total == 0:
        raise AWMError(f"no tasks to evaluate in snapshot {snapshot} (split {config.split!r}, policy {config.policy!r})"
                       + (f"; skipped: {'; '.join(notes[:5])}" if notes else ""))
    split_of = {(r["env_id"], int(r["task_idx"])): r["split"] for r in split_rows}
    result = EvalResult(run_id=run_id, snapshot=snapshot, new_split_rows=split_rows if new_split else [])
    judge = None
    if config.judge:
        judge = LLMJudge.from_settings(settings, ledger=settings.runs_dir / run_id / "llm_calls.jsonl")
    with SandboxPool(settings.sandbox) as pool:
        sandbox = pool.protections()
        run = EvalRun(config, settings, environments, split_of, pool=pool, run_id=run_id, snapshot=snapshot,
                      judge=judge, total=total, on_update=on_update)
        try:
            if log:
                log.info("evaluating %d episode(s) on %d environment(s) of snapshot %d; rollouts stream to %s",
                         total, len(plan), snapshot, run.jsonl)
            parts = (runner or _thread_runner)(run, plan)
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
        with cat.publish(made_by=made_by(settings, flow_run_id, evaluate_run=run_id, sandbox=sandbox),
                         message=f"evaluate {config.policy} ({run.model}) on snapshot {snapshot}: "
                                 f"{len(result.rows)} rollout(s)") as pub:
            pub.add_rollouts(result.rows)
            pub.add_tool_calls(result.tool_calls)
            if result.new_split_rows:
                pub.add_splits(result.new_split_rows)
            if judge is not None and (settings.runs_dir / run_id / "llm_calls.jsonl").exists():
                from awm_core.llm import read_ledger

                pub.add_llm_calls(read_ledger(settings.runs_dir / run_id / "llm_calls.jsonl"))
        result.published_snapshot = pub.snapshot_id
    result.wall_s = time.perf_counter() - started
    return result


def _thread_runner(run: EvalRun, plan: dict[str, list[int]]):
    with ThreadPoolExecutor(max_workers=max(1, min(len(plan), 32)), thread_name_prefix="environment") as ex:
        return list(ex.map(lambda item: run.run_environment(*item), plan.items()))


# --------------------------------------------------------------------------- summary


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _group_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    labels = Counter(r["label"] for r in rows)
    n = len(rows)
    return {"episodes": n, "mean_reward": round(_mean([r["reward"] for r in rows]), 4),
            "completion_rate": round(labels["completed"] / n, 4) if n else 0.0,
            "partial_rate": round(labels["partially_completed"] / n, 4) if n else 0.0,
            "env_error_rate": round(sum(r["env_error"] for r in rows) / n, 4) if n else 0.0,
            "format_error_rate": round(labels["format_error"] / n, 4) if n else 0.0,
            "mean_turns": round(_mean([r["turns"] for r in rows]), 2)}


def summarize(result: EvalResult, environments: dict[str, Environment] | None = None,
              categories: dict[str, str] | None = None) -> dict[str, Any]:
    """Reward by scenario and category, completion rate, mean turns and error classes."""
    rows = result.rows
    cats = dict(categories or {})
    for e, env in (environments or {}).items():
        cats.setdefault(e, env.scenario.category)
    by_env, by_cat = defaultdict(list), defaultdict(list)
    for r in rows:
        by_env[r["env_id"]].append(r)
        by_cat[cats.get(r["env_id"], "general")].append(r)
    durations = [r["duration_s"] for r in rows]
    env_time = sum(r["env_time_s"] or 0.0 for r in rows)
    return {
        "run_id": result.run_id, "snapshot": result.snapshot, "published_snapshot": result.published_snapshot,
        "overall": {**_group_stats(rows), "failed": len(result.failures),
                    "reward_std": round(statistics.pstdev([r["reward"] for r in rows]), 4) if rows else 0.0,
                    "mean_tool_calls": round(_mean([r["tool_calls"] for r in rows]), 2),
                    "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
                    "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
                    "mean_episode_s": round(_mean(durations), 4),
                    "env_time_share": round(env_time / sum(durations), 4) if sum(durations) else 0.0,
                    "wall_s": round(result.wall_s, 2)},
        "by_scenario": [{"env_id": e, "category": cats.get(e, "general"), **_group_stats(rs)}
                        for e, rs in sorted(by_env.items())],
        "by_category": [{"category": c, **_group_stats(rs)} for c, rs in sorted(by_cat.items())],
        "labels": dict(Counter(r["label"] for r in rows).most_common()),
        "errors": dict(Counter((r["error"] or "").split(":")[0] for r in rows if r["error"]).most_common(10)),
        "failures": result.failures[:20],
    }


def reward_plot_png(rows: list[dict[str, Any]], title: str = "Reward distribution") -> bytes:
    """A bar chart of episode counts per reward value, stacked by label (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = LABELS
    colours = {"completed": "#2e7d32", "partially_completed": "#9ccc65", "agent_error": "#ef6c00",
               "environment_error": "#757575", "format_error": "#c62828"}
    values = sorted({r["reward"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    bottom = [0] * len(values)
    xs = [str(v) for v in values]
    for label in labels:
        counts = [sum(1 for r in rows if r["reward"] == v and r["label"] == label) for v in values]
        if any(counts):
            ax.bar(xs, counts, bottom=bottom, color=colours[label], label=label)
            bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("reward")
    ax.set_ylabel("episodes")
    ax.set_title(f"{title} (n={len(rows)}, mean={_mean([r['reward'] for r in rows]):.3f})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def summary_markdown(summary: dict[str, Any], config: EvalConfig, image_src: str | None = None) -> str:
    o = summary["overall"]
    lines = [
        f"# Evaluation `{summary['run_id']}`", "",
        f"Policy **{config.policy}** on snapshot {summary['snapshot']} (split `{config.split}`, interface "
        f"`{config.interface}`, window {config.window}, max turns {config.max_turns}, judge "
        f"{'on' if config.judge else 'off'}); rollouts published as snapshot {summary['published_snapshot']}.", "",
        "| episodes | mean reward | completion rate | partial | env errors | format errors | mean turns | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {o['episodes']} | {o['mean_reward']:.3f} | {o['completion_rate']:.1%} | {o['partial_rate']:.1%} | "
        f"{o['env_error_rate']:.1%} | {o['format_error_rate']:.1%} | {o['mean_turns']:.2f} | {o['failed']} |", "",
        "## Reward by scenario", "",
        "| scenario | category | episodes | mean reward | completion rate | mean turns | env errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {s['env_id']} | {s['category']} | {s['episodes']} | {s['mean_reward']:.3f} | "
              f"{s['completion_rate']:.1%} | {s['mean_turns']:.2f} | {s['env_error_rate']:.1%} |"
              for s in summary["by_scenario"]]
    lines += ["", "## Reward by category", "", "| category | episodes | mean reward | completion rate |",
              "|---|---:|---:|---:|"]
    lines += [f"| {c['category']} | {c['episodes']} | {c['mean_reward']:.3f} | {c['completion_rate']:.1%} |"
              for c in summary["by_category"]]
    lines += ["", "## Outcome classes", "", "| label | episodes |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary["labels"].items()]
    if summary["errors"]:
        lines += ["", "## Error classes", "", "| error | episodes |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in summary["errors"].items()]
    if summary["failures"]:
        lines += ["", "## Episodes that could not run", ""] + [f"- {f}" for f in summary["failures"]]
    if image_src:
        lines += ["", "## Reward distribution", "", f"![reward distribution]({image_src})"]
    return "\n".join(lines)


def publish_artifacts(summary: dict[str, Any], config: EvalConfig, png: bytes) -> None:
    """Markdown report (with the plot inline), table by scenario, and the plot as an image artifact."""
    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

    # The UI shows an image artifact as <img src=...> and renders markdown images, so a data URI
    # needs no file server; the same PNG is also saved beside the rollouts file.
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    create_markdown_artifact(key="evaluation-summary", markdown=summary_markdown(summary, config, data_uri),
                             description=f"evaluate {config.policy} on snapshot {summary['snapshot']}")
    create_table_artifact(key="evaluation-by-scenario", table=summary["by_scenario"],
                          description="reward, completion rate and mean turns per scenario")
    create_image_artifact(image_url=data_uri, key="evaluation-reward-distribution",
                          description="episodes per reward value, by outcome label")


# --------------------------------------------------------------------------- Prefect


_RUNS: dict[str, EvalRun] = {}


@task(task_run_name="episodes[{env_id}]", cache_policy=NO_CACHE)
def run_environment_episodes(run_key: str, env_id: str, task_idxs: list[int]):
    """All episodes of one environment (the shared run is looked up by key: it is not a parameter)."""
    return _RUNS[run_key].run_environment(env_id, task_idxs)


def _prefect_runner(run: EvalRun, plan: dict[str, list[int]]):
    _RUNS[run.run_id] = run
    try:
        futures = [run_environment_episodes.submit(run.run_id, env_id, idxs) for env_id, idxs in plan.items()]
        return [f.result() for f in futures]
    finally:
        _RUNS.pop(run.run_id, None)


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
def evaluate(snapshot: int | None = None, split: str = "val", policy: str = "reference", base_url: str | None = None,
             model: str | None = None, episodes_per_task: int = 1, concurrency: int = 8, window: int | None = 3,
             interface: str = "direct", max_turns: int = 20, judge: bool = False, env_ids: list[str] | None = None,
             split_by: str = "environment", seed: int = 0, max_tasks_per_env: int | None = None) -> dict[str, Any]:
    """Run ``policy`` on the tasks of ``split`` in ``snapshot`` (latest by default) and publish the rollouts.

    Policies: ``reference`` (replays reference solutions; should score 1.0), ``random`` (random
    schema-valid calls), ``openai`` (an OpenAI-compatible endpoint with native tool calls) and
    ``openai-text`` (the same endpoint without tools; the model writes ``<tool_call>`` blocks).
    Returns the summary (see ``summarize``).
    """
    from prefect.runtime import flow_run

    config = EvalConfig(snapshot=snapshot, split=split, policy=policy, base_url=base_url, model=model,
                        episodes_per_task=episodes_per_task, concurrency=concurrency, window=window,
                        interface=interface, max_turns=max_turns, judge=judge, env_ids=env_ids, split_by=split_by,
                        seed=seed, max_tasks_per_env=max_tasks_per_env)
    config.check()
    log = get_run_logger()
    settings = get_settings()
    flow_run_id = str(flow_run.id) if flow_run.id else None
    progress = _ProgressArtifact()
    result = run_evaluation(config, settings=settings, flow_run_id=flow_run_id, runner=_prefect_runner,
                            on_update=progress, log=log)
    from storage.catalog import Catalog

    with Catalog.open(settings, read_only=True) as cat:
        categories = {r["env_id"]: r["category"] for r in cat.rows("SELECT env_id, category FROM scenarios",
                                                                     snapshot=result.snapshot)}
    progress.set(100.0)
    summary = summarize(result, categories=categories)
    png = reward_plot_png(result.rows)
    (settings.runs_dir / result.run_id / "reward_distribution.png").write_bytes(png)
    (settings.runs_dir / result.run_id / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    publish_artifacts(summary, config, png)
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
        for r in cat.rows("SELECT env_id, task_idx FROM tasks WHERE dropped_reason IS NULL", snapshot=snap):
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

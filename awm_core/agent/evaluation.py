"""Running a policy on many tasks of many environments: the evaluation engine.

``EvalConfig`` says what to run (the evaluate flow, ``awm eval`` and the ``evaluate/manual``
deployment all take it). ``plan_tasks`` picks the tasks, ``EvalRun`` runs one environment's
episodes on a shared thread pool over one sandbox pool, streams each finished episode to
``rollouts.jsonl`` at once (nothing is lost if the process dies) and reports progress.
Whether an episode is one message or a conversation with the user simulator is
``EvalConfig.mode`` under ``awm_core.agent.users.plays_as_conversation``; each row records it (``mode``).
``rollout_row`` and ``tool_call_rows`` are the catalog rows. No Prefect and no catalog here:
``flows/evaluate.py`` loads the snapshot, publishes the rows and shows the report.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from pydantic import Field, field_validator

from awm_core.agent.loop import run_episode
from awm_core.agent.policies import OpenAIChatPolicy, RandomPolicy, ReferencePolicy, TextToolCallPolicy
from awm_core.agent.rewards import LLMJudge, reward_for, verify_episode
from awm_core.agent.splits import select
from awm_core.agent.users import RunUsers, conversation_args, episode_mode
from awm_core.configs import FlowConfig
from awm_core.errors import AWMError
from awm_core.interop.benchmarks import benchmark_categories
from awm_core.models import Environment
from awm_core.settings import Settings

PolicyName = Literal["reference", "random", "openai", "openai-text"]
ENDPOINT_POLICIES = ("openai", "openai-text")


class EvalConfig(FlowConfig):
    """What one evaluation runs."""

    flow_name = "evaluate"

    policy: PolicyName = Field("reference", description=(
        "reference: replay reference solutions; random: random schema-valid calls; openai: an OpenAI-compatible "
        "endpoint with native tool calls; openai-text: the same endpoint without tools, the model writes "
        "<tool_call> blocks"))
    snapshot: int | None = Field(None, ge=0, description=(
        "catalog snapshot of the environments (default: the one that last published environments)"))
    split: Literal["all", "train", "val"] = Field("val", description=(
        "which tasks; a split is made and stored if the snapshot has none"))
    split_by: Literal["environment", "task"] = Field("environment", description="how a missing split is made")
    seed: int = Field(0, ge=0, description="seed of a new split and of the random policy")
    base_url: str | None = Field(None, description="endpoint of openai policies (default: llm.policy.base_url)")
    model: str | None = Field(None, description="model of openai policies (default: llm.policy.model)")
    episodes_per_task: int = Field(1, ge=1, description="episodes per task")
    concurrency: int = Field(8, ge=1, description="episodes running at once")
    window: int | None = Field(3, ge=0, description=(
        "history window: turns the policy sees besides the task ('none' keeps all)"))
    interface: Literal["direct", "meta"] = Field("direct", description=(
        "direct: the environment's tools; meta: list_tools + call_tool"))
    max_turns: int = Field(20, ge=1, description=(
        "policy replies per user message (a task of one message: per episode)"))
    judge: bool = Field(False, description="classify episodes with the LLM judge (role 'judge')")
    env_ids: list[str] | None = Field(None, description="only these environments")
    max_tasks_per_env: int | None = Field(None, ge=1, description="at most this many tasks per environment")
    dask_address: str | None = Field(None, description=(
        "a Dask scheduler (tcp://host:8786) to spread the environments over, each worker with its own sandbox "
        "pool; default: generation.dask_address when generation.task_runner is dask, else this process"))
    benchmark: str | None = Field(None, description=(
        "an external benchmark imported into the catalog: 'bfcl' (every multi-turn category), "
        "'bfcl:base,miss_func', 'tau2' (airline, retail, telecom) or 'tau2:retail'; evaluates all its "
        "entries (no split) with the whole history in view unless window is given"))
    mode: Literal["message", "conversation"] = Field("message", description=(
        "message: a synthesized task is one user message (its text); conversation: a synthesized task with a "
        "user scenario is played with the user simulator (--user), the agent shown the environment's policy. "
        "tau2-bench's tasks are conversations in either mode"))
    user: Literal["llm", "scripted"] = Field("llm", description=(
        "who plays the user of a conversation (tau2-bench's tasks; synthesized ones in mode conversation): "
        "llm, the LLM role 'user' (an endpoint or its offline recordings); scripted, a deterministic user that "
        "gives what it knows and stops once the reference's actions are done"))
    max_steps: int = Field(100, ge=1, description=(
        "conversations: messages of every party before the episode stops (tau2-bench's max steps)"))
    max_errors: int = Field(10, ge=1, description=(
        "conversations: tool errors of either side before the episode stops (tau2-bench's max errors)"))

    @field_validator("benchmark")
    @classmethod
    def _known_benchmark(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        try:
            benchmark_categories(value)
        except AWMError as exc:
            raise ValueError(str(exc)) from None
        return value

    def benchmark_categories(self) -> set[str] | None:
        """Scenario categories of the benchmark's environments (None: no benchmark)."""
        return None if self.benchmark is None else benchmark_categories(self.benchmark)

    def for_benchmark(self) -> "EvalConfig":
        """The config a benchmark run uses: every entry, and BFCL's whole history unless a window was given."""
        if self.benchmark is None:
            return self
        update: dict[str, Any] = {"split": "all"}
        if "window" not in self.model_fields_set:
            update["window"] = None
        return self.model_copy(update=update)

    def model_name(self, settings: Settings) -> str:
        if self.policy == "reference":
            return "reference-solution"
        if self.policy == "random":
            return f"random-seed{self.seed}"
        return self.model or settings.llm.policy.model


# --------------------------------------------------------------------------- progress


ProgressListener = Callable[[dict[str, Any]], None]
# Listeners outside the run (the command line's progress line) that cannot be passed to a flow
# run as a parameter; each gets every update of every run in this process.
_listeners: list[ProgressListener] = []


def add_progress_listener(fn: ProgressListener) -> None:
    """Call ``fn({"done", "total", "failed", "mean_reward", "completed"})`` after every episode."""
    _listeners.append(fn)


def remove_progress_listener(fn: ProgressListener) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


class Progress:
    def __init__(self, total: int, on_update: ProgressListener | None = None):
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
        for fn in [*_listeners, *([self._on_update] if self._on_update else [])]:
            try:
                fn(state)
            except Exception:  # a display must never break a run
                pass


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class EpisodeKey:
    """Which episode a rollout row is: the run, the snapshot, the task, the policy, and whether it is one
    message or a conversation (``mode``, ``awm_core.agent.users.episode_mode``)."""

    run_id: str
    snapshot: int
    env_id: str
    task_idx: int
    split: str | None
    policy: str
    model: str
    episode_idx: int
    mode: str = "message"

    @property
    def rollout_id(self) -> str:
        return f"{self.run_id}/{self.env_id}/{self.task_idx}/{self.episode_idx}"


# How an episode ends when nothing went wrong: the agent's final answer, or the user saying it is done.
NORMAL_ENDINGS = ("final_answer", "user_stop")


def episode_columns(episode, outcome, *, duration_s: float) -> dict[str, Any]:
    """What an episode and its outcome put in a ``rollouts`` row, for evaluation and training alike
    (training writes these to its ``rollouts.rank<k>.jsonl`` and publishes them with ``rollout_row``).
    ``messages`` is a list here; the row holds it as ``messages_json``."""
    error = outcome.error or episode.error
    if episode.termination not in NORMAL_ENDINGS and not error:
        error = episode.termination
    return {
        "reward": outcome.reward, "label": outcome.label, "env_error": outcome.env_error,
        "turns": len(episode.turns), "prompt_tokens": episode.prompt_tokens,
        "completion_tokens": episode.completion_tokens, "tool_calls": episode.tool_call_count,
        "duration_s": duration_s, "env_time_s": episode.env_s, "initial_digest": episode.initial_digest,
        "final_digest": episode.final_digest, "final_answer": episode.final_answer, "error": error,
        "termination": episode.termination, "interface": episode.interface, "window": episode.window,
        "verifier_evidence": outcome.verifier_evidence, "judge_reasoning": outcome.judge_reasoning,
        "messages": transcript(episode),
    }


EPISODE_COLUMNS = ("reward", "label", "env_error", "turns", "prompt_tokens", "completion_tokens", "tool_calls",
                   "duration_s", "env_time_s", "initial_digest", "final_digest", "final_answer", "error",
                   "termination", "interface", "window", "verifier_evidence", "judge_reasoning", "messages")


def rollout_row(key: EpisodeKey, episode=None, outcome=None, *, duration_s: float = 0.0,
                load_error: str | None = None, settings: Settings | None = None,
                columns: dict[str, Any] | None = None, rollout_id: str | None = None) -> dict[str, Any]:
    """A row of the catalog's ``rollouts`` table, the one builder of it: a finished episode and its
    outcome; or its ``columns`` as ``episode_columns`` made them (a training run's episodes, read
    back from its files); or (with ``load_error``) an episode of an environment that did not load,
    scored as an environment error."""
    row = {"rollout_id": rollout_id or key.rollout_id, "run_id": key.run_id, "snapshot": key.snapshot,
           "env_id": key.env_id, "task_idx": key.task_idx, "split": key.split, "policy": key.policy,
           "model": key.model, "episode_idx": key.episode_idx, "mode": key.mode,
           "created_at": datetime.now(timezone.utc)}
    if columns is None and episode is None:
        columns = {"reward": reward_for("environment_error", settings), "label": "environment_error",
                   "env_error": True, "turns": 0, "prompt_tokens": 0, "completion_tokens": 0, "tool_calls": 0,
                   "duration_s": 0.0, "env_time_s": 0.0, "error": f"environment failed to load: {load_error}"}
    elif columns is None:
        columns = episode_columns(episode, outcome, duration_s=duration_s)
    row.update({k: columns.get(k) for k in EPISODE_COLUMNS if k != "messages"})
    row["messages_json"] = json.dumps(columns.get("messages") or [], ensure_ascii=False, default=str)
    return row


def transcript(episode) -> list[dict[str, Any]]:
    """The messages a rollout row keeps: the agent's history, or for a conversation every party's
    messages in order (each tagged with its ``sender``), after the agent's system prompt."""
    if not episode.conversational:
        return episode.messages
    return ([{"sender": "system", **episode.system}] if episode.system else []) + episode.conversation


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


# --------------------------------------------------------------------------- the run


def plan_tasks(environments: dict[str, Environment], split_rows: list[dict[str, Any]], split: str, *,
               need_solution: bool = False, max_per_env: int | None = None) -> tuple[dict[str, list[int]], list[str]]:
    """The tasks to run per environment (for evaluation and training alike), and notes on what was
    left out and why: the tasks of ``split`` in ``split_rows`` (no rows: every task), live, with a
    verifier, and with a reference solution where ``need_solution``."""
    chosen = select(split_rows, split) if split_rows else {e: [t.idx for t in env.tasks]
                                                            for e, env in environments.items()}
    plan, notes = {}, []
    for env_id, idxs in chosen.items():
        env = environments.get(env_id)
        if env is None:
            continue
        keep = []
        for i in idxs:
            if not env.is_live(i):
                continue
            if env.verifier(i) is None:
                notes.append(f"{env_id}/{i}: no verifier")
            elif need_solution and env.solution(i) is None:
                notes.append(f"{env_id}/{i}: no reference solution")
            else:
                keep.append(i)
        if max_per_env:
            keep = keep[:max_per_env]
        if keep:
            plan[env_id] = keep
    return plan, notes


@dataclass
class EvalResult:
    """What an evaluation produced: the rows it published and the episodes that could not run."""

    run_id: str
    snapshot: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    new_split_rows: list[dict[str, Any]] = field(default_factory=list)
    published_snapshot: int | None = None
    wall_s: float = 0.0


EnvironmentResult = tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]  # rows, tool calls, failures


class EvalRun:
    """What one evaluation shares: the pool, the environments, the policy, the judge, the output file."""

    def __init__(self, config: EvalConfig, settings: Settings, environments: dict[str, Environment],
                 split_of: dict[tuple[str, int], str], *, pool: Any, run_id: str, snapshot: int,
                 judge: LLMJudge | None = None, total: int = 0, on_update: ProgressListener | None = None):
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
        self.progress = Progress(total, on_update)
        self.workers: set[str] = set()  # Dask workers that ran environments (a Dask runner fills it)
        self._client = self._make_client()
        self.users = RunUsers(settings, config.user, run_id=run_id, ledger=self.out_dir / "llm_calls.jsonl")

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def _make_client(self):
        """The endpoint client shared by the episodes of openai policies (one connection pool)."""
        c, role = self.config, self.settings.llm.policy
        if c.policy not in ENDPOINT_POLICIES:
            return None
        base_url = c.base_url or role.base_url
        if not base_url:
            raise AWMError(f"policy {c.policy!r} needs an endpoint: pass base_url (awm eval --base-url URL) or set "
                           "AWM_LLM__POLICY__BASE_URL")
        import openai

        api_key = role.api_key.get_secret_value() if role.api_key else None
        return openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=role.timeout_s, max_retries=2)

    def key(self, env_id: str, task_idx: int, episode_idx: int) -> EpisodeKey:
        env = self.environments[env_id]
        return EpisodeKey(self.run_id, self.snapshot, env_id, task_idx, self.split_of.get((env_id, task_idx)),
                          self.config.policy, self.model, episode_idx,
                          episode_mode(env, env.task(task_idx), self.config.mode))

    def policy_for(self, env: Environment, task_idx: int, episode_idx: int):
        c, role = self.config, self.settings.llm.policy
        if c.policy in ENDPOINT_POLICIES:
            kw = dict(temperature=role.temperature, max_tokens=min(role.max_tokens, 4096),
                      headers=EpisodeHeaders(env.id, task_idx), client=self._client)
            if c.policy == "openai":
                return OpenAIChatPolicy(None, self.model, **kw)
            return TextToolCallPolicy.for_endpoint(None, self.model, **kw)
        if c.policy == "reference":
            return ReferencePolicy(env.solution(task_idx))
        # str hashes change per process; a digest keeps random runs reproducible.
        seed = f"{c.seed}/{env.id}/{task_idx}/{episode_idx}".encode()
        return RandomPolicy(int.from_bytes(hashlib.sha256(seed).digest()[:8], "big"))

    def run_environment(self, env_id: str, task_idxs: list[int]) -> EnvironmentResult:
        """Every episode of one environment (on the shared thread pool); rows, tool-call rows, failures."""
        env = self.environments[env_id]
        jobs = [(i, k) for i in task_idxs for k in range(self.config.episodes_per_task)]
        try:
            handle = self.pool.load(env)
        except AWMError as exc:
            rows = [rollout_row(self.key(env_id, i, k), load_error=str(exc)[:2000], settings=self.settings)
                    for i, k in jobs]
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
        c = self.config
        try:
            task = env.task(task_idx)
            user = self.users.user(env, task_idx, handle.user_tools(), c.mode)
            with handle.open_session() as session:
                episode = run_episode(self.policy_for(env, task_idx, episode_idx), session, task,
                                      handle.tools(), interface=c.interface, max_turns=c.max_turns, window=c.window,
                                      **conversation_args(env, task, user, handle.user_tools(), interface=c.interface,
                                                          max_steps=c.max_steps, max_errors=c.max_errors))
            outcome = verify_episode(self.pool, env, task_idx, episode, self.settings, judge=self.judge)
        except Exception as exc:  # the policy endpoint failed: no verdict to record for this episode
            failure = f"{env.id}/{task_idx}/{episode_idx}: {type(exc).__name__}: {exc}"
            self._record(None, None, failure)
            return None, [], failure
        row = rollout_row(self.key(env.id, task_idx, episode_idx), episode, outcome,
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


def thread_runner(run: EvalRun, plan: dict[str, list[int]]) -> list[EnvironmentResult]:
    """Every planned environment on threads of this process (the flow submits Prefect tasks instead)."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(plan), 32)), thread_name_prefix="environment") as ex:
        return list(ex.map(lambda item: run.run_environment(*item), plan.items()))


class EpisodeHeaders:
    """Per-request headers of an episode's policy calls: stage ``policy.<task_idx>``, the
    environment, and the turn within the episode (``X-AWM-Turn``: 1, 2, 3...). A gateway can trace
    by them, and the project's fixture server answers by them, so recorded policy conversations
    replay offline."""

    def __init__(self, env_id: str, task_idx: int):
        self.env_id, self.task_idx, self.turn = env_id, task_idx, 0

    def __call__(self, messages: list[dict[str, Any]]) -> dict[str, str]:
        self.turn += 1
        return {"X-AWM-Stage": f"policy.{self.task_idx}", "X-AWM-Scenario": self.env_id,
                "X-AWM-Turn": str(self.turn)}


__all__ = ["EPISODE_COLUMNS", "EpisodeHeaders", "EpisodeKey", "EvalConfig", "EvalResult", "EvalRun", "Progress", "add_progress_listener",
           "episode_columns", "plan_tasks", "remove_progress_listener", "rollout_row", "thread_runner", "tool_call_rows"]

"""Prefect tasks of the generate flow: one generic stage task (repair = Prefect retries),
the scenario selection, per-environment assembly and validation.

Words: a Prefect task is a function named ``*_task`` (and its runs, "task runs"); "task"
anywhere else is one of an environment's user tasks (``task_idx``, ``task_checks``).

Repair loop: a stage attempt that fails raises; Prefect retries the task
(``settings.generation.stage_retries`` times). Each failed attempt's errors and LLM call
records are kept in the run's ``RunResources`` under the task-run id (an ``AttemptHistory``),
and the next attempt's prompt carries all earlier errors (summarised by ``awm_core.stages.base.summarise_errors``). The attempt number
the LLM sees is ``attempt_offset + prefect.runtime.task_run.run_count``, so a stage that is
run again later (a verifier regenerated after its solution kept failing) goes on counting.

Things that cannot be hashed (LLM client, sandbox pool, budget) live in a run-scoped
``RunResources`` registered under the run key; tasks receive only the key, which is left
out of cache keys. Stage results are cached on (stage, context, prompt version, model,
earlier errors) plus the task's source, persisted under AWM_HOME, so a rerun after a crash
redoes only unfinished stages.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.runtime import task_run as runtime_task_run
from prefect.transactions import CommitMode, transaction

from awm_core.errors import AWMError, BudgetExceeded, LLMError, StageError, StageFailed
from awm_core.models import (
    Environment, Provenance, ReferenceSolution, Scenario, StageProvenance, ValidationCheck, ValidationReport,
    Verifier,
)
from awm_core.stages import (
    ENV_STAGES, PROMPT_VERSION, STAGES, StageContext, scenario as scenario_stage, user_scenarios,
)
from awm_core.stages.base import stage_name, summarise_errors
from awm_core.stages.verifier import soundness_errors
from awm_core.validation import publishable, report_from_checks
from tasks.registry import RunRegistry

# --------------------------------------------------------------------------- run resources


@dataclass
class RunResources:
    """Per-run, non-hashable helpers shared by every task of one flow run."""

    settings: Any
    client: Any
    pool: Any
    run_id: str
    run_dir: Path
    embed: Callable[[list[str]], Any] | None = None
    progress: Callable[[str], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: dict[str, "AttemptHistory"] = field(default_factory=dict)

    def history(self, task_run_id: str) -> "AttemptHistory":
        """The earlier attempts of one task run (a new, empty history for its first attempt)."""
        with self.lock:
            return self.attempts.setdefault(task_run_id, AttemptHistory())

    def forget(self, task_run_id: str) -> "AttemptHistory":
        with self.lock:
            return self.attempts.pop(task_run_id, None) or AttemptHistory()

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)

    def note_rejection(self, records: list[Any], errors: list[str]) -> None:
        """Which LLM calls gave rejected replies, and why: merged into llm_calls.error on publish."""
        lines = [json.dumps({"call_id": getattr(r, "call_id", None), "errors": errors[:10]}) + "\n"
                 for r in records if getattr(r, "call_id", None)]
        if lines:
            with self.lock, open(self.run_dir / "rejections.jsonl", "a", encoding="utf-8") as fh:
                fh.writelines(lines)


_RESOURCES: RunRegistry[RunResources] = RunRegistry("generate run resources")
register, unregister = _RESOURCES.register, _RESOURCES.unregister


def resources(key: str) -> RunResources:
    return _RESOURCES[key]


# --------------------------------------------------------------------------- results and failures


@dataclass
class StageOutput:
    """What a stage task returns (and caches): the artifact and the history of the attempts."""

    stage: str
    value: Any
    attempts: int
    errors: list[str]
    records: list[Any]
    checks: list[Any] = field(default_factory=list)  # sandbox checks (a solution passes all but verifier_mutation)


TRANSPORT_PREFIX = "the model endpoint failed: "


@dataclass
class AttemptHistory:
    """What the failed attempts of one stage run said, and the LLM calls they made."""

    errors: list[str] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)

    def for_prompt(self, extra: list[str] = ()) -> list[str]:
        # Transport failures are recorded but say nothing the model could repair.
        return list(extra) + [e for e in self.errors if not e.startswith(TRANSPORT_PREFIX)]

    def failed(self, exc: Exception, res: "RunResources", stage: str, scenario_id: str, attempt: int) -> StageFailed:
        """Record one failed attempt and say so; the StageFailed the task raises (Prefect retries it
        unless the budget is spent)."""
        if isinstance(exc, BudgetExceeded):
            return StageFailed(stage, scenario_id, [str(exc)], self.records, attempt, budget=True)
        if isinstance(exc, StageError):
            records = list(getattr(exc, "records", []))
            res.note_rejection(records, exc.errors)
            self.errors.extend(exc.errors)
            self.records.extend(records)
            res.say(f"  {stage}[{scenario_id}] attempt {attempt} rejected: {summarise_errors(exc.errors)[0][:160]}")
        else:  # the endpoint failed after its own transport retries; the stage may still retry
            self.errors.append(f"{TRANSPORT_PREFIX}{exc}")
            rec = getattr(exc, "record", None)
            self.records.extend([rec] if rec is not None else [])
            res.say(f"  {stage}[{scenario_id}] attempt {attempt} LLM error: {str(exc)[:160]}")
        return StageFailed(stage, scenario_id, self.errors, self.records, attempt)


def _retry_condition(task, task_run, state) -> bool:
    """Retry a rejected reply or a transient LLM failure; never retry a spent budget."""
    failure = getattr(state.data, "result", state.data)  # the exception, or a result record holding it
    return not getattr(failure, "budget", False)


def _cache_policy():
    return (INPUTS - "run_key") + TASK_SOURCE


# No tags on task runs: Prefect acquires a tag concurrency lease through the API for every
# tagged task run (10-100 ms each, x27 per environment, and a busy server answering 503 fails
# the run). Run names carry stage and scenario instead (the ``label`` parameter).
_CONFIGURED: dict[int, Any] = {}


def configured_stage_task(retries: int):
    """``run_stage_task`` with the run's retries; made once (``with_options`` costs ~6 ms)."""
    if retries not in _CONFIGURED:
        _CONFIGURED[retries] = run_stage_task.with_options(retries=retries)
    return _CONFIGURED[retries]


# cache_result_in_memory=False on the cached tasks below: Prefect keeps persisted result records
# in one in-memory LRU cache (1,000 entries) that every task run's result store shares and that
# has no lock. Past 1,000 stage runs, threads evicting from it at once make commits fail with a
# KeyError (seen at 1,000 environments, concurrency 200). The caller gets a stage's value
# directly either way; a rerun reads cached stages from the persisted files.


def results_dir(settings: Any) -> Path:
    """Where cached stage results are persisted (``run_generate`` points Prefect there)."""
    return settings.home_dir / "prefect-results"


@task(name="stage", task_run_name="{label}", retries=5, retry_delay_seconds=0, retry_condition_fn=_retry_condition,
      cache_policy=_cache_policy(), persist_result=True, cache_result_in_memory=False)
def run_stage_task(label: str, stage: str, ctx_json: str, prompt_version: str, model: str, run_key: str,
                   extra_errors: list[str], attempt_offset: int) -> StageOutput:
    """One attempt of one stage; Prefect's retries make the repair loop.

    The context travels as JSON text: Prefect walks every parameter's structure on each
    task run (input tracking, future resolution), which for a full pydantic context cost
    ~70-200 ms per run; a string costs nothing and hashes the same into the cache key."""
    res = resources(run_key)
    ctx = StageContext.model_validate_json(ctx_json)
    module = STAGES[stage]
    task_run_id = str(runtime_task_run.id)
    attempt = attempt_offset + runtime_task_run.run_count
    history = res.history(task_run_id)
    name = stage_name(module, ctx)
    try:
        result = module.run(res.client, ctx, attempt=attempt, previous_errors=history.for_prompt(extra_errors),
                            pool=res.pool)
    except (StageError, LLMError) as exc:
        raise history.failed(exc, res, name, ctx.scenario_id, attempt) from None
    res.forget(task_run_id)
    errors, records = history.errors, history.records + list(result.records)
    repaired = f" (repaired, attempt {attempt})" if attempt > 1 else ""
    res.say(f"  {name}[{ctx.scenario_id}] ok{repaired}")
    return StageOutput(stage=name, value=result.value, attempts=attempt, errors=list(extra_errors) + errors,
                       records=records, checks=list(result.checks))


def call_stage(settings: Any, run_key: str, stage: str, ctx: StageContext, *, extra_errors: list[str] = (),
               attempt_offset: int = 0) -> StageOutput:
    """Run a stage task with its per-call name and retries; raises StageFailed."""
    label = f"{stage_name(STAGES[stage], ctx)}[{ctx.scenario_id}]"
    t = configured_stage_task(settings.generation.stage_retries)
    return t(label, stage, ctx.model_dump_json(), STAGES[stage].PROMPT_VERSION, ctx.model, run_key,
             list(extra_errors), attempt_offset)


# --------------------------------------------------------------------------- scenarios


@task(name="select-scenarios", retries=5, retry_delay_seconds=0, retry_condition_fn=_retry_condition,
      cache_policy=_cache_policy(), persist_result=True, cache_result_in_memory=False)
def select_scenarios_task(seed_list: str | None, n: int, existing: list[Scenario], threshold: float,
                          category_cap: int, model: str, prompt_version: str, run_key: str) -> dict[str, Any]:
    """Expand the seed list with the model, keep stateful, deduplicated, balanced scenarios."""
    res = resources(run_key)
    task_run_id = str(runtime_task_run.id)
    attempt = runtime_task_run.run_count
    history = res.history(task_run_id)
    seeds = scenario_stage.load_seeds(seed_list)
    records: list[Any] = list(history.records)
    candidates: list[scenario_stage.Candidate] = []
    rounds = 0
    selection = None
    # More rounds only while they bring new scenarios: the model is asked again with what it
    # already proposed listed as taken.
    while rounds < max(1, -(-n // 10)) + 2:
        try:
            # The stage adds its deduplication margin to what is still missing.
            new, recs = scenario_stage.run(res.client, seeds, max(n - (len(selection.scenarios) if selection else 0), 1),
                                           attempt=attempt, previous_errors=history.for_prompt(),
                                           avoid=[c.name for c in candidates] + [s.name for s in existing],
                                           offset=rounds * scenario_stage.EXAMPLES_SHOWN)
        except (StageError, LLMError) as exc:
            raise history.failed(exc, res, "scenario", "_", attempt) from None
        records += recs
        rounds += 1
        before = len(selection.scenarios) if selection else 0
        known = {c.name.lower() for c in candidates}
        candidates += [c for c in new if c.name.lower() not in known]
        selection = scenario_stage.select(candidates, n, res.embed, threshold=threshold, category_cap=category_cap,
                                          already=existing)
        if len(selection.scenarios) >= n or len(selection.scenarios) == before:
            break
    res.forget(task_run_id)
    res.say(f"  scenario[_] {len(selection.scenarios)} selected from {len(candidates)} candidates, "
            f"{len(selection.dropped)} dropped")
    return {"scenarios": selection.scenarios, "dropped": selection.dropped, "candidates": len(candidates),
            "records": records, "attempts": attempt}


# --------------------------------------------------------------------------- one environment


@dataclass
class EnvOutcome:
    scenario_id: str
    status: str                      # published | dropped | budget_exceeded
    reason: str = ""
    environment: Environment | None = None
    report: ValidationReport | None = None
    stages: dict[str, StageProvenance] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    # Tasks whose verifier was regenerated for being lenient (accepted a wrong episode) or too
    # strict (rejected an equivalent one, or the reference solution).
    regenerated: dict[str, list[int]] = field(default_factory=lambda: {"lenient": [], "too_strict": []})
    # Why a part is missing from what was published (the user scenarios, when their stage failed).
    notes: list[str] = field(default_factory=list)

    @property
    def repairs(self) -> dict[str, int]:
        """Extra attempts per stage kind (verifier.3 counts under verifier)."""
        out: dict[str, int] = {}
        for name, p in self.stages.items():
            if p.attempts > 1:
                kind = name.split(".")[0]
                out[kind] = out.get(kind, 0) + p.attempts - 1
        return out


def _provenance(out: StageOutput, into: dict[str, StageProvenance]) -> None:
    prev = into.get(out.stage)
    recs = out.records
    p = StageProvenance(attempts=out.attempts,
                        prompt_tokens=sum(r.prompt_tokens for r in recs),
                        completion_tokens=sum(r.completion_tokens for r in recs),
                        cost_usd=sum(r.cost_usd for r in recs), errors=summarise_errors(out.errors))
    if prev is not None:  # a stage run again later: add up
        p = StageProvenance(attempts=out.attempts, prompt_tokens=prev.prompt_tokens + p.prompt_tokens,
                            completion_tokens=prev.completion_tokens + p.completion_tokens,
                            cost_usd=prev.cost_usd + p.cost_usd, errors=summarise_errors(prev.errors + p.errors))
    into[out.stage] = p


def _failed_provenance(exc: StageFailed, into: dict[str, StageProvenance]) -> None:
    _provenance(StageOutput(exc.stage, None, exc.attempts, exc.errors, exc.records), into)


CTX_FIELD = {"tasks": "tasks", "schema": "db_schema", "seed_data": "seed_data", "spec": "api_spec", "code": "code"}


@task(name="build-environment", cache_policy=NO_CACHE)
def build_environment_task(scenario: Scenario, tasks_per_scenario: int, target_tools: int, model: str,
                           min_valid_tasks: int, run_key: str,
                           repairs: dict[str, list[str]] | None = None) -> EnvOutcome:
    """All stages for one scenario, then execution validation. Never raises for a bad
    scenario: the outcome says what was dropped and why. ``repairs``: errors to show a stage
    from the start (curation regenerating an environment's code with what agents ran into)."""
    # Stage tasks called from here would otherwise join this task's transaction and write
    # their cache entries only when the whole environment is done: a crash would lose them.
    with transaction(commit_mode=CommitMode.EAGER):
        return _build_environment(scenario, tasks_per_scenario, target_tools, model, min_valid_tasks, run_key,
                                  repairs or {})


def _build_environment(scenario: Scenario, tasks_per_scenario: int, target_tools: int, model: str,
                       min_valid_tasks: int, run_key: str, repairs: dict[str, list[str]]) -> EnvOutcome:
    res = resources(run_key)
    settings = res.settings
    started = time.perf_counter()
    stages: dict[str, StageProvenance] = {}
    records: list[Any] = []
    ctx = StageContext(scenario=scenario, tasks_per_scenario=tasks_per_scenario, target_tools=target_tools, model=model)

    regenerated: dict[str, list[int]] = {"lenient": [], "too_strict": []}
    notes: list[str] = []

    def outcome(status: str, reason: str, env=None, report=None) -> EnvOutcome:
        return EnvOutcome(scenario.id, status, reason, env, report, stages, records, time.perf_counter() - started,
                          regenerated, notes)

    def stage(name: str, c: StageContext, **kw) -> StageOutput:
        try:
            out = call_stage(settings, run_key, name, c, **kw)
        except StageFailed as exc:
            _failed_provenance(exc, stages)
            records.extend(exc.records)
            raise
        _provenance(out, stages)
        records.extend(out.records)
        return out

    env_checks: list[Any] = []
    task_checks: dict[int, list[Any]] = {}
    try:
        for name in ENV_STAGES:
            # Extra errors change the stage's cache key: a repaired stage runs again, the rest are reused.
            out = stage(name, ctx, extra_errors=repairs.get(name, ()))
            ctx = ctx.with_(**{CTX_FIELD[name]: out.value})
            env_checks += out.checks
        verifiers: list[Verifier] = []
        solutions: list[ReferenceSolution] = []
        dropped: dict[int, str] = {}
        for t in ctx.tasks:
            tctx = ctx.with_(task_idx=t.idx)
            try:
                v = stage("verifier", tctx)
            except StageFailed as exc:
                if exc.budget:
                    raise
                dropped[t.idx] = f"verifier failed after {exc.attempts} attempts: {summarise_errors(exc.errors)[-1]}"
                continue
            try:
                s = stage("solution", tctx.with_(verifiers=[v.value]))
                # The verifier also accepted a wrong episode made from the solution (lenient), or
                # rejected an equivalent one (too strict).
                hint, solution_attempts = soundness_errors(s.checks), s.attempts
                failed = {c.name for c in s.checks if not c.passed}
                # The regenerated verifier sees the tools this solution calls in full.
                shown = tctx.with_(solutions=[s.value])
            except StageFailed as exc:
                if exc.budget:
                    raise
                # The solution kept failing against this verifier: maybe the verifier is wrong.
                hint = ["a reference solution for this task was judged not complete by your previous verifier; "
                        "if the solution below is a correct way to do the task, the verifier is too strict "
                        "or checks the wrong thing: " + summarise_errors(exc.errors)[-1]]
                solution_attempts, failed, shown = exc.attempts, {"verifier_solution"}, tctx
            if hint:
                if "verifier_mutation" in failed:
                    regenerated["lenient"].append(t.idx)
                if failed & {"verifier_equivalence", "verifier_solution"}:
                    regenerated["too_strict"].append(t.idx)
                # Regenerate the verifier with the evidence, then the solution once more.
                try:
                    v = stage("verifier", shown, extra_errors=hint, attempt_offset=v.attempts)
                    s = stage("solution", tctx.with_(verifiers=[v.value]), attempt_offset=solution_attempts)
                except StageFailed as exc2:
                    if exc2.budget:
                        raise
                    dropped[t.idx] = f"{exc2.stage} failed after {exc2.attempts} attempts: {summarise_errors(exc2.errors)[-1]}"
                    continue
            verifiers.append(v.value)
            solutions.append(s.value)
            task_checks[t.idx] = v.checks + s.checks
        conversations = _user_scenarios(stage, ctx, verifiers, solutions, notes, res)
    except StageFailed as exc:
        if exc.budget:
            return outcome("budget_exceeded", str(exc.errors[0]))
        return outcome("dropped", f"{exc.stage} failed after {exc.attempts} attempts: {summarise_errors(exc.errors)[-1]}")

    env = ctx.environment(verifiers=verifiers, solutions=solutions, provenance=Provenance(
        source="generated", generator_model=model, prompt_version=PROMPT_VERSION, run_id=res.run_id, stages=stages))
    if conversations is not None:
        env = user_scenarios.apply(env, conversations.value)
        for c in conversations.checks:
            task_checks.setdefault(c.task_idx, []).append(c)
    # Every execution check already ran inside the stages, on exactly these artifacts: the
    # report collects them instead of executing everything a second time.
    report = collect_validation(env, env_checks, task_checks, dropped, min_valid_tasks)
    valid = len(env.tasks) - len(report.dropped_tasks)
    if not report.passed:
        fails = [c.detail for c in report.failures()] or [f"{valid} valid tasks < {min_valid_tasks}"]
        reason = f"validation failed: {fails[0][:300]}" if valid else "no task passed validation"
        if valid < min_valid_tasks:
            reason = f"only {valid} valid tasks (minimum {min_valid_tasks}); first problem: {fails[0][:300]}"
        res.say(f"  {scenario.id}: dropped ({reason[:160]})")
        return outcome("dropped", reason, env.model_copy(update={"validation": report}), report)
    env = publishable(env, report)
    res.say(f"  {scenario.id}: validated, {valid}/{len(ctx.tasks)} tasks")
    return outcome("published", "", env, report)


def _user_scenarios(stage: Callable[..., StageOutput], ctx: StageContext, verifiers: list[Verifier],
                    solutions: list[ReferenceSolution], notes: list[str], res: RunResources) -> StageOutput | None:
    """The ``user_scenarios`` stage over the kept tasks (those with a verifier and a reference solution).
    None when there is no task to play, or when the stage failed after its retries: the environment is then
    published without user scenarios and the note says why. A spent budget still stops the environment."""
    kept = {s.task_idx for s in solutions}
    if not kept:
        return None
    try:
        return stage("user_scenarios", ctx.with_(tasks=[t for t in ctx.tasks if t.idx in kept], verifiers=verifiers,
                                                 solutions=solutions))
    except StageFailed as exc:
        if exc.budget:
            raise
        why = f"user_scenarios failed after {exc.attempts} attempts: {summarise_errors(exc.errors)[-1]}"
    except AWMError as exc:  # the sandbox failed while playing the conversations: not the model's doing
        why = f"user_scenarios could not be checked: {str(exc)[:300]}"
    notes.append(f"published without user scenarios: {why}")
    res.say(f"  {ctx.scenario_id}: no user scenarios ({why[:160]})")
    return None


def collect_validation(env: Environment, env_checks: list[Any], task_checks: dict[int, list[Any]],
                       dropped: dict[int, str], min_valid_tasks: int) -> ValidationReport:
    """The environment's validation report, as its own task run (``validate[<id>]``) in the UI."""
    checks = json.dumps({"env": [c.model_dump(mode="json") for c in env_checks],
                         "tasks": {str(i): [c.model_dump(mode="json") for c in cs] for i, cs in task_checks.items()}})
    t = validate_environment_task.with_options(task_run_name=f"validate[{env.id}]")
    return t(env.model_dump_json(), checks, {str(k): v for k, v in dropped.items()}, min_valid_tasks)


@task(name="validate-environment", cache_policy=NO_CACHE)
def validate_environment_task(env_json: str, checks_json: str, dropped: dict[str, str], min_valid_tasks: int) -> ValidationReport:
    """Collect the stages' sandbox checks into the report (inputs as JSON: see run_stage_task)."""
    env = Environment.model_validate_json(env_json)
    data = json.loads(checks_json)
    env_checks = [ValidationCheck.model_validate(c) for c in data["env"]]
    task_checks = {int(i): [ValidationCheck.model_validate(c) for c in cs] for i, cs in data["tasks"].items()}
    return report_from_checks(env, env_checks, task_checks, {int(k): v for k, v in dropped.items()},
                              min_valid_tasks=min_valid_tasks)

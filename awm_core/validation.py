"""Execution validation: run an environment for real before it is published.

Per environment: the schema and seed data execute with zero errors; every spec tool called
with its example arguments (each in a fresh session) returns no error. Per task: a no-op
episode must not satisfy the verifier; the reference solution replayed in a fresh session
must satisfy it; a second replay must end in the same database (``snapshot_digest``); wrong
episodes derived from the solution (``awm_core.mutations``: a state-changing call dropped,
an id argument swapped, an unrelated row destroyed, a wrong number in the answer) must not.

The same checks are what the code, verifier and solution stages run on each attempt, so a
stage's rejection and the final report say the same thing in the same words. Generated code
runs only in the sandbox (``awm_core.runtime.SandboxPool``).
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

from awm_core import mutations
from awm_core.db import build_database, snapshot_digest
from awm_core.errors import SolutionRefError, SqlExecutionError, StageError
from awm_core.models import Environment, ValidationCheck, ValidationReport, resolve_refs

DETAIL_CHARS = 700


def _short(value: Any, n: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= n else text[: n - 3] + "..."


def failed_details(checks: list[ValidationCheck]) -> list[str]:
    return [c.detail for c in checks if not c.passed]


def _base(env: Environment) -> Environment:
    """The environment without verifiers and solutions: what sessions run on. One sandbox
    load serves every verifier and solution candidate of the same code."""
    return env.model_copy(update={"verifiers": [], "solutions": [], "validation": None})


_HANDLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_HANDLES_LOCK = threading.Lock()


def _handle(pool, env: Environment):
    """``pool.load`` of the environment's runnable parts, remembered by the identity of those
    parts: the pool keys handles by a digest of the whole bundle, and computing it (a JSON
    dump of everything) on every check was a large share of validation's CPU time."""
    parts = (env.db_schema, env.seed_data, env.api_spec, env.code)
    key = (id(pool),) + tuple(id(p) for p in parts)
    with _HANDLES_LOCK:
        hit = _HANDLES.get(key)
        if hit is not None:
            _HANDLES.move_to_end(key)
            return hit[1]
    handle = pool.load(_base(env))
    with _HANDLES_LOCK:
        _HANDLES[key] = (parts, handle)  # the parts are held so their ids cannot be reused
        while len(_HANDLES) > 64:
            _HANDLES.popitem(last=False)
    return handle


def _verify(pool, env: Environment, task_idx: int, initial_db: bytes, final_db: bytes, final_answer):
    """``pool.verify`` with a bundle of just the verifier (the pool only needs that and an id)."""
    only = Environment(id=env.id, scenario=env.scenario, verifiers=[v for v in env.verifiers if v.task_idx == task_idx])
    return pool.verify(only, task_idx, initial_db=initial_db, final_db=final_db, final_answer=final_answer)


def database_checks(env: Environment) -> list[ValidationCheck]:
    checks = []
    if env.db_schema is None:
        return [ValidationCheck(name="schema", passed=False, detail="the environment has no database schema")]
    try:
        build_database(env.db_schema)
        checks.append(ValidationCheck(name="schema", passed=True, detail=f"{len(env.db_schema.tables)} tables"))
    except SqlExecutionError as exc:
        return [ValidationCheck(name="schema", passed=False, detail=e[:DETAIL_CHARS]) for e in exc.errors]
    try:
        build_database(env.db_schema, env.seed_data)
        n = len(env.seed_data.statements()) if env.seed_data else 0
        checks.append(ValidationCheck(name="seed", passed=True, detail=f"{n} statements"))
    except SqlExecutionError as exc:
        checks += [ValidationCheck(name="seed", passed=False, detail=e[:DETAIL_CHARS]) for e in exc.errors]
    return checks


def load_errors(pool, env: Environment) -> list[ValidationCheck]:
    """Checks that fail when the code cannot be loaded (import error, missing tools, ...)."""
    from awm_core.runtime import EnvLoadError, SandboxError

    try:
        pool.load(_base(env))
    except SqlExecutionError as exc:
        return [ValidationCheck(name="seed" if exc.stage == "seed_data" else "schema", passed=False,
                                detail=e[:DETAIL_CHARS]) for e in exc.errors]
    except EnvLoadError as exc:
        return [ValidationCheck(name="code_load", passed=False, detail=e[:DETAIL_CHARS]) for e in exc.errors]
    except SandboxError as exc:
        return [ValidationCheck(name="code_load", passed=False, detail=f"the sandbox could not load the code: {exc}")]
    return []


def tool_checks(pool, env: Environment) -> list[ValidationCheck]:
    """Every spec tool with its example arguments, as ``awm_core.runtime.EXAMPLE_RULE`` says
    (``SandboxPool.check_tools``, the one place examples run)."""
    problems = load_errors(pool, env)
    if problems:
        return problems
    checks = []
    for tc in pool.check_tools(_base(env)):
        if tc.ok:
            checks.append(ValidationCheck(name="tool_example", tool=tc.tool, passed=True))
        else:
            checks.append(ValidationCheck(
                name="tool_example", tool=tc.tool, passed=False,
                detail=(f"tool {tc.tool} called with its spec example arguments {_short(tc.arguments)} on the "
                        f"initial database failed ({tc.result.error_kind}): {tc.result.error}")[:DETAIL_CHARS]))
    return checks


def noop_check(pool, env: Environment, task_idx: int, *, initial_db: bytes | None = None) -> ValidationCheck:
    """The verifier on a no-op episode (final == initial, no answer) must run and not say complete.

    ``initial_db`` defaults to the loaded environment's snapshot (an environment without code
    can pass its own, built from schema and seed)."""
    if initial_db is None:
        initial_db = _handle(pool, env).snapshot
    out = _verify(pool, env, task_idx, initial_db, initial_db, None)
    if out.verdict is None and out.error:
        return ValidationCheck(name="verifier_noop", task_idx=task_idx, passed=False,
                               detail=f"the verifier raised on a no-op episode (final db == initial db, final_answer "
                                      f"None): {out.error}"[:DETAIL_CHARS])
    if out.verdict == "complete":
        return ValidationCheck(name="verifier_noop", task_idx=task_idx, passed=False,
                               detail=("the verifier returned \"complete\" for a no-op episode (final db identical to "
                                       "the initial db, final_answer None), so it checks something that is already "
                                       "true before the task is done; check for the change or the answer the task "
                                       f"asks for. Its evidence: {_short(out.evidence, 300)}")[:DETAIL_CHARS])
    return ValidationCheck(name="verifier_noop", task_idx=task_idx, passed=True, detail=f"verdict {out.verdict}")


def _replay(handle, solution) -> tuple[bytes | None, list[str], str | None]:
    """Replay in a fresh session: (final db, per-call summaries, failure or None)."""
    trace = []
    results: list[Any] = []
    with handle.open_session() as s:
        for i, call in enumerate(solution.calls):
            try:
                args = resolve_refs(call.arguments, results, i)
            except SolutionRefError as exc:
                return None, trace, str(exc)
            r = s.call(call.tool, args)
            if not r.ok:
                return None, trace, (f"call {i} {call.tool}({_short(args, 150)}) failed "
                                     f"({r.error_kind}): {r.error}")
            results.append(r.content)
            trace.append(f"[{i}] {call.tool} -> {_short(r.content, 160)}")
        return s.snapshot(), trace, None


def solution_checks(pool, env: Environment, task_idx: int) -> list[ValidationCheck]:
    """Replay the reference solution: every call succeeds, the verifier says complete, and a
    second replay ends in the same database."""
    solution = env.solution(task_idx)
    if solution is None:
        return [ValidationCheck(name="verifier_solution", task_idx=task_idx, passed=False,
                                detail=f"task {task_idx} has no reference solution")]
    handle = _handle(pool, env)
    final, trace, failure = _replay(handle, solution)
    if failure:
        return [ValidationCheck(name="solution_replay", task_idx=task_idx, passed=False,
                                detail=f"replaying the reference solution on the seeded database: {failure}"[:DETAIL_CHARS])]
    out = _verify(pool, env, task_idx, handle.snapshot, final, solution.final_answer)
    checks = []
    if out.verdict != "complete":
        what = f"raised: {out.error}" if out.verdict is None else f"returned \"{out.verdict}\""
        checks.append(ValidationCheck(
            name="verifier_solution", task_idx=task_idx, passed=False,
            # Verdict and evidence first: summaries cut long messages at the end.
            detail=(f"the task's verifier {what} after replaying the reference solution; evidence: "
                    f"{_short(out.evidence, 300)}; final_answer "
                    f"{_short(solution.final_answer, 120) if solution.final_answer else None}; calls: "
                    f"{'; '.join(trace) or 'none'}. Either the calls do not do what the task asks, or the final "
                    "answer lacks the value asked for.")[:DETAIL_CHARS * 2]))
    else:
        checks.append(ValidationCheck(name="verifier_solution", task_idx=task_idx, passed=True))
    again, _, failure = _replay(handle, solution)
    if failure or snapshot_digest(again) != snapshot_digest(final):
        checks.append(ValidationCheck(
            name="replay_determinism", task_idx=task_idx, passed=False,
            detail=("replaying the reference solution twice from the same initial database gave different final "
                    "databases" + (f" ({failure})" if failure else "") + "; tools must not read the clock or use "
                    "randomness (use the app_clock table or a parameter)")))
    else:
        checks.append(ValidationCheck(name="replay_determinism", task_idx=task_idx, passed=True))
    return checks


# --------------------------------------------------------------------------- mutations

# Each drop_call and swap_argument mutation is one more replay in the sandbox pool (the others
# one verifier run), for every task of every environment of a nightly run: the count per kind
# and task is capped so validation stays a small multiple of the replays it already does.
MAX_MUTATIONS_PER_KIND = 3


def _mutation(task_idx: int, passed: bool, detail: str, tool: str | None = None) -> ValidationCheck:
    return ValidationCheck(name="verifier_mutation", task_idx=task_idx, passed=passed, tool=tool,
                           detail=detail[:DETAIL_CHARS])


def _skipped(task_idx: int, what: str, why: str, tool: str | None = None) -> ValidationCheck:
    """A mutation that could not be built (or would prove nothing): recorded, not a failure."""
    return _mutation(task_idx, True, f"skipped {what} because {why}", tool)


# "skipped <what> because <why>", after an optional "<label>: " (the audit's); <what> may
# quote arguments, <why> is one of this module's phrases, so the last "because" splits them.
_SKIPPED = re.compile(r"^(?:[^:]*: )?skipped (.*) because (.*)$", re.S)


def skipped_mutation(check: ValidationCheck) -> tuple[str, str] | None:
    """(mutation, reason) of a ``verifier_mutation`` check that was skipped, else None."""
    m = _SKIPPED.match(check.detail) if check.name == "verifier_mutation" and check.passed else None
    return (m.group(1), m.group(2)) if m else None


def _judge(pool, env: Environment, task_idx: int, what: str, initial: bytes, final: bytes, answer,
           tool: str | None = None) -> ValidationCheck:
    out = _verify(pool, env, task_idx, initial, final, answer)
    if out.verdict == "complete":
        return _mutation(task_idx, False, (
            f"the verifier said \"complete\" after {what}; that episode does not do the task, so the verifier "
            f"misses what the mutation broke. Its evidence: {_short(out.evidence, 300)}"), tool)
    return _mutation(task_idx, True, f"{what}: {out.verdict or 'verifier error: ' + _short(out.error, 120)}", tool)


def _replay_states(handle, solution) -> list[bytes] | None:
    """The database after each call of the reference solution (None if it does not replay)."""
    states, results = [], []
    with handle.open_session() as s:
        for i, call in enumerate(solution.calls):
            try:
                r = s.call(call.tool, resolve_refs(call.arguments, results, i))
            except SolutionRefError:
                return None
            if not r.ok:
                return None
            results.append(r.content)
            states.append(s.snapshot())
    return states


def _replay_mutant(handle, calls) -> bytes:
    """Final database of a mutated solution ((original index, call) pairs). A call that fails,
    or whose ``$ref`` names a left-out call, is passed over, as an agent would go on after an
    error; the state it ends in is what the verifier must judge."""
    results: dict[int, Any] = {}
    with handle.open_session() as s:
        for i, call in calls:
            try:
                r = s.call(call.tool, resolve_refs(call.arguments, results, i))
            except SolutionRefError:
                continue
            if r.ok:
                results[i] = r.content
        return s.snapshot()


def _call_label(solution, i: int) -> str:
    call = solution.calls[i]
    return f"call {i} ({call.tool}({_short(call.arguments, 100)}))"


def _drop_checks(pool, env, task_idx, handle, solution, changing, reference) -> list[ValidationCheck]:
    if not changing:
        return [_skipped(task_idx, "drop_call", "no call of the reference solution changes the database")]
    return [_mutant_check(pool, env, task_idx, handle, f"drop_call of {_call_label(solution, i)}",
                          solution.calls[i].tool, mutations.without_call(solution, i), solution, reference)
            for i in changing[:MAX_MUTATIONS_PER_KIND]]


def _mutant_check(pool, env, task_idx, handle, what, tool, mutant, solution, reference) -> ValidationCheck:
    """Replay the mutant solution and ask the verifier; a mutant that ends where the reference
    does is not a wrong solution, so it is skipped."""
    final = _replay_mutant(handle, mutant)
    if snapshot_digest(final) == reference:
        return _skipped(task_idx, what, "it ends in the same database as the reference solution", tool)
    return _judge(pool, env, task_idx, what, handle.snapshot, final, solution.final_answer, tool)


def _swaps(initial: bytes, solution, changing) -> list[mutations.Swap]:
    """At most one swap per call (the first id argument with a candidate), up to the cap."""
    swaps = []
    for i in changing:
        call = solution.calls[i]
        for name, value in mutations.id_arguments(call.arguments):
            found = mutations.swap_for(initial, call.tool, name, value)
            if found:
                swaps.append(mutations.Swap(i, name, value, found[1], found[0]))
                break
    return swaps[:MAX_MUTATIONS_PER_KIND]


def _swap_checks(pool, env, task_idx, handle, solution, changing, reference) -> list[ValidationCheck]:
    swaps = _swaps(handle.snapshot, solution, changing)
    if not swaps:
        return [_skipped(task_idx, "swap_argument", "no state-changing call has an integer id argument whose "
                                                    "value is a key of a table with another row")]
    return [_mutant_check(pool, env, task_idx, handle,
                          f"swap_argument in {_call_label(solution, sw.call_idx)}: {sw.argument} {sw.old} -> "
                          f"{sw.new} (another row of {sw.table})",
                          solution.calls[sw.call_idx].tool, mutations.with_swap(solution, sw), solution, reference)
            for sw in swaps]


def _destructive_check(pool, env, task_idx, initial, final, solution) -> ValidationCheck:
    if snapshot_digest(final) == snapshot_digest(initial):
        return _skipped(task_idx, "extra_destructive", "the reference solution changes nothing (a question "
                                                       "task: wrong_answer covers it)")
    touched = mutations.changed_tables(initial, final)
    damaged = mutations.delete_unrelated_row(final, touched, prefer=env.verifier(task_idx).code)
    if damaged is None:
        return _skipped(task_idx, "extra_destructive", "every non-empty table is one the solution changes")
    what = f"extra_destructive: the reference final database, then {damaged[1]}"
    return _judge(pool, env, task_idx, what, initial, damaged[0], solution.final_answer)


def _answer_checks(pool, env, task_idx, initial, final, solution) -> list[ValidationCheck]:
    answer = solution.final_answer
    if not answer:
        return [_skipped(task_idx, "wrong_answer", "the reference solution gives no final answer")]
    if _verify(pool, env, task_idx, initial, final, None).verdict == "complete":
        return [_skipped(task_idx, "wrong_answer", "the verifier does not read the answer (the reference final "
                                                   "database without an answer is complete)")]
    wrong = mutations.wrong_answers(answer)
    if not wrong:
        return [_skipped(task_idx, "wrong_answer", "the answer has no number to change")]
    # When the asked value is not a number (a title, a name), changed numbers leave it right.
    if _verify(pool, env, task_idx, initial, final, mutations.without_numbers(answer)).verdict == "complete":
        return [_skipped(task_idx, "wrong_answer", "the asked value is not one of the answer's numbers (the answer "
                                                   "without its numbers is still complete)")]
    return [_judge(pool, env, task_idx, f"wrong_answer ({label}): {_short(text, 160)!r} instead of "
                                        f"{_short(answer, 160)!r}", initial, final, text)
            for label, text in wrong]


def mutation_checks(pool, env: Environment, task_idx: int) -> list[ValidationCheck]:
    """The verifier on wrong episodes derived from the reference solution (``awm_core.mutations``):
    it must not say "complete" on any. One ``verifier_mutation`` check per mutation tried or
    skipped; run after the solution checks passed."""
    verifier = env.verifier(task_idx)
    solution = env.solution(task_idx)
    if verifier is not None and verifier.style == "awm1k_sql":
        return [_skipped(task_idx, "mutations", "the verifier collects evidence for a judge and has no verdict")]
    if solution is None:
        return [_skipped(task_idx, "mutations", "there is no reference solution to derive wrong episodes from")]
    handle = _handle(pool, env)
    initial = handle.snapshot
    states = _replay_states(handle, solution)
    if states is None:
        return [_skipped(task_idx, "mutations", "the reference solution does not replay")]
    digests = [snapshot_digest(initial)] + [snapshot_digest(b) for b in states]
    changing = [i for i in range(len(states)) if digests[i + 1] != digests[i]]
    final = states[-1] if states else initial
    return (_drop_checks(pool, env, task_idx, handle, solution, changing, digests[-1])
            + _swap_checks(pool, env, task_idx, handle, solution, changing, digests[-1])
            + [_destructive_check(pool, env, task_idx, initial, final, solution)]
            + _answer_checks(pool, env, task_idx, initial, final, solution))


def task_checks(pool, env: Environment, task_idx: int, *, with_solution: bool = True) -> list[ValidationCheck]:
    if env.verifier(task_idx) is None:
        return [ValidationCheck(name="verifier_noop", task_idx=task_idx, passed=False,
                                detail=f"task {task_idx} has no verifier")]
    checks = [noop_check(pool, env, task_idx)]
    if with_solution:
        replayed = solution_checks(pool, env, task_idx)
        checks += replayed
        if all(c.passed for c in replayed):
            checks += mutation_checks(pool, env, task_idx)
    return checks


def _first_failure(bad: list[ValidationCheck]) -> str:
    return f"{bad[0].name}: {bad[0].detail}"[:DETAIL_CHARS]


def _report(env: Environment, checks: list[ValidationCheck], dropped: dict[int, str], env_ok: bool,
            min_valid_tasks: int) -> ValidationReport:
    """``passed`` only if the environment-level checks passed and at least ``min_valid_tasks`` tasks
    were kept; falling short is recorded as a failed ``min_valid_tasks`` check."""
    valid = len(env.tasks) - len(dropped)
    passed = env_ok and valid >= min_valid_tasks
    if env_ok and not passed:
        checks.append(ValidationCheck(name="min_valid_tasks", passed=False,
                                      detail=f"{valid} valid tasks, fewer than the {min_valid_tasks} required"))
    return ValidationReport(passed=passed, checks=checks, dropped_tasks=dropped)


def validate_environment(pool, env: Environment, *, min_valid_tasks: int = 1,
                         with_solutions: bool = True) -> ValidationReport:
    """Every check, recorded; tasks that fail any of theirs are listed in ``dropped_tasks``.

    ``passed`` only if the environment-level checks all pass and at least ``min_valid_tasks``
    tasks pass all of theirs.
    """
    checks = database_checks(env)
    env_ok = all(c.passed for c in checks)
    if env_ok:
        checks += tool_checks(pool, env)
        env_ok = all(c.passed for c in checks)
    dropped: dict[int, str] = {}
    for task in env.tasks:
        if not env_ok:
            dropped[task.idx] = "environment failed validation"
            continue
        tc = task_checks(pool, env, task.idx, with_solution=with_solutions)
        checks += tc
        bad = [c for c in tc if not c.passed]
        if bad:
            dropped[task.idx] = _first_failure(bad)
    return _report(env, checks, dropped, env_ok, min_valid_tasks)


# A failed or missing one drops the task; in generation a lenient verifier (verifier_mutation)
# is regenerated with the mutation that fooled it, like a too strict one.
REQUIRED_TASK_CHECKS = ("verifier_noop", "verifier_solution", "replay_determinism", "verifier_mutation")


def report_from_checks(env: Environment, env_checks: list[ValidationCheck], task_checks: dict[int, list[ValidationCheck]],
                       dropped: dict[int, str], *, min_valid_tasks: int = 1) -> ValidationReport:
    """The report of checks already run by the stages on exactly these artifacts (the code
    stage's tool checks, each task's final verifier and solution checks), plus the database
    checks; a task without all of its checks passed is dropped. Same verdicts as
    ``validate_environment`` without executing everything a second time."""
    checks = database_checks(env) + list(env_checks)
    env_ok = all(c.passed for c in checks) and any(c.name == "tool_example" for c in env_checks)
    dropped = dict(dropped)
    for task in env.tasks:
        if task.idx in dropped:
            continue
        tc = list(task_checks.get(task.idx, []))
        checks += tc
        bad = [c for c in tc if not c.passed]
        missing = [n for n in REQUIRED_TASK_CHECKS if n not in {c.name for c in tc if c.passed}]
        if not env_ok:
            dropped[task.idx] = "environment failed validation"
        elif bad:
            dropped[task.idx] = _first_failure(bad)
        elif missing:
            dropped[task.idx] = f"checks never run: {', '.join(missing)}"
    return _report(env, checks, dropped, env_ok, min_valid_tasks)


def publishable(env: Environment, report: ValidationReport) -> Environment:
    """The bundle to publish: dropped tasks (and their verifiers/solutions) removed, report attached."""
    if not report.passed:
        raise StageError("validation", [c.detail for c in report.failures()][:20] or ["validation failed"],
                         scenario_id=env.id)
    keep = {t.idx for t in env.tasks} - set(report.dropped_tasks)
    return env.model_copy(update={
        "tasks": [t for t in env.tasks if t.idx in keep],
        "verifiers": [v for v in env.verifiers if v.task_idx in keep],
        "solutions": [s for s in env.solutions if s.task_idx in keep],
        "validation": report,
    })


# --------------------------------------------------------------------------- LLM-free audit


def _audit_mutations(pool, env: Environment, task_idx: int, label: str) -> list[ValidationCheck]:
    if env.solution(task_idx) is not None and env.code is None:
        found = [_skipped(task_idx, "mutations", "there is no environment code to replay the reference solution in")]
    else:
        found = mutation_checks(pool, env, task_idx)
    for c in found:
        c.detail = f"{label}: {c.detail}"[:DETAIL_CHARS]
    return found


def audit_environment(pool, env: Environment) -> tuple[ValidationReport, list[str]]:
    """What can be checked without an LLM on any bundle, complete or not (e.g. AWM-1K records):
    schema and seed errors, tools failing on their spec examples, verifiers that do not
    compile, verifiers that accept a no-op run or (where the bundle has a reference solution)
    a wrong episode derived from it (``mutation_checks``). Returns the report and the parts that could
    not be checked (and why)."""
    checks: list[ValidationCheck] = []
    skipped: list[str] = []
    initial: bytes | None = None
    if env.db_schema is None:
        skipped.append("schema, seed, tools and verifier runs: no database schema")
    else:
        checks += database_checks(env) if env.seed_data is not None else database_checks(
            env.model_copy(update={"seed_data": None}))[:1]
        if env.seed_data is None:
            skipped.append("seed: no seed data (tools and verifiers run on the empty schema)")
        if all(c.passed for c in checks):
            initial = build_database(env.db_schema, env.seed_data)
    if initial is not None and env.code is not None:
        checks += tool_checks(pool, env)
    elif env.code is None:
        skipped.append("tools: no environment code")
    if not env.verifiers:
        skipped.append("verifiers: none in the bundle")
    for v in env.verifiers:
        label = f"{v.style} verifier of task {v.task_idx}"
        try:
            compile(v.code, f"<verifier {v.task_idx}>", "exec")
        except SyntaxError as exc:
            checks.append(ValidationCheck(name="verifier_compile", task_idx=v.task_idx, passed=False,
                                          detail=f"{label} does not compile: line {exc.lineno}: {exc.msg}"))
            continue
        checks.append(ValidationCheck(name="verifier_compile", task_idx=v.task_idx, passed=True, detail=label))
        if initial is None:
            continue
        one = env.model_copy(update={"verifiers": [v]})
        c = noop_check(pool, one, v.task_idx, initial_db=initial)
        c.detail = f"{label}: {c.detail}"
        if v.style == "awm1k_sql" and c.passed is False and "raised" not in c.detail:
            c.passed = True  # evidence collectors have no verdict of their own
        checks.append(c)
        checks += _audit_mutations(pool, one, v.task_idx, label)
    skipped += _skipped_mutation_lines(checks)
    report = ValidationReport(passed=all(c.passed for c in checks), checks=checks)
    return report, skipped


def _skipped_mutation_lines(checks: list[ValidationCheck]) -> list[str]:
    """One line per reason mutations were skipped, with the tasks it applies to."""
    tasks: dict[str, set[int]] = {}
    for c in checks:
        found = skipped_mutation(c)
        if found:
            tasks.setdefault(found[1], set()).add(c.task_idx)
    return [f"verifier mutations of task(s) {', '.join(map(str, sorted(t)))}: {why}" for why, t in tasks.items()]

"""Execution validation: run an environment for real before it is published.

Per environment: the schema and seed data execute with zero errors; every spec tool called
with its example arguments (each in a fresh session) returns no error. Per task: a no-op
episode must not satisfy the verifier; the reference solution replayed in a fresh session
must satisfy it; a second replay must end in the same database (``snapshot_digest``); wrong
episodes derived from the solution must not satisfy the verifier, and equivalent ones must
(``awm_core.soundness``).

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

from awm_core.db import build_database, snapshot_digest
from awm_core.errors import SolutionRefError, SqlExecutionError, StageError
from awm_core.models import Environment, ValidationCheck, ValidationReport, resolve_refs

DETAIL_CHARS = 700


def short_text(value: Any, n: int = 200) -> str:
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


def env_handle(pool, env: Environment):
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


def run_verifier(pool, env: Environment, task_idx: int, initial_db: bytes, final_db: bytes, final_answer):
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
                detail=(f"tool {tc.tool} called with its spec example arguments {short_text(tc.arguments)} on the "
                        f"initial database failed ({tc.result.error_kind}): {tc.result.error}")[:DETAIL_CHARS]))
    return checks


def noop_check(pool, env: Environment, task_idx: int, *, initial_db: bytes | None = None) -> ValidationCheck:
    """The verifier on a no-op episode (final == initial, no answer) must run and not say complete.

    ``initial_db`` defaults to the loaded environment's snapshot (an environment without code
    can pass its own, built from schema and seed)."""
    if initial_db is None:
        initial_db = env_handle(pool, env).snapshot
    out = run_verifier(pool, env, task_idx, initial_db, initial_db, None)
    if out.verdict is None and out.error:
        return ValidationCheck(name="verifier_noop", task_idx=task_idx, passed=False,
                               detail=f"the verifier raised on a no-op episode (final db == initial db, final_answer "
                                      f"None): {out.error}"[:DETAIL_CHARS])
    if out.verdict == "complete":
        return ValidationCheck(name="verifier_noop", task_idx=task_idx, passed=False,
                               detail=("the verifier returned \"complete\" for a no-op episode (final db identical to "
                                       "the initial db, final_answer None), so it checks something that is already "
                                       "true before the task is done; check for the change or the answer the task "
                                       f"asks for. Its evidence: {short_text(out.evidence, 300)}")[:DETAIL_CHARS])
    return ValidationCheck(name="verifier_noop", task_idx=task_idx, passed=True, detail=f"verdict {out.verdict}")


def replay_solution(handle, solution, order: list[int] | None = None) -> tuple[bytes | None, list[str], str | None]:
    """Replay in a fresh session, in the solution's order or in ``order`` (call indices): (final
    db, per-call summaries, failure or None)."""
    trace = []
    results: dict[int, Any] = {}
    with handle.open_session() as s:
        for i in range(len(solution.calls)) if order is None else order:
            call = solution.calls[i]
            try:
                args = resolve_refs(call.arguments, results, i)
            except SolutionRefError as exc:
                return None, trace, str(exc)
            r = s.call(call.tool, args)
            if not r.ok:
                return None, trace, (f"call {i} {call.tool}({short_text(args, 150)}) failed "
                                     f"({r.error_kind}): {r.error}")
            results[i] = r.content
            trace.append(f"[{i}] {call.tool} -> {short_text(r.content, 160)}")
        return s.snapshot(), trace, None


def solution_checks(pool, env: Environment, task_idx: int) -> list[ValidationCheck]:
    """Replay the reference solution: every call succeeds, the verifier says complete, and a
    second replay ends in the same database."""
    solution = env.solution(task_idx)
    if solution is None:
        return [ValidationCheck(name="verifier_solution", task_idx=task_idx, passed=False,
                                detail=f"task {task_idx} has no reference solution")]
    handle = env_handle(pool, env)
    final, trace, failure = replay_solution(handle, solution)
    if failure:
        return [ValidationCheck(name="solution_replay", task_idx=task_idx, passed=False,
                                detail=f"replaying the reference solution on the seeded database: {failure}"[:DETAIL_CHARS])]
    out = run_verifier(pool, env, task_idx, handle.snapshot, final, solution.final_answer)
    checks = []
    if out.verdict != "complete":
        what = f"raised: {out.error}" if out.verdict is None else f"returned \"{out.verdict}\""
        checks.append(ValidationCheck(
            name="verifier_solution", task_idx=task_idx, passed=False,
            # Verdict and evidence first: summaries cut long messages at the end.
            detail=(f"the task's verifier {what} after replaying the reference solution; evidence: "
                    f"{short_text(out.evidence, 300)}; final_answer "
                    f"{short_text(solution.final_answer, 120) if solution.final_answer else None}; calls: "
                    f"{'; '.join(trace) or 'none'}. Either the calls do not do what the task asks, or the final "
                    "answer lacks the value asked for.")[:DETAIL_CHARS * 2]))
    else:
        checks.append(ValidationCheck(name="verifier_solution", task_idx=task_idx, passed=True))
    again, _, failure = replay_solution(handle, solution)
    if failure or snapshot_digest(again) != snapshot_digest(final):
        checks.append(ValidationCheck(
            name="replay_determinism", task_idx=task_idx, passed=False,
            detail=("replaying the reference solution twice from the same initial database gave different final "
                    "databases" + (f" ({failure})" if failure else "") + "; tools must not read the clock or use "
                    "randomness (use the app_clock table or a parameter)")))
    else:
        checks.append(ValidationCheck(name="replay_determinism", task_idx=task_idx, passed=True))
    return checks


def task_checks(pool, env: Environment, task_idx: int, *, with_solution: bool = True) -> list[ValidationCheck]:
    if env.verifier(task_idx) is None:
        return [ValidationCheck(name="verifier_noop", task_idx=task_idx, passed=False,
                                detail=f"task {task_idx} has no verifier")]
    checks = [noop_check(pool, env, task_idx)]
    if with_solution:
        replayed = solution_checks(pool, env, task_idx)
        checks += replayed
        if all(c.passed for c in replayed):
            from awm_core.soundness import soundness_checks  # (it builds on this module's helpers)

            checks += soundness_checks(pool, env, task_idx)
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
# is regenerated with the mutation that fooled it, a too strict one (verifier_equivalence or
# verifier_solution) with the episode it rejected.
REQUIRED_TASK_CHECKS = ("verifier_noop", "verifier_solution", "replay_determinism", "verifier_mutation",
                        "verifier_equivalence")


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

# ``audit_environment`` sorts what it finds into three: a check that failed is a defect, a check
# that passed is a pass, and a part it cannot judge on this bundle (a piece is missing, or what it
# would run says nothing without seed rows) is *not checkable*: no check at all, neither a pass
# nor a defect, listed as "<part>: <why>".

_NO_SEED = "on the empty schema (the environment has no seed data)"
_HTTP_STATUS = re.compile(r"^HTTP (\d{3})\b")
# How the worker words an exception the code did not handle: "<ExceptionType>: message", plus
# " (line N of the environment code)" when a frame of that code raised it.
_UNHANDLED = re.compile(r"\(line \d+ of the environment code\)\s*$"
                        r"|^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")
# Verifier exceptions that hold whatever the rows: the code or its SQL is wrong.
_CODE_ERRORS = re.compile(r"^the verifier raised (NameError|ImportError|ModuleNotFoundError|SyntaxError|"
                          r"UnboundLocalError|OperationalError|DatabaseError|ProgrammingError)\b")


def _seeded(env: Environment) -> bool:
    return env.seed_data is not None and bool(env.seed_data.statements())


def handled_rejection(result) -> bool:
    """Whether a failed tool call is the tool's own, handled answer: an HTTP 4xx other than 422
    (AWM-1K: "not found", "bad request", ...) or a native tool's ``ToolError``. On a database
    without rows that is what a correct tool answers when its example names a row, so it says
    nothing of the tool. Everything else is a defect whatever the data: an exception the code did
    not handle (FastAPI's 500, a native traceback), any 5xx, 422 (the example does not fit the
    route's parameters), arguments that do not fit the tool's schema (``invalid_arguments``), a
    tool the code lacks (``unknown_tool``), the sandbox stopping the code (``environment``), a
    result that is not JSON."""
    if result.ok or result.error_kind != "tool":
        return False
    error = (result.error or "").strip()
    status = _HTTP_STATUS.match(error)
    if status:
        code = int(status.group(1))
        return 400 <= code < 500 and code != 422
    return not _UNHANDLED.search(error) and not error.startswith("the tool returned something that is not JSON")


_NO_LOAD = "tool examples: the environment code does not load (see its defects)"


def _audit_tools(pool, env: Environment) -> tuple[list[ValidationCheck], list[str]]:
    """``tool_checks`` on the seeded database. Without seed rows every example runs on the empty
    schema: a success is a pass and a crash a defect, but a tool that rejects its example itself
    (``handled_rejection``: the row the example names is not there) is not checkable."""
    if _seeded(env):
        checks = tool_checks(pool, env)
        return checks, [_NO_LOAD] if any(c.name != "tool_example" for c in checks) else []
    checks = load_errors(pool, env)
    if checks:
        return checks, [_NO_LOAD]
    rejected = []
    for tc in pool.check_tools(_base(env)):
        if not tc.ok and handled_rejection(tc.result):
            rejected.append(f"{tc.tool} ({short_text(' '.join((tc.result.error or '').split()), 100)})")
            continue
        outcome = "succeeded" if tc.ok else f"failed ({tc.result.error_kind}): {tc.result.error}"
        checks.append(ValidationCheck(
            name="tool_example", tool=tc.tool, passed=tc.ok,
            detail=f"tool {tc.tool} called with its spec example arguments {short_text(tc.arguments)} {_NO_SEED} "
                   f"{outcome}"[:DETAIL_CHARS]))
    if not rejected:
        return checks, []
    return checks, [f"tool examples of {', '.join(rejected)}: the environment has no seed data, and on the empty "
                    "schema each tool rejected its example itself, as a correct tool does when the row the example "
                    "names is not there (a crash would be a defect)"]


def _note(notes: dict, part: str, style: str, task_idx: int, why: str) -> None:
    notes.setdefault((part, style, why), []).append(task_idx)


def _note_lines(notes: dict) -> list[str]:
    """One line per (part, verifier style, reason), with the tasks it applies to."""
    out = []
    for (part, style, why), tasks in notes.items():
        many = "s" if len(tasks) > 1 else ""
        out.append(f"{part} of the {style} verifier{many} of task{many} {', '.join(map(str, sorted(tasks)))}: {why}")
    return out


def _audit_mutations(pool, env: Environment, task_idx: int, label: str, notes: dict) -> list[ValidationCheck]:
    """The wrong and equivalent episodes tried (``soundness_checks``); the ones that cannot be
    built, or would prove nothing, go to ``notes`` as not checkable."""
    style = env.verifier(task_idx).style
    if env.solution(task_idx) is None:
        _note(notes, "mutations", style, task_idx, "there is no reference solution to derive wrong episodes from")
        return []
    if env.code is None:
        _note(notes, "mutations", style, task_idx, "there is no environment code to replay the reference solution in")
        return []
    from awm_core.soundness import skipped_mutation, soundness_checks

    found = []
    for c in soundness_checks(pool, env, task_idx):
        skipped = skipped_mutation(c)
        if skipped:
            kind = skipped[0].split()[0].rstrip(":") if skipped[0].strip() else "mutations"
            what = "mutations" if c.name == "verifier_mutation" else "equivalences"
            _note(notes, what if kind in ("mutations", "equivalences") else f"{kind} {what}", style, task_idx,
                  skipped[1])
        else:
            c.detail = f"{label}: {c.detail}"[:DETAIL_CHARS]
            found.append(c)
    return found


def _audit_verifier(pool, env: Environment, v, label: str, initial: bytes, notes: dict) -> list[ValidationCheck]:
    """A verifier with a verdict, on a seeded database: the no-op check and the mutations. Else
    only whether it runs on a no-op episode is judged (``verifier_run``), and the no-op rejection
    and the mutations are not checkable: an evidence collector gives no verdict, and on the empty
    schema a verdict says nothing of the rows the task is about."""
    one = env.model_copy(update={"verifiers": [v]})
    seeded = _seeded(env)
    if v.style != "awm1k_sql" and seeded:
        c = noop_check(pool, one, v.task_idx, initial_db=initial)
        c.detail = f"{label}: {c.detail}"[:DETAIL_CHARS]
        return [c] + _audit_mutations(pool, one, v.task_idx, label, notes)
    _note(notes, "no-op rejection and mutations", v.style, v.task_idx,
          "the verifier collects evidence for an LLM judge and gives no verdict of its own"
          if v.style == "awm1k_sql" else
          "the environment has no seed data: on the empty schema a verdict says nothing of the rows the task is "
          "about")
    out = run_verifier(pool, one, v.task_idx, initial, initial, None)
    where = "on a no-op episode (final db == initial db, final_answer None)" + ("" if seeded else f" {_NO_SEED}")
    if out.verdict is None and out.error:
        if seeded or out.error_kind == "environment" or not out.error.startswith("the verifier raised ") \
                or _CODE_ERRORS.match(out.error):
            return [ValidationCheck(name="verifier_run", task_idx=v.task_idx, passed=False,
                                    detail=f"{label} failed {where}: {out.error}"[:DETAIL_CHARS])]
        _note(notes, "runs", v.style, v.task_idx,
              f"the verifier raised {_NO_SEED}, where the rows it reads are not there ({short_text(out.error, 160)})")
        return []
    return [ValidationCheck(name="verifier_run", task_idx=v.task_idx, passed=True,
                            detail=f"{label} ran {where} without raising")]


def audit_environment(pool, env: Environment) -> tuple[ValidationReport, list[str]]:
    """What can be checked without an LLM on any bundle, complete or not (e.g. AWM-1K records):
    schema and seed errors, tools failing on their spec examples, verifiers that do not compile
    or do not run, verifiers that accept a no-op run or (where the bundle has a reference
    solution) a wrong episode derived from it (``mutation_checks``).

    Returns the report and the parts that are not checkable on this bundle, one line each,
    "<part>: <why>". The report's checks are only what ran: a failed one is a defect (and
    ``report.passed`` means "no defect"), a passed one a pass; a not checkable part is neither.
    A tool example that the tool itself rejects on a bundle without seed data (a 404: the row is
    not there) is not checkable; a crash is a defect with or without seed data."""
    checks: list[ValidationCheck] = []
    notes: list[str] = []
    initial: bytes | None = None
    if env.db_schema is None:
        notes.append("schema, seed, tools and verifier runs: no database schema")
    else:
        checks += [c for c in database_checks(env) if env.seed_data is not None or c.name != "seed"]
        if env.seed_data is None:
            notes.append("seed: no seed data (tools and verifiers run on the empty schema)")
        elif not _seeded(env):
            notes.append("seed: the seed data has no rows (tools and verifiers run on the empty schema)")
        if all(c.passed for c in checks):
            initial = build_database(env.db_schema, env.seed_data)
        else:
            notes.append("tool examples and verifier runs: the database cannot be built (see the schema and seed "
                         "defects)")
    if env.code is None:
        notes.append("tools: no environment code")
    elif initial is not None:
        found, why = _audit_tools(pool, env)
        checks += found
        notes += why
    if not env.verifiers:
        notes.append("verifiers: none in the bundle")
    per_verifier: dict = {}
    for v in env.verifiers:
        label = f"{v.style} verifier of task {v.task_idx}"
        try:
            compile(v.code, f"<verifier {v.task_idx}>", "exec")
        except SyntaxError as exc:
            checks.append(ValidationCheck(name="verifier_compile", task_idx=v.task_idx, passed=False,
                                          detail=f"{label} does not compile: line {exc.lineno}: {exc.msg}"))
            continue
        checks.append(ValidationCheck(name="verifier_compile", task_idx=v.task_idx, passed=True, detail=label))
        if initial is not None:
            checks += _audit_verifier(pool, env, v, label, initial, per_verifier)
    notes += _note_lines(per_verifier)
    return ValidationReport(passed=all(c.passed for c in checks), checks=checks), notes

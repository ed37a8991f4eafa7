"""Is a verifier sound? Wrong episodes derived from the reference solution (``awm_core.mutations``:
a state-changing call dropped, an id argument swapped, a value the task states changed, a row
destroyed, inserted or edited elsewhere, a wrong or hedged answer) must not satisfy it
(``verifier_mutation``: the verifier is lenient); equivalent episodes (read-only calls around the
solution, independent calls reordered, the answer reworded) must (``verifier_equivalence``: the
verifier is too strict). Run after the solution checks of ``awm_core.validation`` passed, on one
replay of the reference solution.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from awm_core import mutations
from awm_core.db import open_snapshot, snapshot_digest
from awm_core.errors import SolutionRefError
from awm_core.models import Environment, ToolCall, ValidationCheck, resolve_refs
from awm_core.validation import DETAIL_CHARS, env_handle, replay_solution, run_verifier, short_text


# Each drop_call and swap_argument mutation is one more replay in the sandbox pool (the others
# one verifier run), for every task of every environment of a nightly run: the count per kind
# and task is capped so validation stays a small multiple of the replays it already does.
MAX_MUTATIONS_PER_KIND = 3
# Every value a task states is one way to get it wrong: a create with a name, a type, a date and
# a count needs all four tried.
MAX_VALUE_CHANGES = 8


def _mutation(task_idx: int, passed: bool, detail: str, tool: str | None = None) -> ValidationCheck:
    return ValidationCheck(name="verifier_mutation", task_idx=task_idx, passed=passed, tool=tool,
                           detail=detail[:DETAIL_CHARS])


def _skipped(task_idx: int, what: str, why: str, tool: str | None = None) -> ValidationCheck:
    """A mutation that could not be built (or would prove nothing): recorded, not a failure."""
    return _mutation(task_idx, True, f"skipped {what} because {why}", tool)


# "skipped <what> because <why>", after an optional "<label>: " (the audit's); <what> may
# quote arguments, <why> is one of this module's phrases, so the last "because" splits them.
SOUNDNESS_CHECKS = ("verifier_mutation", "verifier_equivalence")
_SKIPPED = re.compile(r"^(?:[^:]*: )?skipped (.*) because (.*)$", re.S)


def skipped_mutation(check: ValidationCheck) -> tuple[str, str] | None:
    """(mutation or equivalence, reason) of a ``verifier_mutation`` or ``verifier_equivalence``
    check that was skipped, else None."""
    m = _SKIPPED.match(check.detail) if check.name in SOUNDNESS_CHECKS and check.passed else None
    return (m.group(1), m.group(2)) if m else None


def _judge(pool, env: Environment, task_idx: int, what: str, initial: bytes, final: bytes, answer,
           tool: str | None = None) -> ValidationCheck:
    out = run_verifier(pool, env, task_idx, initial, final, answer)
    if out.verdict == "complete":
        return _mutation(task_idx, False, (
            f"the verifier said \"complete\" after {what}; that episode does not do the task, so the verifier "
            f"misses what the mutation broke. Its evidence: {short_text(out.evidence, 300)}"), tool)
    return _mutation(task_idx, True, f"{what}: {out.verdict or 'verifier error: ' + short_text(out.error, 120)}", tool)


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
    return f"call {i} ({call.tool}({short_text(call.arguments, 100)}))"


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
                          solution.calls[sw.call_idx].tool, mutations.with_argument(solution, sw), solution, reference)
            for sw in swaps]


def _task_text(env: Environment, task_idx: int) -> str:
    return next((t.text for t in env.tasks if t.idx == task_idx), "")


def _value_checks(pool, env, task_idx, handle, solution, changing, reference) -> list[ValidationCheck]:
    tools = {t.name: t for t in env.api_spec.tools} if env.api_spec else {}
    changes, free = mutations.value_changes(handle.snapshot, solution, changing, tools, _task_text(env, task_idx))
    checks = []
    if free:
        checks.append(_skipped(task_idx, f"change_value of {', '.join(free[:8])}",
                               "the task does not state those values (judged free)"))
    if not changes and not free:
        checks.append(_skipped(task_idx, "change_value", "no state-changing call has an argument the task states "
                                                         "that another valid value could replace"))
    return checks + [
        _mutant_check(pool, env, task_idx, handle,
                      f"change_value in {_call_label(solution, ch.call_idx)}: {ch.argument} {short_text(json.dumps(ch.old), 60)}"
                      f" -> {short_text(json.dumps(ch.new), 60)} ({ch.kind}; the task states {ch.argument})",
                      solution.calls[ch.call_idx].tool, mutations.with_argument(solution, ch), solution, reference)
        for ch in changes[:MAX_VALUE_CHANGES]]


_NOTHING_CHANGED = "the reference solution changes nothing (a question task: the answer checks cover it)"


def _damage_checks(pool, env, task_idx, initial, final, solution) -> list[ValidationCheck]:
    """extra_destructive, extra_insert and extra_update: changes no tool call of the task makes,
    applied to the reference final database."""
    if snapshot_digest(final) == snapshot_digest(initial):
        return [_skipped(task_idx, kind, _NOTHING_CHANGED)
                for kind in ("extra_destructive", "extra_insert", "extra_update")]
    changes = mutations.snapshot_changes(initial, final)
    touched = set(changes)
    prefer = env.verifier(task_idx).code
    conn = open_snapshot(final, readonly=True)
    try:
        others = [t for t in mutations.user_tables(conn) if t not in touched]
    finally:
        conn.close()
    targets = {t: c["inserted"] + [u["new"] for u in c["updated"]] for t, c in changes.items()}
    updated = [(t, u) for t, c in changes.items() for u in c["updated"]]
    built = [
        ("extra_destructive", "", mutations.delete_unrelated_row(final, touched, prefer=prefer),
         "every non-empty table is one the solution changes"),
        ("extra_insert", " in a table the task changes", mutations.insert_copy(final, sorted(touched), targets),
         "no table the solution changes takes a copy of a row"),
        ("extra_insert", " in a table the task changes, under another parent",
         mutations.insert_copy(final, sorted(touched), targets, elsewhere=True),
         "no row the solution changes has a reference column with another value to point at"),
        ("extra_insert", " in another table", mutations.insert_copy(final, others, prefer=prefer),
         "no other table takes a copy of a row"),
        ("extra_update", " of another column of a row the task changes",
         next((d for t, u in updated if (d := mutations.alter_column(final, t, u["key"], set(u["columns"])))), None),
         "the solution updates no row with another column to alter (it only inserts or deletes)"),
        ("extra_update", " in another table", mutations.alter_unrelated_row(final, touched, prefer=prefer),
         "no other table has a row with a column to alter"),
    ]
    checks = []
    for kind, where, damaged, why in built:
        if damaged is None:
            checks.append(_skipped(task_idx, f"{kind}{where}", why))
        else:
            what = f"{kind}{where}: the reference final database, then {damaged[1]}"
            checks.append(_judge(pool, env, task_idx, what, initial, damaged[0], solution.final_answer))
    return checks


def _reads_answer(pool, env, task_idx, initial, final, solution) -> str | None:
    """Why the answer checks cannot run (None when they can)."""
    if not solution.final_answer:
        return "the reference solution gives no final answer"
    if run_verifier(pool, env, task_idx, initial, final, None).verdict == "complete":
        return "the verifier does not read the answer (the reference final database without an answer is complete)"
    return None


def _answer_checks(pool, env, task_idx, ref: "_Reference") -> list[ValidationCheck]:
    """wrong_answer and hedged_answer: the answer's numbers changed, embedded, hedged or only
    inside a date; a database value it states hedged with another of the same column."""
    initial, final, answer = ref.initial, ref.final, ref.solution.final_answer
    why = ref.answer_unread
    if why:
        return [_skipped(task_idx, kind, why) for kind in ("wrong_answer", "hedged_answer")]

    def judge(kind, label, text):
        return _judge(pool, env, task_idx, f"{kind} ({label}): {short_text(text, 160)!r} instead of "
                                           f"{short_text(answer, 160)!r}", initial, final, text)
    checks = []
    wrong = mutations.wrong_answers(answer)
    # When the asked value is not a number (a title, a name), changed numbers leave it right.
    if not wrong:
        checks.append(_skipped(task_idx, "wrong_answer", "the answer has no number to change"))
    elif run_verifier(pool, env, task_idx, initial, final, mutations.without_numbers(answer)).verdict == "complete":
        checks.append(_skipped(task_idx, "wrong_answer", "the asked value is not one of the answer's numbers (the "
                                                         "answer without its numbers is still complete)"))
        wrong = []
    else:
        checks += [judge("wrong_answer", label, text) for label, text in wrong]
    hedges = []
    dbs = [initial, final]
    for m in mutations.number_matches(answer) if wrong else []:
        # Each number the verifier needs (the answer without it is not complete) is an asked value.
        if run_verifier(pool, env, task_idx, initial, final, mutations.without_number(answer, m)).verdict != "complete":
            hedges += [("hedged_answer", label, text)
                       for label, text in mutations.hedged_number(answer, m, dbs, _task_text(env, task_idx))]
    for value in mutations.answer_values(answer, _task_text(env, task_idx), dbs):
        # A value the answer can do without is context ("your order from Acme shipped"), not what was asked.
        if run_verifier(pool, env, task_idx, initial, final, mutations.without_value(answer, value.text)).verdict != "complete":
            hedges.append(("hedged_answer", f"another {value.column} of {value.table} as a second guess",
                           mutations.hedged_value(answer, value)))
    if not hedges:
        checks.append(_skipped(task_idx, "hedged_answer", "the answer states no number or database value the verifier "
                                                          "reads"))
    return checks + [judge(*h) for h in hedges[:MAX_MUTATIONS_PER_KIND + 1]]


@dataclass(frozen=True)
class _Reference:
    """The reference solution replayed once: what every mutation and equivalence starts from."""
    handle: Any
    solution: Any
    initial: bytes
    final: bytes
    changing: list[int]  # the calls whose replay changes the database
    digest: str  # of the final database
    answer_unread: str | None  # why the answer checks cannot run; None when the verifier reads the answer


def _reference(pool, env: Environment, task_idx: int) -> "_Reference | str":
    """The replayed reference, or why the verifier cannot be judged on episodes made from it."""
    verifier = env.verifier(task_idx)
    if verifier is not None and verifier.style == "awm1k_sql":
        return "the verifier collects evidence for a judge and has no verdict"
    solution = env.solution(task_idx)
    if solution is None:
        return "there is no reference solution to derive episodes from"
    handle = env_handle(pool, env)
    states = _replay_states(handle, solution)
    if states is None:
        return "the reference solution does not replay"
    digests = [snapshot_digest(handle.snapshot)] + [snapshot_digest(b) for b in states]
    final = states[-1] if states else handle.snapshot
    return _Reference(handle, solution, handle.snapshot, final,
                      [i for i in range(len(states)) if digests[i + 1] != digests[i]], digests[-1],
                      _reads_answer(pool, env, task_idx, handle.snapshot, final, solution))


def mutation_checks(pool, env: Environment, task_idx: int, ref: "_Reference | str | None" = None) -> list[ValidationCheck]:
    """The verifier on wrong episodes derived from the reference solution (``awm_core.mutations``):
    it must not say "complete" on any. One ``verifier_mutation`` check per mutation tried or
    skipped; run after the solution checks passed."""
    ref = _reference(pool, env, task_idx) if ref is None else ref
    if isinstance(ref, str):
        return [_skipped(task_idx, "mutations", ref)]
    h, sol, changing = ref.handle, ref.solution, ref.changing
    return (_drop_checks(pool, env, task_idx, h, sol, changing, ref.digest)
            + _swap_checks(pool, env, task_idx, h, sol, changing, ref.digest)
            + _value_checks(pool, env, task_idx, h, sol, changing, ref.digest)
            + _damage_checks(pool, env, task_idx, ref.initial, ref.final, sol)
            + _answer_checks(pool, env, task_idx, ref))


# --------------------------------------------------------------------------- equivalences


def _equivalence(task_idx: int, passed: bool, detail: str, tool: str | None = None) -> ValidationCheck:
    return ValidationCheck(name="verifier_equivalence", task_idx=task_idx, passed=passed, tool=tool,
                           detail=detail[:DETAIL_CHARS])


def _accepts(pool, env, task_idx, what, initial, final, answer) -> ValidationCheck:
    out = run_verifier(pool, env, task_idx, initial, final, answer)
    if out.verdict == "complete":
        return _equivalence(task_idx, True, f"{what}: complete")
    said = f"said \"{out.verdict}\"" if out.verdict else f"raised: {short_text(out.error, 200)}"
    return _equivalence(task_idx, False, (
        f"the verifier {said} after {what}; that episode does the task as well as the reference solution, so the "
        f"verifier is too strict. Its evidence: {short_text(out.evidence, 300)}"))


def _skipped_equivalence(task_idx: int, what: str, why: str) -> ValidationCheck:
    return _equivalence(task_idx, True, f"skipped {what} because {why}")


_SAME_DB = "it ends in the same database as the reference solution (nothing new to judge)"


def _read_only_check(pool, env, task_idx, ref: _Reference) -> ValidationCheck:
    handle, solution = ref.handle, ref.solution
    tools = mutations.read_tools(env.api_spec.tools if env.api_spec else [], {c.tool for c in solution.calls})
    if not tools:
        return _skipped_equivalence(task_idx, "read_only_calls", "no read tool has example arguments to call it with")
    look = [ToolCall(tool=t.name, arguments=t.example_arguments()) for t in tools[:2]]
    n = len(solution.calls)
    calls = ([(-len(look) + k, c) for k, c in enumerate(look)] + list(enumerate(solution.calls))
             + [(n + k, c) for k, c in enumerate(look)])
    what = f"read_only_calls: {', '.join(c.tool for c in look)} before and after the reference solution"
    final = _replay_mutant(handle, calls)
    if snapshot_digest(final) == ref.digest:
        return _skipped_equivalence(task_idx, what, _SAME_DB)
    return _accepts(pool, env, task_idx, what, ref.initial, final, solution.final_answer)


def _reorder_check(pool, env, task_idx, ref: _Reference) -> ValidationCheck:
    """The first reordering of independent state-changing calls that replays cleanly and ends
    in the same rows as the reference (new rows may get other keys)."""
    handle, solution = ref.handle, ref.solution
    orders = mutations.reorderings(solution, ref.changing) if len(ref.changing) > 1 else []
    if not orders:
        return _skipped_equivalence(task_idx, "reordered_calls", "no two state-changing calls are independent")
    why = ""
    for order in orders[:MAX_MUTATIONS_PER_KIND]:
        what = f"reordered_calls: the reference solution's calls in the order {order}"
        final, _, failure = replay_solution(handle, solution, order)
        if failure:
            why = f"a call fails in that order, so the order matters ({failure})"
        elif snapshot_digest(final) == ref.digest:
            why = _SAME_DB
        elif not mutations.same_up_to_new_keys(ref.initial, ref.final, final):
            why = "that order ends in another database (the order matters)"
        else:
            return _accepts(pool, env, task_idx, what + " (the same rows; new rows may have other keys)",
                            ref.initial, final, solution.final_answer)
    return _skipped_equivalence(task_idx, what, why)


def _reworded_checks(pool, env, task_idx, ref: "_Reference") -> list[ValidationCheck]:
    if ref.answer_unread:
        return [_skipped_equivalence(task_idx, "reworded_answer", ref.answer_unread)]
    answer = ref.solution.final_answer
    return [_accepts(pool, env, task_idx, f"reworded_answer ({label}): {short_text(text, 200)!r} instead of "
                                          f"{short_text(answer, 160)!r}", ref.initial, ref.final, text)
            for label, text in mutations.reworded_answers(answer)]


def equivalence_checks(pool, env: Environment, task_idx: int,
                       ref: "_Reference | str | None" = None) -> list[ValidationCheck]:
    """The verifier on episodes that do the task as well as the reference solution: it must say
    "complete" on each. One ``verifier_equivalence`` check per episode tried or skipped."""
    ref = _reference(pool, env, task_idx) if ref is None else ref
    if isinstance(ref, str):
        return [_skipped_equivalence(task_idx, "equivalences", ref)]
    return ([_read_only_check(pool, env, task_idx, ref), _reorder_check(pool, env, task_idx, ref)]
            + _reworded_checks(pool, env, task_idx, ref))


def soundness_checks(pool, env: Environment, task_idx: int) -> list[ValidationCheck]:
    """Lenient and too strict, side by side: ``mutation_checks`` then ``equivalence_checks``,
    on one replay of the reference solution."""
    ref = _reference(pool, env, task_idx)
    return mutation_checks(pool, env, task_idx, ref) + equivalence_checks(pool, env, task_idx, ref)



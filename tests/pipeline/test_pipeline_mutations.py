"""Reference solutions with ``$ref`` bindings, and the verifier mutation checks: each kind of
wrong episode catches a planted lenient verifier and lets a strict one pass."""
from __future__ import annotations

import json

import pytest

from awm_core.models import ApiSpec, DbSchema, ReferenceSolution, Scenario, SeedData, Task, ToolCall, Verifier
from awm_core.stages import code, solution, verifier
from awm_core.stages.base import StageContext
from awm_core.soundness import mutation_checks, skipped_mutation, soundness_checks
from awm_core.validation import solution_checks, validate_environment

from test_pipeline_stages import CODE, SCHEMA, SEED, SPEC

# Both notes are the signed-in user's, so an id argument has another row it can point at.
SEED1 = json.loads(json.dumps(SEED))
SEED1["tables"][1]["insert_statements"][1] = "INSERT INTO notes (id, user_id, title, body) VALUES (2, 1, 'Other', 'x')"

TASKS = ["Create notes titled 'Trip' and 'Pack'.", "Delete my note 'Groceries'.", "How many notes do I have?",
         "Create a note titled 'Trip'."]

KEPT = '''
def _kept(initial_db, final_db, table, where="1"):
    q = f"SELECT * FROM {table} WHERE {where} ORDER BY 1"
    return initial_db.execute(q).fetchall() == final_db.execute(q).fetchall()
'''


def _v(idx: int, body: str) -> Verifier:
    return Verifier(task_idx=idx, code=KEPT + "\n\ndef verify(initial_db, final_db, final_answer):\n" + body)


# task 0: two notes to create. Lenient: looks only for the first.
TWO_LENIENT = '''    n = final_db.execute("SELECT count(*) FROM notes WHERE title = 'Trip'").fetchone()[0]
    ok = n == 1 and _kept(initial_db, final_db, "users")
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"trip": n}}
'''
TWO_STRICT = '''    ch = db_changes(initial_db, final_db)
    new = sorted(r["title"] for r in ch.get("notes", {}).get("inserted", []))
    ok = set(ch) == {"notes"} and new == ["Pack", "Trip"] and not ch["notes"]["updated"] and not ch["notes"]["deleted"]
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"new": new}}
'''
# task 1: delete Groceries. Lenient: one note fewer, whichever.
DELETE_LENIENT = '''    before = initial_db.execute("SELECT count(*) FROM notes").fetchone()[0]
    after = final_db.execute("SELECT count(*) FROM notes").fetchone()[0]
    ok = after == before - 1 and _kept(initial_db, final_db, "users")
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"before": before, "after": after}}
'''
DELETE_STRICT = '''    gone = final_db.execute("SELECT count(*) FROM notes WHERE title = 'Groceries'").fetchone()[0] == 0
    ok = gone and _kept(initial_db, final_db, "notes", "title != 'Groceries'") and _kept(initial_db, final_db, "users")
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"gone": gone}}
'''
# task 2: a count. Lenient: the number as a substring of the answer.
COUNT_LENIENT = '''    n = initial_db.execute("SELECT count(*) FROM notes WHERE user_id = 1").fetchone()[0]
    return {"verdict": _verdict_of(str(n) in (final_answer or "")), "evidence": {"expected": n}}


def _verdict_of(ok):
    return "complete" if ok else "incomplete"
'''
COUNT_STRICT = '''    n = initial_db.execute("SELECT count(*) FROM notes WHERE user_id = 1").fetchone()[0]
    numbers = answer_numbers(final_answer)
    ok = n in numbers and len(set(numbers)) == 1
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"expected": n, "numbers": numbers}}
'''
# task 3: create Trip. Lenient: does not notice damage to other tables.
TRIP_LENIENT = '''    n = final_db.execute("SELECT count(*) FROM notes WHERE title = 'Trip'").fetchone()[0]
    return {"verdict": "complete" if n == 1 else "incomplete", "evidence": {"trip": n}}
'''
TRIP_STRICT = '''    n = final_db.execute("SELECT count(*) FROM notes WHERE title = 'Trip'").fetchone()[0]
    ok = n == 1 and _kept(initial_db, final_db, "users") and _kept(initial_db, final_db, "notes", "title != 'Trip'")
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"trip": n}}
'''

SOLUTIONS = [
    ReferenceSolution(task_idx=0, calls=[ToolCall(tool="create_note", arguments={"title": "Trip"}),
                                         ToolCall(tool="create_note", arguments={"title": "Pack"})]),
    ReferenceSolution(task_idx=1, calls=[ToolCall(tool="delete_note", arguments={"note_id": 1})]),
    ReferenceSolution(task_idx=2, calls=[ToolCall(tool="list_notes")], final_answer="You have 2 notes."),
    ReferenceSolution(task_idx=3, calls=[ToolCall(tool="create_note", arguments={"title": "Trip"})]),
]
LENIENT = [TWO_LENIENT, DELETE_LENIENT, COUNT_LENIENT, TRIP_LENIENT]
STRICT = [TWO_STRICT, DELETE_STRICT, COUNT_STRICT, TRIP_STRICT]


@pytest.fixture(scope="module")
def ctx() -> StageContext:
    sc = Scenario.new("Note Pad", "Personal notes", "productivity")
    c = StageContext(scenario=sc, tasks=[Task(scenario_id=sc.id, idx=i, text=t) for i, t in enumerate(TASKS)],
                     db_schema=DbSchema.from_data(SCHEMA), seed_data=SeedData.from_data(SEED1),
                     api_spec=ApiSpec.from_data(SPEC), task_idx=0)
    return c.with_(code=code.parse(CODE, c))


def _env(ctx, bodies):
    return ctx.environment(verifiers=[_v(i, b) for i, b in enumerate(bodies)], solutions=SOLUTIONS)


def _tried(checks):
    return [c for c in checks if not skipped_mutation(c)]


@pytest.mark.parametrize("idx,kind", [(0, "drop_call of call 1 (create_note"), (1, "swap_argument in call 0"),
                                      (2, "wrong_answer (numbers embedded in longer numbers)"),
                                      (3, "extra_destructive")])
def test_each_mutation_catches_its_lenient_verifier_and_passes_the_strict_one(ctx, pool, idx, kind):
    lenient = mutation_checks(pool, _env(ctx, LENIENT), idx)
    failed = [c for c in lenient if not c.passed]
    assert failed and all(c.name == "verifier_mutation" and c.task_idx == idx for c in failed)
    assert any(f"said \"complete\" after {kind}" in c.detail for c in failed), [c.detail for c in failed]
    strict = mutation_checks(pool, _env(ctx, STRICT), idx)
    assert all(c.passed for c in strict), [c.detail for c in strict if not c.passed]
    assert _tried(strict), "the strict verifier must have been tried on at least one mutation"


def _as_prompted() -> str:
    """Task 2's verifier written the way the verifier prompt tells a model to read numbers."""
    rule = verifier.PARSED_VALUES_RULE
    test = rule[rule.index("some v in "):rule.index(" < 0.005") + len(" < 0.005")]
    assert test == "some v in answer_numbers(final_answer) has abs(v - expected) < 0.005"
    return ("    expected = initial_db.execute(\"SELECT count(*) FROM notes WHERE user_id = 1\").fetchone()[0]\n"
            "    found = answer_numbers(final_answer)\n"
            "    ok = any(abs(v - expected) < 0.005 for v in found)\n"
            "    return {\"verdict\": \"complete\" if ok else \"incomplete\", \"evidence\": {\"found\": found}}\n")


def test_a_verifier_following_the_prompts_parsed_values_rule_passes_wrong_answer(ctx, pool):
    """The prompt's rule and the answer mutations agree: a verifier that reads numbers as told
    accepts the reference answer and its rewordings and rejects every changed, embedded or
    date-only number, where the substring verifier (COUNT_LENIENT) is caught."""
    env = _env(ctx, [TWO_STRICT, DELETE_STRICT, _as_prompted(), TRIP_STRICT])
    assert all(c.passed for c in solution_checks(pool, env, 2))
    checks = [c for c in soundness_checks(pool, env, 2) if "_answer" in c.detail]
    tried = _tried(checks)
    assert {c.detail.split(" ")[0] for c in tried} == {"wrong_answer", "hedged_answer", "reworded_answer"}
    assert len(tried) >= 5 and all(c.passed for c in checks), [c.detail for c in checks if not c.passed]
    lenient = _env(ctx, [TWO_STRICT, DELETE_STRICT, COUNT_LENIENT, TRIP_STRICT])
    assert any("after hedged_answer (the number only inside an ISO date)" in c.detail
               for c in mutation_checks(pool, lenient, 2) if not c.passed)


def test_swap_names_the_row_and_table_and_drop_names_the_call(ctx, pool):
    swap = [c for c in mutation_checks(pool, _env(ctx, LENIENT), 1) if not c.passed]
    assert "note_id 1 -> 2 (another row of notes)" in swap[0].detail and swap[0].tool == "delete_note"
    drop = [c.detail for c in mutation_checks(pool, _env(ctx, STRICT), 0)]
    assert any(d.startswith("drop_call of call 0 (create_note({\"title\": \"Trip\"})): incomplete") for d in drop)


def test_mutations_that_cannot_be_built_are_skipped_not_failed(ctx, pool):
    checks = mutation_checks(pool, _env(ctx, STRICT), 2)  # read-only: nothing to drop, swap or protect
    reasons = {skipped_mutation(c)[0]: skipped_mutation(c)[1] for c in checks if skipped_mutation(c)}
    assert reasons.keys() == {"drop_call", "swap_argument", "change_value", "extra_destructive", "extra_insert",
                              "extra_update"}
    assert reasons["extra_insert"].startswith("the reference solution changes nothing")
    assert "no call of the reference solution changes the database" in reasons["drop_call"]
    assert len(_tried(checks)) == 4 and all(c.passed for c in _tried(checks))  # wrong and hedged answers rejected
    no_answer = mutation_checks(pool, _env(ctx, STRICT), 3)
    assert any(skipped_mutation(c) == ("wrong_answer", "the reference solution gives no final answer")
               for c in no_answer)
    bare = ctx.environment(verifiers=[_v(3, TRIP_STRICT)])
    assert [skipped_mutation(c) for c in mutation_checks(pool, bare, 3)] == [
        ("mutations", "there is no reference solution to derive episodes from")]


def test_a_mutant_ending_in_the_reference_database_is_skipped(ctx, pool):
    # The scratch note is created and deleted again: without its creation the delete fails
    # (its $ref names the dropped call) and the end state is the reference's.
    sol = ReferenceSolution(task_idx=3, calls=[
        ToolCall(tool="create_note", arguments={"title": "Scratch"}),
        ToolCall(tool="delete_note", arguments={"note_id": {"$ref": "0.id"}}),
        ToolCall(tool="create_note", arguments={"title": "Trip"})])
    env = ctx.environment(verifiers=[_v(3, TRIP_STRICT)], solutions=[sol])
    checks = mutation_checks(pool, env, 3)
    assert all(c.passed for c in checks)
    assert ("drop_call of call 0 (create_note({\"title\": \"Scratch\"}))",
            "it ends in the same database as the reference solution") in [skipped_mutation(c) for c in checks]
    assert any(c.detail.startswith("drop_call of call 1 (delete_note") and c.detail.endswith("incomplete")
               for c in checks)


def test_validation_drops_a_lenient_task_naming_the_mutation(ctx, pool):
    env = ctx.environment(verifiers=[_v(i, b) for i, b in enumerate([TWO_LENIENT, DELETE_STRICT, COUNT_STRICT,
                                                                      TRIP_STRICT])], solutions=SOLUTIONS)
    report = validate_environment(pool, env, min_valid_tasks=1)
    assert report.passed and list(report.dropped_tasks) == [0]
    assert report.dropped_tasks[0].startswith("verifier_mutation: the verifier said \"complete\" after drop_call")
    names = {c.name for c in report.checks if c.task_idx == 1}
    assert "verifier_mutation" in names


def test_soundness_errors_name_the_mutation_for_the_verifier_stage(ctx, pool):
    checks = mutation_checks(pool, _env(ctx, LENIENT), 3)
    errors = verifier.soundness_errors(checks)
    assert any("extra_destructive" in e and "deleted the first row of users" in e for e in errors)
    assert all(e.startswith("your previous verifier accepted") for e in errors)
    assert verifier.soundness_errors(mutation_checks(pool, _env(ctx, STRICT), 3)) == []
    assert "extra_destructive" in verifier.build_messages(ctx.with_(task_idx=3), errors)[-1]["content"]


def test_solution_stage_returns_mutation_checks_without_rejecting_the_solution(ctx, pool):
    lenient = ctx.with_(task_idx=3, verifiers=[_v(3, TRIP_LENIENT)])
    checks = solution.execute(SOLUTIONS[3], lenient, pool)
    assert {c.name for c in checks} >= {"verifier_solution", "replay_determinism", "verifier_mutation"}
    assert any(c.name == "verifier_mutation" and not c.passed for c in checks)

"""Execution validation in the sandbox: planted bad verifiers and solutions are caught, and
the stage that made them is told why."""
from __future__ import annotations

import json

import pytest

from awm_core.errors import StageError
from awm_core.models import ApiSpec, DbSchema, ReferenceSolution, Scenario, SeedData, Task, ToolCall
from awm_core.runtime import EXAMPLE_RULE
from awm_core.stages import code, solution, spec, verifier
from awm_core.stages.base import StageContext
from awm_core.validation import publishable, validate_environment

from test_pipeline_stages import CODE, SCHEMA, SEED, SPEC, TASK_TEXTS, VERIFIER

NOOP_PASSING = '''```python
def verify(initial_db, final_db, final_answer):
    n = final_db.execute("SELECT count(*) FROM notes WHERE title = 'Groceries'").fetchall()[0][0]
    return {"verdict": "complete" if n == 1 else "incomplete", "evidence": {"groceries": n}}
```'''
UNSATISFIABLE = '''```python
def verify(initial_db, final_db, final_answer):
    n = final_db.execute("SELECT count(*) FROM notes WHERE title = 'Trip' AND body = 'never'").fetchall()[0][0]
    return {"verdict": "complete" if n == 1 else "incomplete", "evidence": {"matching": n}}
```'''
GOOD_SOLUTION = ReferenceSolution(task_idx=0, calls=[ToolCall(tool="create_note", arguments={"title": "Trip"})])


@pytest.fixture
def ctx() -> StageContext:
    sc = Scenario.new("Note Pad", "Personal notes", "productivity")
    c = StageContext(
        scenario=sc, tasks=[Task(scenario_id=sc.id, idx=i, text=t) for i, t in enumerate(TASK_TEXTS[:3])],
        db_schema=DbSchema.from_data(SCHEMA), seed_data=SeedData.from_data(SEED), api_spec=ApiSpec.from_data(SPEC),
        task_idx=0)
    return c.with_(code=code.parse(CODE, c))


def test_code_stage_runs_every_tool_example(ctx, pool):
    code.execute(ctx.code, ctx, pool)  # all examples succeed
    broken = CODE.replace("SELECT id, title FROM notes", "SELECT id, titel FROM notes")
    with pytest.raises(StageError) as exc:
        code.execute(code.parse(broken, ctx), ctx, pool)
    assert exc.value.errors == [e for e in exc.value.errors if "list_notes" in e]
    assert "no such column: titel" in exc.value.errors[0]
    assert "no such column: titel" in code.build_messages(ctx, exc.value.errors)[-1]["content"]


RENAME_TOOL = {"name": "rename_note", "description": "Rename a note.", "parameters": {
    "note_id": {"type": "integer", "description": "id", "required": True, "example": 1},
    "title": {"type": "string", "description": "new title", "required": True, "example": "Renamed"}},
    "returns": {"renamed": "boolean"}, "tables": ["notes"], "group": "notes"}
RENAME_CODE = '''

def rename_note(conn: sqlite3.Connection, note_id: int, title: str) -> dict:
    """Rename a note.

    Args:
        note_id: id
        title: new title
    """
    if conn.execute("UPDATE notes SET title = ? WHERE id = ?", (title, note_id)).rowcount == 0:
        raise ToolError(f"no note {note_id}")
    return {"renamed": True}
```'''


def test_tool_examples_run_as_the_prompts_say(ctx, pool):
    """delete_note's example deletes note 1 before rename_note's example renames it: both pass
    only if each example runs alone on a fresh copy of the seeded database, as EXAMPLE_RULE says."""
    assert "fresh copy of the seeded database" in EXAMPLE_RULE
    with_rename = ctx.with_(api_spec=ApiSpec.from_data({"tools": SPEC["tools"] + [RENAME_TOOL]}))
    assert [t.name for t in with_rename.api_spec.tools][-2:] == ["delete_note", "rename_note"]
    with_rename = with_rename.with_(code=code.parse(CODE.removesuffix("```") + RENAME_CODE, with_rename))
    checks = code.execute(with_rename.code, with_rename, pool)
    assert [c.tool for c in checks] == ["list_notes", "create_note", "delete_note", "rename_note"]
    assert all(c.passed for c in checks)
    for module in (spec, code):
        assert EXAMPLE_RULE in module.build_messages(with_rename, [])[-1]["content"]


def test_planted_noop_passing_verifier_is_caught(ctx, pool):
    v = verifier.parse(NOOP_PASSING, ctx)
    with pytest.raises(StageError) as exc:
        verifier.execute(v, ctx, pool)
    assert "\"complete\" for a no-op episode" in exc.value.errors[0]
    assert "groceries" in exc.value.errors[0]  # the verifier's own evidence travels to the repair prompt
    verifier.execute(verifier.parse(VERIFIER, ctx), ctx, pool)


def test_planted_unsatisfiable_verifier_and_wrong_solution_are_caught(ctx, pool):
    unsat = ctx.with_(verifiers=[verifier.parse(UNSATISFIABLE, ctx)])
    verifier.execute(unsat.verifiers[0], ctx, pool)  # passes the no-op check: only the solution can expose it
    with pytest.raises(StageError) as exc:
        solution.execute(GOOD_SOLUTION, unsat, pool)
    assert "returned \"incomplete\"" in exc.value.errors[0] and "create_note" in exc.value.errors[0]
    good = ctx.with_(verifiers=[verifier.parse(VERIFIER, ctx)])
    solution.execute(GOOD_SOLUTION, good, pool)
    wrong = ReferenceSolution(task_idx=0, calls=[ToolCall(tool="delete_note", arguments={"note_id": 42})])
    with pytest.raises(StageError, match="call 0 delete_note.*failed \\(tool\\): no note 42"):
        solution.execute(wrong, good, pool)


def test_validate_environment_drops_bad_tasks_and_enforces_minimum(ctx, pool):
    env = ctx.environment(
        verifiers=[verifier.parse(VERIFIER, ctx),
                   verifier.parse(NOOP_PASSING, ctx.with_(task_idx=1)),
                   verifier.parse(UNSATISFIABLE, ctx.with_(task_idx=2))],
        solutions=[GOOD_SOLUTION, GOOD_SOLUTION.model_copy(update={"task_idx": 1}),
                   GOOD_SOLUTION.model_copy(update={"task_idx": 2})])
    report = validate_environment(pool, env, min_valid_tasks=1)
    assert report.passed and sorted(report.dropped_tasks) == [1, 2]
    assert report.dropped_tasks[1].startswith("verifier_noop") and report.dropped_tasks[2].startswith("verifier_solution")
    names = {(c.name, c.task_idx): c.passed for c in report.checks}
    assert names[("replay_determinism", 0)] and names[("tool_example", None)]
    out = publishable(env, report)
    assert [t.idx for t in out.tasks] == [0] and [v.task_idx for v in out.verifiers] == [0] and out.validation is report
    strict = validate_environment(pool, env, min_valid_tasks=2)
    assert not strict.passed and strict.failures()[-1].name == "min_valid_tasks"
    with pytest.raises(StageError):
        publishable(env, strict)


def test_broken_seed_fails_environment_checks(ctx, pool):
    seed = json.loads(json.dumps(SEED))
    seed["tables"][1]["insert_statements"].append("INSERT INTO notes (id, user_id, title) VALUES (5, 99, 'x')")
    env = ctx.environment(seed_data=SeedData.from_data(seed))
    report = validate_environment(pool, env)
    assert not report.passed and report.failures()[0].name == "seed"
    assert set(report.dropped_tasks) == {0, 1, 2}


def test_report_from_stage_checks_matches_a_full_revalidation(ctx, pool):
    from awm_core.validation import report_from_checks, task_checks, tool_checks

    env = ctx.environment(
        verifiers=[verifier.parse(VERIFIER, ctx), verifier.parse(NOOP_PASSING, ctx.with_(task_idx=1)),
                   verifier.parse(UNSATISFIABLE, ctx.with_(task_idx=2))],
        solutions=[GOOD_SOLUTION.model_copy(update={"task_idx": i}) for i in range(3)])
    full = validate_environment(pool, env, min_valid_tasks=1)
    per_task = {i: task_checks(pool, env, i) for i in range(2)}  # task 2's checks were never run
    got = report_from_checks(env, tool_checks(pool, env), per_task, {}, min_valid_tasks=1)
    assert got.passed == full.passed and sorted(got.dropped_tasks) == sorted(full.dropped_tasks) == [1, 2]
    assert got.dropped_tasks[2] == ("checks never run: verifier_noop, verifier_solution, replay_determinism, "
                                    "verifier_mutation, verifier_equivalence")
    assert not report_from_checks(env, [], per_task, {}).passed  # no tool checks: never publishable


def test_checks_in_check_processes_match_checks_here_and_survive_a_dead_process(ctx, pool):
    """The stages' sandbox checks give the same results in a check process as in this one, a
    rejected artifact comes back as the same StageError, and a check process that dies fails
    only the check it was running (with a clear error) before a fresh one takes the next."""
    import os
    import signal

    from awm_core.errors import AWMError
    from awm_core.settings import SandboxSettings
    from awm_core.stages import check_processes
    from awm_core.stages.base import execute_checks

    good = ctx.with_(verifiers=[verifier.parse(VERIFIER, ctx)])
    here = execute_checks(solution, GOOD_SOLUTION, good, pool)
    with check_processes.CheckProcesses(SandboxSettings(workers=1), processes=1) as checks:
        there = execute_checks(solution, GOOD_SOLUTION, good, checks)
        assert [(c.name, c.passed, c.detail) for c in there] == [(c.name, c.passed, c.detail) for c in here]
        assert any(c.name == "verifier_mutation" for c in there)  # the soundness episodes ran there too
        with pytest.raises(StageError) as exc:
            execute_checks(verifier, verifier.parse(NOOP_PASSING, ctx), ctx, checks)
        assert exc.value.stage == "verifier" and "\"complete\" for a no-op episode" in exc.value.errors[0]

        pids = list(checks._pool(checks.slot(ctx.scenario_id))._processes)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(AWMError, match="a check process died while running the code stage's checks"):
            execute_checks(code, ctx.code, ctx, checks)
        assert [c.passed for c in execute_checks(code, ctx.code, ctx, checks)] == [True] * len(ctx.api_spec.tools)
    with pytest.raises(AWMError, match="closed"):
        execute_checks(code, ctx.code, ctx, checks)

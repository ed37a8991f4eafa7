"""Gaps between what the stage prompts tell a model and what the checks and the sandbox do,
found when independent models wrote environments: each test pins the prompt and the check
(or the sandbox) to the same rule."""
from __future__ import annotations

import ast
import json
import re

import pytest

from awm_core.db import build_database
from awm_core.errors import SolutionRefError, StageError
from awm_core.models import ApiSpec, DbSchema, Scenario, SeedData, Task, resolve_refs
from awm_core.runtime import sandbox
from awm_core.stages import code, schema, seed_data, solution, spec, tasks, verifier
from awm_core.stages.base import StageContext, render_spec, render_spec_json
from awm_core.validation import tool_checks

from test_pipeline_stages import CODE, SCHEMA, SEED, SPEC

PUBLIC_IMPORTS = {m for m in sandbox.NATIVE_IMPORTS if not m.startswith("_") and m != "awm_core.errors"}


@pytest.fixture
def ctx() -> StageContext:
    sc = Scenario.new("Team Notes", "Notes shared in a team", "productivity")
    return StageContext(
        scenario=sc, tasks=[Task(scenario_id=sc.id, idx=0, text="Create a note titled 'Trip' with the body 'pack'.")],
        db_schema=DbSchema.from_data(SCHEMA), seed_data=SeedData.from_data(SEED), api_spec=ApiSpec.from_data(SPEC),
        task_idx=0, tasks_per_scenario=1, target_tools=12)


def user_prompt(module, ctx) -> str:
    return module.build_messages(ctx, [])[-1]["content"]


# ----------------------------------------------------------------------------- 1. strptime in the sandbox

STRPTIME_SPEC = {"tools": [
    {"name": "days_between", "description": "Days from one date to another.", "parameters": {
        "start": {"type": "string", "description": "first date, YYYY-MM-DD", "required": True, "example": "2026-03-11"},
        "end": {"type": "string", "description": "second date, YYYY-MM-DD", "required": True, "example": "2026-03-14"}},
     "returns": {"days": "integer"}, "tables": ["notes"], "group": "dates"}]}
STRPTIME_CODE = '''```python
import sqlite3
from datetime import datetime


def days_between(conn: sqlite3.Connection, start: str, end: str) -> dict:
    """Days from one date to another.

    Args:
        start: first date, YYYY-MM-DD
        end: second date, YYYY-MM-DD
    """
    a = datetime.strptime(start, "%Y-%m-%d")
    b = datetime.strptime(end, "%Y-%m-%d")
    return {"days": (b - a).days}
```'''
STRPTIME_VERIFIER = '''```python
from datetime import datetime


def verify(initial_db, final_db, final_answer):
    day = datetime.strptime("2026-03-14", "%Y-%m-%d").date()
    n = final_db.execute("SELECT count(*) FROM notes WHERE title = 'Trip'").fetchone()[0]
    return {"verdict": "complete" if n else "incomplete", "evidence": {"day": day.isoformat(), "trip_notes": n}}
```'''


def _run_module(source: str, allowed: frozenset[str]) -> dict:
    ns = {"__name__": "generated", "__builtins__": sandbox.make_builtins(allowed)}
    exec(compile(source, "<generated>", "exec"), ns)
    return ns


def test_strptime_needs_its_lazy_import_on_the_allow_list():
    # The C datetime imports _strptime through the calling module's __import__, the guard.
    source = 'from datetime import datetime\n\ndef f():\n    return datetime.strptime("2026-03-14", "%Y-%m-%d").day\n'
    without = _run_module(source, sandbox.NATIVE_IMPORTS - {"_strptime"})
    with pytest.raises(ImportError, match="_strptime"):
        without["f"]()
    assert _run_module(source, sandbox.NATIVE_IMPORTS)["f"]() == 14
    assert "_strptime" in sandbox.VERIFIER_IMPORTS and "_strptime" in sandbox.AWM1K_IMPORTS


def test_a_native_tool_using_strptime_runs_its_example_in_the_sandbox(ctx, pool):
    c = ctx.with_(api_spec=ApiSpec.from_data(STRPTIME_SPEC))
    env_code = code.parse(STRPTIME_CODE, c)  # the static checks accept it
    checks = tool_checks(pool, c.environment(code=env_code))
    assert [(k.name, k.tool, k.passed) for k in checks] == [("tool_example", "days_between", True)], checks
    assert code.execute(env_code, c, pool)
    with pool.load(c.environment(code=env_code)).open_session() as s:
        r = s.call("days_between", {"start": "2026-03-11", "end": "2026-03-14"})
    assert r.ok and r.content == {"days": 3}, r


def test_a_verifier_using_strptime_runs_in_the_sandbox(ctx, pool):
    c = ctx.with_(code=code.parse(CODE, ctx))
    v = verifier.parse(STRPTIME_VERIFIER, c)
    env = c.environment(verifiers=[v])
    [noop] = verifier.execute(v, c, pool)
    assert noop.passed and noop.detail == "verdict incomplete"
    initial = build_database(c.db_schema, c.seed_data)
    out = pool.verify(env, 0, initial_db=initial, final_db=initial, final_answer=None)
    assert out.error is None and out.evidence == {"day": "2026-03-14", "trip_notes": 0}, out


# ----------------------------------------------------------------------------- 2. one import list

def test_the_code_prompt_lists_exactly_the_sandbox_public_imports(ctx):
    text = user_prompt(code, ctx)
    listed = re.search(r"Imports allowed: (.*?)\. No module-level", text).group(1).split(", ")
    assert set(listed) == PUBLIC_IMPORTS and listed == sorted(listed)
    assert {"uuid", "datetime", "zoneinfo"} <= set(listed)
    assert not any(m.startswith("_") or m == "awm_core.errors" for m in listed)


def test_the_static_import_check_admits_what_the_sandbox_admits():
    ok = "from __future__ import annotations\nimport uuid\nfrom zoneinfo import ZoneInfo\nfrom awm_core.errors import ToolError\n"
    assert code.import_errors(ast.parse(ok)) == []
    for bad in ("import os", "import _strptime", "import awm_core.errors", "import subprocess"):
        [err] = code.import_errors(ast.parse(bad))
        assert "is not allowed" in err and "uuid" in err
    # A narrower list (the verifier's) still narrows.
    assert code.import_errors(ast.parse("import uuid"), ("json",))


def test_every_verifier_import_is_allowed_by_the_verifier_sandbox():
    assert set(verifier.IMPORTS) <= sandbox.VERIFIER_IMPORTS


# ----------------------------------------------------------------------------- 3. the signed-in user rule

def _spec_with(param: str) -> dict:
    data = json.loads(json.dumps(SPEC))
    data["tools"].append({"name": "assign_note", "description": "Assign a note to a teammate.", "parameters": {
        "note_id": {"type": "integer", "description": "note", "required": True, "example": 1},
        param: {"type": "integer", "description": "the teammate's user id", "required": True, "example": 2}},
        "returns": {"assigned": "boolean"}, "tables": ["notes", "users"], "group": "notes"})
    return data


def test_the_spec_prompt_limits_the_user_rule_to_the_signed_in_user(ctx):
    text = user_prompt(spec, ctx)
    assert "never a parameter" not in text
    assert "no parameter called user_id or current_user_id" in text
    assert "only about the signed-in user" in text and "ANOTHER" in text
    assert all(name in text for name in ("assignee_id", "member_id", "recipient_id"))


@pytest.mark.parametrize("param", ["assignee_id", "member_id", "recipient_id"])
def test_a_parameter_for_another_member_passes_the_spec_check(ctx, param):
    spec.check_spec(ApiSpec.from_data(_spec_with(param)), ctx)


@pytest.mark.parametrize("param", spec.SIGNED_IN_USER_PARAMS)
def test_a_signed_in_user_parameter_is_rejected_with_the_alternative(ctx, param):
    with pytest.raises(StageError) as exc:
        spec.check_spec(ApiSpec.from_data(_spec_with(param)), ctx)
    [err] = [e for e in exc.value.errors if param in e]
    assert "signed-in user is implicit" in err and "another person" in err
    assert all(name in err for name in ("assignee_id", "member_id", "recipient_id"))


# ----------------------------------------------------------------------------- 4. dates of created rows

def test_the_tasks_prompt_asks_created_rows_to_carry_their_dates(ctx):
    text = user_prompt(tasks, ctx)
    assert "creates something states every date and time the new record needs" in text
    assert "never read the real clock" in text


def test_the_schema_prompt_counts_app_clock_toward_the_table_cap(ctx):
    text = user_prompt(schema, ctx)
    assert f"5 to {schema.MAX_TABLES} tables, counting app_clock" in text
    assert f"it is one of the {schema.MAX_TABLES} tables" in text
    assert "a row a task creates needs a\n  date the task does not state" in text


# ----------------------------------------------------------------------------- 5. the seed row count

def test_the_seed_prompt_says_the_row_count_is_a_guide(ctx):
    text = user_prompt(seed_data, ctx)
    assert "About 60-150 rows in total: a guide, not a hard limit" in text


def test_the_seed_check_does_not_count_rows(ctx):
    data = json.loads(json.dumps(SEED))
    data["tables"][1]["insert_statements"] += [
        f"INSERT INTO notes (id, user_id, title, body) VALUES ({i}, 2, 'Note {i}', 'x')" for i in range(3, 303)]
    seed_data.check_seed(SeedData.from_data(data), ctx)  # 304 rows: above the guide, still accepted


# ----------------------------------------------------------------------------- 6. $ref into a list result

def test_a_ref_indexes_a_bare_list_result():
    listed = [{"id": 5, "title": "Groceries"}, {"id": 6, "title": "Trip"}]
    args = {"note_id": {"$ref": "0.0.id"}, "other": {"$ref": "0.1.title"}}
    assert resolve_refs(args, [listed], 1) == {"note_id": 5, "other": "Trip"}
    assert resolve_refs(args, [json.dumps(listed)], 1) == {"note_id": 5, "other": "Trip"}  # AWM-1K's JSON text
    with pytest.raises(SolutionRefError, match="is a list of 2 item"):
        resolve_refs({"note_id": {"$ref": "0.2.id"}}, [listed], 1)


def test_the_solution_prompt_documents_refs_into_list_results(ctx):
    text = user_prompt(solution, ctx)
    assert '{"$ref": "0.0.id"} is the "id" of the first item of the list' in text
    reply = json.dumps({"calls": [{"tool": "list_notes", "arguments": {}},
                                  {"tool": "delete_note", "arguments": {"note_id": {"$ref": "0.0.id"}}}],
                        "final_answer": None})
    assert solution.parse(reply, ctx).calls[1].arguments == {"note_id": {"$ref": "0.0.id"}}


# ----------------------------------------------------------------------------- 7. required survives rendering

def test_the_compact_spec_marks_optional_parameters(ctx):
    line = next(x for x in render_spec(ctx).splitlines() if x.startswith("- create_note("))
    assert 'title: string e.g. "Trip"' in line and 'body: string? e.g. "pack"' in line
    for module in (solution, verifier):
        c = ctx.with_(code=code.parse(CODE, ctx))
        text = user_prompt(module, c)
        assert '"?" marks optional parameters' in text and 'body: string? e.g. "pack"' in text


def test_the_code_prompt_spec_keeps_required_on_every_parameter(ctx):
    shown = json.loads(render_spec_json(ctx))
    params = {t["name"]: t.get("parameters", {}) for t in shown["tools"]}
    assert params["create_note"]["title"]["required"] is True
    assert params["create_note"]["body"]["required"] is False
    assert params["delete_note"]["note_id"]["required"] is True
    assert all("required" in p for ps in params.values() for p in ps.values())
    assert "extra" not in params["create_note"]["title"]  # other defaults stay out
    assert ApiSpec.from_data(shown) == ctx.api_spec  # nothing else lost
    assert render_spec_json(ctx) in user_prompt(code, ctx)

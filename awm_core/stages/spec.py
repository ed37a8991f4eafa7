"""Stage 5: the tool API spec.

Reply: JSON ``ApiSpec`` ``{"tools": [{"name", "description", "parameters": {...}, "returns",
"tables", "group"}]}``. Checked against the model (types, unique names), the schema (every
table named exists) and for usability: examples for required parameters that match their type, and
integer id examples that are keys of the seeded table they name (the prompt shows the seed data).
"""
from __future__ import annotations

import keyword
import re
import sys

from awm_core import mutations
from awm_core.db import build_database, open_snapshot
from awm_core.errors import StageError
from awm_core.models import ApiSpec, ToolSpec
from awm_core.runtime import EXAMPLE_RULE
from awm_core.stages.base import (
    SEED_ROWS_PER_TABLE, no_execution,
    CURRENT_USER_ID, StageContext, artifact, extract_json, messages, render_scenario, render_schema, render_seed_rows,
    render_tasks, run_stage,
)

NAME = "spec"
PROMPT_VERSION = "spec-v3"
JSON_MODE = True
PER_TASK = False
execute = no_execution  # its checks run in parse

SYSTEM = """
You are an API designer. You design the tool interface an AI agent uses to operate one application: small,
composable tools over an SQLite database, each doing one thing, with precise parameter types and working
examples. The spec is checked by a program: types, names and examples must be exact.
"""

USER = """
Application: {scenario}

Database schema:
{schema}

Seed data (the initial database; columns, then rows, at most {cap} rows per table):
{seed}

The tools must make every one of these tasks solvable (by one or several calls):
{tasks}

Design about {target} tools (never fewer than 10) covering list/search (with filters), get-by-id, create,
update and delete for the main entities, plus any aggregate a question task needs.

Rules:
- name: unique snake_case verb_noun (search_recipes, get_recipe, create_meal_plan), a valid Python identifier.
- The signed-in user is always user id {user_id}: tools act as that user, so no parameter may name the signed-in
  user (no parameter called {banned}). This rule is only about the signed-in user: a parameter for ANOTHER
  person is fine and is named after that person's role, e.g. assignee_id, member_id, recipient_id.
  No login/logout/auth tools.
- parameters: an object mapping each parameter name to
  {{"type": "string"|"integer"|"number"|"boolean"|"array"|"object", "description": "...", "required": true|false,
    "example": <a value>}}; arrays also give "items": {{"type": ...}}; fixed value sets give "enum": [...].
- Every required parameter has an example, and calling the tool with all its examples must succeed. How
  examples are checked: {example_rule}. So use ids and names that exist in the seed data above (an id
  argument must be a key of a seeded row, in a state the tool accepts: do not cancel what is already
  cancelled), and for create tools values that do not collide with existing unique values.
- Example values have the declared type (integer 3, not "3").
- returns: the JSON shape the tool returns, e.g. {{"id": "integer", "title": "string"}} or
  {{"type": "array", "items": {{...}}}}.
- tables: the exact schema tables the tool reads or writes. group: the resource it belongs to.

Answer with JSON only: {{"tools": [{{"name": "...", "description": "...", "parameters": {{...}}, "returns": {{...}},
"tables": ["..."], "group": "..."}}]}}
"""

MIN_TOOLS = 3
# Parameter names that can only mean the signed-in user; the prompt and the check share them.
SIGNED_IN_USER_PARAMS = ("user_id", "current_user_id")
TYPES = {"string", "integer", "number", "boolean", "array", "object"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario", "tasks", "db_schema", "seed_data")
    user = USER.format(scenario=render_scenario(ctx), schema=render_schema(ctx), seed=render_seed_rows(ctx),
                       cap=SEED_ROWS_PER_TABLE, tasks=render_tasks(ctx), target=ctx.target_tools,
                       user_id=CURRENT_USER_ID, banned=" or ".join(SIGNED_IN_USER_PARAMS), example_rule=EXAMPLE_RULE)
    return messages(SYSTEM, user, previous_errors)


def type_matches(value, type_: str) -> bool:
    return {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }.get(type_, lambda v: True)(value)


def _raw_problems(data) -> list[str]:
    """Problems the model's own validator would report less precisely (it stops at duplicates)."""
    errors = []
    if not isinstance(data, dict) or not isinstance(data.get("tools"), list):
        return ['the reply must be a JSON object with a "tools" list']
    names: dict[str, int] = {}
    for i, t in enumerate(data["tools"]):
        if not isinstance(t, dict):
            errors.append(f"tools.{i} must be an object")
            continue
        name = t.get("name")
        if name in names:
            errors.append(f"tools.{i}: duplicate tool name {name!r} (also tools.{names[name]}); every tool needs a unique name")
        else:
            names[name] = i
        for pname, p in (t.get("parameters") or {}).items():
            if isinstance(p, dict) and "type" not in p:
                errors.append(f"tool {name}: parameter {pname!r} has no \"type\"; give one of {', '.join(sorted(TYPES))}")
    return errors


def check_spec(spec: ApiSpec, ctx: StageContext, stage: str = NAME) -> None:
    errors = []
    tables = {t.name.lower() for t in ctx.db_schema.tables} if ctx.db_schema else None
    if len(spec.tools) < MIN_TOOLS:
        errors.append(f"only {len(spec.tools)} tools; design about {ctx.target_tools} (at least 10)")
    for t in spec.tools:
        if not _NAME_RE.match(t.name) or keyword.iskeyword(t.name):
            errors.append(f"tool name {t.name!r} is not a snake_case Python identifier")
        if not t.description.strip():
            errors.append(f"tool {t.name}: empty description")
        if tables is not None:
            unknown = [x for x in t.tables if x.lower() not in tables]
            if unknown:
                errors.append(f"tool {t.name}: tables {unknown} do not exist in the schema (tables: {', '.join(sorted(tables))})")
            if not t.tables:
                errors.append(f"tool {t.name}: \"tables\" is empty; list the schema tables it reads or writes")
        for pname, p in t.parameters.items():
            where = f"tool {t.name}, parameter {pname}"
            if not _NAME_RE.match(pname) or keyword.iskeyword(pname) or pname == "conn":
                errors.append(f"{where}: the name must be a snake_case Python identifier other than 'conn'")
            if pname in SIGNED_IN_USER_PARAMS:
                errors.append(f"{where}: the signed-in user is implicit (id {CURRENT_USER_ID}); remove this parameter. "
                              "If it means another person (not the signed-in user), name it after that person's role, "
                              "e.g. assignee_id, member_id, recipient_id")
            if p.type not in TYPES:
                errors.append(f"{where}: type {p.type!r} is not one of {', '.join(sorted(TYPES))}")
                continue
            if p.type == "array" and not p.items:
                errors.append(f"{where}: an array parameter needs \"items\": {{\"type\": ...}}")
            if p.required and p.example is None:
                errors.append(f"{where}: required parameter without an \"example\"; give a value that works on the seed data")
            if p.example is not None and not type_matches(p.example, p.type):
                errors.append(f"{where}: example {p.example!r} is not of type {p.type}")
            if p.enum is not None and p.example is not None and p.example not in p.enum:
                errors.append(f"{where}: example {p.example!r} is not one of its enum values {p.enum}")
    errors += seed_errors(spec, ctx)
    if errors:
        raise StageError(stage, errors)


# A tool whose id argument is the new row's own id (create_note(id=7)) names a row that must
# not exist yet; the seed check leaves those alone.
_CREATING = ("create_", "add_", "new_", "insert_", "register_")


def _missing_id(conn, tool: ToolSpec, name: str, value: int) -> str | None:
    found = mutations.named_table(conn, tool.name, name)
    if found is None or (name == "id" and tool.name.startswith(_CREATING)):
        return None  # no table is named unambiguously: nothing to check against
    table, key = found
    if conn.execute(f'SELECT 1 FROM "{table}" WHERE "{key}" = ?', (value,)).fetchone():
        return None
    keys = [r[0] for r in conn.execute(f'SELECT "{key}" FROM "{table}" ORDER BY "{key}" LIMIT 10')]
    seeded = f"seeded ids of {table}: {', '.join(map(str, keys))}" + ("..." if len(keys) == 10 else "") \
        if keys else f"{table} has no seeded rows"
    return (f"tool {tool.name}, parameter {name}: example {value} is not in the seed data (no row of {table} has "
            f"{key} {value}; {seeded}); examples run on the seeded database, so use an id that exists there")


def seed_errors(spec: ApiSpec, ctx: StageContext) -> list[str]:
    """Integer id examples that are not keys of the seeded table they name (by the argument's
    name, as the swap_argument mutation reads it): the example would fail for the data's sake."""
    if ctx.db_schema is None or ctx.seed_data is None:
        return []
    conn = open_snapshot(build_database(ctx.db_schema, ctx.seed_data), readonly=True)
    try:
        return [e for t in spec.tools for name, value in mutations.id_arguments(t.example_arguments())
                if (e := _missing_id(conn, t, name, value))]
    finally:
        conn.close()


def parse(text: str, ctx: StageContext) -> ApiSpec:
    data = extract_json(text, NAME)
    errors = _raw_problems(data)
    try:
        spec = artifact(ApiSpec, data, NAME)
    except StageError as exc:
        # The model's messages for these two are vaguer than ours; keep ours, add the rest.
        errors += [e for e in exc.errors if "duplicate tool names" not in e and not e.endswith(".type: Field required")]
        raise StageError(NAME, errors) from None
    if errors:
        raise StageError(NAME, errors)
    check_spec(spec, ctx)
    return spec


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

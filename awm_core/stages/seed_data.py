"""Stage 4: seed data that makes every task's preconditions hold; executed for real.

Reply: JSON ``SeedData`` ``{"tables": [{"table_name", "reasoning", "insert_statements": [...]}]}``.
Accepted only with zero failing statements and an empty ``PRAGMA foreign_key_check``.
"""
from __future__ import annotations

import re
import sys

from awm_core.db import build_database, open_snapshot
from awm_core.errors import SqlExecutionError, StageError
from awm_core.models import SeedData
from awm_core.stages.base import (
    no_execution,
    CURRENT_USER_ID, StageContext, artifact, extract_json, messages, render_scenario, render_schema, render_tasks,
    run_stage,
)

NAME = "seed_data"
PROMPT_VERSION = "seed_data-v2"
JSON_MODE = True
PER_TASK = False
execute = no_execution  # its checks run in parse

SYSTEM = """
You write the initial contents of an application's SQLite database. Your INSERT statements are executed one
by one, in order, with PRAGMA foreign_keys=ON; a single failing statement or foreign-key violation rejects
the whole answer. Follow the schema exactly: never invent tables or columns.
"""

USER = """
Application: {scenario}

Database schema:
{schema}

The data must make every one of these tasks possible, starting from this initial state:
{tasks}

Write the seed data:
- Insert parents before children (users first); one entry per table in that order.
- users.id = {user_id} is the signed-in user and owns most of the personal data; add a few other users too.
- Every entity a task names (by title, name, amount or date) exists exactly as the task spells it.
  Rows a task updates or deletes exist; rows a task creates do NOT already exist.
- Add distractors: similar but non-matching rows, so searches and filters have something to reject
  and questions have one right answer. About 60-150 rows in total: a guide, not a hard limit (no check counts
  rows; later stages are shown every row, so stay near it).
- Always list columns explicitly: INSERT INTO t (a, b) VALUES (...); the value count equals the column count.
- Give explicit integer ids so later rows can reference them. Literal values only: no datetime('now'),
  random() or other expressions whose value changes between runs; write dates as ISO-8601 text.
- If the schema has an app_clock table, insert its one row with a fixed "now" consistent with the dates used.
- "reasoning": one or two sentences on what the table's rows are there for.

Answer with JSON only:
{{"tables": [{{"table_name": "users", "reasoning": "...", "insert_statements": ["INSERT INTO users (id, name) VALUES (1, 'Ana')"]}}]}}
"""


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario", "tasks", "db_schema")
    user = USER.format(scenario=render_scenario(ctx), schema=render_schema(ctx), tasks=render_tasks(ctx),
                       user_id=CURRENT_USER_ID)
    return messages(SYSTEM, user, previous_errors)


_INSERT_RE = re.compile(r"^\s*INSERT\s+(OR\s+\w+\s+)?INTO\s", re.I)
_VOLATILE_RE = re.compile(r"\b(random|randomblob)\s*\(|'now'", re.I)


def check_seed(seed: SeedData, ctx: StageContext, stage: str = NAME) -> bytes:
    errors = []
    tables = {t.name.lower() for t in ctx.db_schema.tables}
    for t in seed.tables:
        if t.table_name.lower() not in tables:
            errors.append(f"seed entry for table {t.table_name!r}, which the schema does not define "
                          f"(tables: {', '.join(sorted(tables))})")
        for s in t.insert_statements:
            if not _INSERT_RE.match(s):
                errors.append(f"table {t.table_name}: {s.strip()[:80]!r} is not an INSERT statement")
            elif _VOLATILE_RE.search(s):
                errors.append(f"table {t.table_name}: {s.strip()[:120]!r} uses a value that changes between runs "
                              "('now', random()); write a literal value instead")
    if not seed.statements():
        errors.append("no INSERT statements at all; the tasks need initial data")
    if errors:
        raise StageError(stage, errors)
    try:
        data = build_database(ctx.db_schema, seed)
    except SqlExecutionError as exc:
        raise StageError(stage, exc.errors) from None
    conn = open_snapshot(data, readonly=True)
    try:
        if "users" in tables and not conn.execute("SELECT 1 FROM users WHERE id = ?", (CURRENT_USER_ID,)).fetchall():
            errors.append(f"users has no row with id {CURRENT_USER_ID}; the signed-in user must exist")
    finally:
        conn.close()
    if errors:
        raise StageError(stage, errors)
    return data


def parse(text: str, ctx: StageContext) -> SeedData:
    seed = artifact(SeedData, extract_json(text, NAME), NAME)
    check_seed(seed, ctx)
    return seed


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

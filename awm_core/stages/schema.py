"""Stage 3: the SQLite schema, derived from the tasks and executed for real.

Reply: JSON ``DbSchema`` ``{"tables": [{"name", "ddl", "indexes": [...]}]}``.
Accepted only if every statement runs, every foreign key points at an existing table
and column, and each entry's DDL creates the table it is named after.
"""
from __future__ import annotations

import re
import sqlite3
import sys

from awm_core.db import connect_memory, run_statements
from awm_core.errors import SqlExecutionError, StageError
from awm_core.models import DbSchema
from awm_core.stages.base import (
    no_execution,
    CURRENT_USER_ID, StageContext, artifact, extract_json, messages, render_scenario, render_tasks, run_stage,
)

NAME = "schema"
PROMPT_VERSION = "schema-v2"
JSON_MODE = True
PER_TASK = False
execute = no_execution  # its checks run in parse
# The table cap the prompt states (nothing rejects a schema for exceeding it).
MAX_TABLES = 12

SYSTEM = """
You are a database architect. You design compact, correct SQLite 3 schemas for small applications whose
data will be read and changed by tools an AI agent calls. The schema is executed exactly as you write it,
with PRAGMA foreign_keys=ON; a single failing statement rejects the whole answer.
"""

USER = """
Application: {scenario}

The schema must support every one of these user tasks:
{tasks}

Design the database:
- 5 to {max_tables} tables, counting app_clock (below) when you add it; only what the tasks need plus what makes the
  data realistic.
- A `users` table with profile fields only (no password, token, session or other auth columns). The signed-in
  user is always users.id = {user_id}; rows owned by a user carry a user_id foreign key.
- Every table has an INTEGER PRIMARY KEY (or a composite primary key for pure link tables); use NOT NULL,
  UNIQUE, CHECK (e.g. status IN ('open','closed'), amount >= 0) and FOREIGN KEY ... REFERENCES constraints
  where they hold. Foreign keys must reference tables defined earlier in the list (order tables parents first).
- SQLite types only: INTEGER, REAL, TEXT (ISO-8601 dates and times), BLOB; booleans as INTEGER 0/1.
- Tools must not read the wall clock. If anything needs "the current date/time" (a row a task creates needs a
  date the task does not state, such as a created_at stamp, or a task speaks of "today" or "overdue"), add a
  one-row table `app_clock(id INTEGER PRIMARY KEY CHECK (id = 1), now TEXT NOT NULL)` that the seed data fills;
  it is one of the {max_tables} tables.
- Add CREATE INDEX statements for the columns tasks search or filter by.
- Each "ddl" is exactly one CREATE TABLE statement for the table named in "name"; "indexes" holds that
  table's CREATE INDEX statements. No INSERTs, views, triggers or FTS tables.

Answer with JSON only:
{{"tables": [{{"name": "users", "ddl": "CREATE TABLE users (...)", "indexes": ["CREATE INDEX ..."]}}, ...]}}
"""


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario", "tasks")
    user = USER.format(scenario=render_scenario(ctx), tasks=render_tasks(ctx), user_id=CURRENT_USER_ID,
                       max_tables=MAX_TABLES)
    return messages(SYSTEM, user, previous_errors)


_CREATE_RE = re.compile(r"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?[\"'`\[]?([A-Za-z_][A-Za-z0-9_]*)", re.I)
_INDEX_RE = re.compile(r"^\s*CREATE\s+(UNIQUE\s+)?INDEX\s", re.I)


def structural_errors(schema: DbSchema) -> list[str]:
    errors = []
    names = [t.name for t in schema.tables]
    for t in schema.tables:
        m = _CREATE_RE.match(t.ddl)
        if not m:
            errors.append(f"table {t.name}: \"ddl\" must be one CREATE TABLE statement, got {t.ddl.strip()[:80]!r}")
        elif m.group(1).lower() != t.name.lower():
            errors.append(f"table {t.name}: the ddl creates {m.group(1)!r} but the entry is named {t.name!r}; make them equal")
        if t.ddl.strip().rstrip(";").count(";"):
            errors.append(f"table {t.name}: \"ddl\" holds more than one statement; put indexes in \"indexes\"")
        for ix in t.indexes:
            if not _INDEX_RE.match(ix):
                errors.append(f"table {t.name}: index entry {ix.strip()[:80]!r} is not a CREATE INDEX statement")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        errors.append(f"tables defined more than once: {', '.join(dups)}")
    return errors


def foreign_key_errors(conn: sqlite3.Connection) -> list[str]:
    """SQLite accepts a FOREIGN KEY to a missing table at CREATE time; find those here."""
    errors = []
    tables = {r[0].lower() for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'").fetchall():
        for fk in conn.execute(f'PRAGMA foreign_key_list("{table}")').fetchall():
            ref_table, from_col, to_col = fk[2], fk[3], fk[4]
            if ref_table.lower() not in tables:
                errors.append(f"table {table}: column {from_col} references table {ref_table!r}, which does not exist "
                              f"(existing tables: {', '.join(sorted(tables))})")
                continue
            if to_col is not None:
                cols = {r[1].lower() for r in conn.execute(f'PRAGMA table_info("{ref_table}")')}
                if to_col.lower() not in cols:
                    errors.append(f"table {table}: column {from_col} references {ref_table}({to_col}), "
                                  f"but {ref_table} has no column {to_col}")
    return errors


def check_schema(schema: DbSchema, stage: str = NAME) -> None:
    errors = structural_errors(schema)
    conn = connect_memory()
    try:
        try:
            run_statements(conn, schema.statements(), stage=stage)
        except SqlExecutionError as exc:
            errors.extend(exc.errors)
        else:
            errors.extend(foreign_key_errors(conn))
    finally:
        conn.close()
    if errors:
        raise StageError(stage, errors)


def parse(text: str, ctx: StageContext) -> DbSchema:
    schema = artifact(DbSchema, extract_json(text, NAME), NAME)
    check_schema(schema)
    return schema


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

"""The exact change set between two SQLite databases, row by row.

Verifier code gets ``db_changes`` in its namespace (the sandbox worker puts it there), so a
verifier can demand "exactly these changes and nothing else" in a few lines instead of
hand-written table comparisons that only notice deleted rows:

    ch = db_changes(initial_db, final_db)
    # {"notes": {"inserted": [{"id": 3, "title": "Trip", ...}],
    #            "updated": [{"key": {"id": 1}, "old": {...}, "new": {...}, "columns": ["title"]}],
    #            "deleted": []}}
    ok = set(ch) == {"notes"} and len(ch["notes"]["inserted"]) == 1 and not ch["notes"]["updated"]

Only tables with at least one change appear. Rows are matched by primary key (the rowid for a
table without one), so an edited row is one ``updated`` entry, not a delete plus an insert.
The mutation checks (``awm_core.mutations``) read changes through the same function, so what a
verifier is told to compare is exactly what the wrong episodes differ by.
"""
from __future__ import annotations

import sqlite3
from typing import Any

Row = dict[str, Any]


def user_tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def key_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    """The primary key's columns in key order; empty for a table keyed by its rowid."""
    pk = sorted((r[5], r[1]) for r in conn.execute(f'PRAGMA table_info("{table}")') if r[5])
    return [name for _, name in pk]


def _rows(conn: sqlite3.Connection, table: str) -> tuple[list[str], dict[tuple, Row]]:
    """(key columns, {key: row}) for one table; a table without a declared key is keyed by its
    rowid, named ``rowid`` in the key and left out of the row."""
    keys = key_columns(conn, table)
    if keys:
        cur = conn.execute(f'SELECT * FROM "{table}"')
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, values)) for values in cur]
        return keys, {tuple(r[k] for k in keys): r for r in rows}
    cur = conn.execute(f'SELECT rowid, * FROM "{table}"')
    names = [d[0] for d in cur.description][1:]
    return ["rowid"], {(values[0],): dict(zip(names, values[1:])) for values in cur}


def table_changes(initial_db: sqlite3.Connection, final_db: sqlite3.Connection, table: str) -> dict[str, list]:
    """``{"inserted": [row], "updated": [{"key", "old", "new", "columns"}], "deleted": [row]}``
    for one table (a table missing on one side counts as empty there)."""
    have_a, have_b = table in user_tables(initial_db), table in user_tables(final_db)
    keys, before = _rows(initial_db, table) if have_a else ([], {})
    keys_b, after = _rows(final_db, table) if have_b else ([], {})
    keys = keys or keys_b
    inserted = [after[k] for k in after if k not in before]
    deleted = [before[k] for k in before if k not in after]
    updated = []
    for k in before:
        if k in after and before[k] != after[k]:
            old, new = before[k], after[k]
            updated.append({"key": dict(zip(keys, k)), "old": old, "new": new,
                            "columns": [c for c in new if old.get(c) != new.get(c)]})
    return {"inserted": inserted, "updated": updated, "deleted": deleted}


def db_changes(initial_db: sqlite3.Connection, final_db: sqlite3.Connection) -> dict[str, dict[str, list]]:
    """Every table that differs between the two databases, with its inserted, updated and
    deleted rows (see the module docstring)."""
    out = {}
    for table in sorted(set(user_tables(initial_db)) | set(user_tables(final_db))):
        found = table_changes(initial_db, final_db, table)
        if any(found.values()):
            out[table] = found
    return out

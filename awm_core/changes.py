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


def _rows(conn: sqlite3.Connection, table: str) -> tuple[list[str], list[str], dict[tuple, tuple]]:
    """(key columns, column names, {key: values}) for one table; a table without a declared key is
    keyed by its rowid, named ``rowid`` in the key and left out of the row. Rows stay tuples: most
    rows of two snapshots are equal, and only the ones that differ are made into dicts."""
    keys = key_columns(conn, table)
    if keys:
        cur = conn.execute(f'SELECT * FROM "{table}"')
        names = [d[0] for d in cur.description]
        at = [names.index(k) for k in keys]
        return keys, names, {tuple(values[i] for i in at): values for values in cur}
    cur = conn.execute(f'SELECT rowid, * FROM "{table}"')
    names = [d[0] for d in cur.description][1:]
    return ["rowid"], names, {(values[0],): values[1:] for values in cur}


def table_changes(initial_db: sqlite3.Connection, final_db: sqlite3.Connection, table: str,
                  tables: tuple[set[str], set[str]] | None = None) -> dict[str, list]:
    """``{"inserted": [row], "updated": [{"key", "old", "new", "columns"}], "deleted": [row]}``
    for one table (a table missing on one side counts as empty there). ``tables``: the user
    tables of each side, when the caller has them already."""
    have_a, have_b = tables or (set(user_tables(initial_db)), set(user_tables(final_db)))
    keys, names_a, before = _rows(initial_db, table) if table in have_a else ([], [], {})
    keys_b, names_b, after = _rows(final_db, table) if table in have_b else ([], [], {})
    keys = keys or keys_b
    same_columns = names_a == names_b
    inserted = [dict(zip(names_b, after[k])) for k in after if k not in before]
    deleted = [dict(zip(names_a, before[k])) for k in before if k not in after]
    updated = []
    for k, values in before.items():
        other = after.get(k)
        if other is None or (same_columns and values == other):
            continue
        old, new = dict(zip(names_a, values)), dict(zip(names_b, other))
        if old != new:
            updated.append({"key": dict(zip(keys, k)), "old": old, "new": new,
                            "columns": [c for c in new if old.get(c) != new.get(c)]})
    return {"inserted": inserted, "updated": updated, "deleted": deleted}


def db_changes(initial_db: sqlite3.Connection, final_db: sqlite3.Connection) -> dict[str, dict[str, list]]:
    """Every table that differs between the two databases, with its inserted, updated and
    deleted rows (see the module docstring)."""
    tables = (set(user_tables(initial_db)), set(user_tables(final_db)))
    out = {}
    for table in sorted(tables[0] | tables[1]):
        found = table_changes(initial_db, final_db, table, tables)
        if any(found.values()):
            out[table] = found
    return out

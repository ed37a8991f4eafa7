"""Building and handling environment databases as in-memory SQLite snapshots.

An environment's initial state is kept as the bytes of a serialised SQLite database: it
pickles to worker processes, and ``deserialize`` turns it back into a live in-memory
database in well under a millisecond.
"""
from __future__ import annotations

import hashlib
import sqlite3

from awm_core.errors import SqlExecutionError
from awm_core.models import DbSchema, SeedData


def connect_memory() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def run_statements(
    conn: sqlite3.Connection, statements: list[tuple[str, str]], *, stage: str
) -> None:
    """Execute every statement; collect all failures, then raise once if there were any.

    All errors are gathered (not just the first) because the repair prompt should let the
    model fix every broken statement in one attempt. Zero failures are tolerated.
    """
    errors = []
    for table, stmt in statements:
        try:
            conn.execute(stmt)
        except sqlite3.Error as exc:
            errors.append(f"table {table}: {exc} in statement: {stmt.strip()[:300]}")
    if errors:
        raise SqlExecutionError(stage, errors)
    conn.commit()


def build_database(schema: DbSchema, seed: SeedData | None = None) -> bytes:
    """Create the schema, insert the seed rows, and return the database as bytes."""
    conn = connect_memory()
    try:
        run_statements(conn, schema.statements(), stage="schema")
        if seed is not None:
            run_statements(conn, seed.statements(), stage="seed_data")
            problems = [f"foreign key violation in {row[0]} (rowid {row[1]}) -> {row[2]}"
                        for row in conn.execute("PRAGMA foreign_key_check").fetchall()]
            if problems:
                raise SqlExecutionError("seed_data", problems)
        return conn.serialize()
    finally:
        conn.close()


def open_snapshot(data: bytes, *, readonly: bool = False) -> sqlite3.Connection:
    """A live in-memory database from snapshot bytes (writable unless ``readonly``)."""
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.deserialize(data)
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def snapshot_digest(data: bytes) -> str:
    """Content digest of a database *state*, independent of page layout.

    Two databases with the same rows give the same digest even if SQLite laid out pages
    differently, which makes "replaying twice gives the same final database" checkable.
    """
    conn = open_snapshot(data, readonly=True)
    try:
        return database_digest(conn)
    finally:
        conn.close()


def database_digest(conn: sqlite3.Connection) -> str:
    h = hashlib.sha256()
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    for t in tables:
        h.update(f"\x00table {t}\x00".encode())
        cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{t}")')]
        order = ", ".join(f'"{c}"' for c in cols)
        for row in conn.execute(f'SELECT * FROM "{t}" ORDER BY {order}'):
            h.update(repr(row).encode())
    return h.hexdigest()

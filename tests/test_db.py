"""Building databases: every failing statement reported, zero tolerated."""
import pytest

from awm_core.db import build_database, open_snapshot, snapshot_digest
from awm_core.errors import SqlExecutionError
from awm_core.models import DbSchema, SeedData, TableSchema, TableSeed

SCHEMA = DbSchema(tables=[
    TableSchema(name="users", ddl="CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"),
    TableSchema(name="notes", ddl="CREATE TABLE notes (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(id), body TEXT)",
                indexes=["CREATE INDEX ix_notes_user ON notes(user_id)"]),
])


def test_build_and_digest_is_layout_independent():
    seed = SeedData(tables=[TableSeed(table_name="users", insert_statements=["INSERT INTO users VALUES (1,'a')", "INSERT INTO users VALUES (2,'b')"])])
    data = build_database(SCHEMA, seed)
    conn = open_snapshot(data)
    assert conn.execute("SELECT count(*) FROM users").fetchall() == [(2,)]
    other = SeedData(tables=[TableSeed(table_name="users", insert_statements=["INSERT INTO users VALUES (2,'b')", "INSERT INTO users VALUES (1,'a')"])])
    assert snapshot_digest(build_database(SCHEMA, other)) == snapshot_digest(data)


def test_all_errors_reported():
    seed = SeedData(tables=[TableSeed(table_name="users", insert_statements=[
        "INSERT INTO users VALUES (1, NULL)", "INSERT INTO nope VALUES (1)", "INSERT INTO users VALUES (3,'ok')"])])
    with pytest.raises(SqlExecutionError) as exc:
        build_database(SCHEMA, seed)
    assert len(exc.value.errors) == 2
    assert "NOT NULL" in exc.value.errors[0] and "no such table: nope" in exc.value.errors[1]


def test_foreign_keys_checked():
    seed = SeedData(tables=[TableSeed(table_name="notes", insert_statements=["INSERT INTO notes VALUES (1, 99, 'x')"])])
    with pytest.raises(SqlExecutionError, match="FOREIGN KEY|foreign key"):
        build_database(SCHEMA, seed)


def test_readonly_snapshot_refuses_writes():
    conn = open_snapshot(build_database(SCHEMA), readonly=True)
    with pytest.raises(Exception):
        conn.execute("INSERT INTO users VALUES (1,'x')")

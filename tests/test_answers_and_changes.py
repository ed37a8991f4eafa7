"""The helpers verifier code gets in its sandbox namespace: the change set between two
databases (awm_core.changes) and the readers of values in an answer (awm_core.answers)."""
from __future__ import annotations

import sqlite3

import pytest

from awm_core.answers import answer_dates, answer_numbers, answer_times
from awm_core.changes import db_changes


@pytest.mark.parametrize("text, numbers", [
    ("On 2025-05-03 you spent $1,234.50 on 3 items", [1234.5, 3.0]),
    ("You have 14 notes", [14.0]),
    ("as of May 3, 2025 nothing is due", []),          # a date's day and year are not numbers
    ("the 3rd of March and 09:30 and 3 pm", []),
    ("4.5 stars from 12 reviews", [4.5, 12.0]),
    (None, []),
])
def test_answer_numbers_reads_numbers_outside_dates_and_times(text, numbers):
    assert answer_numbers(text) == numbers


def test_answer_dates_reads_iso_spelled_and_slashed_dates_in_order():
    assert answer_dates("Booked for Dec 10, 2026 (and 2026-12-11), then 12/24/2026") == [
        "2026-12-10", "2026-12-11", "2026-12-24"]
    assert answer_dates("on the 3rd of March", default_year=2025) == ["2025-03-03"]
    assert answer_dates("on May 3") == ["05-03"]  # no year known
    assert answer_dates("nothing here, 2024 items") == []


def test_answer_times_reads_clock_times_as_24_hour():
    assert answer_times("at 3:30 PM, not 09:00; 9am; 12 pm; 2026-12-10T15:00") == [
        "15:30", "09:00", "09:00", "12:00", "15:00"]
    assert answer_times("3 items for 45 minutes") == []


def _db(*statements: str) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    for s in statements:
        conn.execute(s)
    return conn


SCHEMA = ("CREATE TABLE notes (id INTEGER PRIMARY KEY, title TEXT, color TEXT)",
          "CREATE TABLE tags (note_id INTEGER, tag TEXT, PRIMARY KEY (note_id, tag))",
          "CREATE TABLE log (line TEXT)")  # no declared key: matched by rowid
SEED = ("INSERT INTO notes VALUES (1, 'Groceries', 'blue'), (2, 'Taxes', 'green')",
        "INSERT INTO tags VALUES (1, 'home'), (2, 'work')",
        "INSERT INTO log VALUES ('started')")


def test_db_changes_gives_inserted_updated_and_deleted_rows_by_key():
    a = _db(*SCHEMA, *SEED)
    b = _db(*SCHEMA, *SEED, "UPDATE notes SET color = 'red' WHERE id = 2", "DELETE FROM notes WHERE id = 1",
            "INSERT INTO notes VALUES (3, 'Trip', 'red')", "INSERT INTO tags VALUES (3, 'travel')",
            "UPDATE log SET line = 'restarted'")
    ch = db_changes(a, b)
    assert set(ch) == {"notes", "tags", "log"}
    assert ch["notes"] == {
        "inserted": [{"id": 3, "title": "Trip", "color": "red"}],
        "updated": [{"key": {"id": 2}, "old": {"id": 2, "title": "Taxes", "color": "green"},
                     "new": {"id": 2, "title": "Taxes", "color": "red"}, "columns": ["color"]}],
        "deleted": [{"id": 1, "title": "Groceries", "color": "blue"}]}
    assert ch["tags"] == {"inserted": [{"note_id": 3, "tag": "travel"}], "updated": [], "deleted": []}
    assert ch["log"]["updated"] == [{"key": {"rowid": 1}, "old": {"line": "started"}, "new": {"line": "restarted"},
                                     "columns": ["line"]}]


def test_db_changes_is_empty_for_equal_databases_and_sees_a_new_table():
    assert db_changes(_db(*SCHEMA, *SEED), _db(*SCHEMA, *SEED)) == {}
    grown = _db(*SCHEMA, *SEED, "CREATE TABLE extra (id INTEGER PRIMARY KEY, x TEXT)", "INSERT INTO extra VALUES (1, 'y')")
    assert db_changes(_db(*SCHEMA, *SEED), grown) == {"extra": {"inserted": [{"id": 1, "x": "y"}], "updated": [],
                                                                "deleted": []}}

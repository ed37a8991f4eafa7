"""Verifier soundness: the new wrong episodes (change_value, extra_insert, extra_update,
hedged_answer) catch planted lenient verifiers, the equivalent episodes (read-only calls,
reordered calls, reworded answers) catch planted over-strict ones, and a verifier written the
way the prompt asks (db_changes, the answer helpers) passes all of them."""
from __future__ import annotations

import re

import pytest

from awm_core.models import (
    ApiSpec, DbSchema, ParamSpec, ReferenceSolution, Scenario, SeedData, Task, ToolCall, Verifier,
)
from awm_core.stages import code, verifier
from awm_core.stages.base import StageContext
from awm_core.soundness import equivalence_checks, mutation_checks, skipped_mutation
from awm_core.validation import validate_environment

SCHEMA = {"tables": [
    {"name": "users", "ddl": "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"},
    {"name": "notes", "ddl": "CREATE TABLE notes (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id), "
                            "title TEXT NOT NULL UNIQUE, color TEXT NOT NULL CHECK (color IN ('red', 'blue', 'green')), "
                            "due TEXT, pinned INTEGER NOT NULL DEFAULT 0, views INTEGER NOT NULL DEFAULT 0)"},
]}
SEED = {"tables": [
    {"table_name": "users", "insert_statements": [
        "INSERT INTO users (id, name) VALUES (1, 'Ana')", "INSERT INTO users (id, name) VALUES (2, 'Bo')"]},
    {"table_name": "notes", "insert_statements": [
        "INSERT INTO notes VALUES (1, 1, 'Groceries', 'blue', '2026-12-01', 0, 0)",
        "INSERT INTO notes VALUES (2, 1, 'Taxes', 'green', '2026-12-20', 0, 0)",
        "INSERT INTO notes VALUES (3, 2, 'Bo private', 'red', '2026-11-30', 0, 0)"]},
]}
_NOTE_ID = {"type": "integer", "description": "id", "required": True, "example": 1}
SPEC = {"tools": [
    {"name": "list_notes", "description": "List my notes.", "tables": ["notes"]},
    {"name": "get_note", "description": "One note (counts a view).", "parameters": {"note_id": _NOTE_ID},
     "tables": ["notes"]},
    {"name": "create_note", "description": "Create a note.", "tables": ["notes"], "parameters": {
        "title": {"type": "string", "required": True, "example": "Trip"},
        "color": {"type": "string", "required": True, "example": "red", "enum": ["red", "blue", "green"]},
        "due": {"type": "string", "required": False, "example": "2026-12-10"},
        "pinned": {"type": "boolean", "required": False, "example": False}}},
    {"name": "update_note", "description": "Change a note's color.", "tables": ["notes"], "parameters": {
        "note_id": _NOTE_ID, "color": {"type": "string", "required": True, "example": "green"}}},
    {"name": "delete_note", "description": "Delete a note.", "parameters": {"note_id": _NOTE_ID}, "tables": ["notes"]},
]}
CODE = '''```python
import sqlite3


def list_notes(conn: sqlite3.Connection) -> list:
    """List my notes."""
    return [{"id": r[0], "title": r[1], "due": r[2]} for r in
            conn.execute("SELECT id, title, due FROM notes WHERE user_id = 1 ORDER BY id")]


def get_note(conn: sqlite3.Connection, note_id: int) -> dict:
    """One note (counts a view).

    Args:
        note_id: id
    """
    conn.execute("UPDATE notes SET views = views + 1 WHERE id = ? AND user_id = 1", (note_id,))
    row = conn.execute("SELECT id, title, color FROM notes WHERE id = ? AND user_id = 1", (note_id,)).fetchone()
    if row is None:
        raise ToolError(f"no note {note_id}")
    return {"id": row[0], "title": row[1], "color": row[2]}


def create_note(conn: sqlite3.Connection, title: str, color: str, due: str | None = None,
                pinned: bool | None = None) -> dict:
    """Create a note.

    Args:
        title: title
        color: red, blue or green
        due: due date
        pinned: pinned
    """
    cur = conn.execute("INSERT INTO notes (user_id, title, color, due, pinned) VALUES (1, ?, ?, ?, ?)",
                       (title, color, due, int(bool(pinned))))
    return {"id": cur.lastrowid}


def update_note(conn: sqlite3.Connection, note_id: int, color: str) -> dict:
    """Change a note's color.

    Args:
        note_id: id
        color: new color
    """
    if conn.execute("UPDATE notes SET color = ? WHERE id = ? AND user_id = 1", (color, note_id)).rowcount == 0:
        raise ToolError(f"no note {note_id}")
    return {"id": note_id}


def delete_note(conn: sqlite3.Connection, note_id: int) -> dict:
    """Delete a note.

    Args:
        note_id: id
    """
    if conn.execute("DELETE FROM notes WHERE id = ? AND user_id = 1", (note_id,)).rowcount == 0:
        raise ToolError(f"no note {note_id}")
    return {"deleted": True}
```'''

TASKS = ["Create a pinned red note titled 'Trip', due 2026-12-10.",
         "Delete my note 'Groceries'.",
         "Which of my notes is due first, and when?",
         "Create two blue notes titled 'Alpha' and 'Beta'.",
         "Make my note 'Taxes' red."]
SOLUTIONS = [
    ReferenceSolution(task_idx=0, calls=[ToolCall(tool="create_note", arguments={
        "title": "Trip", "color": "red", "due": "2026-12-10", "pinned": True})]),
    ReferenceSolution(task_idx=1, calls=[ToolCall(tool="delete_note", arguments={"note_id": 1})]),
    ReferenceSolution(task_idx=2, calls=[ToolCall(tool="list_notes")],
                      final_answer="Groceries is due first, on 2026-12-01."),
    ReferenceSolution(task_idx=3, calls=[ToolCall(tool="create_note", arguments={"title": "Alpha", "color": "blue"}),
                                         ToolCall(tool="create_note", arguments={"title": "Beta", "color": "blue"})]),
    ReferenceSolution(task_idx=4, calls=[ToolCall(tool="update_note", arguments={"note_id": 2, "color": "red"})]),
]

# Written as the verifier prompt asks: db_changes for the exact change set, the answer helpers.
# get_note counts views: an agent that looked a note up did nothing wrong, so updates of the view
# count alone are allowed.
SOUND = [
    '''    ch = db_changes(initial_db, final_db)
    new = ch.get("notes", {}).get("inserted", [])
    want = {"title": "Trip", "color": "red", "due": "2026-12-10", "pinned": 1}
    edits = [u for u in ch.get("notes", {}).get("updated", []) if u["columns"] != ["views"]]
    ok = (set(ch) == {"notes"} and len(new) == 1 and not edits and not ch["notes"]["deleted"]
          and all(new[0][k] == v for k, v in want.items()))
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"changes": ch}}
''',
    '''    ch = db_changes(initial_db, final_db)
    gone = [r["title"] for r in ch.get("notes", {}).get("deleted", [])]
    edits = [u for u in ch.get("notes", {}).get("updated", []) if u["columns"] != ["views"]]
    ok = set(ch) == {"notes"} and gone == ["Groceries"] and not ch["notes"]["inserted"] and not edits
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"deleted": gone}}
''',
    '''    import re
    rows = initial_db.execute("SELECT title, due FROM notes WHERE user_id = 1 ORDER BY due").fetchall()
    title, due = rows[0]
    text = (final_answer or "").lower()
    # Every title is a candidate: naming another one beside the right one is a hedge.
    titles = [r[0] for r in initial_db.execute("SELECT title FROM notes")]
    said = [t for t in titles if re.search(r"\\b" + re.escape(t.lower()) + r"\\b", text)]
    ok = said == [title] and due in answer_dates(final_answer, default_year=int(due[:4]))
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"said": said, "due": due}}
''',
    '''    ch = db_changes(initial_db, final_db)
    new = ch.get("notes", {}).get("inserted", [])
    edits = [u for u in ch.get("notes", {}).get("updated", []) if u["columns"] != ["views"]]
    ok = (set(ch) == {"notes"} and sorted((r["title"], r["color"]) for r in new) == [("Alpha", "blue"), ("Beta", "blue")]
          and not edits and not ch["notes"]["deleted"])
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"inserted": new}}
''',
    '''    ch = db_changes(initial_db, final_db)
    up = ch.get("notes", {}).get("updated", [])
    real = [u for u in up if set(u["columns"]) - {"views"}]
    ok = (set(ch) == {"notes"} and len(real) == 1 and real[0]["new"]["title"] == "Taxes"
          and set(real[0]["columns"]) - {"views"} == {"color"} and real[0]["new"]["color"] == "red"
          and not ch["notes"]["inserted"] and not ch["notes"]["deleted"])
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"updated": up}}
''',
]

# task 0: ignores the values the task states (color, due date, pinned).
VALUE_LENIENT = '''    ch = db_changes(initial_db, final_db)
    new = ch.get("notes", {}).get("inserted", [])
    ok = set(ch) == {"notes"} and [r["title"] for r in new] == ["Trip"]
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"inserted": new}}
'''
# task 1: only looks for deleted rows, the way 8 of 16 real-model verifiers compared "nothing else".
DELETIONS_ONLY = '''    gone = [r for r in initial_db.execute("SELECT id, title FROM notes").fetchall()
            if final_db.execute("SELECT 1 FROM notes WHERE id = ?", (r[0],)).fetchone() is None]
    users_kept = all(final_db.execute("SELECT 1 FROM users WHERE id = ?", (u[0],)).fetchone()
                     for u in initial_db.execute("SELECT id FROM users"))
    ok = [t for _, t in gone] == ["Groceries"] and users_kept
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"gone": gone}}
'''
# task 2: the title as a whole word, with no look at other titles (accepts hedged answers).
HEDGE_LENIENT = '''    import re
    title, due = initial_db.execute("SELECT title, due FROM notes WHERE user_id = 1 ORDER BY due").fetchone()
    ok = bool(re.search(r"\\b" + re.escape(title.lower()) + r"\\b", (final_answer or "").lower())) and due in (final_answer or "")
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"title": title}}
'''
# task 2: wants the ISO date written exactly so (rejects "December 1, 2026").
DATE_STRICT = SOUND[2].replace("due in answer_dates(final_answer, default_year=int(due[:4]))", "due in (final_answer or '')")
# task 3: finds the new notes by the ids the inserts got in the reference order.
IDS_STRICT = '''    rows = final_db.execute("SELECT id, title, color FROM notes WHERE id IN (4, 5) ORDER BY id").fetchall()
    ch = db_changes(initial_db, final_db)
    edits = [u for u in ch.get("notes", {}).get("updated", []) if u["columns"] != ["views"]]
    ok = (rows == [(4, "Alpha", "blue"), (5, "Beta", "blue")] and set(ch) == {"notes"}
          and len(ch["notes"]["inserted"]) == 2 and not edits and not ch["notes"]["deleted"])
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"rows": rows}}
'''
# task 4: no other column may change, not even the view count that looking the note up bumps.
VIEWS_STRICT = '''    ch = db_changes(initial_db, final_db)
    up = ch.get("notes", {}).get("updated", [])
    ok = set(ch) == {"notes"} and len(up) == 1 and up[0]["columns"] == ["color"] and up[0]["new"]["color"] == "red"
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"updated": up}}
'''


def _v(idx: int, body: str) -> Verifier:
    return Verifier(task_idx=idx, code="def verify(initial_db, final_db, final_answer):\n" + body)


@pytest.fixture(scope="module")
def ctx() -> StageContext:
    sc = Scenario.new("Note Pad", "Personal notes", "productivity")
    c = StageContext(scenario=sc, tasks=[Task(scenario_id=sc.id, idx=i, text=t) for i, t in enumerate(TASKS)],
                     db_schema=DbSchema.from_data(SCHEMA), seed_data=SeedData.from_data(SEED),
                     api_spec=ApiSpec.from_data(SPEC), task_idx=0)
    return c.with_(code=code.parse(CODE, c))


def _env(ctx, planted: dict[int, str] | None = None):
    bodies = [(planted or {}).get(i, body) for i, body in enumerate(SOUND)]
    return ctx.environment(verifiers=[_v(i, b) for i, b in enumerate(bodies)], solutions=SOLUTIONS)


def _failed(checks):
    return [c.detail for c in checks if not c.passed]


def _tried(checks, kind):
    return [c for c in checks if kind in c.detail and not skipped_mutation(c)]


def test_sound_verifiers_pass_every_mutation_and_equivalence(ctx, pool):
    report = validate_environment(pool, _env(ctx))
    assert report.passed and report.dropped_tasks == {}, report.dropped_tasks
    checks = report.checks
    for kind in ("change_value", "extra_insert", "extra_update", "hedged_answer"):
        assert any(c.name == "verifier_mutation" for c in _tried(checks, kind)), f"{kind} never tried"
    for kind in ("read_only_calls", "reordered_calls", "reworded_answer"):
        assert any(c.name == "verifier_equivalence" for c in _tried(checks, kind)), f"{kind} never tried"


def test_change_value_catches_a_verifier_ignoring_stated_values_and_names_the_argument(ctx, pool):
    failed = _failed(mutation_checks(pool, _env(ctx, {0: VALUE_LENIENT}), 0))
    changed = {m.group(1) for d in failed if (m := re.search(r"after change_value in call 0 .*\)\): (\w+) ", d))}
    assert changed == {"color", "due", "pinned"}, failed
    assert any('color "red" -> "blue" (another enum member; the task states color)' in d for d in failed)
    assert any("pinned true -> false (the boolean flipped" in d for d in failed)
    assert any('due "2026-12-10" -> "2026-12-11" (another date' in d for d in failed)


def test_an_argument_the_task_does_not_state_is_judged_free_and_reported(ctx, pool):
    env = _env(ctx)
    env.tasks[0] = env.tasks[0].model_copy(update={"text": "Create a red note titled 'Trip'."})
    checks = mutation_checks(pool, env.model_copy(update={"verifiers": [_v(0, VALUE_LENIENT.replace(
        '[r["title"] for r in new] == ["Trip"]', '[(r["title"], r["color"]) for r in new] == [("Trip", "red")]'))]}), 0)
    assert not _failed(checks), _failed(checks)
    free = [skipped_mutation(c) for c in checks if skipped_mutation(c) and "judged free" in skipped_mutation(c)[1]]
    assert free and "create_note.due='2026-12-10'" in free[0][0] and "create_note.pinned=True" in free[0][0]


def test_a_verifier_checking_only_deletions_is_caught_by_extra_insert_and_extra_update(ctx, pool):
    checks = mutation_checks(pool, _env(ctx, {1: DELETIONS_ONLY}), 1)
    failed = _failed(checks)
    assert any("after extra_insert in a table the task changes" in d and "copy of an existing row" in d for d in failed)
    assert any("after extra_insert in another table: the reference final database, then inserted into users" in d
               for d in failed)
    assert any("after extra_update in another table" in d for d in failed)
    # It does reject the deletion the old extra_destructive mutation makes.
    assert not any("extra_destructive" in d for d in failed)


def test_extra_update_alters_another_column_of_the_row_the_task_changes(ctx, pool):
    lenient = SOUND[4].replace('and set(real[0]["columns"]) - {"views"} == {"color"} ', "")
    failed = _failed(mutation_checks(pool, _env(ctx, {4: lenient}), 4))
    assert any("extra_update of another column of a row the task changes" in d and "notes.user_id" in d
               for d in failed), failed


def test_hedged_answers_catch_a_verifier_that_does_not_look_at_other_candidates(ctx, pool):
    failed = _failed(mutation_checks(pool, _env(ctx, {2: HEDGE_LENIENT}), 2))
    assert any("hedged_answer (another title of notes as a second guess)" in d
               and re.search(r"\(or possibly (Taxes|Bo private)\)", d) for d in failed), failed


def test_equivalences_catch_over_strict_verifiers(ctx, pool):
    date = _failed(equivalence_checks(pool, _env(ctx, {2: DATE_STRICT}), 2))
    assert any("after reworded_answer (dates and times written out)" in d and "December 1, 2026" in d for d in date)
    assert any("too strict" in d for d in date)
    ids = _failed(equivalence_checks(pool, _env(ctx, {3: IDS_STRICT}), 3))
    assert len(ids) == 1 and "reordered_calls" in ids[0] and "[1, 0]" in ids[0], ids
    views = _failed(equivalence_checks(pool, _env(ctx, {4: VIEWS_STRICT}), 4))
    assert len(views) == 1 and "read_only_calls: get_note, list_notes before and after" in views[0], views


def test_validation_drops_each_planted_verifier_with_its_reason_and_keeps_the_rest(ctx, pool):
    report = validate_environment(pool, _env(ctx, {0: VALUE_LENIENT, 1: DELETIONS_ONLY, 3: IDS_STRICT}))
    assert sorted(report.dropped_tasks) == [0, 1, 3]
    assert "after change_value" in report.dropped_tasks[0]
    assert "after extra_insert" in report.dropped_tasks[1] or "after extra_update" in report.dropped_tasks[1]
    assert report.dropped_tasks[3].startswith("verifier_equivalence:")


def test_soundness_errors_tell_the_verifier_stage_both_ways(ctx, pool):
    lenient = mutation_checks(pool, _env(ctx, {0: VALUE_LENIENT}), 0)
    strict = equivalence_checks(pool, _env(ctx, {3: IDS_STRICT}), 3)
    errors = verifier.soundness_errors(lenient + strict)
    assert any(e.startswith("your previous verifier accepted") and "change_value" in e for e in errors)
    assert any(e.startswith("your previous verifier rejected an episode that does the task") for e in errors)
    assert verifier.soundness_errors(mutation_checks(pool, _env(ctx), 0)) == []


@pytest.mark.parametrize("task, argument, value, stated", [
    ("Reject Liam Walsh's report 'Team offsite snacks'.", "decision", "rejected", True),
    ("Mark my Lemon Garlic Roast Chicken recipe as a favourite.", "is_favorite", True, True),
    ("Set the team's December 2026 budgets to $6,000.", "month", "2026-12", True),
    ("Set the team's December 2026 budgets to $6,000.", "amount", 6000, True),
    ("Book Dr. Bello's open slot on Dec 10 at 3 pm.", "start_time", "2026-12-10T15:00", True),
    ("Book Dr. Bello's open slot on Dec 10 at 3 pm.", "start", "15:00", True),
    ("Add the curry to my plan for dinner on 2026-12-02, for 4 servings.", "servings", 4, True),
    ("Book Dr. Bello's open slot on Dec 10.", "party_size", 10, False),  # the 10 is the day
    ("Create a report for the Platform Summit.", "business_purpose", "Conference travel", False),
    ("Create a note.", "pinned", False, False),
])
def test_which_values_a_task_states(task, argument, value, stated):
    from awm_core.mutations import named_in_task

    assert named_in_task(task, argument, value) is stated


def test_another_enum_member_comes_from_the_check_that_lists_the_value():
    from awm_core.db import build_database, open_snapshot
    from awm_core.mutations import other_values

    db = build_database(DbSchema.from_data({"tables": [
        {"name": "orders", "ddl": "CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT CHECK (status IN ('new', 'paid')))"},
        {"name": "tickets", "ddl": "CREATE TABLE tickets (id INTEGER PRIMARY KEY, status TEXT "
                                   "CHECK (status IN ('open', 'closed')))"}]}))
    conn = open_snapshot(db, readonly=True)
    try:
        assert other_values(conn, "status", "closed") == [("open", "another enum member")]
        assert other_values(conn, "status", "paid") == [("new", "another enum member")]
        assert other_values(conn, "due", "2026-12-31") == [("2027-01-01", "another date")]
        assert other_values(conn, "month", "2026-12") == [("2027-01", "another month")]
        assert other_values(conn, "color", "red", ParamSpec(type="string", enum=["red", "green", "blue"])) == [
            ("green", "another enum member"), ("blue", "another enum member")]
    finally:
        conn.close()


@pytest.mark.parametrize("task, value, stated", [
    ("Leave a review with the comment 'Very thorough and kind.'", "Very thorough and kind.", True),
    ("Add my Thai Green Curry recipe to my meal plan.", "Thai Green Curry", True),
    ("Add two items: the conference pass from 'Platform Summit BV'.", "Conference pass", False),
    ("Add two items: the conference pass from 'Platform Summit BV'.", "Platform Summit BV", True),
    ("Pay it by bank transfer on 2026-11-20.", "bank_transfer", True),
])
def test_free_text_is_stated_when_quoted_or_written_as_it_is(task, value, stated):
    from awm_core.mutations import named_in_task

    assert named_in_task(task, "description", value) is stated

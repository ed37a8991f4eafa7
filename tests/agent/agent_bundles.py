"""A small hand-written native environment for the agent tests: notes with three tasks, their
verifiers and reference solutions, plus a variant whose extra tool sleeps past the call timeout."""
from __future__ import annotations

import pytest

from awm_core.runtime import SandboxPool
from awm_core.settings import load_settings

from awm_core.models import (
    ApiSpec, DbSchema, EnvCode, Environment, ParamSpec, ReferenceSolution, Scenario, SeedData, TableSchema,
    TableSeed, Task, ToolCall, ToolSpec, Verifier,
)

NOTES_CODE = '''
import sqlite3
import time


def create_note(conn: sqlite3.Connection, title: str, body: str = "") -> dict:
    """Create a note for the current user.

    Args:
        title: Title of the note.
        body: Text of the note.
    """
    if not title.strip():
        raise ToolError("title must not be empty")
    cur = conn.execute("INSERT INTO notes (user_id, title, body) VALUES (1, ?, ?)", (title, body))
    return {"id": cur.lastrowid, "title": title}


def list_notes(conn: sqlite3.Connection, limit: int = 20) -> list:
    """List the current user's notes.

    Args:
        limit: Most notes to return.
    """
    rows = conn.execute("SELECT id, title, body FROM notes WHERE user_id = 1 ORDER BY id LIMIT ?", (limit,)).fetchall()
    return [{"id": r[0], "title": r[1], "body": r[2]} for r in rows]


def delete_note(conn: sqlite3.Connection, note_id: int) -> dict:
    """Delete a note.

    Args:
        note_id: Id of the note to delete.
    """
    if not conn.execute("DELETE FROM notes WHERE id = ?", (note_id,)).rowcount:
        raise ToolError(f"note {note_id} not found")
    return {"deleted": note_id}
'''

SLEEPY_TOOL = '''

def nap(conn: sqlite3.Connection, seconds: float) -> dict:
    """Sleep, then answer.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return {"slept": seconds}
'''

VERIFY_CREATE = '''
def verify(initial_db, final_db, final_answer):
    rows = final_db.execute("SELECT body FROM notes WHERE title = 'Groceries'").fetchall()
    if any(r[0] == "milk, eggs" for r in rows):
        verdict = "complete"
    elif rows:
        verdict = "partial"
    else:
        verdict = "incomplete"
    return {"verdict": verdict, "evidence": {"groceries_notes": len(rows)}}
'''

VERIFY_DELETE = '''
def verify(initial_db, final_db, final_answer):
    left = final_db.execute("SELECT count(*) FROM notes WHERE title = 'Old ideas'").fetchone()[0]
    total_before = initial_db.execute("SELECT count(*) FROM notes").fetchone()[0]
    total_after = final_db.execute("SELECT count(*) FROM notes").fetchone()[0]
    ok = left == 0 and total_after == total_before - 1
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"left": left, "after": total_after}}
'''

VERIFY_COUNT = '''
def verify(initial_db, final_db, final_answer):
    n = initial_db.execute("SELECT count(*) FROM notes WHERE user_id = 1").fetchone()[0]
    same = final_db.execute("SELECT count(*) FROM notes").fetchone()[0] == n
    ok = same and final_answer is not None and str(n) in final_answer
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"expected": n, "answer": final_answer}}
'''


def _p(type_, description, example=None, required=True):
    return ParamSpec(type=type_, description=description, example=example, required=required)


def notes_environment(env_id: str = "notes", *, sleepy: bool = False) -> Environment:
    tools = [
        ToolSpec(name="create_note", description="Create a note", parameters={
            "title": _p("string", "title", "Groceries"), "body": _p("string", "body", "milk", False)}),
        ToolSpec(name="list_notes", description="List notes", parameters={"limit": _p("integer", "max", 5, False)}),
        ToolSpec(name="delete_note", description="Delete a note", parameters={"note_id": _p("integer", "id", 2)}),
    ]
    code = NOTES_CODE
    if sleepy:
        tools.append(ToolSpec(name="nap", description="Sleep", parameters={"seconds": _p("number", "s", 0.01)}))
        code += SLEEPY_TOOL
    return Environment(
        id=env_id,
        scenario=Scenario(id=env_id, name=env_id, description="A notes app.", category="productivity"),
        tasks=[
            Task(scenario_id=env_id, idx=0, text="Create a note titled 'Groceries' with the text 'milk, eggs'."),
            Task(scenario_id=env_id, idx=1, text="Delete my note titled 'Old ideas'."),
            Task(scenario_id=env_id, idx=2, text="How many notes do I have? Answer with the number."),
        ],
        db_schema=DbSchema(tables=[
            TableSchema(name="users", ddl="CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"),
            TableSchema(name="notes", ddl="CREATE TABLE notes (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL "
                                          "REFERENCES users(id), title TEXT NOT NULL, body TEXT DEFAULT '')"),
        ]),
        seed_data=SeedData(tables=[
            TableSeed(table_name="users", insert_statements=["INSERT INTO users VALUES (1, 'ada')"]),
            TableSeed(table_name="notes", insert_statements=[
                "INSERT INTO notes VALUES (1, 1, 'Reading list', 'dune')",
                "INSERT INTO notes VALUES (2, 1, 'Old ideas', 'a flying bicycle')",
                "INSERT INTO notes VALUES (3, 1, 'Recipes', 'soup')"]),
        ]),
        api_spec=ApiSpec(tools=tools),
        code=EnvCode(flavour="native", source=code),
        verifiers=[Verifier(task_idx=0, code=VERIFY_CREATE, success_criteria="a Groceries note with 'milk, eggs'"),
                   Verifier(task_idx=1, code=VERIFY_DELETE),
                   Verifier(task_idx=2, code=VERIFY_COUNT)],
        solutions=[
            ReferenceSolution(task_idx=0, calls=[
                ToolCall(tool="create_note", arguments={"title": "Groceries", "body": "milk, eggs"})]),
            ReferenceSolution(task_idx=1, calls=[
                ToolCall(tool="list_notes", arguments={}), ToolCall(tool="delete_note", arguments={"note_id": 2})]),
            ReferenceSolution(task_idx=2, calls=[ToolCall(tool="list_notes", arguments={})],
                              final_answer="You have 3 notes."),
        ],
    )


# Fixtures shared by the loop tests (a test module imports them by name).
@pytest.fixture(scope="module")
def pool():
    """One sandbox worker with a short call timeout, for the module."""
    with SandboxPool(load_settings().sandbox, workers=1, call_timeout_s=3.0) as p:
        yield p


@pytest.fixture(scope="module")
def notes(pool):
    """The notes app, loaded in the module's pool."""
    env = notes_environment()
    return env, pool.load(env)

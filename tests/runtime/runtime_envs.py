"""Environments the runtime tests share: a small native notes app, hostile variants of it,
and Environment bundles built from the AgentWorldModel-1K sample records."""
from __future__ import annotations

import json
from pathlib import Path

from awm_core.models import (
    ApiSpec, DbSchema, EnvCode, Environment, ParamSpec, Scenario, SeedData, TableSchema, TableSeed, Task,
    ToolSpec, Verifier,
)

NOTES_CODE = '''
import sqlite3
from typing import Optional


def create_note(conn: sqlite3.Connection, title: str, body: str = "", tags: Optional[list[str]] = None) -> dict:
    """Create a note for the current user.

    Args:
        title: Title of the note.
        body: Text of the note.
        tags: Labels to attach.
    """
    if not title.strip():
        raise ToolError("title must not be empty")
    cur = conn.execute("INSERT INTO notes (user_id, title, body) VALUES (1, ?, ?)", (title, body))
    for t in tags or []:
        conn.execute("INSERT INTO tags (note_id, tag) VALUES (?, ?)", (cur.lastrowid, t))
    return {"id": cur.lastrowid, "title": title}


def list_notes(conn: sqlite3.Connection, limit: int = 10, query: str | None = None) -> list:
    """List the current user's notes, newest first.

    Args:
        limit: Most notes to return.
        query: Only notes whose title contains this text.
    """
    sql = "SELECT id, title, body FROM notes WHERE user_id = 1"
    params: list = []
    if query:
        sql += " AND title LIKE ?"
        params.append(f"%{query}%")
    rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
    return [{"id": r[0], "title": r[1], "body": r[2]} for r in rows]


def get_note(conn: sqlite3.Connection, note_id: int) -> dict:
    """Get one note by id.

    Args:
        note_id: Id of the note.
    """
    row = conn.execute("SELECT id, title, body FROM notes WHERE id = ?", (note_id,)).fetchone()
    if row is None:
        raise ToolError(f"note {note_id} not found")
    return {"id": row[0], "title": row[1], "body": row[2]}


def delete_note(conn: sqlite3.Connection, note_id: int) -> dict:
    """Delete a note.

    Args:
        note_id: Id of the note to delete.
    """
    n = conn.execute("DELETE FROM notes WHERE id = ?", (note_id,)).rowcount
    if not n:
        raise ToolError(f"note {note_id} not found")
    return {"deleted": note_id}


def buggy_count(conn: sqlite3.Connection) -> int:
    """Count notes (has a bug)."""
    return conn.execute("SELECT count(*) FROM notes").fetchone()[0] / 0
'''

NOTES_VERIFIER = '''
def verify(initial_db, final_db, final_answer):
    before = initial_db.execute("SELECT count(*) FROM notes").fetchone()[0]
    after = final_db.execute("SELECT count(*) FROM notes WHERE title = 'groceries'").fetchone()[0]
    verdict = "complete" if after >= 1 else "incomplete"
    return {"verdict": verdict, "evidence": {"notes_before": before, "groceries_notes": after}}
'''


def _p(type_, description, example=None, required=True):
    return ParamSpec(type=type_, description=description, example=example, required=required)


def notes_environment(code: str = NOTES_CODE, env_id: str = "notes", extra_tools: list[ToolSpec] = ()) -> Environment:
    tools = [
        ToolSpec(name="create_note", description="Create a note", parameters={
            "title": _p("string", "title", "groceries"), "body": _p("string", "body", "milk", False),
            "tags": ParamSpec(type="array", items={"type": "string"}, required=False, example=["home"])}),
        ToolSpec(name="list_notes", description="List notes", parameters={"limit": _p("integer", "max", 5, False)}),
        ToolSpec(name="get_note", description="Get a note", parameters={"note_id": _p("integer", "id", 1)}),
        ToolSpec(name="delete_note", description="Delete a note", parameters={"note_id": _p("integer", "id", 2)}),
        ToolSpec(name="buggy_count", description="Count notes"),
        *extra_tools,
    ]
    return Environment(
        id=env_id,
        scenario=Scenario(id=env_id, name=env_id, description="A notes app."),
        tasks=[Task(scenario_id=env_id, idx=0, text="Create a note titled groceries.")],
        db_schema=DbSchema(tables=[
            TableSchema(name="users", ddl="CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"),
            TableSchema(name="notes", ddl="CREATE TABLE notes (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL "
                                          "REFERENCES users(id), title TEXT NOT NULL, body TEXT DEFAULT '')"),
            TableSchema(name="tags", ddl="CREATE TABLE tags (note_id INTEGER REFERENCES notes(id) ON DELETE CASCADE, "
                                         "tag TEXT NOT NULL)"),
        ]),
        seed_data=SeedData(tables=[
            TableSeed(table_name="users", insert_statements=["INSERT INTO users VALUES (1, 'ada')"]),
            TableSeed(table_name="notes", insert_statements=[
                "INSERT INTO notes VALUES (1, 1, 'first', 'hello')",
                "INSERT INTO notes VALUES (2, 1, 'second', 'world')"]),
        ]),
        api_spec=ApiSpec(tools=tools),
        code=EnvCode(flavour="native", source=code),
        verifiers=[Verifier(task_idx=0, code=NOTES_VERIFIER)],
    )


def hostile_environment(env_id: str, body: str) -> Environment:
    """The notes app plus one tool ``evil()`` whose body is ``body`` (indented by the caller's text)."""
    code = NOTES_CODE + "\n\ndef evil(conn: sqlite3.Connection) -> object:\n    \"\"\"Hostile.\"\"\"\n" + "\n".join(
        "    " + line for line in body.strip("\n").splitlines()) + "\n"
    return notes_environment(code, env_id, extra_tools=[ToolSpec(name="evil", description="hostile")])


def _jsonl(path: Path, scenario: str) -> dict | None:
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("scenario") == scenario:
            return rec
    return None


def awm1k_environment(samples: Path, scenario: str = "content_platform_1") -> Environment:
    """A bundle from the sample records (the project's importer, when present, does the same)."""
    try:
        from awm_core.interop.awm1k import read_dir
    except ImportError:
        read_dir = None
    if read_dir is not None:
        found = [e for e in read_dir(samples).environments if e.id == scenario]
        if found:
            return found[0]
    db = _jsonl(samples / "gen_db.jsonl", scenario)
    seed = _jsonl(samples / "gen_sample.jsonl", scenario)
    spec = _jsonl(samples / "gen_spec.jsonl", scenario)
    envs = _jsonl(samples / "gen_envs.jsonl", scenario)
    tasks = _jsonl(samples / "gen_tasks.jsonl", scenario)
    tools = []
    for group in spec["api_spec"]["api_groups"]:
        for ep in group["endpoints"]:
            params = {}
            for name, p in (ep.get("request_params") or {}).items():
                params[name] = ParamSpec(type=p.get("type", "string"), description=p.get("description", ""),
                                         required=bool(p.get("required")), example=p.get("example"),
                                         param_type=p.get("param_type"))
            tools.append(ToolSpec(name=ep["operation_id"], description=ep.get("description") or ep.get("summary", ""),
                                  parameters=params, group=group.get("group_name", ""),
                                  extra={"path": ep["path"], "method": ep["method"]}))
    return Environment(
        id=scenario,
        scenario=Scenario(id=scenario, name=scenario, description=scenario),
        tasks=[Task(scenario_id=scenario, idx=i, text=t) for i, t in enumerate((tasks or {}).get("tasks", []))],
        db_schema=DbSchema.from_data(db["db_schema"]),
        seed_data=SeedData.from_data({"tables": [
            {"table_name": t["table_name"], "reasoning": t.get("reasoning", ""),
             "insert_statements": t["insert_statements"]} for t in seed["sample_data"]["tables"]]}),
        api_spec=ApiSpec(tools=tools),
        code=EnvCode(flavour="awm1k", source=envs["full_code"]),
    )


def awm1k_verifier_environment(samples: Path) -> tuple[Environment, list[dict], list[dict]]:
    """e_commerce_33 (schema, seed, both verifier styles; no code) for verifier tests."""
    db = _jsonl(samples / "gen_db.jsonl", "e_commerce_33")
    seed = _jsonl(samples / "gen_sample.jsonl", "e_commerce_33")
    code_v = [json.loads(line) for line in (samples / "gen_verifier.pure_code.jsonl").read_text().splitlines()]
    sql_v = [json.loads(line) for line in (samples / "gen_verifier.jsonl").read_text().splitlines()]
    verifiers = [Verifier(task_idx=r["task_idx"], code=r["verification"]["code"], style="awm1k_code",
                          function_name="verify_task_completion") for r in code_v]
    env = Environment(
        id="e_commerce_33", scenario=Scenario(id="e_commerce_33", name="e_commerce_33", description="shop"),
        db_schema=DbSchema.from_data(db["db_schema"]),
        seed_data=SeedData.from_data({"tables": [
            {"table_name": t["table_name"], "insert_statements": t["insert_statements"]}
            for t in seed["sample_data"]["tables"]]}),
        code=EnvCode(flavour="native", source="def noop(conn):\n    return 1\n"),
        verifiers=verifiers,
    )
    return env, code_v, sql_v


def serve_app(app, main) -> None:
    """An ASGI app under uvicorn on a socket bound here (no free-port race); ``main(url)`` (a
    coroutine function) runs against its ``/mcp``, then the server stops."""
    import socket
    import threading
    import time

    import anyio
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        anyio.run(main, f"http://127.0.0.1:{sock.getsockname()[1]}/mcp")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()

"""SandboxPool with both flavours: schemas, validation, sessions, reset, isolation, verifiers."""
from __future__ import annotations

import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_envs import awm1k_environment, awm1k_verifier_environment, notes_environment  # noqa: E402

from awm_core.db import build_database, snapshot_digest  # noqa: E402
from awm_core.errors import SqlExecutionError  # noqa: E402
from awm_core.models import EnvCode, SeedData, TableSeed  # noqa: E402
from awm_core.runtime import EnvLoadError, SandboxPool  # noqa: E402


@pytest.fixture(scope="module")
def pool():
    os.environ["AWM_TEST_SECRET_KEY"] = "sk-must-not-leak"
    with SandboxPool(workers=2, call_timeout_s=20) as p:
        yield p
    os.environ.pop("AWM_TEST_SECRET_KEY", None)


@pytest.fixture(scope="module")
def notes(pool):
    return pool.load(notes_environment())


@pytest.fixture(scope="module")
def cp1(pool, awm1k_samples):
    return pool.load(awm1k_environment(awm1k_samples))


def test_native_schemas_from_signatures_and_docstrings(notes):
    tools = {t.name: t for t in notes.tools()}
    assert set(tools) == {"create_note", "list_notes", "get_note", "delete_note", "buggy_count"}
    s = tools["create_note"].input_schema
    assert s["required"] == ["title"]
    assert s["properties"]["title"] == {"type": "string", "description": "Title of the note."}
    assert s["properties"]["tags"]["type"] == ["array", "null"]
    assert s["properties"]["tags"]["items"] == {"type": "string"}
    assert s["additionalProperties"] is False
    assert tools["create_note"].description == "Create a note for the current user."
    assert tools["list_notes"].input_schema["properties"]["limit"]["default"] == 10


def test_native_calls_and_error_kinds(notes):
    with notes.open_session() as s:
        r = s.call("create_note", {"title": "groceries", "tags": ["home"]})
        assert r.ok and r.content == {"id": 3, "title": "groceries"}
        assert [n["title"] for n in s.call("list_notes", {"limit": 2}).content] == ["groceries", "second"]
        r = s.call("get_note", {"note_id": 99})
        assert (r.ok, r.error_kind, r.error) == (False, "tool", "note 99 not found")
        r = s.call("buggy_count", {})
        assert r.error_kind == "tool" and "ZeroDivisionError" in r.error and "line" in r.error
        r = s.call("create_note", {"title": "  "})
        assert r.error_kind == "tool" and "must not be empty" in r.error
        # a failed tool call leaves no partial writes behind
        assert len(s.call("list_notes", {"limit": 50}).content) == 3


@pytest.mark.parametrize("args, fragment", [
    ({"title": 5}, "argument 'title': 5 is not of type 'string'"),
    ({}, "missing required argument 'title'"),
    ({"title": "a", "colour": "red"}, "unknown argument(s) 'colour'"),
    ({"title": "a", "tags": "not-a-list"}, "argument 'tags'"),
    ({"title": "a", "tags": [1]}, "argument 'tags.0'"),
    ("not an object", "arguments must be a JSON object"),
    ({"title": float("nan")}, "not plain JSON"),
])
def test_argument_validation(notes, args, fragment):
    with notes.open_session() as s:
        r = s.call("create_note", args)
    assert r.error_kind == "invalid_arguments" and fragment in r.error, r


def test_unknown_tool_lists_the_real_ones(notes):
    with notes.open_session() as s:
        r = s.call("drop_everything", {})
    assert r.error_kind == "unknown_tool" and "create_note" in r.error


def test_reset_restores_exact_initial_bytes_and_sessions_are_isolated(notes):
    a, b = notes.open_session(), notes.open_session()
    initial = a.snapshot()
    assert initial == notes.snapshot
    assert a.call("delete_note", {"note_id": 1}).ok
    assert a.call("create_note", {"title": "only in a"}).ok
    assert [n["title"] for n in b.call("list_notes", {}).content] == ["second", "first"]
    assert b.snapshot() == initial
    assert a.snapshot() != initial
    a.reset()
    assert a.snapshot() == initial
    assert [n["title"] for n in a.call("list_notes", {}).content] == ["second", "first"]
    a.close(), b.close()


def test_foreign_keys_are_enforced_for_native(notes):
    with notes.open_session() as s:
        before = s.snapshot()
        r = s.call("delete_note", {"note_id": 1})
        assert r.ok
        after = s.snapshot()
    assert snapshot_digest(before) != snapshot_digest(after)


def test_load_reports_spec_tools_missing_and_bad_signatures(pool):
    code = "def create_note(title: str) -> dict:\n    \"\"\"No connection.\"\"\"\n    return {}\n"
    with pytest.raises(EnvLoadError) as ei:
        pool.load(notes_environment(code, "broken_notes"))
    text = "\n".join(ei.value.errors)
    assert "tool create_note: the first parameter must be the sqlite3.Connection" in text
    assert "tool list_notes: named in the API spec but not defined in the code" in text
    assert ei.value.stage == "code"


def test_load_reports_syntax_errors_and_bad_seed(pool):
    with pytest.raises(EnvLoadError, match="syntax error at line 1"):
        pool.load(notes_environment("def broken(:\n", "syntax_notes"))
    env = notes_environment(env_id="bad_seed")
    env = env.model_copy(update={"seed_data": SeedData(tables=[TableSeed(
        table_name="notes", insert_statements=["INSERT INTO nope VALUES (1)"])])})
    with pytest.raises(SqlExecutionError, match="no such table: nope"):
        pool.load(env)


def test_worker_environment_has_no_secrets(pool):
    code = ("import sqlite3\n\ndef env_keys(conn: sqlite3.Connection) -> list:\n"
            "    \"\"\"Names of environment variables.\"\"\"\n"
            "    osmod = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
            "    return sorted(osmod.__init__.__globals__['environ'])\n")
    env = notes_environment(code, "env_keys").model_copy(update={"api_spec": None})
    with pool.load(env).open_session() as s:
        keys = s.call("env_keys", {}).content
    assert "AWM_TEST_SECRET_KEY" not in keys and "OPENAI_API_KEY" not in keys
    assert set(keys) <= {"PATH", "HOME", "LANG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "MALLOC_ARENA_MAX",
                         "TMPDIR", "LC_CTYPE"}


def test_protections_in_force(pool, notes):
    w = next(w for w in pool.stats()["workers"] if w["pid"])
    assert w["protections"]["audit_hook"] and w["protections"]["rlimits"]
    if os.geteuid() == 0:
        assert w["protections"]["separate_uid"]


def test_many_threads_share_the_pool(notes, cp1):
    errors = []

    def work(handle, tool, args):
        try:
            with handle.open_session() as s:
                for _ in range(30):
                    r = s.call(tool, args)
                    if not r.ok:
                        errors.append(r)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(notes, "list_notes", {"limit": 3})) for _ in range(4)]
    threads += [threading.Thread(target=work, args=(cp1, "search_channels", {"query": "a"})) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ----------------------------------------------------------------------------- AWM-1K


def test_awm1k_tools_from_openapi(cp1, awm1k_samples):
    names = {t.name for t in cp1.tools()}
    spec_names = {t.name for t in cp1.environment.api_spec.tools}
    assert names == spec_names and len(names) == 34
    s = cp1.tool("search_channels").input_schema
    assert s["properties"]["limit"]["type"] == "integer" and "query" in s["required"]


def test_awm1k_calls_write_to_the_session_database_only(cp1):
    a, b = cp1.open_session(), cp1.open_session()
    found = a.call("search_channels", {"query": "Kurzgesagt"})
    assert found.ok and found.content["channels"][0]["id"] == 1
    subs_before = {s["channel_id"] for s in b.call("list_user_subscriptions", {}).content["subscriptions"]}
    assert 1 not in subs_before
    r = a.call("subscribe_to_channel", {"channel_id": 1})
    assert r.ok and r.content["subscription"]["channel_id"] == 1
    assert 1 in {s["channel_id"] for s in a.call("list_user_subscriptions", {}).content["subscriptions"]}
    assert 1 not in {s["channel_id"] for s in b.call("list_user_subscriptions", {}).content["subscriptions"]}
    conn = sqlite3.connect(":memory:")
    conn.deserialize(a.snapshot())
    assert conn.execute("SELECT count(*) FROM user_subscriptions WHERE user_id=1 AND channel_id=1").fetchone()[0] == 1
    a.reset()
    assert a.snapshot() == cp1.snapshot
    a.close(), b.close()


def test_awm1k_errors_come_back_as_tool_errors(cp1):
    with cp1.open_session() as s:
        r = s.call("get_channel_by_id", {"channel_id": 424242})
        assert r.error_kind == "tool" and r.error.startswith("HTTP 500")
        r = s.call("search_channels", {"query": "x", "limit": "many"})
        assert r.error_kind == "invalid_arguments" and "'limit'" in r.error
        assert s.call("search_channels", {"query": "Kurz"}).ok  # still serving


def test_awm1k_initial_snapshot_is_build_database(cp1):
    # The seed uses datetime('now', ...), so compare what does not depend on the clock.
    def shape(data: bytes) -> dict:
        conn = sqlite3.connect(":memory:")
        conn.deserialize(data)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}

    env = cp1.environment
    expected = shape(build_database(env.db_schema, env.seed_data))
    assert shape(cp1.snapshot) == expected and sum(expected.values()) == 154


def test_check_tools_reports_failures(pool, cp1, notes):
    checks = {c.tool: c for c in pool.check_tools(notes.environment)}
    assert checks["create_note"].ok and checks["get_note"].ok
    assert not checks["buggy_count"].ok and checks["buggy_count"].result.error_kind == "tool"
    cp_checks = pool.check_tools(cp1.environment)
    assert len(cp_checks) == 34
    assert sum(c.ok for c in cp_checks) >= 30


# ----------------------------------------------------------------------------- verifiers


def test_native_verifier(pool, notes):
    env = notes.environment
    with notes.open_session() as s:
        initial = s.snapshot()
        s.call("create_note", {"title": "groceries"})
        final = s.snapshot()
    v = pool.verify(env, 0, initial_db=initial, final_db=final)
    assert v.verdict == "complete" and v.evidence == {"notes_before": 2, "groceries_notes": 1} and v.error is None
    v = pool.verify(env, 0, initial_db=initial, final_db=initial)
    assert v.verdict == "incomplete"
    bad = env.model_copy(update={"verifiers": [env.verifiers[0].model_copy(update={"code": "def verify(a, b, c):\n    return 'yes'\n"})]})
    v = pool.verify(bad, 0, initial_db=initial, final_db=final)
    assert v.verdict is None and v.error_kind == "verifier" and "must return" in v.error
    v = pool.verify(env, 7, initial_db=initial, final_db=final)
    assert v.error_kind == "verifier" and "no verifier for task 7" in v.error


def test_native_verifier_gets_read_only_databases(pool, notes):
    env = notes.environment
    writer = "def verify(a, b, c):\n    b.execute(\"DELETE FROM notes\")\n    return {'verdict': 'complete'}\n"
    env2 = env.model_copy(update={"verifiers": [env.verifiers[0].model_copy(update={"code": writer})]})
    v = pool.verify(env2, 0, initial_db=notes.snapshot, final_db=notes.snapshot)
    assert v.error_kind == "verifier" and "readonly" in v.error.replace("-", "").replace(" ", "").lower()


def test_awm1k_verifier_styles(pool, awm1k_samples):
    env, code_v, sql_v = awm1k_verifier_environment(awm1k_samples)
    initial = build_database(env.db_schema, env.seed_data)
    # Task 1 reorders paper towels; with no change in the database the verdict is "incomplete".
    v = pool.verify(env, 1, initial_db=initial, final_db=initial, final_answer="done")
    assert v.error is None and v.verdict == "incomplete" and v.evidence["result"] == "others"
    sql_env = env.model_copy(update={"verifiers": [
        env.verifiers[0].model_copy(update={"code": sql_v[0]["verification"]["code"], "style": "awm1k_sql",
                                            "function_name": "verify_task"})]})
    v = pool.verify(sql_env, 0, initial_db=initial, final_db=initial)
    assert v.error is None and v.verdict is None and isinstance(v.evidence, dict) and v.evidence


def test_awm1k_code_hosting_without_seed_runs_on_an_empty_database(pool, awm1k_samples):
    from awm_core.interop.awm1k import read_dir

    env = next(e for e in read_dir(awm1k_samples).environments if e.id == "code_hosting_2")
    handle = pool.load(env)
    assert len(handle.tools()) == 61
    with handle.open_session() as s:
        listing = [t.name for t in handle.tools() if t.name.startswith("list_")]
        results = [s.call(name, {}) for name in listing]
    assert any(r.ok for r in results)
    assert all(r.error_kind in (None, "tool", "invalid_arguments") for r in results)


def test_sessions_dropped_without_close_are_freed(pool, notes):
    import gc

    def live_sessions() -> int:
        resp, _, _ = notes.worker.request({"op": "ping"})
        return resp["sessions"]

    before = live_sessions()
    for _ in range(20):
        s = notes.open_session()
        s.call("list_notes", {})
        del s
    gc.collect()
    assert live_sessions() == before
    kept = notes.open_session()
    assert live_sessions() == before + 1
    kept.close()
    assert live_sessions() == before


def test_many_closed_sessions_give_their_memory_back_and_the_worker_serves_on(pool, notes):
    """After 64 closes the worker runs a collection and malloc_trim (its own step, which the
    sandbox refuses to environment code): it must neither trip the sandbox nor restart."""
    from awm_core.runtime.worker import TRIM_AFTER_CLOSES

    def ping() -> dict:
        return notes.worker.request({"op": "ping"})[0]

    before, restarts = ping(), notes.worker.restarts
    opened = [notes.open_session() for _ in range(TRIM_AFTER_CLOSES + 6)]
    for s in opened:
        assert s.call("create_note", {"title": "x"}).ok
        s.close_later()
    assert pool.release_closed() >= 1
    after = ping()
    assert after["trims"] > before["trims"] and after["sessions"] == before["sessions"]
    assert notes.worker.restarts == restarts
    with notes.open_session() as s:
        assert s.call("list_notes", {}).ok


def test_unload_frees_the_environment_and_load_brings_it_back(pool):
    env = notes_environment(env_id="unload_me")
    handle = pool.load(env)
    s = handle.open_session()
    assert handle.key in handle.worker.loaded
    pool.unload(env)
    assert handle.key not in handle.worker.loaded
    gone = s.call("list_notes", {})  # its sessions went with it
    assert gone.error_kind == "environment" and "environment was unloaded" in gone.error
    restarts = handle.worker.restarts
    s.reset()  # a new session on the environment, loaded again on demand
    assert len(s.call("list_notes", {}).content) == 2 and handle.worker.restarts == restarts
    again = pool.load(env)
    assert again is not handle
    with again.open_session() as s2:
        assert len(s2.call("list_notes", {}).content) == 2


def test_every_allowed_module_imports_inside_the_sandbox(pool):
    from awm_core.runtime.sandbox import NATIVE_IMPORTS

    mods = sorted(m for m in NATIVE_IMPORTS if m != "__future__")
    code = ("import sqlite3\n\ndef imports(conn: sqlite3.Connection) -> list:\n    \"\"\"Import them all.\"\"\"\n"
            f"    return [__import__(m).__name__ for m in {mods!r}]\n")
    env = notes_environment(code, "all_imports").model_copy(update={"api_spec": None})
    with pool.load(env).open_session() as s:
        r = s.call("imports", {})
    assert r.ok, r
    assert r.content == [m.split(".")[0] for m in mods]


SMALL_FASTAPI = '''
import os
from typing import Optional
from fastapi import FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, Column, Integer, String
from sqlalchemy.orm import declarative_base, sessionmaker

engine = create_engine(os.getenv("DATABASE_PATH", "sqlite:///items.db"), connect_args={"check_same_thread": False})
SessionLocal = sessionmaker(bind=engine)
Base = declarative_base()


class Item(Base):
    __tablename__ = "items"
    id = Column(Integer, primary_key=True)
    name = Column(String, nullable=False)


Base.metadata.create_all(engine)
app = FastAPI()


class ItemIn(BaseModel):
    name: str = Field(..., description="name of the item")
    note: Optional[str] = None


@app.get("/items/{item_id}", operation_id="get_item", summary="Get an item")
def get_item(item_id: int):
    session = SessionLocal()
    item = session.get(Item, item_id)
    session.close()
    return {"id": item.id, "name": item.name}


@app.post("/items", operation_id="create_item", summary="Create an item")
async def create_item(body: ItemIn):
    session = SessionLocal()
    item = Item(name=body.name)
    session.add(item)
    session.commit()
    out = {"id": item.id, "name": item.name}
    session.close()
    return out
'''


def test_awm1k_adapter_with_sync_handler_and_body_model(pool):
    from awm_core.models import DbSchema, Environment, Scenario, TableSchema

    env = Environment(
        id="small_fastapi", scenario=Scenario(id="small_fastapi", name="small", description="items"),
        db_schema=DbSchema(tables=[TableSchema(name="items", ddl="CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")]),
        code=EnvCode(flavour="awm1k", source=SMALL_FASTAPI))
    handle = pool.load(env)
    schema = handle.tool("create_item").input_schema
    assert schema["required"] == ["name"] and set(schema["properties"]) == {"name", "note"}
    with handle.open_session() as s:
        created = s.call("create_item", {"name": "lamp"})
        assert created.ok and created.content == {"id": 1, "name": "lamp"}
        got = s.call("get_item", {"item_id": 1})  # a sync handler: runs on FastAPI's thread pool
        assert got.ok and got.content["name"] == "lamp"
        missing = s.call("get_item", {"item_id": 9})
        assert missing.error_kind == "tool" and "HTTP 500" in missing.error
    with handle.open_session() as other:
        assert other.call("get_item", {"item_id": 1}).error_kind == "tool"  # its own empty database

"""`awm validate` / ``audit_environment`` keep three things apart: defects (checks that failed),
parts that are not checkable on the bundle (and why), and checks that passed. Without seed data a
tool that rejects its example itself (the row is not there) is not checkable, a crash is a defect;
the exit status counts defects only."""
from __future__ import annotations

import json

import pytest

from awm_core.interop.awm1k import read_dir
from awm_core.runtime import SandboxPool, ToolResult
from awm_core.settings import get_settings
from awm_core.validation import audit_environment, handled_rejection
from flows.cli import main


@pytest.fixture
def pool(awm_home):
    with SandboxPool(get_settings().sandbox, workers=1) as p:
        yield p


@pytest.fixture(scope="module")
def samples(awm1k_samples):
    return {e.id: e for e in read_dir(awm1k_samples).environments}


def _sample(samples, env_id):
    if env_id not in samples:
        pytest.skip(f"{env_id} is not among the AWM-1K samples in this folder")
    return samples[env_id]


@pytest.mark.parametrize("result, handled", [
    (ToolResult.failure("tool", 'HTTP 404: {"detail":"item 3 not found"}'), True),
    (ToolResult.failure("tool", 'HTTP 400: {"detail":"no such order"}'), True),
    (ToolResult.failure("tool", 'HTTP 409: {"detail":"already subscribed"}'), True),
    (ToolResult.failure("tool", "note 3 not found"), True),                      # a native ToolError
    (ToolResult.failure("tool", "HTTP 500 (server error in the environment code): ValidationError: x"), False),
    (ToolResult.failure("tool", 'HTTP 500: {"detail":"boom"}'), False),          # a 500 the code raised itself
    (ToolResult.failure("tool", 'HTTP 503: {"detail":"down"}'), False),
    (ToolResult.failure("tool", 'HTTP 422: {"detail":[{"type":"int_parsing"}]}'), False),  # example misfits
    (ToolResult.failure("tool", "TypeError: 'NoneType' object is not subscriptable (line 12 of the environment "
                                "code)"), False),                                # a native crash
    (ToolResult.failure("tool", "KeyError: 'id'"), False),
    (ToolResult.failure("tool", "the tool returned something that is not JSON: TypeError: x"), False),
    (ToolResult.failure("invalid_arguments", "missing required argument 'body'"), False),
    (ToolResult.failure("unknown_tool", "unknown tool 'x'"), False),
    (ToolResult.failure("environment", "the environment code hit a limit: MemoryError"), False),
    (ToolResult(ok=True, content={}), False),
])
def test_handled_rejection_tells_a_missing_row_from_a_crash(result, handled):
    assert handled_rejection(result) is handled


def test_audit_separates_defects_from_what_is_not_checkable_on_the_samples(samples, pool):
    ecom = _sample(samples, "e_commerce_33")
    report, not_checkable = audit_environment(pool, ecom)
    assert [(c.name, c.task_idx) for c in report.failures()] == [("verifier_compile", 2)]  # the one real defect
    # Evidence collectors run (a pass) but have no verdict: their no-op rejection is not checkable, not passed.
    runs = [c for c in report.checks if c.name == "verifier_run"]
    assert sorted(c.task_idx for c in runs) == [0, 1] and all(c.passed for c in runs)
    noop = [c for c in report.checks if c.name == "verifier_noop"]
    assert sorted(c.task_idx for c in noop) == [0, 1, 2] and all("awm1k_code" in c.detail for c in noop)
    # No reference solutions: no mutation is a check (neither passed nor failed); each reason is listed.
    assert not [c for c in report.checks if c.name == "verifier_mutation"]
    assert ("mutations of the awm1k_code verifiers of tasks 0, 1, 2: there is no reference solution to derive "
            "wrong episodes from") in not_checkable
    assert ("no-op rejection and mutations of the awm1k_sql verifiers of tasks 0, 1: the verifier collects "
            "evidence for an LLM judge and gives no verdict of its own") in not_checkable
    assert "tools: no environment code" in not_checkable
    assert not any(line.startswith("skipped") or " because " in line for line in not_checkable)


def test_without_seed_data_crashes_stay_defects_and_verdicts_are_not_checkable(samples, pool):
    # content_platform_1 with its seed data taken away: its tools now run on the empty schema.
    cp = _sample(samples, "content_platform_1").model_copy(update={"seed_data": None})
    report, not_checkable = audit_environment(pool, cp)
    failed = report.failures()
    # get_channel_by_id crashes (HTTP 500, a pydantic error in the handler) with or without seed rows.
    assert [(c.name, c.tool) for c in failed] == [("tool_example", "get_channel_by_id")]
    assert "empty schema" in failed[0].detail and "HTTP 500" in failed[0].detail
    assert len([c for c in report.checks if c.name == "tool_example" and c.passed]) == 33
    assert "seed: no seed data (tools and verifiers run on the empty schema)" in not_checkable

    # e_commerce_33 without seed data: its verifiers can only be run; a verdict on the empty schema says nothing.
    ecom = _sample(samples, "e_commerce_33").model_copy(update={"seed_data": None})
    report, not_checkable = audit_environment(pool, ecom)
    assert not [c for c in report.checks if c.name == "verifier_noop"]
    assert sorted(c.task_idx for c in report.checks if c.name == "verifier_run" and c.passed) == [0, 0, 1, 1, 2]
    assert [(c.name, c.task_idx) for c in report.failures()] == [("verifier_compile", 2)]
    assert any(line.startswith("no-op rejection and mutations of the awm1k_code verifiers of tasks 0, 1, 2: the "
                               "environment has no seed data") for line in not_checkable)


# A tiny AWM-1K scenario without gen_sample (no seed data): one tool answers 404 for a missing row,
# one crashes on it, one lists (fine on an empty table); the crash is written only when asked for.
APP = '''
import os
from fastapi import FastAPI, HTTPException
from sqlalchemy import Column, Integer, String, create_engine
from sqlalchemy.orm import declarative_base, sessionmaker

engine = create_engine(os.getenv("DATABASE_PATH", "sqlite:///items.db"))
SessionLocal = sessionmaker(bind=engine)
Base = declarative_base()


class Item(Base):
    __tablename__ = "items"
    id = Column(Integer, primary_key=True)
    name = Column(String, nullable=False)


Base.metadata.create_all(engine)
app = FastAPI()


@app.get("/items/{item_id}", operation_id="get_item")
def get_item(item_id: int):
    session = SessionLocal()
    item = session.get(Item, item_id)
    session.close()
    if item is None:
        raise HTTPException(status_code=404, detail=f"item {item_id} not found")
    return {"id": item.id, "name": item.name}


@app.get("/items", operation_id="list_items")
def list_items():
    session = SessionLocal()
    out = [{"id": i.id, "name": i.name} for i in session.query(Item).all()]
    session.close()
    return {"items": out}
'''
CRASHING = '''

@app.get("/items/{item_id}/name", operation_id="get_item_name")
def get_item_name(item_id: int):
    session = SessionLocal()
    item = session.get(Item, item_id)
    session.close()
    return {"name": item.name}
'''


def _endpoint(path, op):
    return {"path": path, "method": "GET", "summary": op, "description": op, "operation_id": op, "tags": ["items"],
            "request_params": {} if "{" not in path else {"item_id": {
                "type": "integer", "param_type": "path", "required": True, "description": "id", "example": 3}},
            "response": {}, "required_tables": ["items"], "required_fields": {}}


def _write_bundle(folder, *, crashing: bool):
    folder.mkdir()
    ddl = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
    endpoints = [_endpoint("/items/{item_id}", "get_item"), _endpoint("/items", "list_items")]
    if crashing:
        endpoints.append(_endpoint("/items/{item_id}/name", "get_item_name"))
    records = {
        "gen_db": {"scenario": "items_1", "db_schema": {"tables": [{"name": "items", "ddl": ddl, "indexes": []}]}},
        "gen_spec": {"scenario": "items_1",
                     "api_spec": {"api_groups": [{"group_name": "Items", "endpoints": endpoints}]}},
        "gen_envs": {"scenario": "items_1", "full_code": APP + (CRASHING if crashing else "")},
    }
    for name, rec in records.items():
        (folder / f"{name}.jsonl").write_text(json.dumps(rec) + "\n")
    return folder


def test_cli_without_seed_data_a_not_found_is_not_checkable_and_a_crash_is_a_defect(tmp_path, awm_home, capsys):
    assert main(["validate", str(_write_bundle(tmp_path / "ok", crashing=False))]) == 0  # nothing failed
    out = capsys.readouterr().out
    assert "| items_1 | ok | - | 1/1 | - | - | - | - | - | 2 | 0 | 3 |" in out
    assert ("- items_1: tool examples of get_item (HTTP 404: {\"detail\":\"item 3 not found\"}): the environment has "
            "no seed data") in out
    assert "\nDefects: none\n" in out and "0 defect(s) in 0 of 1 environment(s)" in out

    assert main(["validate", str(_write_bundle(tmp_path / "crash", crashing=True))]) == 1
    out = capsys.readouterr().out
    assert "| items_1 | ok | - | 1/2 | - | - | - | - | - | 2 | 1 | 3 |" in out
    defects = out.split("\nDefects (1):\n", 1)[1]
    assert defects.startswith("- items_1 [tool_example:get_item_name] tool get_item_name called with its spec "
                              "example arguments {\"item_id\": 3} on the empty schema")
    assert "HTTP 500 (server error in the environment code): AttributeError" in defects
    not_checkable = out.split("\nNot checkable (3;", 1)[1].split("\nDefects", 1)[0]
    assert "get_item (HTTP 404" in not_checkable and "get_item_name" not in not_checkable

    main(["validate", str(tmp_path / "crash"), "--json"])
    env = json.loads(capsys.readouterr().out)["environments"][0]
    assert env["counts"] == {"passed": 2, "defects": 1, "not_checkable": 3} and not env["passed"]
    assert [c["tool"] for c in env["checks"] if c["name"] == "tool_example"] == ["list_items", "get_item_name"]

"""The AWM-1K direct paths (parameters bound with FastAPI's functions, or FastAPI's request handler
for the route) give what the full ASGI app gives: same content, same error kinds and messages, for
every tool of the shared samples called with its spec examples, with no arguments, and with
arguments of the wrong type (sent past the pool's schema check, so FastAPI's validation answers)."""
from __future__ import annotations

import json
import re

import pytest

from awm_core.interop.awm1k import read_dir
from awm_core.runtime.pool import SandboxPool
from awm_core.settings import load_settings


# Sample seed data is dated relative to when the database is built, so two pools built seconds
# apart differ in timestamps only; those are masked, everything else must match exactly.
_STAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?")


def _mask(v):
    if isinstance(v, str):
        return _STAMP.sub("<time>", v)
    if isinstance(v, list):
        return [_mask(x) for x in v]
    if isinstance(v, dict):
        return {k: _mask(x) for k, x in v.items()}
    return v


def _raw_call(s, tool: str, args: dict):
    """A call as the worker answers it, without the pool's argument check."""
    resp, _, _ = s.handle.worker.request({"op": "call", "sid": s.sid, "tool": tool, "args": args},
                                         instance=s.instance)
    return resp.get("ok"), _mask(resp.get("content_json")), resp.get("error_kind"), _mask(resp.get("error"))


def _results(envs, asgi: bool):
    settings = load_settings()
    out, paths = {}, {}
    with SandboxPool(settings.sandbox.model_copy(update={"awm1k_asgi": asgi}), workers=1) as pool:
        for env in envs:
            handle = pool.load(env)
            paths[env.id] = handle.call_paths
            routed = {}
            with handle.open_session() as s:
                for tool in env.api_spec.tools:
                    r = s.call(tool.name, tool.example_arguments())
                    routed[tool.name] = (r.ok, _mask(r.content), r.error_kind, _mask(r.error))
                    routed[tool.name, "none"] = _raw_call(s, tool.name, {})
                    wrong = {k: {"not": ["a", "scalar"]} for k in tool.example_arguments()}
                    routed[tool.name, "wrong types"] = _raw_call(s, tool.name, wrong)
            out[env.id] = routed
    return out, paths


def test_direct_and_asgi_paths_agree_on_every_sample_tool(awm1k_samples):
    envs = [e for e in read_dir(awm1k_samples).environments
            if e.code is not None and e.flavour == "awm1k" and e.api_spec is not None]
    if not envs:
        pytest.skip(f"no AWM-1K sample in {awm1k_samples} has both code and a tool spec")
    (direct, direct_paths), (asgi, asgi_paths) = _results(envs, asgi=False), _results(envs, asgi=True)
    assert sum(len(v) for v in direct.values()) > 0
    assert {p for v in asgi_paths.values() for p in v.values()} == {"asgi"}
    # The samples' routes take path, query and JSON body parameters only: all are bound directly.
    assert {p for v in direct_paths.values() for p in v.values()} == {"bound"}
    for env_id in asgi:
        for tool, expected in asgi[env_id].items():
            assert direct[env_id][tool] == expected, (env_id, tool)
    kinds = {r[2] for v in direct.values() for r in v.values()}
    assert None in kinds  # at least some example calls succeed, so content is compared too
    errors = [r[3] for v in direct.values() for r in v.values() if r[3]]
    assert any(e.startswith("HTTP 422") for e in errors)  # FastAPI's validation errors are compared too


# Routes of every kind the direct paths tell apart: bound here (path, query, JSON body; a response
# model; a status code; an HTTPException; a sync and an async endpoint; a streamed response) and
# left to FastAPI's request handler (a dependency with yield, a header parameter, background tasks).
# The streamed and background routes write, so running one twice or not at all shows in list_items.
MIXED_APP = '''
import os
from typing import Optional
from fastapi import BackgroundTasks, Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import create_engine, Column, Integer, String
from sqlalchemy.orm import declarative_base, sessionmaker

engine = create_engine(os.getenv("DATABASE_PATH", "sqlite:///shop.db"), connect_args={"check_same_thread": False})
SessionLocal = sessionmaker(bind=engine)
Base = declarative_base()


class Item(Base):
    __tablename__ = "items"
    id = Column(Integer, primary_key=True)
    name = Column(String, nullable=False)
    qty = Column(Integer, nullable=False, default=0)


Base.metadata.create_all(engine)
app = FastAPI()


def get_db():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


class ItemIn(BaseModel):
    name: str = Field(..., min_length=2)
    qty: int = 0


class ItemOut(BaseModel):
    id: int
    name: str
    qty: int


@app.post("/items", operation_id="create_item", response_model=ItemOut, status_code=201)
async def create_item(body: ItemIn):
    s = SessionLocal()
    item = Item(name=body.name, qty=body.qty)
    s.add(item)
    s.commit()
    out = ItemOut(id=item.id, name=item.name, qty=item.qty)
    s.close()
    return out


@app.get("/items/{item_id}", operation_id="get_item", response_model=ItemOut)
def get_item(item_id: int, db=Depends(get_db)):
    item = db.get(Item, item_id)
    if item is None:
        raise HTTPException(status_code=404, detail=f"item {item_id} not found")
    return item


@app.get("/items", operation_id="list_items")
def list_items(min_qty: int = Query(0, ge=0), names: Optional[list[str]] = Query(None), limit: int = 10):
    s = SessionLocal()
    q = s.query(Item).filter(Item.qty >= min_qty)
    if names:
        q = q.filter(Item.name.in_(names))
    rows = [{"id": i.id, "name": i.name, "qty": i.qty} for i in q.limit(limit)]
    s.close()
    return {"items": rows}


@app.put("/items/{item_id}/qty", operation_id="set_qty")
async def set_qty(item_id: int, qty: int = Query(..., ge=0)):
    s = SessionLocal()
    item = s.get(Item, item_id)
    if item is None:
        s.close()
        raise HTTPException(status_code=404, detail="no such item")
    item.qty = qty
    s.commit()
    s.close()
    return {"id": item_id, "qty": qty}


@app.get("/whoami", operation_id="whoami")
def whoami(x_user: str = Header("anonymous")):
    return {"user": x_user}


def add_item(name):
    s = SessionLocal()
    s.add(Item(name=name, qty=1))
    s.commit()
    s.close()


@app.post("/export", operation_id="export_items")
def export_items():
    add_item("exported")
    return StreamingResponse(iter([b'{"streamed": ', b'true}']), media_type="application/json")


@app.post("/touch", operation_id="touch_later")
def touch_later(background_tasks: BackgroundTasks):
    background_tasks.add_task(add_item, "touched")
    return {"queued": True}
'''

MIXED_CALLS = [
    ("create_item", {"name": "lamp", "qty": 2}), ("create_item", {"name": "x"}), ("create_item", {"qty": "many"}),
    ("get_item", {"item_id": 1}), ("get_item", {"item_id": 9}), ("get_item", {"item_id": "one"}),
    ("list_items", {}), ("list_items", {"names": ["lamp", "desk"], "min_qty": 1}), ("list_items", {"min_qty": -1}),
    ("set_qty", {"item_id": 1, "qty": 5}), ("set_qty", {"item_id": 7, "qty": 1}), ("set_qty", {"item_id": 1}),
    ("list_items", {"limit": "ten"}), ("whoami", {}),
    ("export_items", {}), ("touch_later", {}), ("list_items", {}),
]


def test_bound_handler_and_asgi_paths_agree_on_routes_of_every_kind():
    from awm_core.models import DbSchema, EnvCode, Environment, Scenario, TableSchema

    ddl = "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL DEFAULT 0)"
    env = Environment(id="mixed_shop", scenario=Scenario(id="mixed_shop", name="mixed_shop", description="shop"),
                      db_schema=DbSchema(tables=[TableSchema(name="items", ddl=ddl)]),
                      code=EnvCode(flavour="awm1k", source=MIXED_APP))
    seen, paths = {}, {}
    for asgi in (False, True):
        with SandboxPool(load_settings().sandbox.model_copy(update={"awm1k_asgi": asgi}), workers=1) as pool:
            handle = pool.load(env)
            paths[asgi] = handle.call_paths
            with handle.open_session() as s:
                seen[asgi] = [_raw_call(s, tool, args) for tool, args in MIXED_CALLS]
    assert paths[False] == {"create_item": "bound", "list_items": "bound", "set_qty": "bound",
                            "export_items": "bound", "get_item": "handler", "whoami": "handler",
                            "touch_later": "handler"}
    assert set(paths[True].values()) == {"asgi"}
    assert seen[False] == seen[True]
    names = [i["name"] for i in json.loads(seen[False][-1][1])["items"]]
    assert names == ["lamp", "exported", "touched"]  # the stream ran once, the background task ran
    outcomes = [(ok, (err or "")[:8]) for ok, _, _, err in seen[False]]
    # Successes, FastAPI's 422s, the endpoints' own 404s: every kind of answer is compared.
    assert {o[1] for o in outcomes} >= {"", "HTTP 422", "HTTP 404"}

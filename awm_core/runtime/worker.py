"""The sandbox worker process: hosts environments and their sessions, runs generated code.

Started by ``SandboxPool`` as ``python -m awm_core.runtime.worker CONFIG_JSON`` with a
scrubbed environment and two pipe fds (requests in, responses out). It serves one request
at a time; the parent enforces the wall-clock limit by killing it.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import inspect
import json
import os
import resource
import sqlite3
import sys
import threading
import time
import traceback
import types
import urllib.parse
from pathlib import Path
from typing import Any

from awm_core.answers import answer_dates, answer_numbers, answer_times
from awm_core.changes import db_changes
from awm_core.runtime import protocol, sandbox
from awm_core.runtime.bfcl_env import BfclEnv
from awm_core.runtime.tau2_env import Tau2Env
from awm_core.runtime.schema import function_schema, openapi_tools

# Imported before the audit hook goes up, so generated code finds them loaded.
import fastapi  # noqa: F401
import fastapi.openapi.utils  # noqa: F401
import fastapi.params
import fastapi.routing
import fastapi.utils
import pydantic  # noqa: F401
import sqlalchemy
import sqlalchemy.dialects.sqlite  # noqa: F401
import sqlalchemy.orm
import sqlalchemy.pool
import starlette.applications  # noqa: F401
from fastapi import exception_handlers as _fh
from fastapi.datastructures import DefaultPlaceholder as _DefaultPlaceholder
from fastapi.dependencies.utils import request_body_to_args as _request_body_to_args
from fastapi.dependencies.utils import request_params_to_args as _request_params_to_args
from fastapi.exceptions import RequestValidationError as _RVE, WebSocketRequestValidationError as _WSRVE
from fastapi.routing import serialize_response as _serialize_response
from starlette.datastructures import QueryParams as _QueryParams
from starlette.responses import JSONResponse as _JSONResponse, Response as _Response
from starlette.exceptions import HTTPException as _HTTPExc
from starlette.requests import Request as _Request
from starlette.routing import Match as _Match

from awm_core.errors import ToolError

ENV_LIMIT_ERRORS = (MemoryError, RecursionError)


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:4000]


def _new_connection(data: bytes, *, foreign_keys: bool, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.deserialize(data)
    # ATTACH and VACUUM INTO would let SQL write files anywhere; no attachments at all.
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    elif foreign_keys:
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _module_name(key: str) -> str:
    # Unique per environment *version* (the key carries the content digest): two repair
    # attempts of one environment must not share a module in sys.modules.
    return "awm_env_" + key.replace("-", "_")


class _Session:
    __slots__ = ("env", "conn", "engine")

    def __init__(self, env: "_Env"):
        self.env = env
        self.conn = _new_connection(env.snapshot, foreign_keys=env.flavour == "native")
        self.engine = None

    def reset(self) -> None:
        if self.conn.in_transaction:
            self.conn.rollback()
        self.conn.deserialize(self.env.snapshot)

    def serialize(self) -> bytes:
        return self.conn.serialize()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        self.conn.close()


class _Env:
    flavour = "native"

    def __init__(self, key: str, snapshot: bytes):
        self.key = key
        self.snapshot = snapshot
        self.tools: dict[str, Any] = {}
        self.infos: list[dict[str, Any]] = []

    def open_session(self) -> _Session:
        return _Session(self)

    def call_paths(self) -> dict[str, str]:
        """tool -> how a call reaches its code (the AWM-1K flavour has several ways)."""
        return {}


class _NativeEnv(_Env):
    def __init__(self, key: str, snapshot: bytes, source: str, spec: dict[str, dict] | None, env_id: str,
                 guard: sandbox.Guard):
        super().__init__(key, snapshot)
        self.problems: list[str] = []
        mod = types.ModuleType(_module_name(key))
        mod.__dict__["__builtins__"] = sandbox.make_builtins(sandbox.NATIVE_IMPORTS, guard=guard)
        mod.__dict__["ToolError"] = ToolError
        sys.modules[mod.__name__] = mod
        exec(compile(source, f"<environment {env_id}>", "exec"), mod.__dict__)
        if spec is None:  # no spec: every public function defined in the module is a tool
            names = [n for n, v in vars(mod).items() if not n.startswith("_") and inspect.isfunction(v)
                     and v.__module__ == mod.__name__]
            spec = {n: {} for n in names}
        for name, params in spec.items():
            fn = mod.__dict__.get(name)
            if fn is None:
                self.problems.append(f"tool {name}: named in the API spec but not defined in the code")
                continue
            if not callable(fn):
                self.problems.append(f"tool {name}: defined but not a function")
                continue
            desc, schema, problems = function_schema(fn, params)
            self.problems += problems
            self.tools[name] = fn
            self.infos.append({"name": name, "description": desc, "input_schema": schema})

    def call(self, session: _Session, tool: str, args: dict[str, Any]) -> Any:
        conn = session.conn
        try:
            out = self.tools[tool](conn, **args)
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        # One tool call is one transaction: what the tool did is kept unless it raised.
        if conn.in_transaction:
            conn.commit()
        return out


class _Awm1kEnv(_Env):
    """A dataset FastAPI module run in-process through a direct ASGI call.

    Database binding: the module is imported with ``DATABASE_PATH=sqlite://`` (a throw-away
    in-memory database for its import-time ``create_all``). Afterwards every module-level
    SQLAlchemy ``Engine`` global is replaced, per call, by the calling session's engine (one
    per session, ``StaticPool`` over the session's own deserialized ``sqlite3`` connection),
    and every ``sessionmaker`` global is re-bound to it. Handlers look ``SessionLocal`` /
    ``engine`` up at call time, so the code runs unmodified.
    """

    flavour = "awm1k"

    def __init__(self, key: str, snapshot: bytes, source: str, env_id: str, loop: asyncio.AbstractEventLoop,
                 guard: sandbox.Guard, force_asgi: bool = False):
        super().__init__(key, snapshot)
        self.problems = []
        self.loop = loop
        os.environ["DATABASE_PATH"] = "sqlite://"
        mod = types.ModuleType(_module_name(key))
        mod.__dict__["__builtins__"] = sandbox.make_builtins(sandbox.AWM1K_IMPORTS, os_standin=True, guard=guard)
        sys.modules[mod.__name__] = mod
        exec(compile(source, f"<environment {env_id}>", "exec"), mod.__dict__)
        self.globals = mod.__dict__
        apps = [v for v in self.globals.values() if isinstance(v, fastapi.FastAPI)]
        if not apps:
            raise ValueError("the module defines no FastAPI app")
        self.app = apps[0]
        self.engine_names = [k for k, v in self.globals.items() if isinstance(v, sqlalchemy.engine.Engine)]
        self.makers = [v for v in self.globals.values() if isinstance(v, sqlalchemy.orm.sessionmaker)]
        if not self.engine_names and not self.makers:
            raise ValueError("the module defines no SQLAlchemy engine or sessionmaker to bind")
        for name in self.engine_names:
            self.globals[name].dispose()
        for t in openapi_tools(self.app.openapi()):
            self.tools[t["name"]] = t
            self.infos.append({k: t[k] for k in ("name", "description", "input_schema")})
        self.routes = {} if force_asgi or not _plain_app(self.app) else _api_routes(self.app, self.tools)
        self.picks: dict[tuple[str, str], bool] = {}  # (method, path) -> the router picks the tool's route

    def call_paths(self) -> dict[str, str]:
        """``bound`` (parameters bound here with FastAPI's functions), ``handler`` (FastAPI's request
        handler for the route) or ``asgi`` (the whole app); a direct path still falls back to ASGI for
        a concrete path that an earlier route shadows."""
        return {t: "asgi" if d is None else "bound" if d.bindable else "handler"
                for t, d in ((t, self.routes.get(t)) for t in self.tools)}

    def _bind(self, session: _Session) -> None:
        if session.engine is None:
            conn = session.conn
            session.engine = sqlalchemy.create_engine(
                "sqlite://", creator=lambda: conn, poolclass=sqlalchemy.pool.StaticPool)
        for name in self.engine_names:
            self.globals[name] = session.engine
        for maker in self.makers:
            maker.configure(bind=session.engine)

    def call(self, session: _Session, tool: str, args: dict[str, Any]) -> Any:
        route = self.tools[tool]
        path = route["path"]
        query: list[tuple[str, str]] = []
        body: Any = None
        for k, v in args.items():
            loc = route["where"].get(k)
            if loc == "path":
                path = path.replace("{" + k + "}", urllib.parse.quote(_qs(v), safe=""))
            elif loc == "query":
                if v is None:
                    continue
                for item in v if isinstance(v, list) else [v]:
                    query.append((k, _qs(item)))
            elif loc == "body":
                if route["body_mode"] == "whole":
                    body = v
                else:
                    body = body or {}
                    body[k] = v
        if route["body_mode"] == "merge" and body is None:
            body = {}
        raw = b"" if body is None else json.dumps(body).encode()
        self._bind(session)
        try:
            direct = self.routes.get(tool)
            status, content_type, data = self.loop.run_until_complete(
                _direct_call(self.app, direct, route["method"], path, query, body, raw, self.picks)
                if direct is not None else
                _asgi_call(self.app, route["method"], path, urllib.parse.urlencode(query), raw))
        finally:
            if session.conn.in_transaction:
                # A handler that failed before its commit leaves its transaction open; the
                # official server would roll it back when the pooled connection is returned.
                session.conn.rollback()
        text = data.decode("utf-8", "replace")
        parsed: Any = text
        if "json" in content_type:
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text
        if status >= 400:
            raise ToolError(f"HTTP {status}: {text[:4000]}")
        return parsed


def _qs(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _plain_app(app) -> bool:
    """True when skipping the middleware stack and router changes nothing: no user middleware and
    only FastAPI's default exception handlers (the fast path reproduces exactly those)."""
    defaults = {_HTTPExc: _fh.http_exception_handler, _RVE: _fh.request_validation_exception_handler,
                _WSRVE: _fh.websocket_request_validation_exception_handler}
    handlers = dict(app.exception_handlers)
    return not app.user_middleware and all(defaults.get(k) is v for k, v in handlers.items())


def _api_routes(app, tools: dict[str, dict[str, Any]]) -> dict[str, "_Direct"]:
    """tool -> how to call its APIRoute directly. Whether the router would pick that route for a
    concrete path is checked per call (``_direct_call``), since an earlier route may shadow it."""
    out = {}
    for name, t in tools.items():
        for r in app.router.routes:
            if isinstance(r, fastapi.routing.APIRoute) and r.path == t["path"] and t["method"] in r.methods:
                out[name] = _Direct(r)
                break
    return out


_SPECIAL_PARAMS = ("request_param_name", "websocket_param_name", "http_connection_param_name",
                   "response_param_name", "background_tasks_param_name", "security_scopes_param_name")


class _Direct:
    """One route called without the ASGI app: bound here when FastAPI would bind its request from
    the path, the query and a JSON body alone (no dependencies, headers, cookies, forms, special
    parameters or streaming; the default response class), else through FastAPI's own request
    handler for the route."""

    def __init__(self, route):
        self.route = route
        d = route.dependant
        body = route.body_field
        self.bindable = (
            not d.dependencies and not d.header_params and not d.cookie_params
            and not any(getattr(d, n, None) for n in _SPECIAL_PARAMS)
            and isinstance(route.response_class, _DefaultPlaceholder)
            and not (body is not None and isinstance(body.field_info, fastapi.params.Form))
            and not (inspect.isgeneratorfunction(d.call) or inspect.isasyncgenfunction(d.call))
            and hasattr(route, "_embed_body_fields"))
        self.handler = None if self.bindable else route.get_route_handler()
        if self.bindable:
            self.is_coroutine = fastapi.routing._is_coroutine_callable(d.call)
            # Where the endpoint is, for the message of a validation error (as FastAPI words it).
            self.endpoint_ctx = fastapi.routing._extract_endpoint_context(d.call)

    async def bound(self, method: str, path_params: dict[str, Any], query: list[tuple[str, str]], body: Any) -> Any:
        """The route's response as FastAPI's request handler makes it: parameters validated by
        FastAPI's own functions in its order (path, query, then body), the endpoint called (a sync
        one inline, where FastAPI would use a worker thread), the result serialized with the
        route's response model."""
        route, d = self.route, self.route.dependant
        ctx = {**self.endpoint_ctx, "path": f"{method} {d.path}"} if d.path else self.endpoint_ctx
        values, errors = _request_params_to_args(d.path_params, path_params)
        query_values, query_errors = _request_params_to_args(d.query_params, _QueryParams(query))
        values.update(query_values)
        errors += query_errors
        if d.body_params:
            body_values, body_errors = await _request_body_to_args(
                body_fields=d.body_params, received_body=body, embed_body_fields=route._embed_body_fields)
            values.update(body_values)
            errors.extend(body_errors)
        if errors:
            raise _RVE(errors, body=body, endpoint_ctx=ctx)
        raw = await d.call(**values) if self.is_coroutine else d.call(**values)
        if isinstance(raw, _Response):
            return raw
        dump_json = route.response_field is not None
        content = await _serialize_response(
            field=route.response_field, response_content=raw, include=route.response_model_include,
            exclude=route.response_model_exclude, by_alias=route.response_model_by_alias,
            exclude_unset=route.response_model_exclude_unset, exclude_defaults=route.response_model_exclude_defaults,
            exclude_none=route.response_model_exclude_none, is_coroutine=True, endpoint_ctx=ctx,
            dump_json=dump_json)
        status = {"status_code": route.status_code} if route.status_code else {}
        response = (_Response(content=content, media_type="application/json", **status) if dump_json
                    else _JSONResponse(content, **status))
        if not fastapi.utils.is_body_allowed_for_status_code(response.status_code):
            response.body = b""
        return response


def _router_picks(app, route, scope, cache: dict) -> bool:
    """Whether the router's first full match for this method and path is ``route``. Only the
    method and path decide (the host header is fixed), so the answer is remembered in
    ``cache`` (the environment's own)."""
    key = (scope["method"], scope["path"])
    hit = cache.get(key)
    if hit is None:
        hit = False
        for r in app.router.routes:
            if r.matches(scope)[0] is _Match.FULL:
                hit = r is route
                break
        if len(cache) >= 4096:
            cache.clear()
        cache[key] = hit
    return hit


async def _direct_call(app, direct: _Direct, method: str, path: str, query: list[tuple[str, str]], body: Any,
                       raw: bytes, picks: dict) -> tuple[int, str, bytes]:
    """The route called without the middleware stack and router (``_Direct``); falls back to ASGI
    when the router would match elsewhere. ``body`` is the JSON body as an object, ``raw`` its bytes."""
    route = direct.route
    query_string = urllib.parse.urlencode(query)
    scope = _scope(method, path, query_string, raw)
    scope["app"] = app
    if not _router_picks(app, route, scope, picks):
        return await _asgi_call(app, method, path, query_string, raw)
    _, child = route.matches(scope)
    request = None
    try:
        if direct.bindable:
            response = await direct.bound(method, child["path_params"], query, body)
        else:
            scope.update(child)
            request = _Request(scope, _receive_once(raw))
            response = await _run_handler(direct.handler, request)
    except _HTTPExc as exc:
        response = await _fh.http_exception_handler(request, exc)
    except _RVE as exc:
        response = await _fh.request_validation_exception_handler(request, exc)
    except Exception as exc:
        raise ToolError(f"HTTP 500 (server error in the environment code): {_exc_text(exc)}") from exc
    return await _respond(response, scope, raw)


async def _run_handler(handler, request):
    """FastAPI's request handler inside the exit stacks its middleware and request wrapper would
    open: dependencies with yield and uploaded files are closed through them, in the same order."""
    scope = request.scope
    async with contextlib.AsyncExitStack() as middleware_stack:
        scope["fastapi_middleware_astack"] = middleware_stack
        async with contextlib.AsyncExitStack() as request_stack:
            scope["fastapi_inner_astack"] = request_stack
            async with contextlib.AsyncExitStack() as function_stack:
                scope["fastapi_function_astack"] = function_stack
                return await handler(request)


def _receive_once(body: bytes):
    """An ASGI ``receive``: the whole request body once, then a disconnect."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _scope(method: str, path: str, query: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"environment"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("environment", 80), "state": {},
    }


async def _asgi_call(app, method: str, path: str, query: str, body: bytes) -> tuple[int, str, bytes]:
    return await _respond(app, _scope(method, path, query, body), body)


async def _respond(asgi, scope: dict[str, Any], body: bytes) -> tuple[int, str, bytes]:
    """What ``asgi`` (the app, or a response the direct path made) sends for one request: status,
    content type, body. A response sent this way also runs its background tasks and streams."""
    status = 500
    ctype = ""
    chunks: list[bytes] = []

    async def send(message):
        nonlocal status, ctype
        if message["type"] == "http.response.start":
            status = message["status"]
            for k, v in message.get("headers", []):
                if k.lower() == b"content-type":
                    ctype = v.decode("latin-1")
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await asgi(scope, _receive_once(body), send)
    except Exception as exc:
        # Starlette re-raises after answering 500; the agent gets the cause, which the
        # official server hides behind "Internal Server Error".
        raise ToolError(f"HTTP 500 (server error in the environment code): {_exc_text(exc)}") from exc
    return status, ctype, b"".join(chunks)


def _make_verifier_module(code: str, name: str, guard: sandbox.Guard) -> dict[str, Any]:
    ns: dict[str, Any] = {"__name__": name, "__builtins__": sandbox.make_builtins(sandbox.VERIFIER_IMPORTS, os_standin=True, guard=guard)}
    ns["sqlite3"] = sqlite3
    ns["json"] = json
    # The helpers the verifier prompt names (awm_core.changes, awm_core.answers); a verifier that
    # defines these names itself, or never uses them, runs as before.
    ns.update(db_changes=db_changes, answer_numbers=answer_numbers, answer_dates=answer_dates,
              answer_times=answer_times)
    exec(_compiled_verifier(code), ns)
    return ns


@functools.lru_cache(maxsize=64)
def _compiled_verifier(code: str):
    """Compiled once per verifier text: the mutation and equivalence checks run one verifier on
    dozens of episodes, and compiling it was most of a verify request. Every run still gets a
    fresh namespace, so nothing a verifier does to its module state carries over."""
    return compile(code, "<verifier>", "exec")


def _load_reply(env) -> dict[str, Any]:
    """What a load answers, for an environment just imported or already held (a BFCL entry has
    no call paths)."""
    return {"ok": True, "tools": env.infos, "problems": env.problems,
            "call_paths": env.call_paths() if isinstance(env, _Env) else {},
            "user_tools": getattr(env, "user_infos", [])}


class _NoSession(Exception):
    pass


# Sessions closed before the worker gives freed memory back to the system; a trim (a full
# collection and malloc_trim) costs milliseconds, so not after every close.
TRIM_AFTER_CLOSES = 64


class Worker:
    def __init__(self, cfg: dict[str, Any], guard: sandbox.Guard):
        self.cfg = cfg
        self.guard = guard
        self.envs: dict[str, _Env] = {}
        self.sessions: dict[int, _Session] = {}
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.max_result = cfg["max_result_bytes"]
        self.verify_counter = 0
        self.closed_since_trim = 0
        self.trims = 0
        self._malloc_trim: Any = None

    # ------------------------------------------------------------------ requests
    def handle(self, req: dict[str, Any], blobs: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        op = req.get("op")
        fn = getattr(self, f"op_{op}", None)
        if fn is None:
            return {"ok": False, "error": f"unknown op {op!r}"}, []
        self.guard.violations.clear()
        self._refresh_cpu_limit()
        try:
            return fn(req, blobs)
        except _NoSession:
            return {"ok": False, "error_kind": "environment",
                    "error": "the session no longer exists in its worker (closed, or its environment was unloaded)"}, []

    def _session(self, sid: Any) -> _Session:
        s = self.sessions.get(sid)
        if s is None:
            raise _NoSession()
        return s

    def _refresh_cpu_limit(self) -> None:
        # RLIMIT_CPU counts the whole life of the worker; move the soft limit so each
        # request gets the configured budget (a backstop behind the parent's wall clock).
        soft = sandbox.cpu_soft_limit(self.cfg["cpu_s"])
        with self.guard.trusted():
            resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))

    def op_ping(self, req, blobs):
        return {"ok": True, "threads": threading.active_count(), "sessions": len(self.sessions),
                "trims": self.trims}, []

    def op_build_db(self, req, blobs):
        from awm_core.db import build_database
        from awm_core.errors import SqlExecutionError
        from awm_core.models import DbSchema, SeedData

        try:
            schema = DbSchema.from_data(req["schema"])
            seed = SeedData.from_data(req["seed"]) if req.get("seed") is not None else None
            return {"ok": True}, [build_database(schema, seed)]
        except SqlExecutionError as exc:
            return {"ok": False, "stage": exc.stage, "errors": exc.errors}, []

    def op_load(self, req, blobs):
        key = req["key"]
        if key in self.envs:
            env = self.envs[key]
            return _load_reply(env), []
        try:
            if req["flavour"] == "bfcl":
                env = BfclEnv(key, req["source"], req["env_id"], self.guard)
            elif req["flavour"] == "tau2":
                env = Tau2Env(key, req["source"], req["env_id"], self.guard)
            elif req["flavour"] == "awm1k":
                env = _Awm1kEnv(key, blobs[0], req["source"], req["env_id"], self.loop, self.guard,
                                force_asgi=bool(req.get("asgi")))
            else:
                env = _NativeEnv(key, blobs[0], req["source"], req.get("spec"), req["env_id"], self.guard)
        except SyntaxError as exc:
            return {"ok": False, "errors": [f"syntax error at line {exc.lineno}: {exc.msg}: {(exc.text or '').strip()}"]}, []
        except BaseException as exc:  # the module's top level raised: report, keep serving
            tb = traceback.extract_tb(exc.__traceback__)
            where = next((f"line {f.lineno}" for f in reversed(tb) if f.filename.startswith("<environment")), "")
            kind = "environment" if self.guard.violations or isinstance(exc, ENV_LIMIT_ERRORS) else "code"
            return {"ok": False, "kind": kind, "recycle": self.guard.tainted or isinstance(exc, ENV_LIMIT_ERRORS),
                    "errors": [f"importing the environment code failed{' at ' + where if where else ''}: {_exc_text(exc)}"]}, []
        self.envs[key] = env
        # The imported app (routes, models, ORM mappers) lives as long as the worker; keeping
        # it out of the collector's view makes the periodic full collections cheap. A BFCL entry
        # whose modules another entry already imported brings no code: nothing new to freeze, and a
        # full collection would cost most of its load time.
        if getattr(env, "imported_modules", 1):
            gc.collect()
            gc.freeze()
        return _load_reply(env), []

    def op_unload(self, req, blobs):
        env = self.envs.pop(req["key"], None)
        sys.modules.pop(_module_name(req["key"]), None)
        for sid in [s for s, sess in self.sessions.items() if sess.env is env]:
            self.sessions.pop(sid).close()
        return {"ok": True}, []

    def op_open(self, req, blobs):
        env = self.envs.get(req["key"])
        if env is None:
            return {"ok": False, "error_kind": "environment", "error": "the environment is not loaded in this worker"}, []
        self.sessions[req["sid"]] = env.open_session()
        return {"ok": True}, []

    def op_close(self, req, blobs):
        self._close([req["sid"]])
        return {"ok": True}, []

    def op_close_many(self, req, blobs):
        self._close(req["sids"])
        return {"ok": True, "sessions": len(self.sessions)}, []

    def _close(self, sids) -> None:
        for sid in sids:
            s = self.sessions.pop(sid, None)
            if s is not None:
                s.close()
                self.closed_since_trim += 1
        if self.closed_since_trim >= TRIM_AFTER_CLOSES:
            self._give_back_memory()

    def _give_back_memory(self) -> None:
        """Hand freed memory back to the system: without this the C allocator keeps what a burst
        of sessions used (their databases, engines), and a served worker stays at its high-water
        mark long after the sessions expired (measured: 470 MB for 1,000 closed sessions, 120 MB
        after a trim)."""
        self.closed_since_trim = 0
        self.trims += 1
        gc.collect()
        if self._malloc_trim is None:
            try:
                with self.guard.trusted():  # the worker's own step: ctypes is refused to environment code
                    import ctypes

                    self._malloc_trim = ctypes.CDLL(None).malloc_trim
            except (AttributeError, OSError):  # not glibc
                self._malloc_trim = False
        if self._malloc_trim:
            with self.guard.trusted():
                self._malloc_trim(0)

    def op_reset(self, req, blobs):
        t = time.perf_counter()
        self._session(req["sid"]).reset()
        return {"ok": True, "worker_ms": (time.perf_counter() - t) * 1000}, []

    def op_snapshot(self, req, blobs):
        return {"ok": True}, [self._session(req["sid"]).serialize()]

    def op_prepare(self, req, blobs):
        """Put a session in a task's initial state (the tau2 flavour: tau2's ``set_state``)."""
        s = self._session(req["sid"])
        if not isinstance(s.env, Tau2Env):
            return {"ok": False, "error_kind": "environment",
                    "error": f"a {s.env.flavour} environment has no task initial states"}, []
        try:
            s.env.prepare(s, req.get("initial_state"))
        except ENV_LIMIT_ERRORS as exc:
            return self._failure("environment", f"setting the task's initial state hit a limit: {_exc_text(exc)}",
                                 recycle=True)
        except Exception as exc:
            return self._failure("environment", f"the task's initial state does not apply: {_exc_text(exc)}")
        return {"ok": True}, []

    def op_call(self, req, blobs):
        s = self._session(req["sid"])
        tool = req["tool"]
        requestor = req.get("requestor") or "assistant"
        if requestor == "user":
            if tool not in getattr(s.env, "user_tools", {}):
                return {"ok": False, "error": f"unknown user tool {tool!r}", "error_kind": "unknown_tool"}, []
        elif tool not in s.env.tools:
            return {"ok": False, "error": f"unknown tool {tool!r}", "error_kind": "unknown_tool"}, []
        t0 = time.perf_counter()
        try:
            if requestor == "user":
                out = s.env.call(s, tool, req.get("args") or {}, requestor="user")
            else:
                out = s.env.call(s, tool, req.get("args") or {})
        except ToolError as exc:
            return self._failure("tool", str(exc) or type(exc).__name__)
        except ENV_LIMIT_ERRORS as exc:
            return self._failure("environment", f"the environment code hit a limit: {_exc_text(exc)}", recycle=True)
        except Exception as exc:
            if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
                return self._failure("environment", f"the environment code hit the thread limit: {_exc_text(exc)}",
                                     recycle=True)
            tb = traceback.extract_tb(exc.__traceback__)
            where = next((f" (line {f.lineno} of the environment code)" for f in reversed(tb)
                          if f.filename.startswith("<environment")), "")
            return self._failure("tool", f"{_exc_text(exc)}{where}")
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, GeneratorExit
            return self._failure("environment", f"the environment code tried to stop the sandbox: {_exc_text(exc)}")
        try:
            encoded = json.dumps(out, default=str)
        except (TypeError, ValueError) as exc:
            return self._failure("tool", f"the tool returned something that is not JSON: {_exc_text(exc)}")
        if len(encoded) > self.max_result:
            return self._failure("environment", f"the tool's result is {len(encoded)} bytes, over the "
                                                f"{self.max_result}-byte limit")
        if self.guard.violations:
            return self._failure("environment", "; ".join(self.guard.violations[:3]))
        return {"ok": True, "content_json": encoded, "worker_ms": (time.perf_counter() - t0) * 1000}, []

    def _failure(self, kind: str, message: str, recycle: bool = False):
        # A refused action did not happen, so the worker stays; it is replaced only when
        # something may linger (threads past the limit, exhausted memory or stack).
        if self.guard.violations:
            kind = "environment"
            message = f"{'; '.join(self.guard.violations[:3])} ({message})"
        return {"ok": False, "error": message, "error_kind": kind, "recycle": recycle or self.guard.tainted}, []

    def op_verify(self, req, blobs):
        style = req["style"]
        fname = req["function_name"]
        initial, final = blobs
        self.verify_counter += 1
        if style == "bfcl":
            return self._verify_bfcl(req)
        if style == "tau2":
            return self._verify_tau2(req)
        try:
            ns = _make_verifier_module(req["code"], f"verifier_{self.verify_counter}", self.guard)
            fn = ns.get(fname)
            if not callable(fn):
                return self._vfail("verifier", f"the verifier code defines no function {fname!r}")
            if style == "native":
                a = _new_connection(initial, foreign_keys=False, readonly=True)
                b = _new_connection(final, foreign_keys=False, readonly=True)
                try:
                    out = fn(a, b, req.get("final_answer"))
                finally:
                    a.close()
                    b.close()
            else:
                out = self._verify_with_paths(fn, style, initial, final, req.get("final_answer"))
        except ENV_LIMIT_ERRORS as exc:
            return self._vfail("environment", f"the verifier hit a limit: {_exc_text(exc)}", recycle=True)
        except SyntaxError as exc:
            return self._vfail("verifier", f"syntax error at line {exc.lineno}: {exc.msg}")
        except Exception as exc:
            return self._vfail("verifier", f"the verifier raised {_exc_text(exc)}")
        except BaseException as exc:
            return self._vfail("environment", f"the verifier tried to stop the sandbox: {_exc_text(exc)}")
        if self.guard.violations:
            return self._vfail("environment", "; ".join(self.guard.violations[:3]))
        try:
            evidence_json = json.dumps(out, default=str)
        except (TypeError, ValueError) as exc:
            return self._vfail("verifier", f"the verifier returned something that is not JSON: {_exc_text(exc)}")
        if len(evidence_json) > self.max_result:
            return self._vfail("verifier", f"the verifier's result is {len(evidence_json)} bytes, over the limit")
        out = json.loads(evidence_json)
        if style == "native":
            if not isinstance(out, dict) or out.get("verdict") not in ("complete", "partial", "incomplete"):
                return self._vfail("verifier", "a native verifier must return {'verdict': 'complete'|'partial'|"
                                               f"'incomplete', 'evidence': {{...}}}}, got {evidence_json[:300]}")
            ev = out.get("evidence", {})
            if not isinstance(ev, dict):
                return self._vfail("verifier", "the verifier's 'evidence' must be an object")
            return {"ok": True, "verdict": out["verdict"], "evidence": ev}, []
        if style == "awm1k_code":
            if not isinstance(out, dict) or "result" not in out:
                return self._vfail("verifier", f"verify_task_completion must return {{'result': ...}}, got {evidence_json[:300]}")
            verdict = "complete" if str(out["result"]).strip().lower() == "complete" else "incomplete"
            return {"ok": True, "verdict": verdict, "evidence": out}, []
        evidence = out if isinstance(out, dict) else {"result": out}
        return {"ok": True, "verdict": None, "evidence": evidence}, []

    def _verify_bfcl(self, req):
        env = self.envs.get(req.get("key"))
        if not isinstance(env, BfclEnv):
            return self._vfail("environment", "the BFCL environment is not loaded in this worker")
        try:
            ground_truth = json.loads(req["code"])["ground_truth"]
            out = env.check(req.get("trace") or [], ground_truth, self.verify_counter)
        except ENV_LIMIT_ERRORS as exc:
            return self._vfail("environment", f"BFCL's checker hit a limit: {_exc_text(exc)}", recycle=True)
        except Exception as exc:
            return self._vfail("verifier", f"BFCL's checker raised {_exc_text(exc)}")
        if self.guard.violations:
            return self._vfail("environment", "; ".join(self.guard.violations[:3]))
        return {"ok": True, "verdict": "complete" if out["valid"] else "incomplete", "evidence": out}, []

    def _verify_tau2(self, req):
        env = self.envs.get(req.get("key"))
        if not isinstance(env, Tau2Env):
            return self._vfail("environment", "the tau2 environment is not loaded in this worker")
        trace = req.get("trace") or {}
        try:
            out = env.check(json.loads(req["code"]), trace.get("messages") or [], trace.get("termination") or "")
        except ENV_LIMIT_ERRORS as exc:
            return self._vfail("environment", f"tau2's evaluator hit a limit: {_exc_text(exc)}", recycle=True)
        except Exception as exc:
            return self._vfail("verifier", f"tau2's evaluator raised {_exc_text(exc)}")
        if self.guard.violations:
            return self._vfail("environment", "; ".join(self.guard.violations[:3]))
        return {"ok": True, "verdict": "complete" if out["valid"] else "incomplete", "evidence": out}, []

    def _verify_with_paths(self, fn, style, initial: bytes, final: bytes, final_answer):
        folder = Path(self.guard.scratch) / f"verify-{self.verify_counter}"
        folder.mkdir()
        paths = []
        try:
            for name, data in (("initial.db", initial), ("final.db", final)):
                p = folder / name
                p.write_bytes(data)
                p.chmod(0o444)
                paths.append(str(p))
            params = inspect.signature(fn).parameters
            values = {"initial_db_path": paths[0], "final_db_path": paths[1], "final_answer": final_answer}
            if all(k in params for k in ("initial_db_path", "final_db_path")):
                kwargs = {k: v for k, v in values.items() if k in params}
                return fn(**kwargs)
            args = paths + ([final_answer] if style == "awm1k_code" and len(params) >= 3 else [])
            return fn(*args)
        finally:
            for p in paths:
                try:
                    os.chmod(p, 0o644)
                    os.remove(p)
                except OSError:
                    pass
            try:
                folder.rmdir()
            except OSError:
                pass

    def _vfail(self, kind: str, message: str, recycle: bool = False):
        if self.guard.violations and kind != "environment":
            kind, message = "environment", f"{'; '.join(self.guard.violations[:3])} ({message})"
        return {"ok": False, "error": message, "error_kind": kind, "recycle": recycle or self.guard.tainted}, []


def main() -> None:
    import warnings

    # The dataset's apps trigger FastAPI deprecation warnings by the dozen on every import.
    warnings.simplefilter("ignore", DeprecationWarning)
    cfg = json.loads(sys.argv[1])
    fd_in, fd_out = cfg["fd_in"], cfg["fd_out"]
    scratch = Path(cfg["scratch"])
    guard = sandbox.Guard(scratch, sandbox.default_read_roots(), cfg["max_threads"])
    sys.setrecursionlimit(cfg.get("recursion_limit", 2000))
    worker = Worker(cfg, guard)
    active = sandbox.apply_limits(cfg, guard.read_roots)
    sys.addaudithook(guard.hook)
    guard.enforcing = True
    active["audit_hook"] = True
    reader = protocol.Reader(fd_in)
    protocol.write_all(fd_out, protocol.encode({"ok": True, "hello": True, "pid": os.getpid(),
                                                "uid": os.getuid(), "protections": active}))
    while True:
        try:
            req, blobs = reader.read()
        except protocol.ChannelClosed:
            os._exit(0)
        try:
            head, out_blobs = worker.handle(req, blobs)
        except BaseException as exc:  # a bug in this file, or a limit hit in trusted code
            head, out_blobs = {"ok": False, "error": f"worker error: {_exc_text(exc)}",
                               "error_kind": "environment", "recycle": True}, []
        if threading.active_count() > 1:
            head.setdefault("threads", threading.active_count())
        protocol.write_all(fd_out, protocol.encode(head, out_blobs))


if __name__ == "__main__":
    main()

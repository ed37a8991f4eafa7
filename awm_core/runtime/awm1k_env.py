"""The AWM-1K flavour of a worker's environment: a dataset FastAPI module, run in-process.

A tool call goes to its route without the ASGI app where that changes nothing (``Direct``: the
parameters bound with FastAPI's own functions, or FastAPI's request handler for the route), else
through the whole app. Imported only inside the worker process (``awm_core.runtime.worker``), and
before the audit hook goes up.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import sys
import types
import urllib.parse
from typing import Any

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
from awm_core.runtime import sandbox
from awm_core.runtime.schema import openapi_tools
from awm_core.runtime.worker_env import WorkerEnv, WorkerSession, exc_text, module_name


class Awm1kEnv(WorkerEnv):
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
        mod = types.ModuleType(module_name(key))
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

    def _bind(self, session: WorkerSession) -> None:
        if session.engine is None:
            conn = session.conn
            session.engine = sqlalchemy.create_engine(
                "sqlite://", creator=lambda: conn, poolclass=sqlalchemy.pool.StaticPool)
        for name in self.engine_names:
            self.globals[name] = session.engine
        for maker in self.makers:
            maker.configure(bind=session.engine)

    def call(self, session: WorkerSession, tool: str, args: dict[str, Any]) -> Any:
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
        raise ToolError(f"HTTP 500 (server error in the environment code): {exc_text(exc)}") from exc
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
        raise ToolError(f"HTTP 500 (server error in the environment code): {exc_text(exc)}") from exc
    return status, ctype, b"".join(chunks)



"""Serve environments over MCP (official SDK, low-level ``Server`` with exact schemas).

One process, one ``SandboxPool``, many isolated sessions. Each MCP client gets its own
environment session (its own database):

- handshake-era clients (protocol up to 2025-11-25, which the official AWM agent and every
  mcp 1.x client speak): one environment session per MCP connection (per ``Mcp-Session-Id``
  over HTTP), closed when the connection goes away;
- 2026-07-28 clients, whose requests carry no session: the session named by
  ``_meta["awm/session"]`` or the ``X-AWM-Session`` HTTP header; requests that name none
  share one default session (right for stdio, where the process has one client).

Over HTTP (``http_app``) the transport is chosen per request:

- a ``tools/call`` that carries no ``Mcp-Session-Id`` (every 2026-07-28 request, and
  handshake-era clients served statelessly) is answered here directly as one JSON response:
  the same checks the SDK makes first (DNS-rebinding guard, Accept, Content-Type, the modern
  header ladder), then the pool, with none of the SDK's per-call generic dispatch (surface
  validation of params and result, the middleware chain, the per-call ``tools/list`` that
  the modern entry runs to check ``Mcp-Param`` headers); anything unusual goes to the SDK;
- handshake-era ``initialize`` gets an MCP session (stateful, JSON responses) unless the
  client names its environment session with ``X-AWM-Session`` or the server runs with
  ``stateless=True``: then it is answered statelessly (no session id) and the client's later
  requests take the stateless path;
- requests with an ``Mcp-Session-Id`` go to the SDK's session manager as before.

Calls reach the pool through ``Session.acall`` (the reply is awaited on the event loop, no
thread per call); the pool validates the arguments once, and the worker's JSON is passed to
the client as it came.

Tools: the environment's own tools plus the AWM meta-tools ``list_tools`` (the tool list
with schemas, as JSON) and ``call_tool(tool_name, arguments)`` (``arguments`` an object or
a JSON string; a leading ``mcp_tool_`` is ignored, as the official agent sends it). When
several environments are served, their tools are named ``<env_id>.<tool>``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from collections import OrderedDict
from typing import Any

import anyio
import mcp_types as types
from mcp.server import Server

from awm_core.models import Environment
from awm_core.runtime.pool import EnvHandle, SandboxPool, Session
from awm_core.runtime.types import ToolResult

OFFICIAL_PREFIX = "mcp_tool_"
SESSION_META_KEY = "awm/session"
SESSION_HEADER = "x-awm-session"
META_TOOLS = {
    "list_tools": types.Tool(
        name="list_tools",
        description="List every tool of the environment with its description and the JSON schema of its arguments.",
        input_schema={"type": "object", "properties": {}, "additionalProperties": False},
    ),
    "call_tool": types.Tool(
        name="call_tool",
        description="Call one environment tool by name with its arguments.",
        input_schema={"type": "object", "properties": {
            "tool_name": {"type": "string", "description": "name of the tool, as list_tools gives it"},
            "arguments": {"type": ["object", "string"], "description": "the tool's arguments (a JSON object)"},
        }, "required": ["tool_name"], "additionalProperties": False},
    ),
}


logger = logging.getLogger(__name__)


class _ClientState:
    """The environment sessions of one MCP client (one per environment, opened lazily)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self._opening: dict[str, asyncio.Future] = {}

    def session(self, handle: EnvHandle) -> Session:
        with self.lock:
            s = self.sessions.get(handle.id)
            if s is None:
                s = self.sessions[handle.id] = handle.open_session()
            return s

    async def asession(self, handle: EnvHandle) -> Session:
        s = self.sessions.get(handle.id)
        if s is not None:
            return s
        pending = self._opening.get(handle.id)
        if pending is not None:  # a concurrent call of this client is opening it
            return await asyncio.shield(pending)
        fut = self._opening[handle.id] = asyncio.get_running_loop().create_future()
        try:
            s = await handle.aopen_session()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # marked retrieved: the waiters, if any, get it too
            raise
        finally:
            self._opening.pop(handle.id, None)
        with self.lock:
            old = self.sessions.get(handle.id)
            if old is not None:  # opened from a thread meanwhile
                s.close_later()
                s = old
            else:
                self.sessions[handle.id] = s
        fut.set_result(s)
        return s

    def close(self) -> None:
        # Called from finalizers too, so never wait on a worker here.
        for s in list(self.sessions.values()):
            s.close_later()
        self.sessions.clear()


class EnvMCPServer:
    def __init__(self, pool: SandboxPool, environments: list[Environment], *, max_keyed_sessions: int = 1024,
                 name: str = "awm-env"):
        if not environments:
            raise ValueError("no environments to serve")
        self.pool = pool
        self.handles = {env.id: pool.load(env) for env in environments}
        prefixed = len(self.handles) > 1
        self.routes: dict[str, tuple[EnvHandle, str]] = {}
        for handle in self.handles.values():
            for t in handle.tools():
                public = f"{handle.id}.{t.name}" if prefixed else t.name
                if public in META_TOOLS:
                    continue  # the meta-tool keeps the name; the env tool stays reachable via call_tool
                self.routes[public] = (handle, t.name)
        # The tool list never changes while serving: built once, not per request.
        self._tool_list = [{"name": public, "description": h.tool(name).description,
                            "input_schema": h.tool(name).input_schema}
                           for public, (h, name) in self.routes.items()]
        self._tool_list_text = json.dumps(self._tool_list)
        self._list_result = types.ListToolsResult(tools=list(META_TOOLS.values()) + [
            types.Tool(name=t["name"], description=t["description"], input_schema=t["input_schema"])
            for t in self._tool_list])
        self._schemas = {t.name: t.input_schema for t in META_TOOLS.values()}
        self._schemas.update({t["name"]: t["input_schema"] for t in self._tool_list})
        self._by_connection: "weakref.WeakKeyDictionary[Any, _ClientState]" = weakref.WeakKeyDictionary()
        self._keyed: OrderedDict[str, _ClientState] = OrderedDict()
        self._max_keyed = max_keyed_sessions
        self._lock = threading.Lock()
        self.server = Server(name, on_list_tools=self._on_list_tools, on_call_tool=self._on_call_tool,
                             get_tool_input_schema=self._schemas.get)
        # The SDK's default middleware is one OpenTelemetry span per message, a no-op until an
        # exporter is installed; dropped (the SDK's documented opt-out) to save its per-call cost.
        self.server.middleware = []

    # ------------------------------------------------------------------ sessions
    def _client_state(self, ctx: Any) -> _ClientState:
        key = None
        meta = ctx.meta or {}
        if isinstance(meta, dict):
            key = meta.get(SESSION_META_KEY)
        request = getattr(ctx, "request", None)
        if key is None and request is not None and hasattr(request, "headers"):
            key = request.headers.get(SESSION_HEADER)
        conn = getattr(ctx.session, "_connection", None)
        handshake_era = conn is not None and getattr(conn, "protocol_version", "") < "2026"
        return self.client_state(key, conn if handshake_era else None)

    def client_state(self, key: Any, connection: Any = None) -> _ClientState:
        """The client's environment sessions: by ``connection`` (an MCP connection of the
        handshake era) when no ``key`` names them, else by ``key`` (``"default"`` if none)."""
        with self._lock:
            if key is None and connection is not None:
                state = self._by_connection.get(connection)
                if state is None:
                    state = self._by_connection[connection] = _ClientState()
                    weakref.finalize(connection, state.close)
                return state
            key = str(key or "default")
            state = self._keyed.get(key)
            if state is None:
                state = self._keyed[key] = _ClientState()
                while len(self._keyed) > self._max_keyed:
                    _, old = self._keyed.popitem(last=False)
                    old.close()
            self._keyed.move_to_end(key)
            return state

    def close(self) -> None:
        with self._lock:
            states = list(self._keyed.values()) + list(self._by_connection.values())
            self._keyed.clear()
        for s in states:
            s.close()

    # ------------------------------------------------------------------ handlers
    def tool_list(self) -> list[dict[str, Any]]:
        return [dict(t) for t in self._tool_list]

    async def _on_list_tools(self, ctx, params) -> types.ListToolsResult:
        return self._list_result

    async def _on_call_tool(self, ctx, params) -> types.CallToolResult:
        text, is_error = await self.call(params.name, params.arguments, lambda: self._client_state(ctx))
        return _text_result(text, is_error)

    async def call(self, name: Any, args: Any, state_of) -> tuple[str, bool]:
        """One ``tools/call``: (text for the client, is_error). ``state_of()`` gives the
        client's sessions (asked only when a tool runs)."""
        args = args or {}
        if name == "list_tools":
            return self._tool_list_text, False
        if name == "call_tool":
            name = args.get("tool_name") if isinstance(args, dict) else None
            inner = args.get("arguments", {}) if isinstance(args, dict) else {}
            if isinstance(name, str) and name.startswith(OFFICIAL_PREFIX) and name not in self.routes:
                name = name[len(OFFICIAL_PREFIX):]
            if isinstance(inner, str):
                try:
                    inner = json.loads(inner) if inner.strip() else {}
                except ValueError as exc:
                    return _failure_text(ToolResult.failure(
                        "invalid_arguments", f"arguments is a string that is not JSON: {exc}"))
            args = {} if inner is None else inner
        route = self.routes.get(name) if isinstance(name, str) else None
        if route is None:
            return _failure_text(ToolResult.failure(
                "unknown_tool", f"unknown tool {str(name)[:200]!r}; list_tools gives the available tools"))
        handle, tool = route
        session = await state_of().asession(handle)
        result = await session.acall(tool, args, as_text=True)
        if result.ok:
            return result.content if isinstance(result.content, str) else json.dumps(result.content), False
        return _failure_text(result)


def _failure_text(r: ToolResult) -> tuple[str, bool]:
    return f"Error ({r.error_kind}): {r.error}", True


def _text_result(text: str, is_error: bool) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=is_error)


def _result(r: ToolResult) -> types.CallToolResult:
    if r.ok:
        return _text_result(r.content if isinstance(r.content, str) else json.dumps(r.content, default=str), False)
    return _text_result(*_failure_text(r))


def serve_stdio(server: EnvMCPServer) -> None:
    from mcp.server.stdio import stdio_server

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.server.run(read, write, server.server.create_initialization_options())

    anyio.run(main)


def http_app(server: EnvMCPServer, host: str = "127.0.0.1", *, stateless: bool = False):
    """The Starlette app serving MCP streamable HTTP at ``/mcp`` (see the module docstring).

    ``stateless``: handshake-era clients get no MCP session either; without ``X-AWM-Session``
    they then share the default environment session (right for one client at a time)."""
    from awm_core.runtime.mcp_http import McpHttpEndpoint

    return McpHttpEndpoint(server, host=host, stateless=stateless).app()


def serve_http(server: EnvMCPServer, host: str = "127.0.0.1", port: int = 8000, *, stateless: bool = False) -> None:
    import uvicorn

    uvicorn.Server(uvicorn.Config(http_app(server, host, stateless=stateless), host=host, port=port,
                                  log_level="warning")).run()

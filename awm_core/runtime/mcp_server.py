"""Serve environments over MCP (official SDK, low-level ``Server`` with exact schemas).

One process, one ``SandboxPool``, many isolated sessions. Each MCP client gets its own
environment session (its own database):

- handshake-era clients (protocol up to 2025-11-25, which the official AWM agent and every
  mcp 1.x client speak): one environment session per MCP connection (per ``Mcp-Session-Id``
  over HTTP), closed when the connection goes away;
- 2026-07-28 clients, whose requests carry no session: the session named by
  ``_meta["awm/session"]`` or the ``X-AWM-Session`` HTTP header; requests that name none
  share one default session (right for stdio, where the process has one client).

Tools: the environment's own tools plus the AWM meta-tools ``list_tools`` (the tool list
with schemas, as JSON) and ``call_tool(tool_name, arguments)`` (``arguments`` an object or
a JSON string; a leading ``mcp_tool_`` is ignored, as the official agent sends it). When
several environments are served, their tools are named ``<env_id>.<tool>``.
"""
from __future__ import annotations

import json
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


class _ClientState:
    """The environment sessions of one MCP client (one per environment, opened lazily)."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()

    def session(self, handle: EnvHandle) -> Session:
        with self.lock:
            s = self.sessions.get(handle.id)
            if s is None:
                s = self.sessions[handle.id] = handle.open_session()
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
        self._by_connection: "weakref.WeakKeyDictionary[Any, _ClientState]" = weakref.WeakKeyDictionary()
        self._keyed: OrderedDict[str, _ClientState] = OrderedDict()
        self._max_keyed = max_keyed_sessions
        self._lock = threading.Lock()
        self.server = Server(name, on_list_tools=self._on_list_tools, on_call_tool=self._on_call_tool)

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
        with self._lock:
            if key is None and handshake_era:
                state = self._by_connection.get(conn)
                if state is None:
                    state = self._by_connection[conn] = _ClientState()
                    weakref.finalize(conn, state.close)
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
        return [{"name": public, "description": h.tool(name).description, "input_schema": h.tool(name).input_schema}
                for public, (h, name) in self.routes.items()]

    async def _on_list_tools(self, ctx, params) -> types.ListToolsResult:
        tools = list(META_TOOLS.values()) + [
            types.Tool(name=t["name"], description=t["description"], input_schema=t["input_schema"])
            for t in self.tool_list()]
        return types.ListToolsResult(tools=tools)

    async def _on_call_tool(self, ctx, params) -> types.CallToolResult:
        name = params.name
        args: Any = params.arguments or {}
        if name == "list_tools":
            return _text_result(json.dumps(self.tool_list()), False)
        if name == "call_tool":
            name = args.get("tool_name") if isinstance(args, dict) else None
            inner = args.get("arguments", {}) if isinstance(args, dict) else {}
            if isinstance(name, str) and name.startswith(OFFICIAL_PREFIX) and name not in self.routes:
                name = name[len(OFFICIAL_PREFIX):]
            if isinstance(inner, str):
                try:
                    inner = json.loads(inner) if inner.strip() else {}
                except ValueError as exc:
                    return _result(ToolResult.failure("invalid_arguments", f"arguments is a string that is not JSON: {exc}"))
            args = {} if inner is None else inner
        route = self.routes.get(name) if isinstance(name, str) else None
        if route is None:
            return _result(ToolResult.failure(
                "unknown_tool", f"unknown tool {str(name)[:200]!r}; list_tools gives the available tools"))
        handle, tool = route
        state = self._client_state(ctx)
        session = await anyio.to_thread.run_sync(state.session, handle)
        result = await anyio.to_thread.run_sync(session.call, tool, args)
        return _result(result)


def _text_result(text: str, is_error: bool) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=is_error)


def _result(r: ToolResult) -> types.CallToolResult:
    if r.ok:
        return _text_result(r.content if isinstance(r.content, str) else json.dumps(r.content, default=str), False)
    return _text_result(f"Error ({r.error_kind}): {r.error}", True)


def serve_stdio(server: EnvMCPServer) -> None:
    from mcp.server.stdio import stdio_server

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.server.run(read, write, server.server.create_initialization_options())

    anyio.run(main)


def http_app(server: EnvMCPServer, host: str = "127.0.0.1"):
    """The Starlette app serving MCP streamable HTTP at ``/mcp``."""
    return server.server.streamable_http_app(json_response=True, host=host)


def serve_http(server: EnvMCPServer, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.Server(uvicorn.Config(http_app(server, host), host=host, port=port, log_level="warning")).run()

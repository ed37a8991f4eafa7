"""Serve environments over MCP (official SDK, low-level ``Server`` with exact schemas).

One process, one ``SandboxPool``, many isolated sessions. Each MCP client gets its own
environment session (its own database; ``awm_core.runtime.access`` keeps them):

- handshake-era clients (protocol up to 2025-11-25, which the official AWM agent and every
  mcp 1.x client speak): one environment session per MCP connection (per ``Mcp-Session-Id``
  over HTTP, which the SDK binds to the token that opened it), closed when the connection
  goes away or idles past the expiry;
- 2026-07-28 clients, whose requests carry no session, and handshake-era clients served
  statelessly: over HTTP, the first tool call that names no session is issued one (its id in
  the reply's ``_meta["awm/session"]`` and ``X-AWM-Session`` header), which later calls name
  the same way; a client may instead choose a name, scoped to its token. Over stdio (one client
  per process) calls that name none share one default session.

Sessions are bounded (per server and per token) and expire when idle; a call naming an expired
or unknown session is a JSON-RPC error, never a fresh database.

Over HTTP (``http_app``) the transport is chosen per request:

- a ``tools/call`` that carries no ``Mcp-Session-Id`` (every 2026-07-28 request, and
  handshake-era clients served statelessly) is answered here directly as one JSON response:
  the same checks the SDK makes first (DNS-rebinding guard, Accept, Content-Type, the modern
  header ladder), then the pool, with none of the SDK's per-call generic dispatch (surface
  validation of params and result, the middleware chain, the per-call ``tools/list`` that
  the modern entry runs to check ``Mcp-Param`` headers); anything unusual goes to the SDK;
- handshake-era ``initialize`` gets an MCP session (stateful, JSON responses) unless the
  client names its environment session with ``X-AWM-Session`` or the server runs with
  ``stateless=True``: then it is answered statelessly (no MCP session id) and the client's
  later requests take the stateless path;
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

import json
import logging
from typing import Any, Callable, NamedTuple

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.shared.exceptions import MCPError

from awm_core.errors import SessionError
from awm_core.models import Environment
from awm_core.runtime.access import SESSION_HEADER, SESSION_META_KEY, ClientSessions, ClientState, Tokens, owner_of
from awm_core.runtime.pool import EnvHandle, SandboxPool
from awm_core.runtime.types import ToolResult

OFFICIAL_PREFIX = "mcp_tool_"
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


class CallReply(NamedTuple):
    text: str
    is_error: bool
    issued: str | None = None  # the session id the server issued for this call, if it did


class EnvMCPServer:
    """The MCP server of a set of environments. ``sessions`` bounds and expires the clients'
    environment sessions (default: at most 1,024 live, none expiring)."""

    def __init__(self, pool: SandboxPool, environments: list[Environment], *,
                 sessions: ClientSessions | None = None, name: str = "awm-env"):
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
        self.sessions = sessions or ClientSessions()
        self.server = Server(name, on_list_tools=self._on_list_tools, on_call_tool=self._on_call_tool,
                             get_tool_input_schema=self._schemas.get)
        # The SDK's default middleware is one OpenTelemetry span per message, a no-op until an
        # exporter is installed; dropped (the SDK's documented opt-out) to save its per-call cost.
        self.server.middleware = []

    # ------------------------------------------------------------------ sessions
    def _client_state(self, ctx: Any) -> tuple[ClientState, str | None]:
        key = None
        meta = ctx.meta or {}
        if isinstance(meta, dict):
            key = meta.get(SESSION_META_KEY)
        request = getattr(ctx, "request", None)
        headers = getattr(request, "headers", None)
        if key is None and headers is not None:
            key = headers.get(SESSION_HEADER)
        conn = getattr(ctx.session, "_connection", None)
        # A handshake-era MCP session: over HTTP one the SDK issued (``Mcp-Session-Id``); in
        # process, the connection itself.
        per_connection = conn is not None and getattr(conn, "protocol_version", "") < "2026" and (
            headers is None or headers.get("mcp-session-id") is not None)
        user = request.scope.get("user") if request is not None and hasattr(request, "scope") else None
        return self.client_state(key, conn if per_connection else None, owner=owner_of(user),
                                 issue=headers is not None)

    def client_state(self, key: Any, connection: Any = None, *, owner: str | None = None,
                     issue: bool = False) -> tuple[ClientState, str | None]:
        """The client's environment sessions and, when the server just issued them, their id:
        by ``connection`` (a handshake-era MCP connection) when no ``key`` names them; else by
        ``key`` within ``owner``'s sessions; with neither, a new issued session (``issue``, over
        HTTP) or the one ``"default"`` session (stdio, where the process has one client)."""
        if key is None and connection is not None:
            return self.sessions.of_connection(owner, connection), None
        if key is None and issue:
            return self.sessions.issue(owner)[::-1]
        return self.sessions.named(owner, str(key or "default")), None

    def close(self) -> None:
        self.sessions.close()

    # ------------------------------------------------------------------ handlers
    def tool_list(self) -> list[dict[str, Any]]:
        return [dict(t) for t in self._tool_list]

    async def _on_list_tools(self, ctx, params) -> types.ListToolsResult:
        return self._list_result

    async def _on_call_tool(self, ctx, params) -> types.CallToolResult:
        try:
            reply = await self.call(params.name, params.arguments, lambda: self._client_state(ctx))
        except SessionError as exc:
            raise MCPError(exc.code, str(exc), exc.data) from None
        result = _text_result(reply.text, reply.is_error)
        if reply.issued is not None:
            result.meta = {SESSION_META_KEY: reply.issued}
        return result

    async def call(self, name: Any, args: Any,
                   state_of: Callable[[], tuple[ClientState, str | None]]) -> CallReply:
        """One ``tools/call``. ``state_of()`` gives the client's sessions and the id the server
        issued them, if it just did (asked only when a tool runs). Raises ``SessionError`` for
        an expired or unknown session and at a session limit."""
        args = args or {}
        if name == "list_tools":
            return CallReply(self._tool_list_text, False)
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
        state, issued = state_of()
        self.sessions.begin(state)
        try:
            session = await state.asession(handle)
            result = await session.acall(tool, args, as_text=True)
        finally:
            self.sessions.end(state)
        if result.ok:
            text = result.content if isinstance(result.content, str) else json.dumps(result.content)
            return CallReply(text, False, issued)
        return _failure_text(result)._replace(issued=issued)


def _failure_text(r: ToolResult) -> CallReply:
    return CallReply(f"Error ({r.error_kind}): {r.error}", True)


def _text_result(text: str, is_error: bool) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=is_error)


def serve_stdio(server: EnvMCPServer) -> None:
    from mcp.server.stdio import stdio_server

    async def main() -> None:
        async with stdio_server() as (read, write):
            await server.server.run(read, write, server.server.create_initialization_options())

    anyio.run(main)


def http_app(server: EnvMCPServer, host: str = "127.0.0.1", *, stateless: bool = False,
             tokens: Tokens | None = None, max_body: int | None = None):
    """The Starlette app serving MCP streamable HTTP at ``/mcp`` (see the module docstring).

    ``stateless``: handshake-era clients get no MCP session either; like 2026-07-28 clients they
    name their environment session or are issued one. ``tokens``: the bearer tokens every request
    must show (required on a host other than loopback). ``max_body``: the largest request body,
    in bytes, refused before parsing past it (default: the SDK's, 4 MiB)."""
    from awm_core.runtime.mcp_http import McpHttpEndpoint

    limit = {} if max_body is None else {"max_body": max_body}
    return McpHttpEndpoint(server, host=host, stateless=stateless, tokens=tokens, **limit).app()


def serve_http(server: EnvMCPServer, host: str = "127.0.0.1", port: int = 8000, *, stateless: bool = False,
               tokens: Tokens | None = None, max_body: int | None = None) -> None:
    import uvicorn

    app = http_app(server, host, stateless=stateless, tokens=tokens, max_body=max_body)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()

"""MCP streamable HTTP for ``EnvMCPServer``: a stateless JSON fast path for ``tools/call`` in
front of the SDK's session managers (one stateful, one stateless, both JSON responses).

Every request first shows a bearer token when the server has tokens (``awm_core.runtime.access``);
without one it gets 401 before any MCP work. Which requests then take which path is in
``awm_core.runtime.mcp_server``'s docstring. The fast
path answers only a request that every check of the SDK would pass, and answers it with the
body the SDK would send (a test compares the two); for anything else (a failed check, a
malformed envelope, ``Mcp-Param`` headers to validate) the request, body included, is handed
to the SDK, which answers it as it always does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import mcp_types as types
from mcp.server.runner import modern_error_data
from mcp.shared.exceptions import MCPError
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER, check_accept_headers
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
)
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_PARAM_HEADER_PREFIX,
    InboundLadderRejection,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from awm_core.errors import InputError, SessionError
from awm_core.runtime.access import SESSION_HEADER, SESSION_META_KEY, UNAUTHORIZED, Tokens, check_bind, owner_of

logger = logging.getLogger(__name__)

_SESSION_ID = MCP_SESSION_ID_HEADER.lower().encode()
_PROTOCOL_VERSION = b"mcp-protocol-version"
_AWM_SESSION = SESSION_HEADER.encode()
_AUTHORIZATION = b"authorization"
_NO_SCOPES = AuthCredentials([])
_PARAM_PREFIX = MCP_PARAM_HEADER_PREFIX.lower()
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _security(host: str) -> TransportSecuritySettings | None:
    # As the SDK's own streamable_http_app: DNS-rebinding protection on a loopback host.
    if host in ("127.0.0.1", "localhost", "::1"):
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
        )
    return None


class McpHttpEndpoint:
    """The ASGI endpoint at ``/mcp``."""

    def __init__(self, server, *, host: str = "127.0.0.1", stateless: bool = False,
                 max_body: int = DEFAULT_MAX_REQUEST_BODY_SIZE, fast: bool = True, tokens: Tokens | None = None):
        check_bind(host, tokens)
        if max_body < 1:
            raise InputError(f"the request body limit must be at least 1 byte, got {max_body}")
        self.server = server
        self.fast = fast  # False: every request through the SDK (for comparisons)
        self.stateless = stateless
        self.max_body = max_body
        self.tokens = tokens
        security = _security(host)
        self._guard = TransportSecurityMiddleware(security)
        sessions = server.sessions
        # The SDK's MCP sessions expire and are bounded as the environment sessions they carry.
        self.stateful_manager = StreamableHTTPSessionManager(
            server.server, json_response=True, security_settings=security, session_idle_timeout=sessions.idle_s,
            max_sessions=sessions.max_sessions, max_request_body_size=max_body)
        self.stateless_manager = StreamableHTTPSessionManager(server.server, json_response=True, stateless=True,
                                                              security_settings=security, max_request_body_size=max_body)
        self._stamp = server.server.server_info_stamp  # fixed for the server's life

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            async with self.stateful_manager.run(), self.stateless_manager.run():
                sweeper = asyncio.create_task(self._sweep()) if self.server.sessions.idle_s else None
                try:
                    yield
                finally:
                    if sweeper is not None:
                        sweeper.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await sweeper

        return Starlette(routes=[Route("/mcp", endpoint=_Asgi(self), methods=["GET", "POST", "DELETE"])],
                         lifespan=lifespan)

    async def _sweep(self) -> None:
        """Expire idle environment sessions and free their databases in the workers, also
        while no request comes."""
        sessions = self.server.sessions
        interval = min(max(sessions.idle_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                if sessions.expire():
                    await asyncio.to_thread(self.server.pool.release_closed)
            except Exception:  # the sweeper must outlive one bad round
                logger.exception("expiring idle sessions failed")

    # ------------------------------------------------------------------ routing
    async def __call__(self, scope, receive, send) -> None:
        headers = scope["headers"]
        if self.tokens is not None:
            presented = next((v for k, v in headers if k == _AUTHORIZATION), None)
            user = self.tokens.principal(presented)
            if user is None:
                return await _unauthorized(send, presented is not None)
            scope["user"], scope["auth"] = user, _NO_SCOPES
        if scope["method"] != "POST" or any(k == _SESSION_ID for k, _ in headers):
            return await self.stateful_manager.handle_request(scope, receive, send)
        body = await self._body(scope, receive, send)
        if body is None:
            return
        replay = _replay(body, receive)
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError):
            msg = None
        if not isinstance(msg, dict):
            return await self.stateless_manager.handle_request(scope, replay, send)
        method = msg.get("method")
        if method == "tools/call" and "id" in msg and self.fast:
            if await self._fast_call(scope, headers, msg, send):
                return
            return await self.stateless_manager.handle_request(scope, replay, send)
        pv = next((v.decode("latin-1") for k, v in headers if k == _PROTOCOL_VERSION), None)
        modern = pv is not None and pv not in HANDSHAKE_PROTOCOL_VERSIONS
        if method == "initialize" and not modern and not self.stateless \
                and not any(k == _AWM_SESSION for k, _ in headers):
            # A handshake-era client that did not name its environment session: an MCP session
            # (and with it an environment session of its own).
            return await self.stateful_manager.handle_request(scope, replay, send)
        return await self.stateless_manager.handle_request(scope, replay, send)

    async def _body(self, scope, receive, send) -> bytes | None:
        """The whole request body, or None after answering 413 as the SDK does."""
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    if int(v) > self.max_body:
                        await Response("Request body too large", status_code=413)(scope, receive, send)
                        return None
                except ValueError:
                    pass
                break
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await Response("Request body too large", status_code=413)(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    # ------------------------------------------------------------------ the fast path
    async def _fast_call(self, scope, raw_headers, msg: dict[str, Any], send) -> bool:
        """Answer one session-less ``tools/call``; False (nothing sent) where the SDK should."""
        request = Request(scope)
        if await self._guard.validate_request(request, is_post=True) is not None:
            return False
        has_json, _ = check_accept_headers(request)
        if not has_json:
            return False
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("application/json"):
            return False
        params = msg.get("params")
        if msg.get("jsonrpc") != "2.0" or not isinstance(params, dict) or not isinstance(params.get("name"), str):
            return False
        req_id = msg["id"]
        if not isinstance(req_id, (str, int)) or isinstance(req_id, bool):
            return False
        args = params.get("arguments")
        if args is not None and not isinstance(args, dict):
            return False
        meta = params.get("_meta")
        if meta is not None and not isinstance(meta, dict):
            return False
        pv = request.headers.get("mcp-protocol-version")
        modern = pv is not None and pv not in HANDSHAKE_PROTOCOL_VERSIONS
        if modern:
            if find_duplicated_routing_header(request.headers.items()) is not None:
                return False
            verdict = classify_inbound_request(msg, headers=dict(request.headers))
            if isinstance(verdict, InboundLadderRejection) or verdict.protocol_version not in MODERN_PROTOCOL_VERSIONS:
                return False
            if any(k.startswith(_PARAM_PREFIX) for k in request.headers.keys()):
                return False  # the SDK validates Mcp-Param headers against the tool's schema
        key = (meta or {}).get(SESSION_META_KEY)
        if key is None:
            key = request.headers.get(SESSION_HEADER)
        owner = owner_of(scope.get("user"))
        extra: list[tuple[bytes, bytes]] = []
        try:
            reply = await self.server.call(params["name"], args,
                                           lambda: self.server.client_state(key, owner=owner, issue=True))
        except Exception as exc:  # as the SDK's entry: a generic internal error, logged here
            if isinstance(exc, SessionError):
                exc = MCPError(exc.code, str(exc), exc.data)
            error = modern_error_data(exc)
            body = {"jsonrpc": "2.0", "id": req_id,
                    "error": error.model_dump(mode="json", by_alias=True, exclude_none=True)}
            status = ERROR_CODE_HTTP_STATUS.get(error.code, 200) if modern else 200
        else:
            result: dict[str, Any] = {"content": [{"type": "text", "text": reply.text}], "isError": reply.is_error}
            if modern:
                result["resultType"] = "complete"
                result["_meta"] = {types.SERVER_INFO_META_KEY: self._stamp}
            if reply.issued is not None:
                result.setdefault("_meta", {})[SESSION_META_KEY] = reply.issued
                extra.append((_AWM_SESSION, reply.issued.encode()))
            body = {"jsonrpc": "2.0", "id": req_id, "result": result}
            status = 200
        data = json.dumps(body, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": _JSON_HEADERS + extra + [(b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
        return True


class _Asgi:
    """A plain ASGI endpoint for Starlette's ``Route`` (not wrapped as a request handler)."""

    def __init__(self, endpoint: McpHttpEndpoint):
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send) -> None:
        await self.endpoint(scope, receive, send)


async def _unauthorized(send, presented: bool) -> None:
    """401 with a JSON-RPC error body, before any MCP work."""
    message = ("the bearer token is not one this server accepts" if presented
               else "this server needs a bearer token: send 'Authorization: Bearer <token>'")
    data = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": UNAUTHORIZED, "message": message}},
                      separators=(",", ":")).encode()
    challenge = b'Bearer realm="awm-env", error="invalid_token"' if presented else b'Bearer realm="awm-env"'
    await send({"type": "http.response.start", "status": 401,
                "headers": _JSON_HEADERS + [(b"www-authenticate", challenge),
                                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _replay(body: bytes, receive):
    """A ``receive`` that gives the already-read body once, then the client's own messages."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again

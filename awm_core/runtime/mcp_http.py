"""MCP streamable HTTP for ``EnvMCPServer``: a stateless JSON fast path for ``tools/call`` in
front of the SDK's session managers (one stateful, one stateless, both JSON responses).

Which requests take which path is in ``awm_core.runtime.mcp_server``'s docstring. The fast
path answers only a request that every check of the SDK would pass, and answers it with the
body the SDK would send (a test compares the two); for anything else (a failed check, a
malformed envelope, ``Mcp-Param`` headers to validate) the request, body included, is handed
to the SDK, which answers it as it always does.
"""
from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

import mcp_types as types
from mcp.server.runner import modern_error_data
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
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

_SESSION_ID = MCP_SESSION_ID_HEADER.lower().encode()
_PROTOCOL_VERSION = b"mcp-protocol-version"
_AWM_SESSION = b"x-awm-session"
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
                 max_body: int = DEFAULT_MAX_REQUEST_BODY_SIZE, fast: bool = True):
        self.server = server
        self.fast = fast  # False: every request through the SDK (for comparisons)
        self.stateless = stateless
        self.max_body = max_body
        security = _security(host)
        self._guard = TransportSecurityMiddleware(security)
        self.stateful_manager = StreamableHTTPSessionManager(server.server, json_response=True,
                                                             security_settings=security)
        self.stateless_manager = StreamableHTTPSessionManager(server.server, json_response=True, stateless=True,
                                                              security_settings=security)
        self._stamp = server.server.server_info_stamp  # fixed for the server's life

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            async with self.stateful_manager.run(), self.stateless_manager.run():
                yield

        return Starlette(routes=[Route("/mcp", endpoint=_Asgi(self), methods=["GET", "POST", "DELETE"])],
                         lifespan=lifespan)

    # ------------------------------------------------------------------ routing
    async def __call__(self, scope, receive, send) -> None:
        headers = scope["headers"]
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
        key = (meta or {}).get("awm/session")
        if key is None:
            key = request.headers.get("x-awm-session")
        try:
            text, is_error = await self.server.call(params["name"], args, lambda: self.server.client_state(key))
        except Exception as exc:  # as the SDK's entry: a generic internal error, logged here
            error = modern_error_data(exc)
            reply = {"jsonrpc": "2.0", "id": req_id,
                     "error": error.model_dump(mode="json", by_alias=True, exclude_none=True)}
            status = ERROR_CODE_HTTP_STATUS.get(error.code, 200) if modern else 200
        else:
            result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": is_error}
            if modern:
                result["resultType"] = "complete"
                result["_meta"] = {types.SERVER_INFO_META_KEY: self._stamp}
            reply = {"jsonrpc": "2.0", "id": req_id, "result": result}
            status = 200
        data = json.dumps(reply, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": _JSON_HEADERS + [(b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
        return True


class _Asgi:
    """A plain ASGI endpoint for Starlette's ``Route`` (not wrapped as a request handler)."""

    def __init__(self, endpoint: McpHttpEndpoint):
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send) -> None:
        await self.endpoint(scope, receive, send)


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

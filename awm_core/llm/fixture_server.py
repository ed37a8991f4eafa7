"""A local OpenAI-compatible server that answers from the fixture files, with fault injection.

It exercises the real client path (openai package, HTTP, JSON, tool calls, retries) without a
remote model. Chat requests are keyed by the ``X-AWM-Stage`` and ``X-AWM-Scenario`` headers the
client sends and by the reply's position in the recorded list: ``X-AWM-Attempt`` for a synthesis
stage (the repair attempt), ``X-AWM-Turn`` for a policy's call (the turn within its episode).
Embeddings come from the offline embedder.

In-process use (tests)::

    with FixtureServer(fixtures_dir, fault_rate=0.2, seed=7) as srv:
        settings.llm.generator = srv.role_settings()
        srv.script("429", "ok")          # the next two chat requests: a 429, then a normal reply
        ...
        srv.requests                     # what the server saw, fault by fault

Command line: ``awm llm serve-fixtures --port 8765 --fault-rate 0.1``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from awm_core.errors import LLMError
from awm_core.llm.offline import estimate_tokens, load_fixture
from awm_core.settings import RoleSettings

log = logging.getLogger(__name__)

FAULT_KINDS = ("timeout", "429", "500", "malformed", "truncated")
MALFORMED_CONTENT = "Sure! Here is what you asked for, described in words rather than as a document."


@dataclass
class SeenRequest:
    """One request as the server saw it (``fault`` is the injected fault, None for a normal reply)."""

    path: str
    stage: str | None
    scenario: str | None
    attempt: int | None
    model: str | None
    fault: str | None
    status: int


def parse_faults(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if spec is None:
        return FAULT_KINDS
    kinds = [k.strip() for k in (spec.split(",") if isinstance(spec, str) else spec) if k.strip()]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise LLMError(f"unknown fault kind(s) {unknown or spec!r}; choose from {', '.join(FAULT_KINDS)}")
    return tuple(kinds)


class FixtureServer:
    """OpenAI-compatible fixture server on 127.0.0.1 in a background thread (context manager)."""

    def __init__(self, fixtures_dir: str | os.PathLike, *, port: int = 0, host: str = "127.0.0.1",
                 fault_rate: float = 0.0, faults: str | list[str] | tuple[str, ...] | None = None,
                 seed: int | None = 0, latency_s: float = 0.0, timeout_sleep_s: float = 30.0):
        if not 0.0 <= fault_rate <= 1.0:
            raise LLMError(f"fault rate must be between 0 and 1, got {fault_rate}")
        self.fixtures_dir = Path(fixtures_dir)
        self.host = host
        self.fault_rate = fault_rate
        self.faults = parse_faults(faults)
        self.latency_s = latency_s
        self.timeout_sleep_s = timeout_sleep_s
        self.requests: list[SeenRequest] = []
        self._rng = random.Random(seed)
        self._scripted: deque[str | None] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._embedder = None
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "FixtureServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                            name=f"fixture-server-{self.port}", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop()`` or KeyboardInterrupt (the CLI uses this)."""
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._stopping.set()
            self._httpd.server_close()

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in an injected timeout
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "FixtureServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def role_settings(self, **overrides: Any) -> RoleSettings:
        """Role settings that point the http backend at this server."""
        values: dict[str, Any] = {"backend": "http", "base_url": self.base_url, "api_key": "fixture-server",
                                  "timeout_s": 10.0}
        values.update(overrides)
        return RoleSettings(**values)

    def script(self, *faults: str | None) -> None:
        """Queue faults for the next chat requests, in order ("ok" or None = a normal reply)."""
        for f in faults:
            if f not in (None, "ok"):
                parse_faults([f])
            with self._lock:
                self._scripted.append(None if f == "ok" else f)

    def chat_requests(self) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # ------------------------------------------------------------------ request handling

    def _next_fault(self) -> str | None:
        with self._lock:
            if self._scripted:
                return self._scripted.popleft()
            if self.fault_rate > 0 and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.faults)
            return None

    def _seen(self, req: SeenRequest) -> SeenRequest:
        with self._lock:
            self.requests.append(req)
        return req

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def handle_chat(self, headers: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        stage = headers.get("X-AWM-Stage")
        scenario = headers.get("X-AWM-Scenario") or "_"
        position = "X-AWM-Turn" if headers.get("X-AWM-Turn") is not None else "X-AWM-Attempt"
        raw_attempt = headers.get(position) or "1"
        model = body.get("model")
        seen = self._seen(SeenRequest("/v1/chat/completions", stage, scenario, None, model, None, 0))
        try:
            seen.attempt = int(raw_attempt)
        except ValueError:
            return self._error(seen, 400, f"{position} must be an integer, got {raw_attempt!r}")
        if not stage:
            return self._error(seen, 400, "missing X-AWM-Stage header: the fixture server keys replies by "
                                          "X-AWM-Stage, X-AWM-Scenario and X-AWM-Attempt (or X-AWM-Turn)")
        if not isinstance(body.get("messages"), list):
            return self._error(seen, 400, "request body has no 'messages' list")
        seen.fault = fault = self._next_fault()
        self._pause(self.latency_s)
        if fault == "429":
            return self._error(seen, 429, "injected fault: rate limited", kind="rate_limit_error")
        if fault == "500":
            return self._error(seen, 500, "injected fault: internal server error", kind="server_error")
        if fault == "timeout":
            self._pause(self.timeout_sleep_s)  # the client has given up by now
        try:
            reply = load_fixture(self.fixtures_dir, scenario, stage, seen.attempt, body["messages"])
        except LLMError as exc:
            return self._error(seen, 404, str(exc), kind="not_found_error")
        content, finish, completion = reply.content, reply.finish_reason, reply.completion_tokens
        if fault == "malformed":
            content, finish = MALFORMED_CONTENT, "stop"
            completion = estimate_tokens(content)
        elif fault == "truncated":
            content, finish, completion = content[: len(content) // 2], "length", completion // 2
        message: dict[str, Any] = {"role": "assistant", "content": content if (content or not reply.tool_calls) else None}
        if reply.tool_calls and fault not in ("malformed", "truncated"):
            message["tool_calls"] = reply.tool_calls
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model or "awm-offline",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": reply.prompt_tokens + completion},
        }
        seen.status = 200
        return 200, payload

    def handle_embeddings(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        seen = self._seen(SeenRequest("/v1/embeddings", None, None, None, body.get("model"), None, 0))
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return self._error(seen, 400, "'input' must be a string or a list of strings")
        if self._embedder is None:
            from awm_core.llm.embed import OfflineEmbedder

            self._embedder = OfflineEmbedder()
        vectors = self._embedder.embed(texts)
        tokens = sum(estimate_tokens(t) for t in texts)
        payload = {
            "object": "list", "model": body.get("model") or self._embedder.model,
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        seen.status = 200
        return 200, payload

    def _error(self, seen: SeenRequest, status: int, message: str, kind: str = "invalid_request_error"):
        seen.status = status
        return status, {"error": {"message": message, "type": kind, "code": status}}


def _make_handler(server: FixtureServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client's connection pool expects
        server_version = "awm-fixture-server"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out as two writes; without this, Nagle plus delayed ACK adds ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s - " + format, self.address_string(), *args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (an injected timeout does exactly that)

        def do_GET(self) -> None:
            path = self.path.rstrip("/")
            if path in ("/health", "/v1/health"):
                self._send(200, {"ok": True, "fixtures_dir": str(server.fixtures_dir)})
            elif path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "awm-offline", "object": "model",
                                                             "owned_by": "awm"}]})
            else:
                self._send(404, {"error": {"message": f"no route GET {self.path}", "type": "not_found_error"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body is not a JSON object")
            except ValueError as exc:
                self._send(400, {"error": {"message": f"request body is not JSON: {exc}",
                                           "type": "invalid_request_error"}})
                return
            if path in ("/v1/chat/completions", "/chat/completions"):
                status, payload = server.handle_chat(self.headers, body)
            elif path in ("/v1/embeddings", "/embeddings"):
                status, payload = server.handle_embeddings(body)
            else:
                self._send(404, {"error": {"message": f"no route POST {self.path}", "type": "not_found_error"}})
                return
            self._send(status, payload)

    return Handler

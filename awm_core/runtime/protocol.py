"""Framing of the request/response channel between the pool and a worker.

A message is a JSON header plus zero or more binary blobs (database snapshots):
``[u32 header length][header JSON][u64 blob length][blob]...``; the header's ``"blobs"`` key
says how many blobs follow. JSON (never pickle) travels in both directions because the
worker runs untrusted code: unpickling its bytes in the parent would hand it the parent.
"""
from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any, Literal, NotRequired, TypedDict, Union

try:
    import fcntl
except ImportError:  # not on Windows: pipes keep their default capacity
    fcntl = None

# ---------------------------------------------------------------------- the messages
# One request type per ``op`` the worker answers (``awm_core.runtime.worker.OPS``), and the
# replies. Blobs travel beside the header: ``load`` (native, AWM-1K) and ``verify`` send database
# snapshots; ``build_db`` and ``snapshot`` answer with one.

class PingRequest(TypedDict):
    op: Literal["ping"]


class BuildDbRequest(TypedDict):
    op: Literal["build_db"]
    schema: dict[str, Any]            # a DbSchema as data
    seed: dict[str, Any] | None       # a SeedData as data


class LoadRequest(TypedDict):
    """Import an environment's code (blob: its initial database, for native and AWM-1K)."""
    op: Literal["load"]
    key: str                          # the environment's id and content digest
    env_id: str
    flavour: Literal["native", "awm1k", "bfcl", "tau2"]
    source: str
    spec: dict[str, dict[str, Any]] | None   # native: tool -> parameter types and descriptions
    asgi: bool                        # AWM-1K: every call through the whole app


class UnloadRequest(TypedDict):
    op: Literal["unload"]
    key: str


class OpenRequest(TypedDict):
    op: Literal["open"]
    key: str
    sid: int                          # chosen by the pool, unique per pool


class SessionRequest(TypedDict):
    """``close``, ``reset`` and ``snapshot``: an op on one session."""
    op: Literal["close", "reset", "snapshot"]
    sid: int


class CloseManyRequest(TypedDict):
    op: Literal["close_many"]
    sids: list[int]


class PrepareRequest(TypedDict):
    op: Literal["prepare"]
    sid: int
    initial_state: dict[str, Any] | None


class CallRequest(TypedDict):
    op: Literal["call"]
    sid: int
    tool: str
    args: dict[str, Any] | None
    requestor: NotRequired[Literal["assistant", "user"]]


class VerifyRequest(TypedDict):
    """Run one verifier on (initial, final) databases, the two blobs."""
    op: Literal["verify"]
    style: str                        # native, awm1k_code, awm1k_sql, bfcl, tau2
    function_name: str
    code: str
    final_answer: Any
    key: NotRequired[str]             # bfcl, tau2: the loaded entry whose checker runs
    trace: NotRequired[Any]           # bfcl, tau2: what the agent did


Request = Union[PingRequest, BuildDbRequest, LoadRequest, UnloadRequest, OpenRequest, SessionRequest,
                CloseManyRequest, PrepareRequest, CallRequest, VerifyRequest]


class Reply(TypedDict):
    """Every reply: ``ok``, and on failure why (``error_kind``: tool, invalid_arguments,
    unknown_tool, environment, verifier, code) and whether the worker must be replaced."""
    ok: bool
    error: NotRequired[str]
    error_kind: NotRequired[str]
    recycle: NotRequired[bool]


class PingReply(Reply):
    threads: int
    sessions: int                     # live sessions in the worker
    trims: int                        # times it gave freed memory back


class LoadReply(Reply):
    tools: NotRequired[list[dict[str, Any]]]         # name, description, input_schema
    problems: NotRequired[list[str]]
    call_paths: NotRequired[dict[str, str]]          # AWM-1K: tool -> bound | handler | asgi
    user_tools: NotRequired[list[dict[str, Any]]]    # tau2: the user's own tools
    errors: NotRequired[list[str]]                   # the import failed
    kind: NotRequired[str]


class CallReply(Reply):
    content_json: NotRequired[str]    # the tool's result as JSON text, passed on as it came
    worker_ms: NotRequired[float]


class VerifyReply(Reply):
    verdict: NotRequired[Literal["complete", "partial", "incomplete"] | None]
    evidence: NotRequired[dict[str, Any]]


_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class ChannelClosed(Exception):
    """The other end went away or sent something that is not a message."""


class ChannelTimeout(Exception):
    pass


def encode(header: dict[str, Any], blobs: list[bytes] = ()) -> bytes:
    head = dict(header)
    head["blobs"] = len(blobs)
    data = json.dumps(head, default=str, ensure_ascii=False).encode()
    parts = [_U32.pack(len(data)), data]
    for b in blobs:
        parts.append(_U64.pack(len(b)))
        parts.append(bytes(b))
    return b"".join(parts)


def widen(*fds: int, size: int = 256 << 10) -> None:
    """Give pipes a capacity of ``size`` bytes where the system allows (Linux): a database snapshot
    then crosses in a few system calls instead of one per 64 KiB. Not more: pipe buffers count
    against a per-user limit (64 MiB by default) that many pools' workers share. Best effort: a
    pipe keeps its default capacity where it cannot grow."""
    op = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl else None
    if op is None:
        return
    for fd in fds:
        try:
            fcntl.fcntl(fd, op, size)
        except OSError:
            return


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError as exc:
            raise ChannelClosed("channel closed while writing") from exc
        view = view[n:]


class Reader:
    """Reads framed messages from a pipe fd, optionally with a deadline.

    Sizes are capped so a hostile worker cannot make the parent allocate without bound.
    """

    def __init__(self, fd: int, *, max_header: int = 64 << 20, max_blob: int = 1 << 30):
        self.fd = fd
        self.max_header = max_header
        self.max_blob = max_blob

    def _read_exact(self, n: int, deadline: float | None) -> bytes:
        # Read straight into one buffer of the final size: database snapshots are megabytes
        # that arrive a pipe's capacity at a time, and growing a bytearray copies them again.
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelTimeout()
                ready, _, _ = select.select([self.fd], [], [], left)
                if not ready:
                    raise ChannelTimeout()
            k = os.readv(self.fd, [view[got:]])
            if not k:
                raise ChannelClosed("end of stream")
            got += k
        return bytes(buf)

    def read(self, deadline: float | None = None) -> tuple[dict[str, Any], list[bytes]]:
        (hlen,) = _U32.unpack(self._read_exact(4, deadline))
        if hlen > self.max_header:
            raise ChannelClosed(f"message header of {hlen} bytes exceeds the limit")
        try:
            header = json.loads(self._read_exact(hlen, deadline))
        except ValueError as exc:
            raise ChannelClosed(f"message header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ChannelClosed("message header is not an object")
        blobs = []
        count = header.get("blobs", 0)
        if not isinstance(count, int) or not 0 <= count <= 8:
            raise ChannelClosed("bad blob count")
        for _ in range(count):
            (blen,) = _U64.unpack(self._read_exact(8, deadline))
            if blen > self.max_blob:
                raise ChannelClosed(f"blob of {blen} bytes exceeds the limit")
            blobs.append(self._read_exact(blen, deadline))
        return header, blobs

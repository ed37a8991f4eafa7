"""Recorded LLM replies ("fixtures"), shared by the offline backend and the local fixture server.

Layout: ``<fixtures_dir>/<scenario_id>/<stage>.json`` (scenario id ``_`` for run-wide stages)::

    {"stage": "schema", "scenario": "recipe_box",
     "attempts": [{"content": "...", "prompt_tokens": 1200, "completion_tokens": 3400,
                   "tool_calls": [...], "finish_reason": "stop"}, ...]}

Attempt *n* (1-based) answers ``attempts[min(n, len) - 1]``.
"""
from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from awm_core.errors import LLMError
from awm_core.models import describe_validation_error

RUN_WIDE = "_"


class FixtureAttempt(BaseModel):
    content: str = ""
    prompt_tokens: int | None = Field(None, ge=0)
    completion_tokens: int | None = Field(None, ge=0)
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    finish_reason: str | None = None


class FixtureFile(BaseModel):
    stage: str
    scenario: str
    attempts: list[FixtureAttempt] = Field(min_length=1)


class FixtureReply(BaseModel):
    """One answer, with token counts filled in and tool calls in the OpenAI wire shape."""

    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def estimate_tokens(text: str) -> int:
    """Rough token count (about 4 characters per token) for replies recorded without usage."""
    return math.ceil(len(text) / 4) if text else 0


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # content parts
            content = " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
        total += estimate_tokens(str(content or "")) + 4  # role and separators
    return total


def _component(value: str, what: str) -> str:
    # Fixture keys become path components; refuse anything that could climb out of the folder.
    if not value or "/" in value or "\\" in value or value in (".", "..") or "\x00" in value:
        raise LLMError(f"{what} {value!r} cannot name a fixture file")
    return value


def fixture_path(fixtures_dir: str | os.PathLike, scenario_id: str | None, stage: str) -> Path:
    scenario = _component(scenario_id or RUN_WIDE, "scenario id")
    return Path(fixtures_dir) / scenario / f"{_component(stage, 'stage')}.json"


def normalise_tool_calls(calls: list[dict[str, Any]], *, prefix: str = "call") -> list[dict[str, Any]]:
    """OpenAI wire shape ``{"id", "type": "function", "function": {"name", "arguments": "<json>"}}``.

    Fixtures may give ``arguments`` as an object and leave out ``id``/``type`` for brevity.
    """
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function", call)
        if "name" not in fn:
            raise LLMError(f"tool call #{i} has no function name: {call!r}")
        args = fn.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args)
        out.append({"id": call.get("id") or f"{prefix}_{i}", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


class _FileCache:
    """Parsed fixture files keyed by (path, mtime, size): edits are picked up, rereads are free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[Path, tuple[tuple[int, int], FixtureFile]] = {}

    def load(self, path: Path) -> FixtureFile:
        try:
            st = path.stat()
        except FileNotFoundError:
            raise LLMError(f"no recorded reply: fixture file {path} does not exist") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._items.get(path)
        if hit and hit[0] == stamp:
            return hit[1]
        try:
            parsed = FixtureFile.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise LLMError(f"fixture file {path} is invalid: " + "; ".join(describe_validation_error(exc))) from None
        with self._lock:
            self._items[path] = (stamp, parsed)
        return parsed


_files = _FileCache()


def load_fixture(
    fixtures_dir: str | os.PathLike,
    scenario_id: str | None,
    stage: str,
    attempt: int,
    messages: list[dict[str, Any]] | None = None,
) -> FixtureReply:
    """The recorded reply for (scenario, stage, attempt); raises ``LLMError`` naming the file."""
    if attempt < 1:
        raise LLMError(f"attempt must be >= 1, got {attempt}")
    path = fixture_path(fixtures_dir, scenario_id, stage)
    recorded = _files.load(path)
    rec = recorded.attempts[min(attempt, len(recorded.attempts)) - 1]
    tool_calls = normalise_tool_calls(rec.tool_calls)
    prompt = rec.prompt_tokens if rec.prompt_tokens is not None else estimate_prompt_tokens(messages or [])
    completion = rec.completion_tokens
    if completion is None:
        completion = estimate_tokens(rec.content) + sum(estimate_tokens(json.dumps(c)) for c in tool_calls)
    finish = rec.finish_reason or ("tool_calls" if tool_calls else "stop")
    return FixtureReply(content=rec.content, tool_calls=tool_calls, finish_reason=finish,
                        prompt_tokens=prompt, completion_tokens=completion)


def fixture_digest(fixtures_dir: str | os.PathLike, scenario_id: str | None, stage: str) -> str | None:
    """Content hash of a fixture file (None when absent), so cached replies follow edits to it."""
    import hashlib

    path = fixture_path(fixtures_dir, scenario_id, stage)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def record_fixture(
    fixtures_dir: str | os.PathLike,
    scenario_id: str | None,
    stage: str,
    attempt: int,
    reply: FixtureReply,
    lock: threading.Lock | None = None,
) -> Path:
    """Store a live reply as attempt ``attempt`` of its fixture file (atomic rewrite)."""
    path = fixture_path(fixtures_dir, scenario_id, stage)
    with lock or _record_lock:
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = {"stage": stage, "scenario": scenario_id or RUN_WIDE, "attempts": []}
        attempts = data["attempts"]
        entry = reply.model_dump()
        # Attempts must stay contiguous: a gap (attempt 3 recorded before 2) repeats the last one.
        while len(attempts) < attempt - 1:
            attempts.append(attempts[-1] if attempts else entry)
        if len(attempts) >= attempt:
            attempts[attempt - 1] = entry
        else:
            attempts.append(entry)
        atomic_write_text(path, json.dumps(data, indent=1))
    return path


_record_lock = threading.Lock()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_fixture(fixtures_dir: str | os.PathLike, scenario_id: str | None, stage: str,
                  attempts: list[dict[str, Any] | str]) -> Path:
    """Write a fixture file (tests and hand-made recordings); a plain string is a reply's content."""
    entries = [{"content": a} if isinstance(a, str) else a for a in attempts]
    FixtureFile.model_validate({"stage": stage, "scenario": scenario_id or RUN_WIDE, "attempts": entries})
    path = fixture_path(fixtures_dir, scenario_id, stage)
    atomic_write_text(path, json.dumps({"stage": stage, "scenario": scenario_id or RUN_WIDE, "attempts": entries},
                                       indent=1))
    return path

"""Reading tool calls out of a policy's reply.

Two shapes arrive here: raw text with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks (what Qwen3 and other Hermes-style models write), and native OpenAI tool calls whose
``arguments`` is a JSON string. Both end up as ``ToolCallRequest`` objects or a ``FormatError``.
Nothing is repaired: a reply the loop cannot read exactly ends the episode with a format error,
because training should punish it rather than reward a lucky repair.
"""
from __future__ import annotations

import json
import re
from typing import Any

from awm_core.agent.episode import FormatErrorKind, ToolCallRequest

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
THINK_RE = re.compile(r"<think>.*?</think>", re.S)


class FormatError(ValueError):
    """A reply that tried to call a tool but did not do it correctly.

    ``kind`` is one of ``unparsable``, ``unknown_tool`` or ``arguments_not_object``.
    """

    def __init__(self, kind: FormatErrorKind, message: str):
        self.kind = kind
        super().__init__(message)


def strip_thinking(text: str) -> str:
    """The reply without ``<think>...</think>`` reasoning (what counts as the final answer)."""
    return THINK_RE.sub("", text).strip()


def parse_text_tool_calls(text: str, *, id_prefix: str = "call") -> list[ToolCallRequest]:
    """Every ``<tool_call>`` block in ``text``, in order; ``[]`` when there is none.

    Reasoning inside ``<think>`` is ignored, so a model that drafts a call while thinking is not
    taken to have made it.
    """
    visible = THINK_RE.sub("", text)
    blocks = TOOL_CALL_RE.findall(visible)
    rest = TOOL_CALL_RE.sub("", visible)
    if "<tool_call>" in rest or "</tool_call>" in rest:
        raise FormatError("unparsable", "a <tool_call> tag is not closed (or a </tool_call> has no opening tag)")
    calls = []
    for i, block in enumerate(blocks):
        try:
            data = json.loads(block.strip())
        except json.JSONDecodeError as exc:
            raise FormatError("unparsable", f"tool call #{i + 1} is not valid JSON: {exc.msg} "
                                            f"(line {exc.lineno}, column {exc.colno})") from None
        if not isinstance(data, dict):
            raise FormatError("unparsable", f"tool call #{i + 1} must be a JSON object with 'name' and "
                                            f"'arguments', got {type(data).__name__}")
        calls.append(_request(data.get("name"), data.get("arguments", {}), f"{id_prefix}_{i}", i))
    return calls


def parse_native_tool_calls(calls: list[dict[str, Any]], *, id_prefix: str = "call") -> list[ToolCallRequest]:
    """Native tool calls (``{"id", "name", "arguments"}`` or the OpenAI wire shape with ``function``)."""
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            if not args.strip():
                args = {}
            else:
                try:
                    args = json.loads(args)
                except json.JSONDecodeError as exc:
                    raise FormatError("unparsable", f"arguments of tool call #{i + 1} are not valid JSON: "
                                                    f"{exc.msg}") from None
        out.append(_request(fn.get("name"), args, call.get("id") or f"{id_prefix}_{i}", i))
    return out


def _request(name: Any, arguments: Any, call_id: str, i: int) -> ToolCallRequest:
    if not isinstance(name, str) or not name:
        raise FormatError("unparsable", f"tool call #{i + 1} has no tool name (a non-empty string 'name')")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise FormatError("arguments_not_object",
                          f"arguments of tool call #{i + 1} ({name}) must be a JSON object, got "
                          f"{type(arguments).__name__}")
    return ToolCallRequest(id=call_id, name=name, arguments=arguments)


def format_text_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The block a text policy writes for one call (the inverse of ``parse_text_tool_calls``)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"

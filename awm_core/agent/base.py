"""The policy interface every back end implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class PolicyReply:
    """One reply of a policy.

    ``text`` is the raw reply. ``tool_calls`` is ``None`` when the loop should read
    ``<tool_call>`` blocks from ``text`` (text back ends), or the list of native calls
    (``{"id", "name", "arguments"}`` with ``arguments`` an object or a JSON string, or the OpenAI
    wire shape with ``function``) for back ends with native tool calling; ``[]`` means "no call".
    Token counts are the back end's own, ``None`` when it does not know them.
    """

    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@runtime_checkable
class Policy(Protocol):
    """Anything that, given what it sees, writes the next assistant reply.

    ``messages`` are chat messages in the OpenAI shape (system, user, assistant with optional
    ``tool_calls``, tool); ``tools`` are OpenAI function tools. A policy must not keep the
    lists: the loop may reuse them.
    """

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply: ...

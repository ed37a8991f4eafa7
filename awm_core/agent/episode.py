"""What one episode leaves behind: turns, tool results, tokens, timings and database digests.

An ``Episode`` is plain data. Training reads ``turns[i].visible`` (exactly the messages the policy
saw before producing ``turns[i].raw``) to build per-step samples; evaluation turns it into a
catalog row with ``to_dict()``. The final database bytes travel with the object for the verifier
but are never serialised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Termination = Literal["final_answer", "max_turns", "format_error", "environment_error"]
FormatErrorKind = Literal["unparsable", "unknown_tool", "arguments_not_object"]


@dataclass
class ToolCallRequest:
    """One tool call as the policy wrote it, after parsing (``arguments`` is always an object)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class ToolCallResult:
    """What one call did in the environment.

    ``tool`` is the environment tool that ran (for the meta-tool ``call_tool`` the inner tool;
    ``None`` for ``list_tools``, which the loop answers itself). ``error_kind`` follows the
    runtime: ``None``, ``"tool"``, ``"invalid_arguments"``, ``"unknown_tool"`` or ``"environment"``.
    """

    call_id: str
    tool: str | None
    arguments: dict[str, Any]
    ok: bool
    content: Any
    error: str | None
    error_kind: str | None
    env_s: float


@dataclass
class Turn:
    """One policy step: what it saw, what it wrote, and what the environment answered."""

    index: int
    visible: list[dict[str, Any]]
    raw: str
    assistant: dict[str, Any]
    calls: list[ToolCallRequest] = field(default_factory=list)
    results: list[ToolCallResult] = field(default_factory=list)
    tool_messages: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    policy_s: float = 0.0
    env_s: float = 0.0
    format_error: str | None = None
    format_error_kind: FormatErrorKind | None = None
    user_message: dict[str, Any] | None = None  # a scripted task's next user message, after this answer

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The turn as it enters the history: the assistant message, its tool results, the next user message."""
        tail = [self.user_message] if self.user_message is not None else []
        return [self.assistant, *self.tool_messages, *tail]

    def to_dict(self, *, include_visible: bool = False) -> dict[str, Any]:
        out = {
            "index": self.index,
            "raw": self.raw,
            "calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.calls],
            "results": [
                {"call_id": r.call_id, "tool": r.tool, "ok": r.ok, "error": r.error,
                 "error_kind": r.error_kind, "env_s": r.env_s}
                for r in self.results
            ],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "policy_s": self.policy_s,
            "env_s": self.env_s,
            "format_error": self.format_error,
            "format_error_kind": self.format_error_kind,
            "user_message": self.user_message,
            "visible_count": len(self.visible),
        }
        if include_visible:
            out["visible"] = self.visible
        return out


@dataclass
class Episode:
    """A whole episode. ``messages`` is the full history; ``turns[i].visible`` what step i saw."""

    task: str
    interface: str
    env_id: str | None
    task_idx: int | None
    window: int | None
    max_turns: int
    system: dict[str, Any] | None
    task_message: dict[str, Any]
    turns: list[Turn] = field(default_factory=list)
    final_answer: str | None = None
    termination: Termination = "max_turns"
    error: str | None = None
    initial_digest: str | None = None
    final_digest: str | None = None
    initial_snapshot: bytes | None = field(default=None, repr=False)
    final_snapshot: bytes | None = field(default=None, repr=False)
    duration_s: float = 0.0
    snapshot_s: float = 0.0
    user_turn_starts: list[int] = field(default_factory=lambda: [0])  # first reply of each user message

    def calls_by_user_turn(self) -> list[list[list[ToolCallResult]]]:
        """Per user message, per reply that called the environment, the environment calls it made
        (a meta ``call_tool`` as the tool it ran; ``list_tools`` left out): the shape BFCL's checker reads."""
        bounds = [*self.user_turn_starts, len(self.turns)]
        steps = [[[r for r in t.results if r.tool is not None] for t in self.turns[a:b]]
                 for a, b in zip(bounds, bounds[1:])]
        return [[step for step in turn if step] for turn in steps]

    @property
    def messages(self) -> list[dict[str, Any]]:
        head = [self.system] if self.system is not None else []
        return [*head, self.task_message, *(m for t in self.turns for m in t.messages)]

    @property
    def policy_s(self) -> float:
        return sum(t.policy_s for t in self.turns)

    @property
    def env_s(self) -> float:
        """Seconds inside the environment: tool calls plus the two database snapshots."""
        return sum(t.env_s for t in self.turns) + self.snapshot_s

    @property
    def loop_s(self) -> float:
        """Seconds spent in the loop itself (parsing, bookkeeping, digests)."""
        return max(0.0, self.duration_s - self.policy_s - self.env_s)

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens or 0 for t in self.turns)

    @property
    def completion_tokens(self) -> int:
        return sum(t.completion_tokens or 0 for t in self.turns)

    @property
    def tool_call_count(self) -> int:
        return sum(len(t.results) for t in self.turns)

    @property
    def environment_error(self) -> bool:
        """The environment failed (not the agent): a tool call hit ``error_kind="environment"``."""
        return self.termination == "environment_error" or any(
            r.error_kind == "environment" for t in self.turns for r in t.results)

    def to_dict(self, *, include_visible: bool = False) -> dict[str, Any]:
        """JSON-ready record; the snapshot bytes are left out on purpose."""
        return {
            "task": self.task,
            "env_id": self.env_id,
            "task_idx": self.task_idx,
            "interface": self.interface,
            "window": self.window,
            "max_turns": self.max_turns,
            "termination": self.termination,
            "error": self.error,
            "final_answer": self.final_answer,
            "turn_count": len(self.turns),
            "user_turns": len(self.user_turn_starts),
            "tool_calls": self.tool_call_count,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "duration_s": self.duration_s,
            "policy_s": self.policy_s,
            "env_s": self.env_s,
            "loop_s": self.loop_s,
            "initial_digest": self.initial_digest,
            "final_digest": self.final_digest,
            "messages": self.messages,
            "turns": [t.to_dict(include_visible=include_visible) for t in self.turns],
        }

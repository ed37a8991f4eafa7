"""What one episode leaves behind: turns, tool results, tokens, timings and database digests.

An ``Episode`` is plain data. Training reads ``turns[i].visible`` (exactly the messages the policy
saw before producing ``turns[i].raw``) to build per-step samples; evaluation turns it into a
catalog row with ``to_dict()``. The final database bytes travel with the object for the verifier
but are never serialised.

A conversational episode (played with a user simulator) has a third party. ``messages`` stays the
agent's side (what the agent could see with an unlimited window); ``conversation`` is every message of
every party in order, each tagged with its sender: the agent's greeting, the user's messages (its tool
calls and their results included), the agent's messages and tool results. The user's tool traffic is
kept per turn in ``Turn.user_exchange`` (and before the first agent turn in ``Episode.opening``) and
never enters what the agent sees.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Termination = Literal["final_answer", "max_turns", "format_error", "environment_error",
                      "user_stop", "max_steps", "too_many_errors", "user_error"]
Sender = Literal["assistant", "user", "environment"]
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


def tool_result_message(result: ToolCallResult, content: str, *, requestor: str, call_name: str | None = None
                        ) -> dict[str, Any]:
    """A tool result as it stands in ``Episode.conversation``: the chat message plus what ran and how it went."""
    return {"sender": "environment", "role": "tool", "tool_call_id": result.call_id, "content": content,
            "requestor": requestor, "name": call_name if call_name is not None else result.tool,
            "tool": result.tool, "arguments": result.arguments, "ok": result.ok, "error": result.error,
            "error_kind": result.error_kind}


@dataclass
class UserExchange:
    """One reply of the user simulator to the agent: its tool calls (if any), their results, its text.

    ``messages`` are conversation messages in order, each tagged (``sender``): the user's tool-call
    messages (``role="user"`` with ``tool_calls``, each call carrying ``requestor="user"``), the tool
    results (``sender="environment"``, ``requestor="user"``), then the user's text (``role="user"``).
    ``text`` is that text (``None`` when the exchange ended before the user wrote one); ``stop`` says
    it ended the conversation. ``results`` are the user's calls as they ran.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    results: list[ToolCallResult] = field(default_factory=list)
    text: str | None = None
    stop: bool = False
    replies: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    user_s: float = 0.0
    env_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "text": self.text, "stop": self.stop, "replies": self.replies,
                "tool_calls": len(self.results), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "user_s": self.user_s, "env_s": self.env_s}


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
    user_message: dict[str, Any] | None = None  # the next user message (scripted or simulated), after this answer
    user_exchange: UserExchange | None = None  # the user simulator's reply to this answer, tool traffic included

    def conversation(self) -> list[dict[str, Any]]:
        """The turn's messages of every party, each tagged with its sender (see ``Episode.conversation``)."""
        to = "environment" if self.calls else None if self.format_error is not None else "user"
        out = [{"sender": "assistant", "to": to, **self.assistant}]
        names = {c.id: c.name for c in self.calls}
        for result, message in zip(self.results, self.tool_messages):
            out.append(tool_result_message(result, message["content"], requestor="assistant",
                                           call_name=names.get(result.call_id)))
        if self.user_exchange is not None:
            out.extend(self.user_exchange.messages)
        elif self.user_message is not None:
            out.append({"sender": "user", "to": "assistant", **self.user_message})
        return out

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
            "user_exchange": self.user_exchange.to_dict() if self.user_exchange is not None else None,
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
    # Conversational episodes: the agent's fixed greeting, the user's first reply (whose text is the
    # task message), and the counters of the party-independent limits (tau2-bench's orchestrator).
    greeting: dict[str, Any] | None = None
    opening: UserExchange | None = None
    steps: int = 0
    tool_errors: int = 0

    @property
    def conversational(self) -> bool:
        return self.greeting is not None

    @property
    def user_exchanges(self) -> list[UserExchange]:
        head = [self.opening] if self.opening is not None else []
        return head + [t.user_exchange for t in self.turns if t.user_exchange is not None]

    @property
    def user_calls(self) -> list[ToolCallResult]:
        """The user's own tool calls (dual control), in order."""
        return [r for x in self.user_exchanges for r in x.results]

    @property
    def user_prompt_tokens(self) -> int:
        return sum(x.prompt_tokens or 0 for x in self.user_exchanges)

    @property
    def user_completion_tokens(self) -> int:
        return sum(x.completion_tokens or 0 for x in self.user_exchanges)

    @property
    def user_s(self) -> float:
        """Seconds the user simulator took to reply."""
        return sum(x.user_s for x in self.user_exchanges)

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """Every message of every party in order, each tagged with ``sender`` (assistant, user, environment).

        Agent and user messages also say where they went (``to``: user, assistant, environment; ``None``
        for an agent reply the loop could not read). The system prompt is left out (it is the agent's
        alone: ``messages`` has it). Tool results carry ``requestor`` (whose call it answers), ``name``
        (the name called), ``tool``/``arguments`` (what ran in the environment; ``tool`` is None for
        ``list_tools``), ``ok``, ``error`` and ``error_kind``.
        """
        out: list[dict[str, Any]] = []
        if self.greeting is not None:
            out.append({"sender": "assistant", "to": "user", **self.greeting})
        if self.opening is not None:
            out.extend(self.opening.messages)
        else:
            out.append({"sender": "user", "to": "assistant", **self.task_message})
        for t in self.turns:
            out.extend(t.conversation())
        return out

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
        if self.greeting is not None:
            head.append(self.greeting)
        return [*head, self.task_message, *(m for t in self.turns for m in t.messages)]

    @property
    def policy_s(self) -> float:
        return sum(t.policy_s for t in self.turns)

    @property
    def env_s(self) -> float:
        """Seconds inside the environment: tool calls (the user's too) plus the two database snapshots."""
        return sum(t.env_s for t in self.turns) + sum(x.env_s for x in self.user_exchanges) + self.snapshot_s

    @property
    def loop_s(self) -> float:
        """Seconds spent in the loop itself (parsing, bookkeeping, digests)."""
        return max(0.0, self.duration_s - self.policy_s - self.env_s - self.user_s)

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
            r.error_kind == "environment" for t in self.turns for r in t.results) or any(
            r.error_kind == "environment" for r in self.user_calls)

    def to_dict(self, *, include_visible: bool = False) -> dict[str, Any]:
        """JSON-ready record; the snapshot bytes are left out on purpose.

        ``prompt_tokens``/``completion_tokens`` are the agent's; the user simulator's are the ``user_*`` keys.
        """
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
            "conversational": self.conversational,
            "conversation": self.conversation,
            "opening": self.opening.to_dict() if self.opening is not None else None,
            "steps": self.steps,
            "tool_errors": self.tool_errors,
            "user_tool_calls": len(self.user_calls),
            "user_prompt_tokens": self.user_prompt_tokens,
            "user_completion_tokens": self.user_completion_tokens,
            "user_s": self.user_s,
        }

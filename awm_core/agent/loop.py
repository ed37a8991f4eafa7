"""The multi-turn tool-use episode: one policy, one environment session, one task.

Each step the policy sees ``visible_messages(system, task, turns, window)`` and the interface's
function tools, and replies. A reply without a tool call is the final answer. A reply with tool
calls runs them in the session in order and appends the results. The episode ends with the final
answer, after ``max_turns`` replies, at the first malformed tool call (``format_error``), or at
the first call the environment could not serve (``environment_error``).

A scripted task (``Task.follow_ups``, BFCL's multi-turn entries) has more user messages: a final
answer to one sends the next (with the tools it adds), and only the answer to the last one ends
the episode. ``max_turns`` bounds the replies to each user message (BFCL's step limit per turn).

A conversation (``user=``, tau2-bench's orchestrator) has a third party, a user simulator
(``awm_core.agent.users``). The agent opens with ``AGENT_GREETING``; the user's first reply is the
task message. Each text reply of the agent goes to the user, whose reply becomes the next user
message; the user may first call its own tools (run with ``requestor="user"``; neither side sees the
other's tool traffic). The conversation ends when the user writes a stop token (``user_stop``), when
the user cannot reply (``user_error``), or at tau2's limits: ``max_steps`` counts every hop (a message
of the agent, a message of the user, the environment answering one message's calls) and
``max_errors`` every failed tool call of either side; both are checked, as tau2 does, whenever the
next hop is not the environment, and then decide the termination even over a stop token.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from typing import Any, Iterable, Sequence

from awm_core.agent.base import Policy, PolicyReply
from awm_core.agent.episode import Episode, Termination, ToolCallResult, Turn, UserExchange, tool_result_message
from awm_core.agent.interfaces import INTERFACES, Interface, ToolDef, ToolRouter
from awm_core.agent.parsing import FormatError, parse_native_tool_calls, parse_text_tool_calls, strip_thinking
from awm_core.agent.users import AGENT_GREETING, User, UserReply, flip_user_message, is_stop
from awm_core.db import snapshot_digest
from awm_core.models import Task

DEFAULT_WINDOW = 3
DEFAULT_MAX_TURNS = 20
DEFAULT_MAX_STEPS = 100  # tau2-bench's Orchestrator default (its CLI uses 200)
DEFAULT_MAX_ERRORS = 10

SYSTEM_PROMPTS: dict[str, str] = {
    "direct": (
        "You complete the user's task in an application by calling its tools. You are already "
        "signed in as the user with id 1. Work step by step: call a tool, read its result, then "
        "decide the next step. Use only values you were given or read from tool results. When the "
        "task is done (or cannot be done), reply with your final answer in plain text and no tool call."
    ),
    "meta": (
        "You complete the user's task in an application through two functions. Call list_tools "
        "once, first, to see the application's tools and their arguments; then run a tool with "
        "call_tool, giving tool_name and arguments (a JSON object). You are already signed in as "
        "the user with id 1. Work step by step and read each result before the next call. When "
        "the task is done (or cannot be done), reply with your final answer in plain text and no "
        "function call."
    ),
}


def default_system_prompt(interface: Interface) -> str:
    if interface not in SYSTEM_PROMPTS:
        raise ValueError(f"interface must be one of {INTERFACES}, got {interface!r}")
    return SYSTEM_PROMPTS[interface]


def policy_system_prompt(interface: Interface, policy: str | None) -> str:
    """The agent's system prompt in a conversation under an environment's policy, laid out as tau2-bench
    shows its domain policy: the interface's default prompt in ``<instructions>``, then the policy in
    ``<policy>``. Without a policy (None or blank) it is the default prompt alone."""
    base = default_system_prompt(interface)
    if not policy or not policy.strip():
        return base
    return f"<instructions>\n{base}\n</instructions>\n<policy>\n{policy.strip()}\n</policy>"


def _as_message(value: str | dict[str, Any] | None, role: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    return {"role": role, "content": value}


def visible_messages(
    system: str | dict[str, Any] | None,
    task_message: str | dict[str, Any],
    turns: Sequence[Any],
    window: int | None = DEFAULT_WINDOW,
) -> list[dict[str, Any]]:
    """What the policy sees: the system prompt, the task, and only the last ``window`` turns.

    A turn is one assistant message with its tool results: a ``Turn`` or a list of messages.
    ``window=None`` keeps every turn; ``window=0`` shows no earlier turn. In a scripted task a turn
    can end with the next user message; the latest user message of the turns left out of the window
    takes the task's place, so the request being worked on is always in view. This is the single place
    that decides the policy's context, in the loop and when training builds per-step samples
    (the sample for step ``t`` is ``visible_messages(system, task, episode.turns[:t], window)``,
    which equals ``episode.turns[t].visible``).
    """
    if window is not None and (not isinstance(window, int) or window < 0):
        raise ValueError(f"window must be None or an integer >= 0, got {window!r}")
    sys_msg = _as_message(system, "system")
    out = [sys_msg] if sys_msg is not None else []
    first_kept = 0 if window is None else max(0, len(turns) - window) if window else len(turns)
    pinned = _as_message(task_message, "user")
    for turn in turns[:first_kept]:
        pinned = _user_message_of(turn) or pinned
    out.append(pinned)
    for turn in turns[first_kept:]:
        out.extend(turn.messages if hasattr(turn, "messages") else turn)
    return out


def _user_message_of(turn: Any) -> dict[str, Any] | None:
    # Only a Turn says which user message follows it; in a plain message list a "user" message may
    # be a tool result written for a model without a tool role.
    return getattr(turn, "user_message", None)


SQLITE_HEADER = b"SQLite format 3\x00"
_DIGESTS: dict[bytes, str] = {}
_DIGEST_CACHE_SIZE = 256


def database_state_digest(data: bytes) -> str:
    """``snapshot_digest`` of a database, remembered by content hash.

    Every episode starts from the same initial bytes, and read-only episodes end there too; a
    sha256 of the bytes costs a fraction of reading every row again.
    """
    key = hashlib.sha256(data).digest()
    found = _DIGESTS.get(key)
    if found is None:
        # Environments of the bfcl flavour snapshot canonical JSON, not a database: its hash is the digest.
        found = snapshot_digest(data) if data.startswith(SQLITE_HEADER) else key.hex()
        if len(_DIGESTS) >= _DIGEST_CACHE_SIZE:
            _DIGESTS.clear()
        _DIGESTS[key] = found
    return found


def render_tool_result(ok: bool, content: Any, error: str | None) -> str:
    """The text of a tool message: the result as JSON, or ``{"error": ...}``."""
    if ok:
        return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False, default=str)
    return json.dumps({"error": error or "the tool failed"}, ensure_ascii=False)


def run_episode(
    policy: Policy,
    session: Any,
    task: Task | str,
    tools: Iterable[Any],
    *,
    interface: Interface = "direct",
    max_turns: int = DEFAULT_MAX_TURNS,
    window: int | None = DEFAULT_WINDOW,
    system_prompt: str | None = None,
    user: User | None = None,
    max_steps: int | None = None,
    max_errors: int | None = None,
    user_tools: Iterable[Any] | None = None,
) -> Episode:
    """Run one episode of ``policy`` on ``session`` (a runtime session: ``call``, ``snapshot``).

    ``tools`` are the environment's tools (``EnvHandle.tools()``: name, description,
    input_schema). Exceptions of the policy itself (an unreachable endpoint) propagate; everything
    the agent or the environment does wrong is recorded in the episode instead.

    A task with ``initial_state`` is first put in it (``session.prepare``). With ``user`` the episode
    is a conversation (see the module notes); a task's ``follow_ups`` are then not used. ``max_steps``
    (default 100 with a user) and ``max_errors`` (default 10 with a user) are tau2's limits; without a
    user they apply only when given. ``user_tools`` (the environment's ``user_tools()``), when given,
    are the only tools the user may call; a call of another name fails as an unknown tool. Exceptions
    of the user itself (an unreachable endpoint, a spent budget) propagate like the policy's.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if user is not None:
        max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
        max_errors = DEFAULT_MAX_ERRORS if max_errors is None else max_errors
    for name, value in (("max_steps", max_steps), ("max_errors", max_errors)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    tools = [ToolDef.of(t) for t in tools]
    follow_ups = list(task.follow_ups) if isinstance(task, Task) and user is None else []
    hidden = task.hidden_tools if isinstance(task, Task) else set()
    router = ToolRouter([t for t in tools if t.name not in hidden], interface)
    policy_tools = router.policy_tools()
    text = task.text if isinstance(task, Task) else str(task)
    if system_prompt is None and isinstance(task, Task) and task.system_prompt:
        system_prompt = task.system_prompt
    system = _as_message(system_prompt if system_prompt is not None else default_system_prompt(interface), "system")
    episode = Episode(
        task=text, interface=interface, window=window, max_turns=max_turns,
        env_id=task.scenario_id if isinstance(task, Task) else None,
        task_idx=task.idx if isinstance(task, Task) else None,
        system=system, task_message={"role": "user", "content": text},
    )

    def limit() -> Termination | None:
        """tau2's limits, checked whenever the next hop is not the environment (errors win over steps)."""
        reason: Termination | None = None
        if max_steps is not None and episode.steps >= max_steps:
            reason = "max_steps"
        if max_errors is not None and episode.tool_errors >= max_errors:
            reason = "too_many_errors"
        return reason

    started = time.perf_counter()
    done = False
    initial_state = task.initial_state if isinstance(task, Task) else None
    if initial_state is not None:
        t0 = time.perf_counter()
        try:
            session.prepare(initial_state)
        except Exception as exc:  # the task's state could not be set up: nothing the agent did
            episode.termination = "environment_error"
            episode.error = f"initial state failed: {type(exc).__name__}: {exc}"
            done = True
        episode.snapshot_s += time.perf_counter() - t0  # setting the state up is environment time
    t0 = time.perf_counter()
    episode.initial_snapshot = session.snapshot()
    episode.snapshot_s += time.perf_counter() - t0
    episode.initial_digest = database_state_digest(episode.initial_snapshot)

    conversation = None
    if user is not None:
        episode.greeting = {"role": "assistant", "content": AGENT_GREETING}
        conversation = _Conversation(user, session, episode, limit, max_replies=max_turns, user_tools=user_tools)
        if not done:
            episode.opening, done = conversation.ask()
            if episode.opening.text is not None:
                episode.task_message = {"role": "user", "content": episode.opening.text}

    for index in itertools.count():
        if done:
            break
        if index - episode.user_turn_starts[-1] >= max_turns:
            episode.termination = "max_turns"
            break
        visible = visible_messages(system, episode.task_message, episode.turns, window)
        t0 = time.perf_counter()
        reply = policy.act(visible, policy_tools)
        policy_s = time.perf_counter() - t0
        if not isinstance(reply, PolicyReply):
            raise TypeError(f"{type(policy).__name__}.act must return a PolicyReply, got {type(reply).__name__}")
        turn = Turn(index=index, visible=visible, raw=reply.text or "", assistant={}, policy_s=policy_s,
                    prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
        episode.turns.append(turn)
        episode.steps += 1
        try:
            if reply.tool_calls is None:
                calls = parse_text_tool_calls(turn.raw, id_prefix=f"call_{index}")
                turn.assistant = {"role": "assistant", "content": turn.raw}
            else:
                calls = parse_native_tool_calls(reply.tool_calls, id_prefix=f"call_{index}")
                turn.assistant = {"role": "assistant", "content": turn.raw or None}
                if calls:
                    turn.assistant["tool_calls"] = [
                        {"id": c.id, "type": "function",
                         "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                        for c in calls]
            turn.calls = calls
            resolved = [router.resolve(c) for c in calls]
        except FormatError as exc:
            if not turn.assistant:
                turn.assistant = {"role": "assistant", "content": turn.raw}
            turn.format_error, turn.format_error_kind = str(exc), exc.kind
            episode.termination, episode.error = "format_error", f"{exc.kind}: {exc}"
            break
        if not calls:
            episode.final_answer = strip_thinking(turn.raw)
            if conversation is not None:
                reason = limit()
                if reason is not None:
                    episode.termination = reason
                    break
                conversation.agent_said(episode.final_answer)
                turn.user_exchange, done = conversation.ask()
                if not done:
                    turn.user_message = {"role": "user", "content": turn.user_exchange.text}
                    episode.user_turn_starts.append(index + 1)
                continue
            if follow_ups:
                nxt = follow_ups.pop(0)
                turn.user_message = {"role": "user", "content": nxt.text}
                episode.user_turn_starts.append(index + 1)
                if nxt.tools_added:
                    hidden -= set(nxt.tools_added)
                    router = ToolRouter([t for t in tools if t.name not in hidden], interface)
                    policy_tools = router.policy_tools()
                continue
            episode.termination = "final_answer"
            break
        failed = _run_calls(session, router, turn, calls, resolved)
        episode.steps += 1
        episode.tool_errors += sum(not r.ok for r in turn.results)
        if failed:
            episode.termination = "environment_error"
            failed = turn.results[-1]
            episode.error = f"environment error in {failed.tool}: {failed.error}"
            break
        reason = limit()
        if reason is not None:
            episode.termination = reason
            break

    t0 = time.perf_counter()
    try:
        episode.final_snapshot = session.snapshot()
    except Exception as exc:  # the worker died at the very end: the verifier has nothing to read
        episode.snapshot_s += time.perf_counter() - t0
        episode.termination, episode.error = "environment_error", f"final snapshot failed: {exc}"
    else:
        episode.snapshot_s += time.perf_counter() - t0
        episode.final_digest = database_state_digest(episode.final_snapshot)
    episode.duration_s = time.perf_counter() - started
    return episode


class _Conversation:
    """The user's side of a conversational episode: what the user has seen, and asking it for replies."""

    def __init__(self, user: User, session: Any, episode: Episode, limit, *, max_replies: int,
                 user_tools: Iterable[Any] | None):
        self.user = user
        self.session = session
        self.episode = episode
        self.limit = limit
        self.max_replies = max_replies
        self.user_tools = None if user_tools is None else {ToolDef.of(t).name for t in user_tools}
        self.history: list[dict[str, Any]] = [{"role": "user", "content": AGENT_GREETING}]  # the user's view
        self.asked = 0
        self.call_ids: set[str] = set()

    def agent_said(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})

    def _end(self, termination: Termination, error: str | None = None) -> None:
        self.episode.termination, self.episode.error = termination, error

    def ask(self) -> tuple[UserExchange, bool]:
        """The user's reply to the agent's last text: its tool calls run until it writes.

        Returns the exchange and whether the episode ends with it (the termination is then set).
        """
        exchange = UserExchange()
        episode = self.episode
        for _ in range(self.max_replies):
            self.asked += 1
            t0 = time.perf_counter()
            reply = self.user.reply(list(self.history))
            exchange.user_s += time.perf_counter() - t0
            if not isinstance(reply, UserReply):
                raise TypeError(f"{type(self.user).__name__}.reply must return a UserReply, got {type(reply).__name__}")
            exchange.replies += 1
            if reply.prompt_tokens is not None:
                exchange.prompt_tokens = (exchange.prompt_tokens or 0) + reply.prompt_tokens
            if reply.completion_tokens is not None:
                exchange.completion_tokens = (exchange.completion_tokens or 0) + reply.completion_tokens
            episode.steps += 1
            if reply.error:
                self._end("user_error", reply.error)
                return exchange, True
            try:
                calls = parse_native_tool_calls(reply.tool_calls or [], id_prefix=f"user_{self.asked}")
            except FormatError as exc:
                self._end("user_error", f"the user's tool call could not be read: {exc}")
                return exchange, True
            if calls:
                if self._run(exchange, reply.text, calls):
                    return exchange, True
                reason = self.limit()
                if reason is not None:
                    self._end(reason)
                    return exchange, True
                continue
            text = reply.text
            if not text or not text.strip():
                self._end("user_error", "the user replied with neither text nor a tool call")
                return exchange, True
            message = {"sender": "user", "to": "assistant", "role": "user", "content": text}
            exchange.messages.append(message)
            self.history.append(flip_user_message(message))
            exchange.text = text
            exchange.stop = is_stop(text)
            reason = self.limit()  # as in tau2, a limit reached now wins over a stop token
            if reason is not None:
                self._end(reason)
            elif exchange.stop:
                self._end("user_stop")
            return exchange, exchange.stop or reason is not None
        self._end("user_error", f"the user called its tools in {self.max_replies} replies in a row without "
                                "writing to the agent")
        return exchange, True

    def _run(self, exchange: UserExchange, text: str | None, calls) -> bool:
        """Run one user message's calls in order; True when the environment failed (the episode ends)."""
        for i, c in enumerate(calls):
            if c.id in self.call_ids:  # ids must name one call in the whole conversation
                c.id = f"user_{self.asked}_{i}"
            self.call_ids.add(c.id)
        message = {"sender": "user", "to": "environment", "role": "user", "content": text or None,
                   "tool_calls": [{"id": c.id, "type": "function", "requestor": "user",
                                   "function": {"name": c.name,
                                                "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                                  for c in calls]}
        exchange.messages.append(message)
        self.history.append(flip_user_message(message))
        failed = False
        for c in calls:
            if self.user_tools is not None and c.name not in self.user_tools:
                shown = ", ".join(sorted(self.user_tools)) or "none"
                result = ToolCallResult(c.id, c.name, c.arguments, False, None,
                                        f"unknown user tool {c.name!r}; the user's tools are: {shown}",
                                        "unknown_tool", 0.0)
            else:
                t0 = time.perf_counter()
                try:
                    r = self.session.call(c.name, c.arguments, requestor="user")
                    ok, content, error, kind = r.ok, r.content, r.error, r.error_kind
                except Exception as exc:  # the runtime should not raise; if it does, it is not the user's fault
                    ok, content, error, kind = False, None, f"{type(exc).__name__}: {exc}", "environment"
                result = ToolCallResult(c.id, c.name, c.arguments, ok, content, error, kind, time.perf_counter() - t0)
            exchange.results.append(result)
            exchange.env_s += result.env_s
            rendered = render_tool_result(result.ok, result.content, result.error)
            exchange.messages.append(tool_result_message(result, rendered, requestor="user", call_name=c.name))
            self.history.append({"role": "tool", "tool_call_id": c.id, "content": rendered})
            self.episode.tool_errors += not result.ok
            if result.error_kind == "environment":
                self._end("environment_error", f"environment error in the user's {c.name}: {result.error}")
                failed = True
                break
        self.episode.steps += 1
        return failed


def _run_calls(session: Any, router: ToolRouter, turn: Turn, calls, resolved) -> bool:
    """Run the turn's calls in order; True when the environment failed (the episode stops)."""
    for call, (tool, args) in zip(calls, resolved):
        if tool is None:  # list_tools: the loop knows the answer
            content = router.listing()
            result = ToolCallResult(call.id, None, {}, True, content, None, None, 0.0)
        else:
            t0 = time.perf_counter()
            try:
                r = session.call(tool, args)
                ok, content, error, kind = r.ok, r.content, r.error, r.error_kind
            except Exception as exc:  # the runtime should not raise; if it does, it is not the agent's fault
                ok, content, error, kind = False, None, f"{type(exc).__name__}: {exc}", "environment"
            env_s = time.perf_counter() - t0
            result = ToolCallResult(call.id, tool, args, ok, content, error, kind, env_s)
            turn.env_s += env_s
        turn.results.append(result)
        turn.tool_messages.append({"role": "tool", "tool_call_id": call.id,
                                   "content": render_tool_result(result.ok, result.content, result.error)})
        if result.error_kind == "environment":
            return True
    return False

"""The multi-turn tool-use episode: one policy, one environment session, one task.

Each step the policy sees ``visible_messages(system, task, turns, window)`` and the interface's
function tools, and replies. A reply without a tool call is the final answer. A reply with tool
calls runs them in the session in order and appends the results. The episode ends with the final
answer, after ``max_turns`` replies, at the first malformed tool call (``format_error``), or at
the first call the environment could not serve (``environment_error``).

A scripted task (``Task.follow_ups``, BFCL's multi-turn entries) has more user messages: a final
answer to one sends the next (with the tools it adds), and only the answer to the last one ends
the episode. ``max_turns`` bounds the replies to each user message (BFCL's step limit per turn).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from typing import Any, Iterable, Sequence

from awm_core.agent.base import Policy, PolicyReply
from awm_core.agent.episode import Episode, ToolCallResult, Turn
from awm_core.agent.interfaces import INTERFACES, Interface, ToolDef, ToolRouter
from awm_core.agent.parsing import FormatError, parse_native_tool_calls, parse_text_tool_calls, strip_thinking
from awm_core.db import snapshot_digest
from awm_core.models import Task

DEFAULT_WINDOW = 3
DEFAULT_MAX_TURNS = 20

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
) -> Episode:
    """Run one episode of ``policy`` on ``session`` (a runtime session: ``call``, ``snapshot``).

    ``tools`` are the environment's tools (``EnvHandle.tools()``: name, description,
    input_schema). Exceptions of the policy itself (an unreachable endpoint) propagate; everything
    the agent or the environment does wrong is recorded in the episode instead.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    tools = [ToolDef.of(t) for t in tools]
    follow_ups = list(task.follow_ups) if isinstance(task, Task) else []
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
    started = time.perf_counter()
    t0 = time.perf_counter()
    episode.initial_snapshot = session.snapshot()
    episode.snapshot_s += time.perf_counter() - t0
    episode.initial_digest = database_state_digest(episode.initial_snapshot)

    for index in itertools.count():
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
        if _run_calls(session, router, turn, calls, resolved):
            episode.termination = "environment_error"
            failed = turn.results[-1]
            episode.error = f"environment error in {failed.tool}: {failed.error}"
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

"""The user side of a conversational episode: a simulated customer the agent talks to.

In a conversation (tau2-bench style) an agent's text reply does not end the episode: it goes to a
*user*, whose reply comes back to the agent, until the user ends the conversation with a stop token
(``STOP_TOKENS``) or a limit is reached. The agent opens with ``AGENT_GREETING``; the user's first
reply is the request the agent works on.

A user sees the conversation from its own side (``user_view``): the agent's texts as ``user``
messages, its own earlier turns as ``assistant`` messages, its own tool calls and their results;
the agent's tool traffic is left out, as the agent never sees the user's. In dual-control domains
(tau2's telecom) the user acts on their own device through user tools; its calls come back in
``UserReply.tool_calls`` and the loop runs them with ``requestor="user"``.

Which episodes are conversations is one rule, ``plays_as_conversation(env, task, mode)``: a tau2-bench
task always; a synthesized task with a user scenario (``Task.conversational``) in mode ``conversation``;
anything else is one message (mode ``message``, the default). In a conversation of a synthesized task
the agent is shown the environment's policy (``conversation_system_prompt``).

- ``LLMUser``: a language model plays the user (LLM role ``user``, stage ``user``).
- ``ScriptedUser``: deterministic, from the task's reference solution; with ``ReferencePolicy`` it
  plays a whole conversation without any model.
"""
from __future__ import annotations

import json
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, runtime_checkable

from awm_core.agent.interfaces import ToolDef, function_tool
from awm_core.agent.parsing import strip_thinking
from awm_core.models import ReferenceSolution, Task, resolve_refs

STOP = "###STOP###"
TRANSFER = "###TRANSFER###"
OUT_OF_SCOPE = "###OUT-OF-SCOPE###"
STOP_TOKENS = (STOP, TRANSFER, OUT_OF_SCOPE)
AGENT_GREETING = "Hi! How can I help you today?"
USER_STAGE = "user"
USER_ROLE = "user"


def is_stop(text: str | None) -> bool:
    """Whether a user's text ends the conversation (it contains one of ``STOP_TOKENS``)."""
    return bool(text) and any(token in text for token in STOP_TOKENS)


@dataclass
class UserReply:
    """One reply of the user.

    ``text`` is what the user writes to the agent; ``tool_calls`` are calls of the user's own tools
    (OpenAI wire shape ``{"id", "type", "function": {"name", "arguments"}}`` or ``{"id", "name",
    "arguments"}``); with calls the loop runs them and asks the user again, and any text of that reply
    does not reach the agent. ``error`` says the user could not reply (the episode ends with
    ``user_error``). Tokens and seconds are the back end's own, ``None``/0 when unknown.
    """

    text: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0
    error: str | None = None


@runtime_checkable
class User(Protocol):
    """Anything that, given the conversation from the user's side (``user_view``), writes the user's next reply.

    ``history`` starts with the agent's greeting as a ``user`` message; it holds no system prompt (the
    user brings its own). A user must not keep the list: the loop extends it.
    """

    def reply(self, history: list[dict[str, Any]]) -> UserReply: ...


def user_view(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The user's side of a tagged conversation (``Episode.conversation``), roles flipped.

    The agent's texts become ``user`` messages, reasoning stripped (an agent message that called tools is
    left out, text and all: it went to the environment, not to the user; so is one the loop could not
    read); the user's own messages become ``assistant`` messages; tool results are kept only for the user's own calls. This is what the loop shows the user.
    """
    out: list[dict[str, Any]] = []
    for m in conversation:
        sender = m.get("sender")
        if sender == "assistant":
            if m.get("to", "environment" if m.get("tool_calls") else "user") == "user":
                out.append({"role": "user", "content": strip_thinking(m.get("content") or "")})
        elif sender == "user":
            out.append(flip_user_message(m))
        elif sender == "environment" and m.get("requestor") == "user":
            out.append({"role": "tool", "tool_call_id": m["tool_call_id"], "content": m.get("content") or ""})
    return out


def flip_user_message(message: dict[str, Any]) -> dict[str, Any]:
    """A user's conversation message as the user's model sees its own turn (an ``assistant`` message)."""
    flipped: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        flipped["tool_calls"] = [{k: v for k, v in c.items() if k != "requestor"} for c in message["tool_calls"]]
    elif flipped["content"] is None:
        flipped["content"] = ""
    return flipped


def render_scenario(scenario: dict[str, Any] | None) -> str:
    """A user scenario (τ²'s shape) as τ² shows it to its user simulator (``str(UserScenario)``):
    persona, then the instructions, each part indented by a tab."""
    if not scenario:
        return ""
    lines = []
    if scenario.get("persona") is not None:
        lines += ["Persona:", _indent(str(scenario["persona"]))]
    instructions = scenario.get("instructions")
    if isinstance(instructions, dict):
        body = [f"Domain: {instructions.get('domain')}",
                f"Reason for call:\n{_indent(str(instructions.get('reason_for_call') or ''))}"]
        for label, key in (("Known info", "known_info"), ("Unknown info", "unknown_info")):
            if instructions.get(key) is not None:
                body.append(f"{label}:\n{_indent(str(instructions[key]))}")
        body.append(f"Task instructions:\n{_indent(str(instructions.get('task_instructions') or ''))}")
        text = "\n".join(body)
    else:
        text = str(instructions)
    lines += ["Instructions:", _indent(text)]
    return "\n".join(lines)


def user_system_prompt(guidelines: str, scenario: dict[str, Any]) -> str:
    """A user simulator's system prompt as τ²'s ``UserSimulator`` builds it: guidelines, then the scenario."""
    return f"{guidelines}\n\n<scenario>\n{render_scenario(scenario)}\n</scenario>"


def _indent(text: str) -> str:
    return textwrap.indent(text, "\t")


DEFAULT_USER_GUIDELINES = (
    "You play a customer talking to a customer-service agent. Follow the scenario below: say what you "
    "want in your own words, a little at a time, as a real customer would, and give information only "
    "when the agent needs it. Do not invent facts the scenario does not give you; if the agent asks for "
    "something you do not know, say so. Write only your own next message, never the agent's. When your "
    f"request is fully handled, or it cannot be, end the conversation by writing {STOP}. If you are "
    f"transferred to a human agent, write {TRANSFER}. If the scenario gives you no way to answer, write "
    f"{OUT_OF_SCOPE}."
)


def default_user_prompt(task: Task) -> str:
    """A user system prompt for a task that brings none (``Task.user_prompt``): short guidelines and the scenario."""
    if not task.user_scenario:
        return f"{DEFAULT_USER_GUIDELINES}\n\n<scenario>\n{task.text}\n</scenario>"
    return user_system_prompt(DEFAULT_USER_GUIDELINES, task.user_scenario)


def user_function_tools(tools: Any) -> list[dict[str, Any]] | None:
    """User tools as OpenAI function tools: accepts function tools already, or the runtime's ``ToolInfo``s."""
    if not tools:
        return None
    out = []
    for t in tools:
        if isinstance(t, dict) and t.get("type") == "function":
            out.append(t)
        else:
            d = ToolDef.of(t)
            out.append(function_tool(d.name, d.description, d.input_schema))
    return out


def task_key(task: Task) -> str:
    """The fixture/ledger key of one task's conversations: ``<environment id>.task<idx>``."""
    return f"{task.scenario_id}.task{task.idx}"


# --------------------------------------------------------------------------- LLM user


class LLMUser:
    """A language model plays the user: system prompt ``task.user_prompt``, the conversation from its side.

    Calls go through ``LLMClient`` for the role ``user``, stage ``user``, ``scenario_id`` ``task_key(task)``
    (``<env id>.task<idx>``), and ``attempt`` the 1-based index of the user's reply in the conversation
    (its earlier replies are the ``assistant`` messages of the history), so one offline fixture file per
    task (``<fixtures_dir>/<env id>.task<idx>/user.json``) lists a conversation's successive replies.

    ``tools`` are the user's own tools (OpenAI function tools or the runtime's ``ToolInfo``s) for
    dual-control domains. An empty completion (no text, no call) is retried once with a reminder added
    to the system prompt (so the request differs and no cached reply answers it); a second empty one
    makes ``UserReply.error`` and the episode ends with ``user_error``.
    """

    RETRY_NOTE = "\n\nYour previous reply was empty. Write your next message to the agent now."

    def __init__(self, client: Any, task: Task, *, tools: Any = None, scenario_id: str | None = None,
                 system_prompt: str | None = None, temperature: float | None = None, max_tokens: int | None = None):
        self.client = client
        self.task = task
        self.tools = user_function_tools(tools)
        self.scenario_id = scenario_id or task_key(task)
        self.system_prompt = system_prompt or task.user_prompt or default_user_prompt(task)
        self.temperature = temperature
        self.max_tokens = max_tokens

    @classmethod
    def for_task(cls, settings: Any, task: Task, *, tools: Any = None, budget: Any = None, ledger: Any = None,
                 run_id: str | None = None, **kw: Any) -> "LLMUser":
        from awm_core.llm import LLMClient

        return cls(LLMClient.for_role(settings, USER_ROLE, budget=budget, ledger=ledger, run_id=run_id), task,
                   tools=tools, **kw)

    def reply(self, history: list[dict[str, Any]]) -> UserReply:
        attempt = 1 + sum(1 for m in history if m.get("role") == "assistant")
        prompt_tokens = completion_tokens = 0
        seconds = 0.0
        for system in (self.system_prompt, self.system_prompt + self.RETRY_NOTE):
            messages = [{"role": "system", "content": system}, *history]
            t0 = time.perf_counter()
            result = self.client.chat(messages, stage=USER_STAGE, scenario_id=self.scenario_id, attempt=attempt,
                                      tools=self.tools, temperature=self.temperature, max_tokens=self.max_tokens)
            seconds += time.perf_counter() - t0
            prompt_tokens += result.record.prompt_tokens or 0
            completion_tokens += result.record.completion_tokens or 0
            text = result.content or ""
            if text.strip() or result.tool_calls:
                return UserReply(text=text if text.strip() else None, tool_calls=list(result.tool_calls),
                                 prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, seconds=seconds)
        return UserReply(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, seconds=seconds,
                         error=f"the user simulator gave an empty reply twice (reply {attempt}, "
                               f"{self.scenario_id}; finish_reason {result.finish_reason!r})")


# --------------------------------------------------------------------------- scripted user


def solution_ranges(solution: ReferenceSolution) -> list[tuple[int, int]]:
    """The reference's calls split by ``turn_ends``: range j answers user message j.

    Range j is ``calls[turn_ends[j-1] (or 0) : turn_ends[j]]``; without ``turn_ends`` one range holds
    every call; calls after the last ``turn_ends`` entry make a last range. In each range the user's
    calls (``requestor="user"``) come first, then the agent's. ``ReferencePolicy`` and
    ``ScriptedUser`` share this rule.
    """
    n = len(solution.calls)
    bounds = [e for e in solution.turn_ends if 0 <= e <= n]
    if not bounds or bounds[-1] < n:
        bounds.append(n)
    out, start = [], 0
    for end in bounds:
        out.append((start, max(start, end)))
        start = max(start, end)
    return out


class ScriptedUser:
    """A deterministic user from a task's reference solution: no model, same conversation every time.

    Reply k (k = 0 answers the greeting) first makes the user calls of range k of ``solution_ranges``
    (one per reply, so a ``$ref`` may use an earlier user call's result), then writes: for k = 0 the
    scenario's reason for calling and what the user knows (the instructions themselves when they are a
    string; the task text without a scenario); later "I have done that: <tools>." after its own calls,
    else "Yes, go ahead."; once every range is done (k >= number of ranges) ``###STOP###``.
    The state is read from the history, so the same object may serve several episodes of the task.
    """

    GO_AHEAD = "Yes, go ahead."

    def __init__(self, task: Task, solution: ReferenceSolution):
        self.task = task
        self.solution = solution
        self.ranges = solution_ranges(solution)

    def opening_text(self) -> str:
        scenario = self.task.user_scenario or {}
        instructions = scenario.get("instructions")
        if isinstance(instructions, str) and instructions.strip():
            return instructions.strip()
        if isinstance(instructions, dict) and instructions.get("reason_for_call"):
            parts = [str(instructions["reason_for_call"]).strip()]
            if instructions.get("known_info"):
                parts.append(str(instructions["known_info"]).strip())
            return " ".join(parts)
        return self.task.text

    def reply(self, history: list[dict[str, Any]]) -> UserReply:
        texts = [i for i, m in enumerate(history) if m.get("role") == "assistant" and not m.get("tool_calls")]
        k = len(texts)  # user texts written so far: this is reply k
        since = history[texts[-1] + 1:] if texts else history
        done = [m for m in since if m.get("role") == "tool"]
        if k >= len(self.ranges):
            return UserReply(text=STOP)
        start, end = self.ranges[k]
        mine = [i for i in range(start, end) if self.solution.calls[i].requestor == "user"]
        if len(done) < len(mine):
            idx = mine[len(done)]
            call = self.solution.calls[idx]
            arguments = resolve_refs(call.arguments, self._own_results(history), idx)
            return UserReply(tool_calls=[{"id": f"user_call_{idx}", "type": "function", "function": {
                "name": call.tool, "arguments": json.dumps(arguments, ensure_ascii=False)}}])
        if k == 0:
            text = self.opening_text()
        elif mine:
            names = ", ".join(dict.fromkeys(self.solution.calls[i].tool for i in mine))
            text = f"I have done that: {names}."
        else:
            text = self.GO_AHEAD
        return UserReply(text=text)

    @staticmethod
    def _own_results(history: list[dict[str, Any]]) -> dict[int, Any]:
        """Results of the user's earlier calls by call index (from the ids it gave them)."""
        out: dict[int, Any] = {}
        for m in history:
            cid = m.get("tool_call_id") if m.get("role") == "tool" else None
            if isinstance(cid, str) and cid.startswith("user_call_") and cid[10:].isdigit():
                out[int(cid[10:])] = m.get("content")
        return out


# --------------------------------------------------------------------------- the mode of an episode

MODES = ("message", "conversation")
CONVERSATION_FLAVOURS = ("tau2",)  # benchmarks whose tasks are conversations in every mode


def plays_as_conversation(env: Any, task: Task, mode: str) -> bool:
    """Whether an episode of ``env``'s ``task`` is a conversation with a user simulator, in ``mode``.

    The one rule evaluation and training share: a task of an imported conversational benchmark
    (flavour ``tau2``) always is; any other task is one when ``mode`` is ``conversation`` and the task has
    a user scenario (``Task.conversational``); else it is one message, ``task.text``.
    """
    if mode not in MODES:
        from awm_core.errors import AWMError

        raise AWMError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if env.flavour in CONVERSATION_FLAVOURS:
        return True
    return mode == "conversation" and task.conversational


def episode_mode(env: Any, task: Task, mode: str) -> str:
    """What a rollout row records as its ``mode``: ``conversation`` or ``message`` (``plays_as_conversation``)."""
    return "conversation" if plays_as_conversation(env, task, mode) else "message"


def conversation_system_prompt(env: Any, task: Task, interface: str) -> str | None:
    """The agent's system prompt in a conversation of ``env``'s ``task``: None when the task brings its own
    (tau2's, which ``run_episode`` uses), else the loop's default prompt for ``interface`` with the
    environment's policy (``policy_system_prompt``; the default prompt alone when it has none)."""
    if task.system_prompt:
        return None
    from awm_core.agent.loop import policy_system_prompt

    return policy_system_prompt(interface, getattr(env, "policy", None))


def missing_scenarios(planned: Iterable[tuple[Any, Task]]) -> tuple[int, list[Task]]:
    """Of the planned ``(environment, task)`` pairs that conversation mode would play with a user (every
    flavour but the conversational benchmarks'): how many there are, and those without a user scenario."""
    count, missing = 0, []
    for env, task in planned:
        if env.flavour in CONVERSATION_FLAVOURS:
            continue
        count += 1
        if not task.conversational:
            missing.append(task)
    return count, missing


def check_conversation_mode(mode: str, planned: Iterable[tuple[Any, Task]], snapshot: int | None) -> list[Task]:
    """Refuse conversation mode when none of the planned synthesized tasks has a user scenario (a snapshot
    made before the generator wrote scenarios), naming the snapshot and how to make them. Returns the tasks
    without a scenario when only some lack one: those are played as one message."""
    if mode != "conversation":
        return []
    count, missing = missing_scenarios(planned)
    if count and len(missing) == count:
        from awm_core.errors import AWMError

        where = f"snapshot {snapshot}" if snapshot is not None else "the snapshot"
        raise AWMError(f"mode conversation needs user scenarios, and none of the {count} planned task(s) of {where} "
                       f"has one ({', '.join(t.id for t in missing[:3])}{', ...' if count > 3 else ''}): make them "
                       f"with `awm generate --include-existing` (it writes the existing environments' user "
                       f"scenarios, reusing their cached stages), or use mode message")
    return missing


# --------------------------------------------------------------------------- choosing a user

USER_KINDS = ("llm", "scripted")


def check_user_role(settings: Any, tasks: Iterable[Task] = ()) -> None:
    """Fail before any episode when the ``user`` role cannot answer ``tasks``: an http back end needs an
    endpoint; the offline back end needs a recorded conversation for each task."""
    from awm_core.errors import AWMError
    from awm_core.llm.offline import fixture_path

    role = settings.llm.user
    fixes = ("set AWM_LLM__USER__BACKEND=http and AWM_LLM__USER__BASE_URL (or OPENAI_BASE_URL), or play the "
             "scripted user (--user scripted)")
    if role.backend == "http" and not role.base_url:
        raise AWMError(f"the user simulator (LLM role 'user') has no endpoint: {fixes}")
    if role.backend == "offline":
        missing = [task_key(t) for t in tasks
                   if not fixture_path(settings.llm.fixtures_dir, task_key(t), USER_STAGE).is_file()]
        if missing:
            raise AWMError(f"the user simulator (LLM role 'user') is offline and has no recorded conversation for "
                           f"{len(missing)} task(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} "
                           f"under {settings.llm.fixtures_dir}): {fixes}")


def user_for(kind: str, task: Task, *, settings: Any = None, solution: ReferenceSolution | None = None,
             tools: Any = None, budget: Any = None, ledger: Any = None, run_id: str | None = None) -> User:
    """The user of one conversational episode: ``llm`` (role ``user``) or ``scripted`` (needs the reference)."""
    from awm_core.errors import AWMError

    if kind == "scripted":
        if solution is None:
            raise AWMError(f"the scripted user of {task_key(task)} needs the task's reference solution")
        return ScriptedUser(task, solution)
    if kind == "llm":
        return LLMUser.for_task(settings, task, tools=tools, budget=budget, ledger=ledger, run_id=run_id)
    raise AWMError(f"unknown user {kind!r}; choose from {', '.join(USER_KINDS)}")


def play_reference(pool: Any, environment: Any, task_idx: int, settings: Any,
                   solution: ReferenceSolution | None = None) -> tuple[Any, Any]:
    """A task played as a conversation by its reference (or ``solution``), then verified: the reference
    policy makes the agent's calls, the scripted user tells what its scenario says it knows, makes the
    user's own calls turn by turn (τ²'s telecom) and stops once all are done. Returns (episode, outcome)."""
    from awm_core.agent.loop import run_episode
    from awm_core.agent.policies import ReferencePolicy
    from awm_core.agent.rewards import verify_episode

    solution = solution or environment.solution(task_idx)
    task = environment.task(task_idx)
    handle = pool.load(environment)
    n = len(solution.calls)
    with handle.open_session() as session:
        episode = run_episode(ReferencePolicy(solution), session, task, handle.tools(), window=None,
                              max_turns=n + 2, user=ScriptedUser(task, solution), user_tools=handle.user_tools(),
                              max_steps=4 * n + 20)
    return episode, verify_episode(pool, environment, task_idx, episode, settings)


class RunUsers:
    """Who plays the user of each conversation of one run (an evaluation or a training run): one kind, one
    ledger, and one LLM budget for every user simulator call (``budget``, else made on the first LLM user)."""

    def __init__(self, settings: Any, kind: str, *, run_id: str | None, ledger: Any = None, budget: Any = None):
        self.settings, self.kind, self.run_id, self.ledger, self.budget = settings, kind, run_id, ledger, budget
        self._lock = threading.Lock()

    def user(self, env: Any, task_idx: int, tools: Any, mode: str, kind: str | None = None) -> User | None:
        """The user of one episode of ``env``'s task ``task_idx`` in ``mode`` (None: the task is one message);
        ``kind`` overrides the run's (a warm start replays references with the scripted user)."""
        task = env.task(task_idx)
        if not plays_as_conversation(env, task, mode):
            return None
        kind = kind or self.kind
        if kind == "llm":
            with self._lock:
                if self.budget is None:
                    from awm_core.llm.shared_budget import run_budget

                    self.budget = run_budget(self.settings, self.run_id or "run")
        return user_for(kind, task, settings=self.settings, solution=env.solution(task_idx), tools=tools,
                        budget=self.budget, ledger=self.ledger, run_id=self.run_id)


def conversation_args(env: Any, task: Task, user: User | None, user_tools: Any, *, interface: str,
                      max_steps: int, max_errors: int) -> dict[str, Any]:
    """``run_episode``'s keyword arguments for a conversation with ``user`` (none without a user): the user,
    its tools, tau2's limits, and the agent's system prompt with the environment's policy
    (``conversation_system_prompt``; a task that brings its own prompt, tau2's, keeps it)."""
    if user is None:
        return {}
    args = {"user": user, "user_tools": user_tools, "max_steps": max_steps, "max_errors": max_errors}
    prompt = conversation_system_prompt(env, task, interface)
    if prompt is not None:
        args["system_prompt"] = prompt
    return args

"""Policy back ends: an OpenAI-compatible endpoint, raw text generation, and two offline policies.

- ``OpenAIChatPolicy``: chat completions with native tool calls (OpenAI, vLLM, any compatible server).
- ``TextToolCallPolicy``: wraps ``generate(messages) -> str`` (a local model, or an endpoint used
  without tools); the model writes ``<tool_call>`` blocks and the loop parses them. The trainer
  plugs its model in here.
- ``ReferencePolicy``: replays a task's reference solution, then gives its final answer.
- ``RandomPolicy``: calls random tools with schema-valid random arguments, then gives up.

The offline policies keep per-episode state: make one per episode.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from typing import Any, Callable

from awm_core.agent.base import PolicyReply
from awm_core.agent.interfaces import META_TOOLS
from awm_core.agent.parsing import format_text_tool_call
from awm_core.models import ReferenceSolution, resolve_refs

# --------------------------------------------------------------------------- OpenAI endpoint


class OpenAIChatPolicy:
    """Chat completions with native tool calls through the ``openai`` package.

    ``extra_body`` goes to the server as is (vLLM: ``{"chat_template_kwargs": {"enable_thinking": False}}``).
    ``headers`` are extra HTTP headers per request: a dict, or ``headers(messages) -> dict`` (for a
    gateway that routes or traces by header). Pass ``client`` to reuse an ``openai.OpenAI``
    instance (connection pool shared by threads).
    """

    def __init__(self, base_url: str | None, model: str, api_key: str | None = None, *,
                 temperature: float = 1.0, max_tokens: int | None = 2048, timeout_s: float = 120.0,
                 max_retries: int = 2, extra_body: dict[str, Any] | None = None,
                 headers: dict[str, str] | Callable[[list[dict[str, Any]]], dict[str, str]] | None = None,
                 client: Any = None):
        if not model:
            raise ValueError("OpenAIChatPolicy needs a model name")
        if client is None:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s,
                                   max_retries=max_retries)
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = extra_body
        self.headers = headers

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if tools:
            kwargs["tools"] = tools
        if self.max_tokens:
            kwargs["max_tokens"] = self.max_tokens
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        if self.headers:
            kwargs["extra_headers"] = self.headers(messages) if callable(self.headers) else self.headers
        resp = self.client.chat.completions.create(**kwargs)
        msg = resp.choices[0].message
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in (msg.tool_calls or [])]
        usage = getattr(resp, "usage", None)
        return PolicyReply(text=msg.content or "", tool_calls=calls,
                           prompt_tokens=getattr(usage, "prompt_tokens", None),
                           completion_tokens=getattr(usage, "completion_tokens", None))


# --------------------------------------------------------------------------- raw text


@dataclass
class Generation:
    """What a ``generate`` callable may return instead of a bare string, to report tokens."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def tools_system_block(tools: list[dict[str, Any]]) -> str:
    """Tool descriptions for the system prompt in the Hermes/Qwen3 style the models were tuned on."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


class TextToolCallPolicy:
    """A model that writes text; tool calls are ``<tool_call>`` blocks the loop parses.

    ``generate(messages) -> str | Generation`` gets chat messages. With ``tools_in_system=True``
    (default) the tool signatures are appended to the system message, as Qwen3's chat template
    would; with ``False`` they are passed on as ``generate(messages, tools)`` so a tokenizer's
    own chat template can render them. Tool results keep ``role="tool"`` (Qwen3 templates wrap
    them in ``<tool_response>``) unless ``tool_role="user"``, for endpoints that accept only
    system/user/assistant: they then become user messages wrapped in ``<tool_response>``.
    ``render`` is exactly what ``generate`` receives, for building training samples.
    """

    def __init__(self, generate: Callable[..., str | Generation], *, tools_in_system: bool = True,
                 tool_role: str = "tool"):
        if tool_role not in ("tool", "user"):
            raise ValueError(f"tool_role must be 'tool' or 'user', got {tool_role!r}")
        self.generate = generate
        self.tools_in_system = tools_in_system
        self.tool_role = tool_role

    @classmethod
    def for_endpoint(cls, base_url: str | None, model: str, api_key: str | None = None, *,
                     temperature: float = 1.0, max_tokens: int | None = 2048, timeout_s: float = 120.0,
                     headers: dict[str, str] | Callable[[list[dict[str, Any]]], dict[str, str]] | None = None,
                     client: Any = None) -> "TextToolCallPolicy":
        """Text generation through a chat-completions endpoint called without ``tools``.

        ``headers`` as for ``OpenAIChatPolicy``.
        """
        if client is None:
            import openai

            client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=2)

        def generate(messages: list[dict[str, Any]]) -> Generation:
            kwargs: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature}
            if max_tokens:
                kwargs["max_tokens"] = max_tokens
            if headers:
                kwargs["extra_headers"] = headers(messages) if callable(headers) else headers
            resp = client.chat.completions.create(**kwargs)
            usage = getattr(resp, "usage", None)
            return Generation(resp.choices[0].message.content or "", getattr(usage, "prompt_tokens", None),
                              getattr(usage, "completion_tokens", None))

        return cls(generate, tool_role="user")

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            role = m.get("role")
            if role == "system" and self.tools_in_system and tools:
                out.append({"role": "system", "content": (m.get("content") or "") + tools_system_block(tools)})
            elif role == "assistant":
                out.append({"role": "assistant", "content": _assistant_text(m)})
            elif role == "tool" and self.tool_role == "user":
                out.append({"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"})
            elif role == "tool":
                out.append({"role": "tool", "content": m.get("content", "")})
            else:
                out.append(m)
        if self.tools_in_system and tools and not any(m.get("role") == "system" for m in messages):
            out.insert(0, {"role": "system", "content": tools_system_block(tools).lstrip()})
        return out

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
        rendered = self.render(messages, tools)
        out = self.generate(rendered) if self.tools_in_system else self.generate(rendered, tools)
        if isinstance(out, Generation):
            return PolicyReply(text=out.text, tool_calls=None, prompt_tokens=out.prompt_tokens,
                               completion_tokens=out.completion_tokens)
        if not isinstance(out, str):
            raise TypeError(f"generate must return str or Generation, got {type(out).__name__}")
        return PolicyReply(text=out, tool_calls=None)


def _assistant_text(message: dict[str, Any]) -> str:
    """An assistant message as the text a model would have written (native calls become blocks)."""
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    if not calls or "<tool_call>" in text:
        return text
    blocks = []
    for c in calls:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        blocks.append(format_text_tool_call(fn["name"], args))
    return "\n".join([text, *blocks]) if text else "\n".join(blocks)


# --------------------------------------------------------------------------- offline policies


def _is_meta(tools: list[dict[str, Any]]) -> bool:
    return {t["function"]["name"] for t in tools} == set(META_TOOLS)


def _reply(name: str, arguments: dict[str, Any], style: str, call_id: str) -> PolicyReply:
    if style == "text":
        return PolicyReply(text=format_text_tool_call(name, arguments))
    return PolicyReply(text="", tool_calls=[{"id": call_id, "name": name, "arguments": arguments}])


class ReferencePolicy:
    """Replays the reference solution's calls, then answers its final answer.

    With the meta interface it first calls ``list_tools``, then wraps each call in ``call_tool``.
    ``style="text"`` writes ``<tool_call>`` blocks (exercising the parser); ``"native"`` returns
    native calls. It costs no time, which makes it the zero-latency policy of the benchmarks.
    ``$ref`` arguments are resolved from the tool results the loop shows it (the last message
    after each of its calls); a ref it cannot resolve raises ``SolutionRefError``. For a scripted
    task it answers each user message once that message's calls (``turn_ends``) are made.

    Calls the user makes (``requestor="user"``, tau2's dual control) are skipped: in a conversation
    with ``ScriptedUser`` the user makes them. Both follow the rule of ``users.solution_ranges``: range j of the
    calls answers user message j, its user calls first, then the agent's; in turn j this policy makes
    the agent calls of range j, then answers. A ``$ref`` to a user call's result cannot be resolved here.
    """

    DEFAULT_ANSWER = "Done."

    def __init__(self, solution: ReferenceSolution, *, style: str = "text"):
        if style not in ("text", "native"):
            raise ValueError(f"style must be 'text' or 'native', got {style!r}")
        self.solution = solution
        self.style = style
        self._step = 0
        self._listed = False
        self._results: dict[int, Any] = {}
        self._awaiting: int | None = None
        self._turn = 0  # user messages answered so far (scripted tasks: one per ``turn_ends`` entry)

    def _take_result(self, messages: list[dict[str, Any]]) -> None:
        # With a history window of 0 the result is not shown; a ref to it then fails clearly.
        last = messages[-1] if messages else None
        if self._awaiting is not None and isinstance(last, dict) and last.get("role") == "tool":
            self._results[self._awaiting] = last.get("content")
        self._awaiting = None

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
        self._take_result(messages)
        meta = _is_meta(tools) and not any(c.tool in META_TOOLS for c in self.solution.calls)
        if meta and not self._listed:
            self._listed = True
            return _reply("list_tools", {}, self.style, "ref_list")
        ends = self.solution.turn_ends
        turn_end = ends[self._turn] if self._turn < len(ends) else len(self.solution.calls)
        while self._step < turn_end and self.solution.calls[self._step].requestor == "user":
            self._step += 1  # the user's own call: the user makes it
        if self._step < turn_end:
            call = self.solution.calls[self._step]
            arguments = resolve_refs(call.arguments, self._results, self._step)
            self._awaiting = self._step
            self._step += 1
            if meta:
                return _reply("call_tool", {"tool_name": call.tool, "arguments": arguments}, self.style,
                              f"ref_{self._step}")
            return _reply(call.tool, arguments, self.style, f"ref_{self._step}")
        self._turn += 1
        answer = (self.solution.final_answer if self._turn >= len(ends) else None) or self.DEFAULT_ANSWER
        return PolicyReply(text=answer, tool_calls=None if self.style == "text" else [])


class RandomPolicy:
    """Calls ``calls`` random tools with schema-valid random arguments, then gives up.

    A baseline that should score low and must never crash the loop or the environment.
    """

    GIVE_UP = "I could not complete the task."

    def __init__(self, seed: int = 0, *, calls: int = 3, style: str = "text"):
        self.rng = random.Random(seed)
        self.calls = calls
        self.style = style
        self._made = 0
        self._listing: list[dict[str, Any]] | None = None

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> PolicyReply:
        if self._made >= self.calls:
            return PolicyReply(text=self.GIVE_UP, tool_calls=None if self.style == "text" else [])
        self._made += 1
        if not _is_meta(tools):
            fn = self.rng.choice(tools)["function"]
            return _reply(fn["name"], random_arguments(fn.get("parameters") or {}, self.rng), self.style,
                          f"rand_{self._made}")
        if self._listing is None:
            self._listing = _last_listing(messages)
        if not self._listing:
            return _reply("list_tools", {}, self.style, f"rand_{self._made}")
        tool = self.rng.choice(self._listing)
        args = random_arguments(tool.get("input_schema") or {}, self.rng)
        return _reply("call_tool", {"tool_name": tool["name"], "arguments": args}, self.style, f"rand_{self._made}")


def _last_listing(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    for m in reversed(messages):
        if m.get("role") == "tool":
            try:
                data = json.loads(m.get("content") or "")
            except (json.JSONDecodeError, TypeError):
                continue
            if isinstance(data, list) and all(isinstance(t, dict) and "name" in t for t in data):
                return data
    return None


_WORDS = ["alpha", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper"]


def random_arguments(schema: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Random arguments valid against an object JSON schema: every required property, some optional ones."""
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    out = {}
    for name, sub in props.items():
        if name in required or rng.random() < 0.5:
            out[name] = random_value(sub if isinstance(sub, dict) else {}, rng)
    return out


def random_value(schema: dict[str, Any], rng: random.Random, depth: int = 0) -> Any:
    """A random value of a (sub)schema: enum, const, anyOf/oneOf, the basic types, arrays, objects."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf"):
        options = [s for s in schema.get(key) or [] if isinstance(s, dict) and s.get("type") != "null"]
        if options:
            return random_value(rng.choice(options), rng, depth + 1)
    typ = schema.get("type", "string")
    if isinstance(typ, list):
        typ = rng.choice([t for t in typ if t != "null"] or ["null"])
    if typ == "integer":
        lo, hi = schema.get("minimum", 1), schema.get("maximum", 5)
        return rng.randint(int(lo), max(int(lo), int(hi)))
    if typ == "number":
        lo, hi = schema.get("minimum", 0.0), schema.get("maximum", 100.0)
        return round(rng.uniform(float(lo), max(float(lo), float(hi))), 2)
    if typ == "boolean":
        return rng.random() < 0.5
    if typ == "null":
        return None
    if typ == "array":
        if depth > 3:
            return []
        n = rng.randint(schema.get("minItems", 0), max(schema.get("minItems", 0), min(schema.get("maxItems", 2), 2)))
        return [random_value(schema.get("items") or {}, rng, depth + 1) for _ in range(n)]
    if typ == "object":
        return random_arguments(schema, rng) if depth <= 3 else {}
    fmt = schema.get("format")
    if fmt == "date":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "date-time":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00"
    word = rng.choice(_WORDS)
    if rng.random() < 0.3:
        word += "_" + "".join(rng.choices(string.ascii_lowercase, k=3))
    lo = schema.get("minLength", 0)
    return word if len(word) >= lo else word + "x" * (lo - len(word))

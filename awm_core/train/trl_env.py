"""Catalog environments for stock TRL: ``GRPOTrainer(..., environment_factory=...)``.

TRL finds an environment's tools with ``inspect.getmembers`` on the *class* and reads each one's
JSON schema from its signature and Google-style ``Args:`` docstring, so one class is built per
environment from the tool schemas the sandbox reports. Every tool method forwards to a
``Session`` of the ``SandboxPool``: generated code runs only in sandbox workers, never in the
trainer process. ``reset(env_id=..., task_idx=...)`` (the dataset's columns) puts the session
back on the environment's initial database; ``awm_reward`` (through each instance's ``_reward``) runs the task's verifier on
(initial, final database, final answer) and maps its verdict with ``settings.rewards``.

    factory = trl_environment_factory(pool, environments)
    trainer = GRPOTrainer(model=..., processing_class=tok, train_dataset=trl_dataset(environments),
                          reward_funcs=[awm_reward], environment_factory=factory, args=GRPOConfig(...))
"""
from __future__ import annotations

import inspect
import keyword
from typing import Any, Callable, Sequence

from awm_core.agent.rewards import VERDICT_LABELS, reward_for
from awm_core.errors import AWMError
from awm_core.models import Environment

_JSON_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool,
                               "array": list, "object": dict}


class ToolCallFailed(Exception):
    """A tool call the environment refused; TRL shows the message to the model as ``{"error": ...}``."""


def _annotation(schema: dict[str, Any]) -> Any:
    t = schema.get("type")
    if isinstance(t, list):  # ["string", "null"] and the like: the first concrete type
        t = next((x for x in t if x != "null"), "string")
    return _JSON_TYPES.get(t, str)


def _tool_method(name: str, description: str, schema: dict[str, Any]) -> Callable[..., str]:
    props: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    for arg in props:
        if not arg.isidentifier() or keyword.iskeyword(arg):
            raise AWMError(f"tool {name!r} has argument {arg!r}, which cannot be a Python parameter name")
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    ordered = sorted(props, key=lambda a: a not in required)  # required ones first, as Python demands
    for arg in ordered:
        ann = _annotation(props[arg])
        default = inspect.Parameter.empty if arg in required else None
        params.append(inspect.Parameter(arg, inspect.Parameter.KEYWORD_ONLY, annotation=ann if arg in required
                                        else ann | None, default=default))

    def tool(self, **kwargs: Any) -> str:
        return self._call(name, {k: v for k, v in kwargs.items() if v is not None or k in required})

    lines = [(description or name).strip().splitlines()[0] if (description or "").strip() else name]
    if ordered:
        lines += ["", "Args:"]
        for arg in ordered:
            text = " ".join(str(props[arg].get("description") or arg).split())
            lines.append(f"    {arg}: {text}")
    tool.__name__ = tool.__qualname__ = name
    tool.__doc__ = "\n".join(lines)
    tool.__signature__ = inspect.Signature(params, return_annotation=str)
    tool.__annotations__ = {p.name: p.annotation for p in params[1:]} | {"return": str}
    return tool


def trl_environment_class(pool: Any, environment: Environment, settings: Any = None) -> type:
    """A class for TRL's ``environment_factory``: one method per tool of ``environment``."""
    from awm_core.settings import get_settings

    settings = settings if settings is not None else get_settings()
    handle = pool.load(environment)
    tools = handle.tools()
    reserved = {"reset", "get_reward", "environment"}
    members: dict[str, Any] = {}
    for info in tools:
        if not info.name.isidentifier() or keyword.iskeyword(info.name) or info.name.startswith("_") \
                or info.name in reserved:
            raise AWMError(f"{environment.id}: tool name {info.name!r} cannot be a method name for TRL")
        members[info.name] = _tool_method(info.name, info.description, info.input_schema)

    def __init__(self) -> None:
        self.session = None
        self.task_idx: int | None = None
        self.env_error: str | None = None

    def reset(self, **columns: Any) -> None:
        if columns.get("env_id", environment.id) != environment.id:
            raise AWMError(f"row for {columns['env_id']!r} reached the {environment.id!r} environment; "
                           "pass a dict factory and an 'environment' column for several environments")
        if "task_idx" not in columns:
            raise AWMError("each dataset row needs a 'task_idx' column (trl_dataset builds it)")
        task_idx = int(columns["task_idx"])
        if environment.verifier(task_idx) is None:
            raise AWMError(f"{environment.id} has no verifier for task {task_idx}")
        if self.session is None or self.session.closed:
            self.session = handle.open_session()
        else:
            self.session.reset()
        self.task_idx, self.env_error = task_idx, None
        return None

    def _call(self, tool: str, args: dict[str, Any]) -> str:
        if self.session is None:
            raise AWMError("reset() was not called before a tool call")
        result = self.session.call(tool, args)
        if result.ok:
            return result.text()
        if result.error_kind == "environment":
            self.env_error = result.error
        raise ToolCallFailed(f"{result.error_kind}: {result.error}")

    def _reward(self, final_answer: str | None) -> float:
        """The episode's reward: verifier verdict on the session's database, through ``settings.rewards``."""
        if self.session is None or self.task_idx is None:
            raise AWMError("a reward was asked for before reset()")
        if self.env_error:
            return reward_for("environment_error", settings)
        try:
            final_db = self.session.snapshot()
        except AWMError:
            return reward_for("environment_error", settings)
        v = pool.verify(environment, self.task_idx, initial_db=handle.snapshot, final_db=final_db,
                        final_answer=final_answer)
        if v.verdict is None:
            # A failed or evidence-only verifier is not the policy's fault.
            return reward_for("environment_error", settings)
        return reward_for(VERDICT_LABELS[v.verdict], settings)

    def _close(self) -> None:
        if self.session is not None:
            self.session.close()

    # Public methods are tools to TRL, so everything else is underscored.
    members.update(__init__=__init__, reset=reset, _call=_call, _reward=_reward, _close=_close,
                   __doc__=f"The {environment.id} environment, served by a sandbox session.",
                   environment=environment)
    cls_name = "".join(p.capitalize() for p in environment.id.replace("-", "_").split("_") if p) or "Env"
    return type(f"{cls_name}Env", (), members)


def trl_environment_factory(pool: Any, environments: Sequence[Environment], settings: Any = None
                            ) -> Callable[[], Any] | dict[str, Callable[[], Any]]:
    """TRL's ``environment_factory``: the class itself for one environment, ``{env_id: class}`` for
    several (then the dataset's ``environment`` column picks one, as ``trl_dataset`` writes it)."""
    if not environments:
        raise AWMError("no environments given")
    classes = {e.id: trl_environment_class(pool, e, settings) for e in environments}
    return next(iter(classes.values())) if len(classes) == 1 else classes


def trl_dataset(environments: Sequence[Environment], *, system: str | None = None):
    """A ``datasets.Dataset`` of one conversational prompt per verifiable task, with the
    ``env_id``/``task_idx`` columns ``reset`` reads (and ``environment`` when there are several)."""
    from datasets import Dataset

    rows = []
    for env in environments:
        for task in env.tasks:
            if env.verifier(task.idx) is None:
                continue
            prompt = ([{"role": "system", "content": system}] if system else []) + \
                     [{"role": "user", "content": task.text}]
            row = {"prompt": prompt, "env_id": env.id, "task_idx": task.idx}
            if len(environments) > 1:
                row["environment"] = env.id
            rows.append(row)
    if not rows:
        raise AWMError("no task with a verifier in the given environments")
    return Dataset.from_list(rows)


def _final_text(completion: Any) -> str | None:
    if isinstance(completion, str):
        return completion
    for message in reversed(completion or []):
        if message.get("role") == "assistant" and message.get("content"):
            return message["content"] if isinstance(message["content"], str) else str(message["content"])
    return None


def awm_reward(completions: list[Any], environments: list[Any] | None = None, **_: Any) -> list[float]:
    """TRL reward function: each rollout's environment verifies its own session; the last
    assistant text is the final answer."""
    if environments is None:
        raise AWMError("awm_reward needs environment_factory environments (TRL passes them as 'environments')")
    return [env._reward(_final_text(c)) for c, env in zip(completions, environments)]


__all__ = ["ToolCallFailed", "awm_reward", "trl_dataset", "trl_environment_class", "trl_environment_factory"]

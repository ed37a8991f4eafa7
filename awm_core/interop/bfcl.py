"""BFCL multi-turn interop: the ``bfcl-eval`` package's entries <-> Environment bundles.

The package is read as files, never imported here: its pinned dependencies (numpy 1.26 and a long
list of provider SDKs) clash with this project's, and its backend code is untrusted like any
environment code. ``locate`` finds it installed (a ``bfcl_eval`` folder on the import path, found
without running it) or in a downloaded wheel. The constants it needs (which module holds which
class, the stateless classes, the prompt BFCL sends when functions are added) are read from its
source with ``ast``. Each entry becomes one environment of the ``bfcl`` flavour
(``awm_core.runtime.bfcl_env``): one task whose user turns are BFCL's turns, BFCL's function docs as
tools, a ``bfcl`` verifier holding the ground truth, and the ground truth as the reference solution.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awm_core.errors import BfclError
from awm_core.interop.wheels import PackageFiles, folder_files, open_package
from awm_core.models import (
    ApiSpec,
    EnvCode,
    Environment,
    ParamSpec,
    Provenance,
    ReferenceSolution,
    Scenario,
    Task,
    ToolCall,
    ToolSpec,
    UserTurn,
    ValidationCheck,
    ValidationReport,
    Verifier,
    slugify,
)
from awm_core.runtime.bfcl_env import CHECKER_MODULE, UTILS_MODULE, json_schema

CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
ALL_CATEGORIES = ",".join(CATEGORIES)
PACKAGE = "bfcl_eval"
CONSTANTS = "constants/executable_backend_config.py"
PROMPTS = "constants/default_prompts.py"
FUNC_DOC_DIR = "data/multi_turn_func_doc"
SYSTEM_PROMPT = (
    "You complete the user's requests by calling the functions you are given. Work step by step: call a "
    "function, read its result, then decide the next step. If a request lacks a value a function needs, or no "
    "function can do it, say so in plain text instead of guessing. When you have done what the current request "
    "asks, reply in plain text with no function call; the user may then ask for more."
)


BfclPackage = PackageFiles


def locate(wheel: str | Path | None = None) -> BfclPackage:
    """The bfcl-eval package: ``wheel`` (a ``.whl`` file or an unpacked ``bfcl_eval`` folder) or the installed one."""
    if wheel is not None:
        return open_package(wheel, PACKAGE, CONSTANTS, "BFCL", BfclError)
    spec = importlib.util.find_spec(PACKAGE)  # a top-level find runs none of the package's code
    if spec is None or not spec.submodule_search_locations:
        raise BfclError("bfcl-eval is not installed; install it in another environment and pass its folder, or "
                        "pass a wheel: pip download bfcl-eval==2026.3.23 --no-deps, then --wheel FILE")
    root = Path(list(spec.submodule_search_locations)[0])
    try:
        version = importlib.metadata.version("bfcl-eval")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return folder_files(root, version, BfclError, PACKAGE)


# --------------------------------------------------------------------------- constants from source


def _module_constants(source: str) -> dict[str, Any]:
    """Top-level assignments of literals, lists, dicts and f-strings of earlier names."""
    known: dict[str, Any] = {}

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                if isinstance(v, ast.FormattedValue):
                    parts.append(str(value(v.value)))
                else:
                    parts.append(ast.literal_eval(v))
            return "".join(parts)
        if isinstance(node, ast.Name):
            return known[node.id]
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(e) for e in node.elts]
        return ast.literal_eval(node)

    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                known[node.targets[0].id] = value(node.value)
            except (ValueError, KeyError, TypeError):
                continue
    return known


def _imports_of(source: str) -> list[str]:
    """The ``bfcl_eval`` modules a module imports (static imports only)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith(PACKAGE + ".")]
    return found


def _method_params(source: str) -> dict[str, dict[str, list[str]]]:
    """Per class, per public method, its parameter names in order (to name positional ground-truth args)."""
    out: dict[str, dict[str, list[str]]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {f.name: [a.arg for a in (*f.args.posonlyargs, *f.args.args)][1:]
                              for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}
    return out


class _Reader:
    """Reads one release once: constants, module sources, function docs."""

    def __init__(self, package: BfclPackage):
        self.package = package
        consts = _module_constants(package.read_text(CONSTANTS))
        try:
            self.class_modules: dict[str, str] = consts["CLASS_FILE_PATH_MAPPING"]
            self.doc_files: dict[str, str] = consts["MULTI_TURN_FUNC_DOC_FILE_MAPPING"]
            self.stateless: list[str] = consts.get("STATELESS_CLASSES", [])
        except KeyError as exc:
            raise BfclError(f"{package.origin}: {CONSTANTS} has no {exc.args[0]}; is this a supported bfcl-eval?") from None
        prompts = _module_constants(package.read_text(PROMPTS))
        self.added_functions_prompt: str = prompts.get(
            "DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC",
            "I have updated some more functions you can choose from. What about now?")
        self._sources: dict[str, str] = {}
        self._docs: dict[str, list[dict[str, Any]]] = {}
        self._params: dict[str, dict[str, list[str]]] = {}
        self._imports: dict[str, list[str]] = {}

    def source(self, module: str) -> str:
        if module not in self._sources:
            rel = module.removeprefix(PACKAGE + ".").replace(".", "/") + ".py"
            self._sources[module] = self.package.read_text(rel)
        return self._sources[module]

    def modules_for(self, classes: list[str]) -> list[list[str]]:
        """[name, source] of every module the classes and BFCL's checker need, dependencies first."""
        order: list[str] = []

        def visit(module: str, path: tuple[str, ...]) -> None:
            if module in order or module in path:
                return
            if module not in self._imports:
                self._imports[module] = _imports_of(self.source(module))
            for dep in self._imports[module]:
                visit(dep, (*path, module))
            order.append(module)

        for name in classes:
            visit(self.class_modules[name], ())
        visit(CHECKER_MODULE, ())
        visit(UTILS_MODULE, ())
        return [[m, self.source(m)] for m in order]

    def docs(self, class_name: str) -> list[dict[str, Any]]:
        if class_name not in self._docs:
            self._docs[class_name] = self.package.json_lines(f"{FUNC_DOC_DIR}/{self.doc_files[class_name]}")
        return self._docs[class_name]

    def params(self, class_name: str) -> dict[str, list[str]]:
        if class_name not in self._params:
            self._params[class_name] = _method_params(self.source(self.class_modules[class_name])).get(class_name, {})
        return self._params[class_name]


# --------------------------------------------------------------------------- entries -> environments


def parse_call(text: str, params: dict[str, list[str]]) -> ToolCall:
    """One ground-truth call string (``mv(source='a', destination='b')``, ``sort('f')``) as a ToolCall."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise BfclError(f"ground-truth call {text!r} does not parse: {exc.msg}") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise BfclError(f"ground-truth call {text!r} is not a plain function call")
    name = node.func.id
    args: dict[str, Any] = {}
    names = params.get(name, [])
    if len(node.args) > len(names):
        raise BfclError(f"ground-truth call {text!r}: {name} takes {len(names)} positional argument(s)")
    try:
        for pname, arg in zip(names, node.args):
            args[pname] = ast.literal_eval(arg)
        for kw in node.keywords:
            args[kw.arg] = ast.literal_eval(kw.value)
    except ValueError:
        raise BfclError(f"ground-truth call {text!r} has an argument that is not a literal") from None
    return ToolCall(tool=name, arguments=args)


def _param_spec(name: str, schema: dict[str, Any], required: list[str]) -> ParamSpec:
    converted = json_schema(schema)
    return ParamSpec(type=converted.get("type", "string"), description=schema.get("description", ""),
                     required=name in required, enum=schema.get("enum"), items=converted.get("items"),
                     extra={"bfcl_type": schema.get("type")})


def _tool_spec(doc: dict[str, Any], class_name: str) -> ToolSpec:
    parameters = doc.get("parameters") or {}
    required = parameters.get("required") or []
    return ToolSpec(name=doc["name"], description=doc.get("description", ""),
                    parameters={k: _param_spec(k, v, required) for k, v in (parameters.get("properties") or {}).items()},
                    returns=doc.get("response") or {}, group=class_name)


def _turn_text(messages: list[dict[str, Any]]) -> str:
    return "\n\n".join(m["content"] for m in messages if m.get("role") == "user" and m.get("content"))


def environment_of(entry: dict[str, Any], ground_truth: list[list[str]], reader: _Reader, category: str) -> Environment:
    """One BFCL multi-turn entry as an Environment of the ``bfcl`` flavour."""
    entry_id = entry["id"]
    classes: list[str] = entry["involved_classes"]
    unknown = [c for c in classes if c not in reader.class_modules]
    if unknown:
        raise BfclError(f"{entry_id}: unknown backend class(es) {', '.join(unknown)}")
    questions = entry["question"]
    if len(questions) != len(ground_truth):
        raise BfclError(f"{entry_id}: {len(questions)} user turns but {len(ground_truth)} ground-truth turns")
    missed = {int(k): v for k, v in (entry.get("missed_function") or {}).items()}
    turns = []
    for idx, messages in enumerate(questions):
        if idx in missed:
            if messages:
                raise BfclError(f"{entry_id}: turn {idx} adds functions but also has a user message")
            turns.append(UserTurn(text=reader.added_functions_prompt, tools_added=list(missed[idx])))
        else:
            turns.append(UserTurn(text=_turn_text(messages) or "(no message)"))
    if turns[0].tools_added:
        raise BfclError(f"{entry_id}: the first turn cannot add functions")
    docs: dict[str, ToolSpec] = {}
    params: dict[str, list[str]] = {}
    functions: dict[str, dict[str, Any]] = {}
    for class_name in classes:  # later classes win a shared name, as in BFCL's executor
        for doc in reader.docs(class_name):
            docs[doc["name"]] = _tool_spec(doc, class_name)
            functions[doc["name"]] = doc
        params.update(reader.params(class_name))
    calls: list[ToolCall] = []
    turn_ends: list[int] = []
    for turn in ground_truth:
        calls += [parse_call(c, params) for c in turn]
        turn_ends.append(len(calls))
    bundle = {
        "entry_id": entry_id,
        "modules": reader.modules_for(classes),
        "classes": {c: reader.class_modules[c] for c in classes},
        "involved_classes": classes,
        "stateless": [c for c in classes if c in reader.stateless],
        "initial_config": entry.get("initial_config") or {},
        "long_context": "long_context" in entry_id.rsplit("_", 1)[0] or "composite" in entry_id,
        "functions": list(functions.values()),
        "checker": CHECKER_MODULE,
    }
    env_id = slugify(f"bfcl_{entry_id}")
    task = Task(scenario_id=env_id, idx=0, text=turns[0].text, follow_ups=turns[1:], system_prompt=SYSTEM_PROMPT)
    return Environment(
        id=env_id,
        scenario=Scenario(id=env_id, name=f"BFCL {entry_id}", category=f"bfcl_{category}",
                          description=f"BFCL v4 multi-turn entry {entry_id} ({', '.join(classes)})",
                          extra={"bfcl": {"id": entry_id, "category": category, "version": reader.package.version,
                                          "involved_classes": classes, "path": entry.get("path", [])}}),
        tasks=[task],
        api_spec=ApiSpec(tools=list(docs.values())),
        code=EnvCode(flavour="bfcl", source=json.dumps(bundle)),
        verifiers=[Verifier(task_idx=0, style="bfcl", function_name="multi_turn_checker",
                            code=json.dumps({"ground_truth": ground_truth}),
                            success_criteria="BFCL's multi_turn_checker passes the agent's calls")],
        solutions=[ReferenceSolution(task_idx=0, calls=calls, turn_ends=turn_ends)],
        provenance=Provenance(source="bfcl", prompt_version=f"bfcl-eval {reader.package.version}"),
    )


@dataclass
class BfclRead:
    environments: list[Environment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # category -> entries read
    version: str = "unknown"


def parse_categories(value: str | list[str] | None) -> list[str]:
    """``"base,miss_func"`` (or a list) checked against ``CATEGORIES``; empty means all of them."""
    if value is None or value == "" or value == []:
        return list(CATEGORIES)
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in CATEGORIES]
    if bad:
        raise BfclError(f"unknown BFCL multi-turn categor{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; "
                        f"choose from {', '.join(CATEGORIES)}")
    return list(dict.fromkeys(items))


def benchmark_categories(spec: str) -> set[str]:
    """Scenario categories named by a benchmark split: ``bfcl`` (all four) or ``bfcl:base,miss_func``."""
    name, _, categories = spec.partition(":")
    if name != "bfcl":
        raise BfclError(f"unknown benchmark {name!r}; the benchmarks are: bfcl")
    return {f"bfcl_{c}" for c in parse_categories(categories or None)}


def read_package(package: BfclPackage, categories: str | list[str] | None = None,
                 limit: int | None = None) -> BfclRead:
    """Every entry of the chosen categories as environments (``limit``: the first N of each)."""
    reader = _Reader(package)
    out = BfclRead(version=package.version)
    for category in parse_categories(categories):
        name = f"BFCL_v4_multi_turn_{category}.json"
        entries = package.json_lines(f"data/{name}")
        answers = {a["id"]: a["ground_truth"] for a in package.json_lines(f"data/possible_answer/{name}")}
        if limit is not None:
            entries = entries[:limit]
        out.counts[category] = len(entries)
        for entry in entries:
            if entry.get("id") not in answers:
                out.problems.append(f"{category}: {entry.get('id')}: no ground truth in possible_answer/{name}")
                continue
            try:
                out.environments.append(environment_of(entry, answers[entry["id"]], reader, category))
            except (BfclError, KeyError, ValueError) as exc:
                out.problems.append(f"{category}: {entry.get('id')}: {exc}")
    return out


# --------------------------------------------------------------------------- replay


@dataclass
class Replay:
    """BFCL's verdict on its own ground truth replayed through the runtime."""

    env_id: str
    passed: bool
    detail: str
    seconds: float


def replay_ground_truth(pool: Any, environment: Environment, settings: Any) -> Replay:
    """Replay the entry's ground truth as an agent would (turn by turn, through the sandbox) and score it."""
    from awm_core.agent import ReferencePolicy, run_episode, verify_episode

    started = time.perf_counter()
    task = environment.task(0)
    handle = pool.load(environment)
    with handle.open_session() as session:
        # max_turns bounds the replies to each user message: a turn's calls and its answer fit.
        episode = run_episode(ReferencePolicy(environment.solution(0)), session, task, handle.tools(),
                              window=None, max_turns=max(20, len(environment.solution(0).calls) + 1))
    outcome = verify_episode(pool, environment, 0, episode, settings)
    detail = outcome.error or (outcome.verifier_evidence or {}).get("error_message") or ""
    return Replay(environment.id, outcome.verdict == "complete", detail, time.perf_counter() - started)


def with_replay(environment: Environment, replay: Replay) -> Environment:
    """The environment with its ground-truth replay as its validation report.

    A failed replay does not drop the task: the benchmark is scored over all of BFCL's entries,
    as its leaderboard is; the report says which entries no agent can pass.
    """
    check = ValidationCheck(name="bfcl_ground_truth", passed=replay.passed, task_idx=0,
                            detail=replay.detail or "BFCL's checker passes the replayed ground truth")
    return environment.model_copy(update={"validation": ValidationReport(passed=replay.passed, checks=[check])})

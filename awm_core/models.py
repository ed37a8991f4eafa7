"""Typed artifacts of the synthesis pipeline and the Environment bundle.

Every stage produces one of these models; the Environment bundle holds one scenario's
whole set and serialises to one JSON document, the unit the catalog stores, the runtime
loads and ``awm env export`` writes.

Identifiers are stable slugs: a scenario id is ``slugify(name)`` and a task id is
``"<scenario_id>/<task_idx>"``.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from awm_core.errors import ArtifactError, SolutionRefError

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")

Flavour = Literal["native", "awm1k", "bfcl", "tau2"]
# Imported benchmarks: each one's flavour, verifier style and provenance source carry its name. Their
# state is built by their code bundle (the benchmark's own objects): no SQLite schema or seed; their own
# checker scores an episode, and their reference passed it on import instead of our validation.
BENCHMARKS = frozenset({"bfcl", "tau2"})
Verdict = Literal["complete", "partial", "incomplete"]


def slugify(name: str) -> str:
    """Stable identifier for a free-form name: lowercase, ``[a-z0-9_]``, no repeats.

    Same rule as the AWM-1K dataset's scenario keys, so imported ids match theirs.
    """
    slug = re.sub(r"[^a-z0-9_]", "_", name.strip().lower())
    slug = re.sub(r"_+", "_", slug).strip("_")
    if not slug:
        raise ArtifactError("slug", [f"name {name!r} has no letters or digits to make an id from"])
    return slug


def task_id(scenario_id: str, task_idx: int) -> str:
    return f"{scenario_id}/{task_idx}"


def parse_task_id(value: str) -> tuple[str, int]:
    scenario_id, sep, idx = value.rpartition("/")
    if not sep or not idx.isdigit() or not SLUG_RE.match(scenario_id):
        raise ArtifactError("task id", [f"{value!r} is not of the form 'scenario_id/task_idx'"])
    return scenario_id, int(idx)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Artifact(BaseModel):
    """Base of every artifact: strict fields and JSON helpers with readable errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self, **kwargs: Any) -> str:
        return self.model_dump_json(**kwargs)

    @classmethod
    def from_json(cls: type[A], text: str | bytes) -> A:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ArtifactError(cls.__name__, describe_validation_error(exc)) from None

    @classmethod
    def from_data(cls: type[A], data: Any) -> A:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ArtifactError(cls.__name__, describe_validation_error(exc)) from None


A = TypeVar("A", bound=Artifact)


class _LaterFields(Artifact):
    """An artifact with fields added after bundles were published: they are left out of dumps while
    they hold their default, so the digests (and recordings) of every bundle made before them stay
    what they were."""

    _later_fields: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self._later_fields:
                if name in data and getattr(self, name) == type(self).model_fields[name].get_default(
                        call_default_factory=True):
                    del data[name]
        return data


def describe_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem, each naming the field path, e.g. ``tasks.2.text: field required``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(document)"
        lines.append(f"{loc}: {err.get('msg', 'invalid')}")
    return lines


def _slug_field(value: str) -> str:
    if not SLUG_RE.match(value):
        raise ValueError(f"{value!r} is not a slug (lowercase letters, digits and '_')")
    return value


# --------------------------------------------------------------------------- scenario


class Scenario(Artifact):
    id: str = Field(description="slug of the name; the environment id")
    name: str
    description: str
    category: str = "general"
    extra: dict[str, Any] = Field(default_factory=dict, description="fields kept from imports")

    _check_id = field_validator("id")(classmethod(lambda cls, v: _slug_field(v)))

    @classmethod
    def new(cls, name: str, description: str, category: str = "general") -> "Scenario":
        return cls(id=slugify(name), name=name, description=description, category=category)


class UserTurn(Artifact):
    """A later user message of a scripted task, sent once the agent answered the one before."""

    text: str = Field(min_length=1)
    tools_added: list[str] = Field(default_factory=list, description=(
        "tools the agent is first shown with this message (hidden before it)"))


class Task(_LaterFields):
    scenario_id: str
    idx: int = Field(ge=0)
    text: str = Field(min_length=1)
    follow_ups: list[UserTurn] = Field(default_factory=list, description=(
        "a script of further user messages (BFCL multi-turn); empty for a one-message task"))
    system_prompt: str | None = Field(None, description=(
        "the system prompt the task is meant for (BFCL's entries); None: the agent loop's default"))
    user_scenario: dict[str, Any] | None = Field(None, description=(
        "who the user is and what they want, in tau2-bench's user_scenario shape ({persona?, instructions: "
        "{domain, reason_for_call, known_info, unknown_info, task_instructions}}): the task is played as a "
        "conversation with a user simulator"))
    user_prompt: str | None = Field(None, description=(
        "the user simulator's system prompt (simulation guidelines plus the user scenario)"))
    initial_state: dict[str, Any] | None = Field(None, description=(
        "state the session is put in before the episode (tau2-bench's initial_state: initialization_data, "
        "initialization_actions, message_history)"))

    _later_fields = ("user_scenario", "user_prompt", "initial_state")

    @property
    def conversational(self) -> bool:
        """The task has a user scenario, so it can be played with a user simulator (tau2's tasks always are;
        synthesized ones in conversation mode: ``awm_core.agent.plays_as_conversation``)."""
        return self.user_scenario is not None

    @property
    def hidden_tools(self) -> set[str]:
        """Tools the agent does not see until the follow-up that adds them."""
        return {name for turn in self.follow_ups for name in turn.tools_added}

    @property
    def user_turns(self) -> int:
        return 1 + len(self.follow_ups)

    @property
    def id(self) -> str:
        return task_id(self.scenario_id, self.idx)


# --------------------------------------------------------------------------- database


class TableSchema(Artifact):
    name: str
    ddl: str = Field(description="one CREATE TABLE statement")
    indexes: list[str] = Field(default_factory=list)


class DbSchema(Artifact):
    tables: list[TableSchema] = Field(min_length=1)

    def statements(self) -> list[tuple[str, str]]:
        """(table name, statement) in execution order: each table's DDL, then its indexes."""
        out = []
        for t in self.tables:
            out.append((t.name, t.ddl))
            out.extend((t.name, ix) for ix in t.indexes)
        return out


class TableSeed(Artifact):
    table_name: str
    reasoning: str = ""
    insert_statements: list[str] = Field(default_factory=list)


class SeedData(Artifact):
    tables: list[TableSeed] = Field(default_factory=list)

    def statements(self) -> list[tuple[str, str]]:
        return [(t.table_name, s) for t in self.tables for s in t.insert_statements]


# --------------------------------------------------------------------------- tools


class ParamSpec(Artifact):
    type: str = Field(description="JSON-schema type: string, integer, number, boolean, array, object")
    description: str = ""
    required: bool = True
    example: Any = None
    enum: list[Any] | None = None
    items: dict[str, Any] | None = Field(default=None, description="JSON schema of array items")
    param_type: str | None = Field(default=None, description="AWM-1K: path, query or body")
    extra: dict[str, Any] = Field(default_factory=dict)


class ToolSpec(Artifact):
    name: str = Field(description="tool name; the operation_id in AWM-1K")
    description: str = ""
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    returns: dict[str, Any] = Field(default_factory=dict, description="response shape, free-form")
    tables: list[str] = Field(default_factory=list, description="tables the tool reads or writes")
    group: str = ""
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="AWM-1K endpoint fields (path, method, summary, tags, required_fields, ...)",
    )

    def example_arguments(self) -> dict[str, Any]:
        return {k: p.example for k, p in self.parameters.items() if p.example is not None}

    def json_schema(self) -> dict[str, Any]:
        props: dict[str, Any] = {}
        for pname, p in self.parameters.items():
            prop: dict[str, Any] = {"type": p.type}
            if p.description:
                prop["description"] = p.description
            if p.enum is not None:
                prop["enum"] = p.enum
            if p.items is not None:
                prop["items"] = p.items
            props[pname] = prop
        required = [k for k, p in self.parameters.items() if p.required]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


class ApiSpec(Artifact):
    tools: list[ToolSpec] = Field(min_length=1)

    def tool(self, name: str) -> ToolSpec:
        for t in self.tools:
            if t.name == name:
                return t
        raise KeyError(name)

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolSpec]) -> list[ToolSpec]:
        seen: set[str] = set()
        dup = [t.name for t in tools if t.name in seen or seen.add(t.name)]
        if dup:
            raise ValueError(f"duplicate tool names: {sorted(set(dup))}")
        return tools


class EnvCode(Artifact):
    flavour: Flavour = "native"
    source: str = Field(min_length=1, description=(
        "one Python module; for the bfcl flavour a JSON bundle of BFCL's modules and the entry's state"))


# --------------------------------------------------------------------------- verification


class Verifier(Artifact):
    """Checks one task from (initial db, final db, final answer).

    ``native`` style: ``def verify(initial_db, final_db, final_answer) -> dict`` taking read-only
    ``sqlite3.Connection`` objects and returning ``{"verdict": "complete"|"partial"|"incomplete",
    "evidence": {...}}``. The AWM-1K styles take database paths:
    ``awm1k_code`` is ``verify_task_completion(initial_db_path, final_db_path, final_answer=None)``
    returning ``{"result": "complete"|"others"}``; ``awm1k_sql`` is
    ``verify_task(initial_db_path, final_db_path)`` returning evidence for an LLM judge.
    """

    task_idx: int = Field(ge=0)
    code: str = Field(min_length=1)
    style: Literal["native", "awm1k_code", "awm1k_sql", "bfcl", "tau2"] = "native"
    function_name: str = "verify"
    success_criteria: str = ""
    failure_criteria: str = ""
    extra: dict[str, Any] = Field(default_factory=dict, description="fields kept from imports")


class ToolCall(_LaterFields):
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    requestor: Literal["assistant", "user"] = Field("assistant", description=(
        "who makes the call: the agent, or (tau2-bench's dual-control telecom) the user on their own device"))

    _later_fields = ("requestor",)


class ReferenceSolution(Artifact):
    """Tool calls replayed in order in a fresh session, then the final answer.

    An argument value ``{"$ref": "<call>.<path>"}`` stands for a value of an earlier call's
    JSON result (``"0.id"``, ``"1.items.0.id"``, or ``"0.0.id"`` when call 0 returns a bare
    list): ids that call creates cannot be known when
    the solution is written. Every replay resolves them with ``resolve_refs``.
    """

    task_idx: int = Field(ge=0)
    calls: list[ToolCall] = Field(default_factory=list)
    final_answer: str | None = None
    turn_ends: list[int] = Field(default_factory=list, description=(
        "scripted tasks: after how many calls each user turn is answered (one entry per user turn)"))

    def ref_errors(self) -> list[str]:
        """Refs that can be seen to be wrong without running anything (malformed, not earlier)."""
        errors = []
        for i, call in enumerate(self.calls):
            for ref in refs_in(call.arguments):
                try:
                    _ref_source(ref, i)
                except SolutionRefError as exc:
                    errors.append(str(exc))
        return errors


REF_KEY = "$ref"


def is_ref(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(REF_KEY), str)


def refs_in(value: Any) -> list[str]:
    """Every ref string inside an argument value, depth first."""
    if is_ref(value):
        return [value[REF_KEY]]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [r for v in items for r in refs_in(v)]


def resolve_refs(arguments: dict[str, Any], results: "list[Any] | dict[int, Any]", call_idx: int) -> dict[str, Any]:
    """``arguments`` of call ``call_idx`` with every ref replaced by the value it names.

    ``results`` holds the earlier calls' results by call index (a list, or a dict when some
    are unavailable: a call that failed or was left out). A result that is a JSON string is
    read as JSON. Raises ``SolutionRefError`` naming the call, the ref and what was missing.
    """
    by_idx = dict(enumerate(results)) if isinstance(results, list) else results

    def walk(value: Any) -> Any:
        if is_ref(value):
            return _lookup(value[REF_KEY], by_idx, call_idx)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(arguments)


def _ref_source(ref: str, call_idx: int) -> tuple[int, list[str]]:
    head, *path = ref.split(".")
    where = f"call {call_idx}: $ref {ref!r}"
    if not head.isdigit():
        raise SolutionRefError(f"{where} must start with the index of an earlier call (e.g. \"0.id\")")
    source = int(head)
    if source >= call_idx:
        earlier = f"0..{call_idx - 1}" if call_idx else "none: it is the first call"
        raise SolutionRefError(f"{where} points at call {source}, which is not an earlier call (earlier calls: "
                               f"{earlier}); a $ref can only use the result of a call made before it")
    if any(p == "" for p in path):
        raise SolutionRefError(f"{where} has an empty path part; write parts separated by single dots")
    return source, path


def _lookup(ref: str, results: dict[int, Any], call_idx: int) -> Any:
    source, path = _ref_source(ref, call_idx)
    where = f"call {call_idx}: $ref {ref!r}"
    if source not in results:
        raise SolutionRefError(f"{where}: call {source} has no result to read (it failed or was not made)")
    value, walked = _as_json(results[source]), str(source)
    for part in path:
        if isinstance(value, list):
            if not part.isdigit() or int(part) >= len(value):
                raise SolutionRefError(f"{where}: call {source}'s result at {walked!r} is a list of {len(value)} "
                                       f"item(s); {part!r} is not an index into it")
            value = value[int(part)]
        elif isinstance(value, dict):
            if part not in value:
                keys = ", ".join(map(str, list(value)[:12])) or "none"
                raise SolutionRefError(f"{where}: call {source}'s result at {walked!r} has no key {part!r} "
                                       f"(keys: {keys})")
            value = value[part]
        else:
            raise SolutionRefError(f"{where}: call {source}'s result at {walked!r} is {json.dumps(value)[:80]}, "
                                   f"not an object or list, so it has no {part!r}")
        walked = f"{walked}.{part}"
    return value


def _as_json(value: Any) -> Any:
    # Tools of the AWM-1K flavour answer with JSON text; a plain string stays a string.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------- bundle


class ValidationCheck(Artifact):
    name: str = Field(description="e.g. schema, seed, tool_example, verifier_solution, verifier_noop, replay_determinism, "
                                  "verifier_mutation")
    passed: bool
    task_idx: int | None = None
    tool: str | None = None
    detail: str = ""


class ValidationReport(Artifact):
    passed: bool
    checks: list[ValidationCheck] = Field(default_factory=list)
    dropped_tasks: dict[int, str] = Field(default_factory=dict, description="task idx -> reason")
    validated_at: datetime = Field(default_factory=utcnow)

    def failures(self) -> list[ValidationCheck]:
        return [c for c in self.checks if not c.passed]


class StageProvenance(Artifact):
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: list[str] = Field(default_factory=list, description="errors of the failed attempts")


class Provenance(Artifact):
    source: Literal["generated", "awm1k", "bfcl", "tau2", "handwritten"] = "generated"
    generator_model: str | None = None
    prompt_version: str | None = None
    run_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    stages: dict[str, StageProvenance] = Field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(s.prompt_tokens + s.completion_tokens for s in self.stages.values())


ENV_PARTS = ("scenario", "tasks", "db_schema", "seed_data", "api_spec", "code", "verifiers")


class Environment(_LaterFields):
    """One scenario's whole set: the unit that is stored, loaded, served and exported."""

    id: str
    scenario: Scenario
    tasks: list[Task] = Field(default_factory=list)
    db_schema: DbSchema | None = None
    seed_data: SeedData | None = None
    api_spec: ApiSpec | None = None
    code: EnvCode | None = None
    verifiers: list[Verifier] = Field(default_factory=list)
    solutions: list[ReferenceSolution] = Field(default_factory=list)
    provenance: Provenance = Field(default_factory=Provenance)
    validation: ValidationReport | None = None
    missing: list[str] = Field(default_factory=list, description="parts absent from an import")
    retired_tasks: dict[int, str] = Field(default_factory=dict, description=(
        "task idx -> why curation retired it (too easy or never solved); kept, but not evaluated or trained on"))
    policy: str | None = Field(None, description=(
        "the agent's policy in a conversation (what needs the user's confirmation, what is never allowed), "
        "shown to the agent as tau2-bench shows its domain policy"))

    _later_fields = ("policy",)

    _check_id = field_validator("id")(classmethod(lambda cls, v: _slug_field(v)))

    @property
    def flavour(self) -> Flavour:
        return self.code.flavour if self.code else "native"

    def is_live(self, idx: int) -> bool:
        """Validation kept the task and curation has not retired it: agents are evaluated and trained on it."""
        dropped = self.validation.dropped_tasks if self.validation else {}
        return idx not in dropped and idx not in self.retired_tasks

    def task(self, idx: int) -> Task:
        for t in self.tasks:
            if t.idx == idx:
                return t
        raise KeyError(task_id(self.id, idx))

    def verifier(self, idx: int) -> Verifier | None:
        return next((v for v in self.verifiers if v.task_idx == idx), None)

    def solution(self, idx: int) -> ReferenceSolution | None:
        return next((s for s in self.solutions if s.task_idx == idx), None)

    def digest(self) -> str:
        """Content hash of everything but provenance and validation (for dedup and caching)."""
        data = self.model_dump(mode="json", exclude={"provenance", "validation"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def runnable_parts_missing(self) -> list[str]:
        needs = ("code",) if self.flavour in BENCHMARKS else ("db_schema", "seed_data", "code")
        return [p for p in needs if getattr(self, p) is None]

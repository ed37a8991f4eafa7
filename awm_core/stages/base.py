"""What every synthesis stage shares: the context it reads, its result, reply parsing,
and the repair section that carries earlier errors into the next attempt's prompt.

A stage module is a ``Stage`` (the protocol below; ``awm_core.stages`` checks every module
against it at import). ``run_stage`` drives one attempt of any of them, so one generic Prefect
task can run every stage.
"""
from __future__ import annotations

import json
import re
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from awm_core.errors import ArtifactError, StageError
from awm_core.models import (
    ApiSpec,
    DbSchema,
    EnvCode,
    Environment,
    ReferenceSolution,
    Scenario,
    SeedData,
    Task,
    Verifier,
)
from awm_core.runtime.sandbox import NATIVE_IMPORTS

# The one user every task acts as; prompts and checks share this number.
CURRENT_USER_ID = 1

# Modules environment code may import: the sandbox's own list, so the prompt and the static
# check can never promise or refuse what the sandbox does not. Names with "_" are there for
# the standard library's lazy imports (_strptime) or are compiler directives, and ToolError
# reaches generated code as a builtin: none of them is for the model to import. Sorted, so
# the prompt is a stable cache key.
ALLOWED_IMPORTS = tuple(sorted(m for m in NATIVE_IMPORTS if not m.startswith("_") and m != "awm_core.errors"))

# How much earlier-error text one prompt may carry; beyond it the list is cut with a note.
MAX_ERROR_LINES = 40
MAX_ERROR_CHARS = 600
MAX_ERRORS_TOTAL_CHARS = 12_000


class StageContext(BaseModel):
    """Everything known so far about one environment, plus the knobs a stage reads.

    Plain data only, so it hashes into a cache key and travels to any worker.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scenario: Scenario | None = None
    tasks: list[Task] = Field(default_factory=list)
    db_schema: DbSchema | None = None
    seed_data: SeedData | None = None
    api_spec: ApiSpec | None = None
    code: EnvCode | None = None
    verifiers: list[Verifier] = Field(default_factory=list)
    # A verifier regenerated after a reference solution exists is shown the tools that solution calls.
    solutions: list[ReferenceSolution] = Field(default_factory=list)
    task_idx: int | None = None
    tasks_per_scenario: int = 10
    target_tools: int = 35
    model: str = ""

    @property
    def scenario_id(self) -> str:
        return self.scenario.id if self.scenario else "_"

    def need(self, *parts: str) -> None:
        missing = [p for p in parts if getattr(self, p) in (None, [])]
        if missing:
            raise ValueError(f"stage context for {self.scenario_id} lacks {', '.join(missing)}")

    def task(self) -> Task:
        if self.task_idx is None:
            raise ValueError("this stage needs task_idx in its context")
        for t in self.tasks:
            if t.idx == self.task_idx:
                return t
        raise ValueError(f"task {self.task_idx} not in the context of {self.scenario_id}")

    def verifier(self) -> Verifier | None:
        return next((v for v in self.verifiers if v.task_idx == self.task_idx), None)

    def environment(self, **parts: Any) -> Environment:
        """A (partial) bundle of what is known, with ``parts`` replacing or adding pieces."""
        data: dict[str, Any] = {
            "id": self.scenario_id, "scenario": self.scenario, "tasks": self.tasks,
            "db_schema": self.db_schema, "seed_data": self.seed_data, "api_spec": self.api_spec,
            "code": self.code, "verifiers": self.verifiers, "solutions": self.solutions,
        }
        data.update(parts)
        return Environment(**data)

    def with_(self, **parts: Any) -> "StageContext":
        return self.model_copy(update=parts)


class StageResult(BaseModel):
    """A stage's accepted artifact and the LLM call records of the attempt that made it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    value: Any
    records: list[Any] = Field(default_factory=list)
    checks: list[Any] = Field(default_factory=list, description="sandbox checks the artifact passed")


# --------------------------------------------------------------------------- reply parsing


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)


def extract_json(text: str, stage: str) -> Any:
    """The JSON document of a reply; tolerates one surrounding code fence, nothing else.

    No "repair" of truncated JSON: a cut-off answer must fail and be regenerated.
    """
    body = text.strip()
    fences = _FENCE_RE.findall(body)
    if fences and not body.startswith(("{", "[")):
        if len(fences) > 1:
            raise StageError(stage, [f"the reply has {len(fences)} code blocks; answer with exactly one JSON document"])
        body = fences[0][1].strip()
    if not body:
        raise StageError(stage, ["the reply was empty; answer with the JSON document only"])
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        hint = " (the reply looks cut off: keep it shorter)" if exc.pos >= len(body) - 2 else ""
        raise StageError(stage, [f"the reply is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}{hint}; "
                                 "answer with one JSON document and nothing else"]) from None


def extract_python(text: str, stage: str) -> str:
    """The single fenced python block of a reply (a reply with no fence is taken whole)."""
    blocks = [(lang, body) for lang, body in _FENCE_RE.findall(text)]
    if not blocks:
        if "```" in text:
            raise StageError(stage, ["the reply opens a code block but never closes it (the answer looks cut off); "
                                     "answer with one complete ```python fenced block"])
        source = text.strip()
    elif len(blocks) > 1:
        raise StageError(stage, [f"the reply has {len(blocks)} code blocks; put the whole module in exactly one ```python block"])
    else:
        lang, source = blocks[0]
        if lang and lang.lower() not in ("python", "py", "python3"):
            raise StageError(stage, [f"the code block is marked {lang!r}; it must be a ```python block"])
    if not source.strip():
        raise StageError(stage, ["the code block is empty"])
    return source.strip() + "\n"


def artifact(model: type, data: Any, stage: str) -> Any:
    try:
        return model.from_data(data)
    except ArtifactError as exc:
        raise StageError(stage, [f"field {p}" for p in exc.problems]) from None


# --------------------------------------------------------------------------- repair feedback


def summarise_errors(errors: list[str]) -> list[str]:
    """Earlier attempts' errors, deduplicated in first-seen order and cut deterministically."""
    seen: set[str] = set()
    out: list[str] = []
    total = 0
    for err in errors:
        line = " ".join(str(err).split())
        if len(line) > MAX_ERROR_CHARS:
            line = line[: MAX_ERROR_CHARS - 3] + "..."
        if line in seen:
            continue
        seen.add(line)
        if len(out) >= MAX_ERROR_LINES or total + len(line) > MAX_ERRORS_TOTAL_CHARS:
            out.append(f"... and {len(set(errors)) - len(out)} more problems not shown")
            break
        out.append(line)
        total += len(line)
    return out


def repair_section(previous_errors: list[str]) -> str:
    if not previous_errors:
        return ""
    items = "\n".join(f"{i}. {e}" for i, e in enumerate(summarise_errors(previous_errors), 1))
    return (
        "\n\n## Your previous attempt was rejected\n"
        "An earlier answer to this request failed these checks (they were run for real). Write a new, complete "
        "answer that fixes every one of them, and keep everything else that was right:\n"
        f"{items}\n"
    )


def messages(system: str, user: str, previous_errors: list[str]) -> list[dict]:
    return [{"role": "system", "content": system.strip()},
            {"role": "user", "content": user.strip() + repair_section(previous_errors)}]


# --------------------------------------------------------------------------- context rendering


def render_scenario(ctx: StageContext) -> str:
    s = ctx.scenario
    return f"{s.name} ({s.category}): {s.description}" if s else "(no scenario)"


def render_tasks(ctx: StageContext) -> str:
    return "\n".join(f"{t.idx}. {t.text}" for t in ctx.tasks)


def render_schema(ctx: StageContext) -> str:
    lines = []
    for t in ctx.db_schema.tables:
        lines.append(t.ddl.strip().rstrip(";") + ";")
        lines.extend(ix.strip().rstrip(";") + ";" for ix in t.indexes)
    return "\n".join(lines)


def render_seed(ctx: StageContext) -> str:
    return "\n".join(s.strip().rstrip(";") + ";" for _, s in ctx.seed_data.statements())


# Seeded rows shown per table where a prompt shows the data compactly (the spec stage): enough
# to pick existing ids and names from, bounded however much a model seeded.
SEED_ROWS_PER_TABLE = 8
SEED_VALUE_CHARS = 60


def _cell(value: Any) -> str:
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= SEED_VALUE_CHARS else text[: SEED_VALUE_CHARS - 4] + '..."'
    text = "NULL" if value is None else str(value)
    return text if len(text) <= SEED_VALUE_CHARS else text[: SEED_VALUE_CHARS - 3] + "..."


def render_seed_rows(ctx: StageContext, per_table: int = SEED_ROWS_PER_TABLE) -> str:
    """The seeded database table by table: columns, then at most ``per_table`` rows, with the
    number of rows left out; read from the built database, so it is the data the tools get."""
    from awm_core.db import build_database, open_snapshot

    conn = open_snapshot(build_database(ctx.db_schema, ctx.seed_data), readonly=True)
    try:
        out = []
        for t in ctx.db_schema.tables:
            # Storage order (no ORDER BY rowid: a WITHOUT ROWID table has none); the same bytes
            # always give the same rows, so the prompt stays a stable cache key.
            cur = conn.execute(f'SELECT * FROM "{t.name}" LIMIT ?', (per_table,))
            columns = [d[0] for d in cur.description]
            rows = cur.fetchall()
            total = conn.execute(f'SELECT count(*) FROM "{t.name}"').fetchone()[0]
            shown = f"first {len(rows)} of {total} rows" if total > len(rows) else f"{total} row{'' if total == 1 else 's'}"
            out.append(f"{t.name} ({shown}): {' | '.join(columns)}")
            out.extend("  " + " | ".join(_cell(v) for v in row) for row in rows)
        return "\n".join(out)
    finally:
        conn.close()


def render_spec(ctx: StageContext) -> str:
    """One compact line per tool: name(params) -> returns: description."""
    lines = []
    for t in ctx.api_spec.tools:
        params = ", ".join(
            f"{n}: {p.type}{'' if p.required else '?'}" + (f" e.g. {json.dumps(p.example)}" if p.example is not None else "")
            for n, p in t.parameters.items())
        lines.append(f"- {t.name}({params}) -> {json.dumps(t.returns, separators=(',', ':'))[:300]}: {t.description}")
    return "\n".join(lines)


def render_spec_json(ctx: StageContext) -> str:
    """The whole spec as compact JSON, defaults left out except each parameter's "required":
    its default is true, so dropping defaults would leave required parameters unmarked and
    only the optional ones saying anything."""
    data = ctx.api_spec.model_dump(mode="json", exclude_defaults=True)
    for tool, shown in zip(ctx.api_spec.tools, data["tools"]):
        for pname, p in tool.parameters.items():
            kept = shown["parameters"][pname]
            shown["parameters"][pname] = {k: v for k, v in p.model_dump(mode="json").items()
                                          if k in kept or k == "required"}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- one attempt


@runtime_checkable
class Stage(Protocol):
    """One synthesis stage over an environment's ``StageContext`` (a module, not a class: each
    stage is a prompt and a few functions beside it)."""

    NAME: str  # the artifact it makes; fixtures and the ledger are keyed by it
    PROMPT_VERSION: str  # part of the cache key: a prompt change re-runs the stage
    JSON_MODE: bool  # ask the endpoint for a JSON object
    PER_TASK: bool  # runs once per user task (named ``<NAME>.<task_idx>``)

    def build_messages(self, ctx: StageContext, previous_errors: list[str]) -> list[dict]:
        """The chat messages of one attempt; ``previous_errors`` are the earlier attempts' problems."""

    def parse(self, text: str, ctx: StageContext) -> Any:
        """The reply as the stage's artifact; raises ``StageError`` naming what to fix."""

    def execute(self, value: Any, ctx: StageContext, pool: Any) -> list:
        """Checks that run the artifact in the sandbox (validation checks); ``[]`` when none apply."""

    def run(self, client: Any, ctx: StageContext, *, attempt: int, previous_errors: list[str],
            pool: Any = None) -> "StageResult":
        """One attempt (``run_stage`` on the module)."""


def no_execution(value: Any, ctx: StageContext, pool: Any) -> list:
    """``Stage.execute`` of a stage whose checks all run in ``parse`` (no sandbox needed)."""
    return []


def stage_name(module: Stage, ctx: StageContext) -> str:
    """The stage's name as the fixtures and ledger know it (``verifier.3`` for per-task stages)."""
    return f"{module.NAME}.{ctx.task_idx}" if module.PER_TASK else module.NAME


def execute_checks(module: Stage, value: Any, ctx: StageContext, pool: Any) -> list:
    """The stage's sandbox checks on ``pool``: a ``SandboxPool`` here, or ``CheckProcesses``
    (``awm_core.stages.check_processes``), which runs them in another process."""
    run_elsewhere = getattr(pool, "execute_stage", None)
    if run_elsewhere is not None:
        return run_elsewhere(module.NAME, value, ctx)
    return module.execute(value, ctx, pool) or []


def run_stage(module: Stage, client: Any, ctx: StageContext, *, attempt: int, previous_errors: list[str],
              pool: Any = None) -> StageResult:
    """One attempt: prompt, call, parse, execute. A rejected reply raises StageError with
    the attempt's CallRecords attached as ``records``."""
    name = stage_name(module, ctx)
    msgs = module.build_messages(ctx, previous_errors)
    res = client.chat(msgs, stage=name, scenario_id=ctx.scenario_id, attempt=attempt,
                      json_mode=module.JSON_MODE)
    try:
        if getattr(res, "finish_reason", None) == "length":
            raise StageError(name, ["the reply was cut off at the output-token limit; give a more compact answer "
                                    "(fewer words in descriptions, no comments), complete and well-formed"])
        value = module.parse(res.content, ctx)
        checks = execute_checks(module, value, ctx, pool) if pool is not None else []
    except StageError as exc:
        exc.stage = name
        exc.scenario_id = ctx.scenario_id
        exc.records = [res.record]
        raise
    return StageResult(value=value, records=[res.record], checks=checks)

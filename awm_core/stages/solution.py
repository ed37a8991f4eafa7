"""Stage 8: one reference solution per task.

Reply: JSON ``{"calls": [{"tool", "arguments"}], "final_answer": str | null}``; an argument value
``{"$ref": "0.id"}`` is the ``id`` of call 0's result (see ``ReferenceSolution``). Checked against
the spec (known tools, arguments valid for the tool's JSON schema, refs only to earlier calls) and
in the sandbox: replayed on the seeded database every call succeeds, the task's verifier says "complete", and a second
replay ends in the same database. Then the task's verifier is run on wrong episodes derived from
the solution (``awm_core.soundness.mutation_checks``); those results go to the report.
"""
from __future__ import annotations

import sys

import jsonschema

from awm_core.errors import StageError
from awm_core.models import ReferenceSolution, is_ref
from awm_core.stages.base import (
    CURRENT_USER_ID, StageContext, artifact, extract_json, messages, render_scenario, render_schema, render_seed,
    render_spec, run_stage,
)

NAME = "solution"
PER_TASK = True
PROMPT_VERSION = "solution-v3"
JSON_MODE = True

SYSTEM = """
You solve tasks on an application by calling its tools, and write the exact sequence of calls down so it can
be replayed by a program. The replay starts from the initial data shown; each call must succeed as written.
"""

USER = """
Application: {scenario}

Database schema:
{schema}

Initial data:
{seed}

Tools (name(parameters) -> returns: description; "?" marks optional parameters):
{spec}

Task {idx} (the signed-in user is user id {user_id}):
{task}

Write the tool calls that complete this task from the initial data, in order. Use ids you can read from the
initial data (or call a search/get tool first, as a careful agent would). Arguments must match the tool's
parameters exactly (names and types; omit optional ones you do not need). For a question, put the answer,
with the exact value, in final_answer; for a pure change, final_answer may be a short confirmation or null.
A value that an earlier call returns (e.g. the id of a row it creates) cannot be known in advance: write it as
{{"$ref": "<call index>.<path into that call's JSON result>"}}, e.g. {{"$ref": "0.id"}} for the "id" field of
call 0's result, or {{"$ref": "1.items.0.id"}} (numbers index lists). When a call's result is itself a JSON
list, the index comes right after the call number: {{"$ref": "0.0.id"}} is the "id" of the first item of the list
call 0 returned. The replay puts the real value there; a $ref may only point at an earlier call.

Answer with JSON only: {{"calls": [{{"tool": "name", "arguments": {{...}}}}], "final_answer": "..." or null}}
"""


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario", "tasks", "db_schema", "seed_data", "api_spec")
    task = ctx.task()
    user = USER.format(scenario=render_scenario(ctx), schema=render_schema(ctx), seed=render_seed(ctx),
                       spec=render_spec(ctx), idx=task.idx, task=task.text, user_id=CURRENT_USER_ID)
    return messages(SYSTEM, user, previous_errors)


def argument_errors(solution: ReferenceSolution, ctx: StageContext) -> list[str]:
    errors = []
    names = {t.name: t for t in ctx.api_spec.tools}
    for i, call in enumerate(solution.calls):
        tool = names.get(call.tool)
        if tool is None:
            errors.append(f"call {i}: unknown tool {call.tool!r}; tools: {', '.join(sorted(names))}")
            continue
        validator = jsonschema.Draft202012Validator(tool.json_schema())
        # A $ref's value is known only at replay, where a wrong type fails the call itself.
        found = [e for e in validator.iter_errors(call.arguments) if not is_ref(e.instance)]
        for err in sorted(found, key=lambda e: list(e.path)):
            where = ".".join(str(p) for p in err.path) or "arguments"
            errors.append(f"call {i} ({call.tool}): {where}: {err.message}")
    return errors


def parse(text: str, ctx: StageContext) -> ReferenceSolution:
    stage = f"{NAME}.{ctx.task_idx}"
    data = extract_json(text, stage)
    if not isinstance(data, dict):
        raise StageError(stage, ['the reply must be a JSON object {"calls": [...], "final_answer": ...}'])
    data = {k: v for k, v in data.items() if k != "task_idx"}
    solution = artifact(ReferenceSolution, {"task_idx": ctx.task_idx, **data}, stage)
    errors = solution.ref_errors() + argument_errors(solution, ctx)
    if errors:
        raise StageError(stage, errors)
    return solution


def execute(solution: ReferenceSolution, ctx: StageContext, pool) -> list:
    """Replay, verdict and determinism checks (raising if one fails), then the verifier's
    mutation checks; returns them all for the report. A failed mutation check does not reject
    the solution: it shows the verifier is lenient, which only a new verifier can fix."""
    from awm_core.soundness import soundness_checks
    from awm_core.validation import failed_details, solution_checks

    env = ctx.environment(solutions=[solution])
    checks = solution_checks(pool, env, solution.task_idx)
    errors = failed_details(checks)
    if errors:
        raise StageError(f"{NAME}.{ctx.task_idx}", errors)
    return checks + soundness_checks(pool, env, solution.task_idx)


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

"""Stage 7: one verifier per task.

Reply: one fenced ```python block defining ``verify(initial_db, final_db, final_answer)``.
Checked statically (compiles, allowed imports, the signature) and in the sandbox: on a
no-op episode (final == initial, no answer) it must run without error and must NOT say
"complete" (a verifier that passes a no-op checks something that was already true). Once a
reference solution passes it, the solution stage runs it on wrong episodes derived from that
solution; ``lenience_errors`` turns any it accepted into the next verifier attempt's errors.
"""
from __future__ import annotations

import ast
import sys

from awm_core.errors import StageError
from awm_core.models import Verifier
from awm_core.stages.base import (
    CURRENT_USER_ID, StageContext, extract_python, messages, render_scenario, render_schema, render_seed, run_stage,
)
from awm_core.stages.code import compile_module, import_errors

NAME = "verifier"
PER_TASK = True
PROMPT_VERSION = "verifier-v1"
JSON_MODE = False
IMPORTS = ("sqlite3", "json", "re", "math", "datetime", "decimal", "collections")

SYSTEM = """
You write automatic checkers for tasks an AI agent performs on an application's SQLite database. A checker
compares the database before and after the agent's episode (and the agent's final answer) and decides,
deterministically, whether the task was completed. It must never say "complete" for an episode in which
nothing was done, and must accept every correct way of doing the task.
"""

USER = """
Application: {scenario}

Database schema:
{schema}

Initial data (the state every episode starts from):
{seed}

Task {idx} (the signed-in user is user id {user_id}):
{task}

Write `def verify(initial_db, final_db, final_answer):`
- initial_db and final_db are read-only sqlite3.Connection objects (initial and final state); final_answer is
  the agent's last message (str) or None. Do not write to them and do not open files.
- Return {{"verdict": "complete" | "partial" | "incomplete", "evidence": {{...what you checked, with values...}}}}.
- Change tasks: find the intended change by comparing final_db against initial_db (the new/updated/deleted rows
  with the values the task gives) and check nothing unrelated was destroyed. Match text case-insensitively
  and trimmed; do not depend on ids the agent's inserts will get, find rows by their content.
- Question tasks: compute the right value from initial_db with SQL (do not hard-code it) and check that
  final_answer contains it, tolerating formatting ("$1,234.50", "1234.5", case, surrounding words).
- Multi-step tasks: "partial" when some but not all required changes are present.
- A no-op episode (final_db identical to initial_db, final_answer None) must give "incomplete".
- Deterministic and fast: no clock, no randomness; imports only from {imports}.

Answer with the function (and any helpers it needs) in exactly one ```python fenced block.
"""


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario", "tasks", "db_schema", "seed_data")
    task = ctx.task()
    user = USER.format(scenario=render_scenario(ctx), schema=render_schema(ctx), seed=render_seed(ctx),
                       idx=task.idx, task=task.text, user_id=CURRENT_USER_ID, imports=", ".join(IMPORTS))
    return messages(SYSTEM, user, previous_errors)


def signature_errors(tree: ast.Module, name: str = "verify") -> list[str]:
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if fn is None:
        return [f"no top-level `def {name}(initial_db, final_db, final_answer):` in the code"]
    positional = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    required = len(positional) - len(fn.args.defaults)
    if len(positional) < 3 or required > 3:
        return [f"`{name}` takes ({', '.join(positional)}); it must take exactly (initial_db, final_db, final_answer)"]
    return []


def parse(text: str, ctx: StageContext) -> Verifier:
    stage = f"{NAME}.{ctx.task_idx}"
    source = extract_python(text, stage)
    tree = compile_module(source, stage)
    errors = import_errors(tree, IMPORTS) + signature_errors(tree)
    if errors:
        raise StageError(stage, errors)
    return Verifier(task_idx=ctx.task_idx, code=source, style="native", function_name="verify")


def execute(verifier: Verifier, ctx: StageContext, pool) -> list:
    """The no-op check; returns it (passed) for the environment's validation report."""
    from awm_core.validation import noop_check

    check = noop_check(pool, ctx.environment(verifiers=[verifier]), verifier.task_idx)
    if not check.passed:
        raise StageError(f"{NAME}.{ctx.task_idx}", [check.detail])
    return [check]


def lenience_errors(checks: list) -> list[str]:
    """Repair instructions for a verifier that said "complete" on wrong episodes (failed
    ``verifier_mutation`` checks), naming each mutation that fooled it."""
    fooled = [c.detail for c in checks if c.name == "verifier_mutation" and not c.passed]
    if not fooled:
        return []
    return ["your previous verifier accepted the reference solution but also said \"complete\" for a wrong episode "
            "made from it; check every change the task asks for (the right rows, by content), that nothing else "
            "was destroyed, and the exact value in the answer: " + d for d in fooled]


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

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
import re
import sys

from awm_core.errors import StageError
from awm_core.models import Verifier
from awm_core.mutations import NUMBER_PATTERN, word_stem
from awm_core.stages.base import (
    CURRENT_USER_ID, StageContext, extract_python, messages, render_scenario, render_schema, render_seed,
    render_spec, run_stage,
)
from awm_core.stages.code import compile_module, import_errors

NAME = "verifier"
PER_TASK = True
PROMPT_VERSION = "verifier-v2"
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

Tools the agent calls (name(parameters) -> returns: description; "?" marks optional parameters):
{spec}

Their code (what each tool reads and writes: the side effects a correct episode leaves in final_db):
```python
{code}
```

Task {idx} (the signed-in user is user id {user_id}):
{task}

Write `def verify(initial_db, final_db, final_answer):`
- initial_db and final_db are read-only sqlite3.Connection objects (initial and final state); final_answer is
  the agent's last message (str) or None. Do not write to them and do not open files.
- Return {{"verdict": "complete" | "partial" | "incomplete", "evidence": {{...what you checked, with values...}}}}.
- Change tasks: find the intended change by comparing final_db against initial_db (the new/updated/deleted rows
  with the values the task gives, and the other columns the tools above set when they do it) and check
  nothing unrelated was destroyed. Match text case-insensitively and trimmed; do not depend on ids the
  agent's inserts will get, find rows by their content.
- Question tasks: compute the right value from initial_db with SQL (do not hard-code it), then parse values
  out of final_answer and compare values, never substrings ("4" is inside "2024" and "14"):
{parsed_rule}
- Multi-step tasks: "partial" when some but not all required changes are present.
- A no-op episode (final_db identical to initial_db, final_answer None) must give "incomplete".
- Deterministic and fast: no clock, no randomness; imports only from {imports}.

Answer with the function (and any helpers it needs) in exactly one ```python fenced block.
"""


# How a question verifier reads the answer. The number pattern is the one the wrong_answer
# mutation changes numbers by, so a verifier written this way rejects exactly those mutants.
PARSED_VALUES_RULE = f"""
  numbers: found = [float(x.replace(",", "")) for x in re.findall(r"{NUMBER_PATTERN}", final_answer or "")]
    and complete only if some v in found has abs(v - expected) < 0.005: "$1,234.50" and "1234.5" both match
    1234.5, while "14" and "2024" never match 4;
  dates: extract them (re.findall(r"\\d{{4}}-\\d{{2}}-\\d{{2}}", ...), or a spelled-out month and day) and compare dates;
  names and titles: whole words, case-insensitively:
    re.search(r"\\b" + re.escape(name.lower()) + r"\\b", final_answer.lower()).
""".strip("\n")

# The verifier is written before the reference solution (tasks/generation.py), so which tools
# the intended episode calls is not known yet: the prompt shows the whole module when it fits
# (it usually does) and otherwise the tools over tables the task mentions first, then helpers,
# then the rest, up to this many characters, naming what was left out.
TOOL_CODE_CHARS = 20_000


def _words(text: str) -> set[str]:
    return {word_stem(w) for w in re.findall(r"[a-z]+", text.lower())}


def _relevance(tool, task_words: set[str]) -> int:
    """Words of the tool's name in the task ("delete", "note" for delete_note), then whether a
    table it touches is named there."""
    in_name = len(_words(tool.name.replace("_", " ")) & task_words)
    in_tables = any(_words(t.replace("_", " ")) & task_words for t in tool.tables)
    return 2 * in_name + in_tables


def render_tool_code(ctx: StageContext, cap: int = TOOL_CODE_CHARS) -> str:
    source = ctx.code.source.strip()
    if len(source) <= cap:
        return source
    tree = ast.parse(source)
    funcs = {n.name: ast.get_source_segment(source, n) or "" for n in tree.body
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    # Module constants (the signed-in user's id, status names) are short and read by every tool.
    constants = [ast.get_source_segment(source, n) or "" for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))]
    task_words = _words(ctx.task().text)
    scored = sorted(((_relevance(t, task_words), t.name) for t in ctx.api_spec.tools if t.name in funcs),
                    key=lambda x: -x[0])
    related = [n for score, n in scored if score > 0]
    order = related + [n for n in funcs if n.startswith("_")] + [n for score, n in scored if score == 0]
    shown, left_out = ["\n".join(constants)] if constants else [], []
    used = sum(map(len, shown))
    for name in order:
        if used + len(funcs[name]) > cap:
            left_out.append(name)
            continue
        shown.append(funcs[name])
        used += len(funcs[name]) + 2
    note = (f"# (code cut at {cap} characters; left out: {', '.join(n for n in left_out if not n.startswith('_'))} "
            "-- their spec lines above say what they do)") if left_out else ""
    return "\n\n".join(shown + ([note] if note else []))


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario", "tasks", "db_schema", "seed_data", "api_spec", "code")
    task = ctx.task()
    user = USER.format(scenario=render_scenario(ctx), schema=render_schema(ctx), seed=render_seed(ctx),
                       spec=render_spec(ctx), code=render_tool_code(ctx), idx=task.idx, task=task.text,
                       user_id=CURRENT_USER_ID, imports=", ".join(IMPORTS), parsed_rule=PARSED_VALUES_RULE)
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

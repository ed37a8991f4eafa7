"""Stage 7: one verifier per task.

Reply: one fenced ```python block defining ``verify(initial_db, final_db, final_answer)``.
Checked statically (compiles, allowed imports, the signature) and in the sandbox: on a
no-op episode (final == initial, no answer) it must run without error and must NOT say
"complete" (a verifier that passes a no-op checks something that was already true). Once a
reference solution passes it, the solution stage runs it on wrong episodes derived from that
solution, and on equivalent ones it must accept; ``soundness_errors`` turns any it judged wrongly
into the next verifier attempt's errors.
"""
from __future__ import annotations

import ast
import functools
import re
import sys
from dataclasses import dataclass

from awm_core.errors import StageError
from awm_core.models import Verifier
from awm_core.mutations import word_stem
from awm_core.stages.base import (
    CURRENT_USER_ID, StageContext, extract_python, messages, render_scenario, render_schema, render_seed,
    render_spec, run_stage,
)
from awm_core.stages.code import compile_module, import_errors

NAME = "verifier"
PER_TASK = True
PROMPT_VERSION = "verifier-v3"
JSON_MODE = False
IMPORTS = ("sqlite3", "json", "re", "math", "datetime", "decimal", "collections")
# Provided in the verifier's namespace by the sandbox (awm_core.runtime.worker).
HELPERS = ("db_changes", "answer_numbers", "answer_dates", "answer_times")

SYSTEM = """
You write automatic checkers for tasks an AI agent performs on an application's SQLite database. A checker
compares the database before and after the agent's episode (and the agent's final answer) and decides,
deterministically, whether the task was completed. It must never say "complete" for a wrong episode (nothing
done, a wrong value, a wrong row, a change nobody asked for, a wrong or hedged answer), and must accept every
correct way of doing the task.
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
{helpers}
- Change tasks: exactly the changes the task asks for and nothing else. Call db_changes(initial_db, final_db)
  once and check all of:
  * the changed tables are exactly the ones the intended change touches (with the side effects the tools above
    write when they do it, such as a log row or an updated_at column);
  * in each of them, exactly the expected rows inserted, updated or deleted, found by their content (never by
    the ids the agent's inserts will get), with every value the task states (names, numbers, dates, times,
    statuses and other enum values, flags) equal to what it says; for an updated row, exactly the expected
    columns changed;
  * no other row inserted, updated or deleted in any table (a stray copy of a row, an edit to another row or
    to another column counts).
  A value the task does not state (an optional note, a timestamp a tool sets) may be anything. Match text
  case-insensitively and trimmed. Tools that only look things up may write too (a view count, an access
  log: see their code); those changes are not wrong.
- Question tasks: compute the right value from initial_db with SQL (do not hard-code it), then read values out
  of final_answer with the helpers and compare values, never substrings ("4" is inside "2024" and "14"):
{parsed_rule}
- Multi-step tasks: "partial" when some but not all required changes are present and nothing wrong was done.
- A no-op episode (final_db identical to initial_db, final_answer None) must give "incomplete".
- Deterministic and fast: no clock, no randomness; imports only from {imports}.

Answer with the function (and any helpers it needs) in exactly one ```python fenced block.
"""

HELPERS_TEXT = """
- Already defined in your namespace (call them; do not import or define them):
  db_changes(initial_db, final_db) -> {"<table>": {"inserted": [row], "updated": [{"key": {...}, "old": row,
    "new": row, "columns": [changed column names]}], "deleted": [row]}} for every table with a change; rows are
    dicts of column -> value, matched by primary key; tables without a change are absent.
  answer_numbers(text) -> the numbers in text outside dates and times, as floats ("$1,234.50" -> 1234.5; the
    "03" of "2025-05-03" and the 3 of "May 3" are not numbers).
  answer_dates(text, default_year=None) -> the dates in text as "YYYY-MM-DD" ("2026-12-10", "Dec 10, 2026",
    "10 December", "12/10/2026"); a date written without a year takes default_year.
  answer_times(text) -> the clock times in text as 24-hour "HH:MM" ("3:30 PM" -> "15:30", "09:00").
""".strip("\n")


# How a question verifier reads the answer; the wrong_answer and hedged_answer mutations and the
# reworded_answer equivalences (awm_core.mutations) are built to what this says.
PARSED_VALUES_RULE = r"""
  numbers: complete only if some v in answer_numbers(final_answer) has abs(v - expected) < 0.005 ("$1,234.50",
    "1,234.50 dollars" and "1234.5" all match 1234.5; "14", "2024" and the day of a date never match 4);
  dates and times: compare answer_dates(...) / answer_times(...) with the expected ones;
  names and titles: whole words, case-insensitively:
    re.search(r"\b" + re.escape(name.lower()) + r"\b", final_answer.lower()).
  A hedged answer is wrong: also compute the wrong candidates of the same kind (the other values of the column
  the answer comes from: other names, titles, statuses, and the same number for the other rows) and give
  "incomplete" when the answer states any of them as well as the right one ("Maria Lopez (or Tomasz Nowak)").
  A reworded answer is right: any sentence around the value, units written out, thousands separators, a date
  or time written another way.
""".strip("\n")

# The verifier is first written before the reference solution (tasks/generation.py): the prompt
# shows the whole module when it fits (it usually does) and otherwise always the tools the
# solution calls (once there is one) and the tools that write the tables the task names, then
# the other tools over those tables, helpers and the rest, up to this many characters, naming
# what was left out.
TOOL_CODE_CHARS = 20_000


def _words(text: str) -> set[str]:
    return {word_stem(w) for w in re.findall(r"[a-z]+", text.lower())}


def _relevance(tool, task_words: set[str]) -> int:
    """Words of the tool's name in the task ("delete", "note" for delete_note), then whether a
    table it touches is named there."""
    in_name = len(_words(tool.name.replace("_", " ")) & task_words)
    in_tables = any(_words(t.replace("_", " ")) & task_words for t in tool.tables)
    return 2 * in_name + in_tables


_WRITE = re.compile(r"\b(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM|REPLACE\s+INTO)\s+[\"`\[]?(\w+)", re.I)


def written_tables(source: str) -> set[str]:
    """Tables a tool's code writes (the names after INSERT INTO / UPDATE / DELETE FROM)."""
    return {m.group(1).lower() for m in _WRITE.finditer(source)}


_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


@dataclass(frozen=True)
class TopLevelCode:
    """A tool module's top-level functions (source text by name), its module constants (source
    text) and the tables each function writes."""

    functions: dict[str, str]
    constants: list[str]
    writes: dict[str, set[str]]


@functools.lru_cache(maxsize=32)
def top_level_code(source: str) -> TopLevelCode:
    """Parsed once per tool module: every verifier prompt of an environment (one per task and
    attempt) shows the same code, and ``ast.get_source_segment`` re-splits the whole source for
    each node it cuts out."""
    tree = ast.parse(source)
    # Split as the parser counts lines (\r\n, \r, \n): str.splitlines also breaks at \f and \x1c.
    lines = _LINES.findall(source)

    def segment(node: ast.stmt) -> str:
        # Top-level statements start at column 0; only the last line is cut, by its byte offset.
        first, last = node.lineno - 1, node.end_lineno - 1
        tail = lines[last].encode()[:node.end_col_offset].decode(errors="replace")
        return "".join(lines[first:last]) + tail

    functions = {n.name: segment(n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    # Module constants (the signed-in user's id, status names) are short and read by every tool.
    constants = [segment(n) for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))]
    return TopLevelCode(functions, constants, {name: written_tables(src) for name, src in functions.items()})


def kept_tools(ctx: StageContext, code: TopLevelCode) -> list[str]:
    """Tools whose code the prompt never cuts: those the task's reference solution calls (when
    the context has one) and those that write a table the task names."""
    solution = next((s for s in ctx.solutions if s.task_idx == ctx.task_idx), None)
    called = [c.tool for c in solution.calls] if solution else []
    task_words = _words(ctx.task().text)
    tables = {t.name.lower() for t in ctx.db_schema.tables} if ctx.db_schema else set()
    # "meal plan" names meal_plan_entries: all of a table's words but one will do.
    named = {t for t in tables if len(_words(t.replace("_", " ")) & task_words) >= max(1, len(t.split("_")) - 1)}
    writers = [n for n, written in code.writes.items() if not n.startswith("_") and written & named]
    return list(dict.fromkeys(n for n in called + writers if n in code.functions))


def render_tool_code(ctx: StageContext, cap: int = TOOL_CODE_CHARS) -> str:
    source = ctx.code.source.strip()
    if len(source) <= cap:
        return source
    code = top_level_code(source)
    funcs, constants = code.functions, code.constants
    task_words = _words(ctx.task().text)
    scored = sorted(((_relevance(t, task_words), t.name) for t in ctx.api_spec.tools if t.name in funcs),
                    key=lambda x: -x[0])
    kept = kept_tools(ctx, code)
    related = [n for score, n in scored if score > 0]
    order = related + [n for n in funcs if n.startswith("_")] + [n for score, n in scored if score == 0]
    shown, left_out = ["\n".join(constants)] if constants else [], []
    shown += [funcs[n] for n in kept]  # never cut, whatever they cost
    used = sum(map(len, shown))
    for name in (n for n in order if n not in kept):
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
                       user_id=CURRENT_USER_ID, imports=", ".join(IMPORTS), parsed_rule=PARSED_VALUES_RULE,
                       helpers=HELPERS_TEXT)
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


def soundness_errors(checks: list) -> list[str]:
    """Repair instructions for a verifier that said "complete" on wrong episodes (failed
    ``verifier_mutation`` checks: lenient) or not on equivalent ones (failed
    ``verifier_equivalence`` checks: too strict), naming each episode."""
    fooled = [c.detail for c in checks if c.name == "verifier_mutation" and not c.passed]
    strict = [c.detail for c in checks if c.name == "verifier_equivalence" and not c.passed]
    return (["your previous verifier accepted the reference solution but also said \"complete\" for a wrong episode "
             "made from it; check every change the task asks for (the right rows, by content, with the values the "
             "task states), that nothing else was inserted, updated or deleted (db_changes), and the exact value "
             "in the answer with no other candidate beside it: " + d for d in fooled]
            + ["your previous verifier rejected an episode that does the task as well as the reference solution; "
               "accept every correct way of doing it: " + d for d in strict])


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

"""Stage 2: user tasks for one scenario.

Reply: JSON ``{"tasks": ["one self-contained sentence", ...]}`` with exactly
``ctx.tasks_per_scenario`` entries.
"""
from __future__ import annotations

import re
import sys

from awm_core.errors import StageError
from awm_core.models import Task
from awm_core.stages.base import StageContext, extract_json, messages, no_execution, render_scenario, run_stage

NAME = "tasks"
PROMPT_VERSION = "tasks-v3"
JSON_MODE = True
PER_TASK = False
execute = no_execution  # its checks run in parse

SYSTEM = """
You design realistic user requests for a tool-using assistant that operates one application through an API.
Every request you write will later be implemented as a database, a set of tools and an automatic checker, so
it must be concrete, checkable and solvable with create/read/update/delete operations on stored data.
"""

USER = """
Application: {scenario}

Write exactly {n} user tasks for this application.

Rules for every task:
- One self-contained sentence that carries every value needed: names, titles, amounts, dates, quantities. Never
  "a recipe" or "some amount": say which one and how much.
- The user is already signed in and is always user id 1. No login, logout, sign-up, password or account-security tasks.
- Solvable only through the application's data operations: no file downloads, no UI clicks, no email or phone,
  no payments to outside services, no browsing of external websites.
- Deterministic outcome: exactly one correct end state or one correct answer. Avoid "recent", "today", "now"
  unless the date is spelled out.
- A task that creates something states every date and time the new record needs (a due date, a start time,
  the date of an expense) as a calendar date such as 2026-03-14, never "today", "tomorrow" or "next Friday":
  the tools never read the real clock, so the date has to come from the task.
- Mix the kinds: {questions} asking a question whose answer is a specific value the user wants to know
  (a count, a total, a name, a date), and {changes} changing data (create, update, delete){multi}.
- Order from beginner (one operation) to advanced (three or more dependent operations).
- Tasks must not depend on each other; each starts from the same initial data.

Answer with JSON only: {{"tasks": ["...", "..."]}}
"""


# Share of question tasks in the mix (the paper's environments have about 4 questions in 10).
QUESTION_SHARE = 0.4


def task_mix(k: int) -> tuple[int, int]:
    """(questions, changes) for ``k`` tasks: about ``QUESTION_SHARE`` questions, rounded, and at
    least one of each kind once there is room for both."""
    questions = round(k * QUESTION_SHARE)
    if k >= 2:
        questions = min(max(questions, 1), k - 1)
    return questions, k - questions


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario")
    questions, changes = task_mix(ctx.tasks_per_scenario)
    user = USER.format(scenario=render_scenario(ctx), n=ctx.tasks_per_scenario,
                       questions=_count(questions, "task"), changes=_count(changes, "task"),
                       multi=", some of them multi-step (look something up, then change it)" if changes > 1 else "")
    return messages(SYSTEM, user, previous_errors)


_AUTH_RE = re.compile(r"\b(log ?in|log ?out|sign ?up|sign ?in|register an account|password|two-factor|2fa)\b", re.I)


def parse(text: str, ctx: StageContext) -> list[Task]:
    data = extract_json(text, NAME)
    if isinstance(data, list):
        raise StageError(NAME, ['the reply is a bare JSON array; wrap it as {"tasks": [...]}'])
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
        raise StageError(NAME, ['the reply must be a JSON object with a "tasks" list of strings'])
    raw = data["tasks"]
    errors = []
    n = ctx.tasks_per_scenario
    if len(raw) < n:
        errors.append(f"expected exactly {n} tasks, got only {len(raw)}")
    raw = raw[:n]  # extra tasks are surplus, not a defect
    seen: set[str] = set()
    for i, t in enumerate(raw):
        if not isinstance(t, str) or not t.strip():
            errors.append(f"task {i} must be a non-empty string, got {type(t).__name__}")
            continue
        if len(t.split()) < 5:
            errors.append(f"task {i} ({t!r}) is too short to be self-contained: give every value it needs")
        if _AUTH_RE.search(t):
            errors.append(f"task {i} ({t!r}) is about authentication; the user is already signed in as user 1: replace it")
        key = " ".join(t.lower().split())
        if key in seen:
            errors.append(f"task {i} repeats an earlier task; every task must be different")
        seen.add(key)
    if errors:
        raise StageError(NAME, errors)
    return [Task(scenario_id=ctx.scenario_id, idx=i, text=" ".join(t.split())) for i, t in enumerate(raw)]


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

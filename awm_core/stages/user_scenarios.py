"""Stage 9: the user side of every task, so each one can be played as a conversation with a customer
who has to be asked (tau2-bench style), and the policy the agent follows in those conversations.

One call per environment, after every kept task has its verifier and reference solution. Reply: JSON
``{"policy": str, "scenarios": [{"task_idx", "reason_for_call", "known_info", "unknown_info",
"task_instructions"}]}``, one scenario per task. The task sentence stays the ground truth: verifiers and
reference solutions are untouched; ``apply`` puts each scenario on its task (``Task.user_scenario`` in
tau2's shape and ``Task.user_prompt``) and the policy on the environment (``Environment.policy``).

Checks:

- shape (``parse``): the two fields, exactly one scenario per task, non-empty ``reason_for_call`` and
  ``task_instructions``;
- known values (``parse``): every value the reference solution needs from the user is in the scenario's
  ``reason_for_call`` or ``known_info`` (``missing_values``);
- by execution (``execute``): the scripted user (``awm_core.agent.ScriptedUser``) opening with the scenario
  and the reference solution as the agent play each task as a conversation in the sandbox, and the task's
  verifier says "complete".
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator

from pydantic import BaseModel, Field

from awm_core.answers import answer_dates, answer_numbers, answer_times
from awm_core.errors import AWMError, SandboxError, StageError
from awm_core.models import Environment, ReferenceSolution, Task, ValidationCheck, is_ref
from awm_core.mutations import named_in_task
from awm_core.stages.base import (
    CURRENT_USER_ID, StageContext, extract_json, messages, render_scenario, render_seed_rows, render_spec, run_stage,
)

NAME = "user_scenarios"
PER_TASK = False
PROMPT_VERSION = "user_scenarios-v1"
JSON_MODE = True

# The fields of one scenario, as tau2-bench's user instructions name them.
FIELDS = ("reason_for_call", "known_info", "unknown_info", "task_instructions")
REQUIRED = ("reason_for_call", "task_instructions")

SYSTEM = """
You write the customer side of an application's support conversations. For each task the application's
assistant can do, you describe the customer who contacts the assistant to get exactly that done: why they
get in touch, what they know and can tell when asked, what they do not know, and how they behave. You also
write the short policy the assistant follows in these conversations.
"""

USER = """
Application: {scenario}

Tools the assistant has (name(parameters) -> returns: description; "?" marks optional parameters):
{spec}

Data the application holds (the assistant can look any of it up with its tools):
{seed}

Tasks. Each one is shown with the tool calls that complete it (the reference solution; a {{"$ref": ...}}
argument is a value an earlier call returned) and its final answer. The customer is the signed-in user
(user id {user_id}).
{tasks}

Write one user scenario per task, for the customer who wants exactly that task done:
- reason_for_call: why they get in touch, in their own words, first person ("I'd like to cancel an
  appointment I can't make."). Say what they want, not every detail: the assistant has to ask.
- known_info: what they can tell the assistant when asked, first person, with every value written exactly
  as in the task: names, titles, dates, times, amounts, quantities, quoted texts. It must hold every value
  the assistant cannot find in the data by itself: each argument value of the calls above that the data
  does not hold, and each value the task states that the calls use (which recipe, which appointment, which
  amount). Ids and whatever the tools return need not be known.
- unknown_info: what they do not know and the assistant must look up (ids, what the data says, the answer
  to their question), or null.
- task_instructions: how they behave: give a detail only when asked for it, confirm when the assistant asks
  before a change, never invent values that are not in known_info, end the conversation once the task is
  done.

Then write the policy: a short document (5 to 10 lines) for the assistant: it acts only for the signed-in
user; which actions need the user's explicit confirmation first (deleting, cancelling, submitting, paying,
approving, changing what was agreed); what is never allowed (acting on another user's account, inventing
values, revealing other users' private data). Every task above must stay doable under it.

Answer with JSON only: {{"policy": "...", "scenarios": [{{"task_idx": 0, "reason_for_call": "...",
"known_info": "...", "unknown_info": "..." or null, "task_instructions": "..."}}]}}
"""


class UserScenario(BaseModel):
    """One task's user, in tau2-bench's instruction fields."""

    task_idx: int = Field(ge=0)
    reason_for_call: str
    known_info: str | None = None
    unknown_info: str | None = None
    task_instructions: str


class UserScenarios(BaseModel):
    """The stage's artifact: the agent's policy and one scenario per task."""

    policy: str
    scenarios: list[UserScenario]

    def scenario(self, task_idx: int) -> UserScenario | None:
        return next((s for s in self.scenarios if s.task_idx == task_idx), None)


# --------------------------------------------------------------------------- prompt


def render_call(call: Any) -> str:
    return f"{call.tool}({json.dumps(call.arguments, ensure_ascii=False, separators=(', ', ': '))})"


def render_tasks(ctx: StageContext) -> str:
    out = []
    for t in ctx.tasks:
        out.append(f"Task {t.idx}: {t.text}")
        solution = next((s for s in ctx.solutions if s.task_idx == t.idx), None)
        if solution is not None:
            out.extend(f"  call {i}: {render_call(c)}" for i, c in enumerate(solution.calls))
            out.append(f"  final answer: {solution.final_answer if solution.final_answer else '(none)'}")
    return "\n".join(out)


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario", "tasks", "db_schema", "seed_data", "api_spec", "solutions")
    user = USER.format(scenario=render_scenario(ctx), spec=render_spec(ctx), seed=render_seed_rows(ctx),
                       tasks=render_tasks(ctx), user_id=CURRENT_USER_ID)
    return messages(SYSTEM, user, previous_errors)


# --------------------------------------------------------------------------- parse


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def parse(text: str, ctx: StageContext) -> UserScenarios:
    data = extract_json(text, NAME)
    shape = ('answer with one JSON object {"policy": "...", "scenarios": [{"task_idx", "reason_for_call", '
             '"known_info", "unknown_info", "task_instructions"}, ...]}')
    if not isinstance(data, dict):
        raise StageError(NAME, [f"the reply is a JSON {type(data).__name__}; {shape}"])
    errors: list[str] = []
    policy = _text(data.get("policy"))
    if policy is None:
        errors.append('"policy" is missing or empty: write the assistant\'s policy as one non-empty string')
    raw = data.get("scenarios")
    if not isinstance(raw, list):
        raise StageError(NAME, errors + [f'"scenarios" must be a list with one scenario per task; {shape}'])
    task_ids = [t.idx for t in ctx.tasks]
    scenarios: list[UserScenario] = []
    seen: dict[int, int] = {}
    for n, item in enumerate(raw):
        where = f"scenario {n}"
        if not isinstance(item, dict):
            errors.append(f"{where} is a JSON {type(item).__name__}, not an object with task_idx and the scenario fields")
            continue
        idx = item.get("task_idx")
        if isinstance(idx, str) and idx.strip().isdigit():
            idx = int(idx)
        if not isinstance(idx, int) or isinstance(idx, bool):
            errors.append(f"{where}: task_idx must be the task's number, got {json.dumps(idx)}")
            continue
        if idx not in task_ids:
            errors.append(f"{where}: there is no task {idx} (the tasks are {', '.join(map(str, task_ids))})")
            continue
        seen[idx] = seen.get(idx, 0) + 1
        where = f"task {idx}"
        fields: dict[str, str | None] = {}
        for name in FIELDS:
            value = item.get(name)
            if value is not None and not isinstance(value, str):
                errors.append(f"{where}: {name} must be a string" + (" or null" if name not in REQUIRED else "")
                              + f", got a JSON {type(value).__name__}")
                value = None
            fields[name] = _text(value)
            if name in REQUIRED and fields[name] is None:
                errors.append(f"{where}: {name} is missing or empty")
        if all(fields[name] for name in REQUIRED):
            scenarios.append(UserScenario(task_idx=idx, **fields))
    errors += [f"task {i} has {k} scenarios; write exactly one per task" for i, k in seen.items() if k > 1]
    errors += [f"task {i} has no scenario; write exactly one per task" for i in task_ids if i not in seen]
    if errors:
        raise StageError(NAME, errors)
    result = UserScenarios(policy=policy, scenarios=sorted(scenarios, key=lambda s: s.task_idx))
    errors = missing_values(result, ctx)
    if errors:
        raise StageError(NAME, errors)
    return result


# --------------------------------------------------------------------------- known values


@dataclass(frozen=True)
class NeededValue:
    """A value the reference solution needs from the user: ``where`` it goes (``tool.argument``) and why
    the agent cannot find it alone (``stated``: the task states it; else the database does not hold it)."""

    value: Any
    argument: str
    where: str
    stated: bool
    inside: bool = False  # a date or number inside wording the solution chose (a message body)


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ISO_DATE_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ](\d{1,2}:\d{2})(?::\d{2})?(?:Z|[+-]\d{2}:?\d{2})?$")
_CLOCK = re.compile(r"^\d{1,2}:\d{2}(?::\d{2})?$")
_ISO_MONTH = re.compile(r"^\d{4}-\d{2}$")
_NUMERIC = re.compile(r"^-?\d+(?:\.\d+)?$")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")


def _normal(text: str) -> str:
    """Lower case, every run of other characters one space, padded: whole words match with ``in``."""
    return " " + re.sub(r"[^a-z0-9]+", " ", str(text).lower()).strip() + " "


def _numbers(text: str) -> set[float]:
    words = set(_normal(text).split())
    return set(answer_numbers(text)) | {float(i) for i, w in enumerate(_NUMBER_WORDS) if w in words}


def _scalars(value: Any, path: str, name: str) -> Iterator[tuple[str, str, Any]]:
    """(path, argument name, value) of every scalar inside an argument value; ``$ref`` values left out."""
    if is_ref(value):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _scalars(v, f"{path}.{k}", str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _scalars(v, f"{path}.{i}", name)
    else:
        yield path, name, value


def _month_edge(iso: str, text: str) -> bool:
    """A first or last day of a month that ``text`` names ("October 2026" states 2026-10-01 and
    2026-10-31: the range a month is asked for in)."""
    import calendar

    y, m, d = (int(x) for x in iso.split("-"))
    if not 1 <= m <= 12 or d not in (1, calendar.monthrange(y, m)[1]):
        return False
    return named_in_task(text, "month", f"{y:04d}-{m:02d}")


def is_stated(text: str, argument: str, value: Any) -> bool:
    """Whether ``text`` states ``value``: numbers by value (``$1,500`` states 1500), dates and times in
    any common form (``Dec 2, 2026``, ``3:30 PM``; the first and last day of a month by the month), a
    date-time by both its date and its time, a month (``December 2026``), anything else as the same words,
    case and punctuation aside (a status or kind in another inflection: "reject" states ``rejected``)."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, (int, float)):
        return float(value) in _numbers(text)
    value = str(value).strip()
    if not value:
        return True
    if m := _ISO_DATE_TIME.match(value):
        hour, minute = m.group(2).split(":")
        return (m.group(1) in answer_dates(text, default_year=int(value[:4]))
                and f"{int(hour):02d}:{minute}" in answer_times(text))
    if _ISO_DATE.match(value):
        return (value in answer_dates(text, default_year=int(value[:4])) or named_in_task(text, argument, value)
                or _month_edge(value, text))
    if _CLOCK.match(value):
        hour, minute = value.split(":")[:2]
        return f"{int(hour):02d}:{minute}" in answer_times(text)
    if _ISO_MONTH.match(value):
        return named_in_task(text, argument, value)
    if _NUMERIC.match(value) and float(value) in _numbers(text):
        return True
    if _normal(value) in _normal(text):
        return True
    words = _normal(value.replace("_", " ")).split()
    # A status or kind ("rejected", bank_transfer) in another inflection; phrases need their words as written.
    return len(words) <= 2 and named_in_task(text, argument, value)


def _is_id(argument: str, value: Any) -> bool:
    """An integer id argument (a row's key: the agent looks it up)."""
    return (argument == "id" or argument.endswith("_id")) and isinstance(value, int) and not isinstance(value, bool)


def _is_wording(value: Any) -> bool:
    """Free wording (a message body, a description): three words or more, not a date, time or number."""
    if not isinstance(value, str):
        return False
    v = value.strip()
    if _ISO_DATE.match(v) or _ISO_DATE_TIME.match(v) or _CLOCK.match(v) or _ISO_MONTH.match(v) or _NUMERIC.match(v):
        return False
    return len(_normal(v).split()) >= 3


# A quoted text: the quote opens after a space or bracket (not the apostrophe of "Okafor's").
_QUOTED = re.compile(r"(?<![\w'\"])(?:'([^']+?)'|\"([^\"]+?)\"|‘([^’]+?)’|“([^”]+?)”)(?![\w])")


def task_values(text: str) -> list[tuple[str, Any]]:
    """(kind, value) of what a task sentence states outright: its quoted texts, full dates, clock times and
    numbers (outside dates and times)."""
    out: list[tuple[str, Any]] = [("text", next(g for g in m.groups() if g).strip()) for m in _QUOTED.finditer(text)]
    out += [("date", d) for d in answer_dates(text) if len(d) == 10]
    out += [("time", t) for t in answer_times(text)]
    out += [("number", int(n) if n.is_integer() else n) for n in answer_numbers(text)]
    return out


class SeededValues:
    """Every value in the seeded database (strings case-insensitively, numbers by value)."""

    def __init__(self, ctx: StageContext):
        from awm_core.changes import user_tables
        from awm_core.db import build_database, open_snapshot

        self.strings: set[str] = set()
        self.numbers: set[float] = set()
        conn = open_snapshot(build_database(ctx.db_schema, ctx.seed_data), readonly=True)
        try:
            for table in user_tables(conn):
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    for cell in row:
                        if isinstance(cell, str):
                            self.strings.add(" ".join(cell.lower().split()))
                        elif isinstance(cell, (int, float)) and not isinstance(cell, bool):
                            self.numbers.add(float(cell))
        finally:
            conn.close()

    def holds(self, value: Any) -> bool:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) in self.numbers
        if isinstance(value, str):
            v = " ".join(value.lower().split())
            return v in self.strings or (bool(_NUMERIC.match(v)) and float(v) in self.numbers)
        return False


def needed_values(task: Task, solution: ReferenceSolution, seeded: SeededValues) -> list[NeededValue]:
    """The values the user has to be able to give, each once: first the reference solution's, in call
    order, then the rest of what the task sentence states.

    A literal argument value (``$ref`` values, booleans and nulls aside) is needed when the task states it
    (the user has to say which one or how much, even where the data holds it), or when the database does
    not hold it. Integer ids the data holds are never needed (the agent looks them up). Wording the solution
    chose and the task does not state (a message body, a description) is free: only the dates and numbers
    in it that the task states are needed. Then every quoted text, date, time and number of the task
    sentence itself (which appointment, which amount) is needed too.
    """
    out: list[NeededValue] = []
    seen: set[str] = set()

    def add(value: Any, argument: str, where: str, stated: bool, inside: bool = False) -> None:
        key = f"#{float(value)}" if isinstance(value, (int, float)) else _normal(str(value))
        if key not in seen:
            seen.add(key)
            out.append(NeededValue(value, argument, where, stated, inside))

    for call in solution.calls:
        for name, value in call.arguments.items():
            for path, argument, v in _scalars(value, f"{call.tool}.{name}", name):
                if v is None or isinstance(v, bool) or (isinstance(v, str) and not v.strip()):
                    continue
                if _is_id(argument, v):
                    if not seeded.holds(v):
                        add(v, argument, path, stated=False)
                    continue
                if is_stated(task.text, argument, v):
                    add(v, argument, path, stated=True)
                elif seeded.holds(v):
                    continue
                elif _is_wording(v):
                    for d in answer_dates(v):
                        if len(d) == 10 and is_stated(task.text, argument, d):
                            add(d, argument, path, stated=True, inside=True)
                    for n in answer_numbers(v):
                        if is_stated(task.text, argument, n):
                            add(int(n) if n.is_integer() else n, argument, path, stated=True, inside=True)
                else:
                    add(v, argument, path, stated=False)
    for kind, v in task_values(task.text):
        if not any(is_stated(str(n.value), n.argument, v) for n in out if not isinstance(n.value, (int, float))):
            add(v, kind, "", stated=True)
    return out


def _shown(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    return text if re.fullmatch(r"[\w.:/@+-]+", text) else json.dumps(text, ensure_ascii=False)


def missing_values(result: UserScenarios, ctx: StageContext) -> list[str]:
    """One error per needed value that no scenario field the user opens with holds (``reason_for_call``
    and ``known_info``)."""
    seeded = SeededValues(ctx)
    errors = []
    for task in ctx.tasks:
        scenario = result.scenario(task.idx)
        solution = next((s for s in ctx.solutions if s.task_idx == task.idx), None)
        if scenario is None or solution is None:
            continue
        said = f"{scenario.reason_for_call}\n{scenario.known_info or ''}"
        for need in needed_values(task, solution, seeded):
            if is_stated(said, need.argument, need.value):
                continue
            if not need.where:
                why = "the task states it"
            elif need.inside:
                why = f"the task states it and the reference solution writes it into {need.where}"
            elif need.stated:
                why = f"the task states it and the reference solution passes it to {need.where}"
            else:
                why = f"the reference solution passes it to {need.where} and the database does not hold it"
            errors.append(f"task {task.idx}: known_info lacks {_shown(need.value)} ({why})")
    return errors


# --------------------------------------------------------------------------- apply and execute


def user_scenario(domain: str, scenario: UserScenario) -> dict[str, Any]:
    """One task's ``Task.user_scenario``, in tau2-bench's shape."""
    return {"persona": None, "instructions": {
        "domain": domain, "reason_for_call": scenario.reason_for_call, "known_info": scenario.known_info,
        "unknown_info": scenario.unknown_info, "task_instructions": scenario.task_instructions}}


def apply(env: Environment, result: UserScenarios) -> Environment:
    """The environment with each task's user scenario and user prompt, and the agent's policy."""
    from awm_core.agent.users import DEFAULT_USER_GUIDELINES, user_system_prompt

    domain = env.scenario.name if env.scenario else env.id
    tasks = []
    for t in env.tasks:
        s = result.scenario(t.idx)
        if s is not None:
            scenario = user_scenario(domain, s)
            t = t.model_copy(update={"user_scenario": scenario,
                                     "user_prompt": user_system_prompt(DEFAULT_USER_GUIDELINES, scenario)})
        tasks.append(t)
    return env.model_copy(update={"tasks": tasks, "policy": result.policy})


DETAIL_CHARS = 400


def execute(result: UserScenarios, ctx: StageContext, pool) -> list:
    """Each task played as a conversation in the sandbox: the scripted user opens with its scenario, the
    reference solution acts as the agent, the task's verifier must say "complete". Raises with every
    task that fails; returns one passed ``user_scenario`` check per task."""
    from awm_core.agent.users import play_reference
    from awm_core.settings import RewardSettings

    env = apply(ctx.environment(), result)
    checks, errors = [], []
    for task in env.tasks:
        if env.solution(task.idx) is None or env.verifier(task.idx) is None or result.scenario(task.idx) is None:
            continue
        try:
            episode, outcome = play_reference(pool, env, task.idx, RewardSettings())
        except SandboxError:
            raise  # the sandbox failed, not the reply: not a repair instruction
        except AWMError as exc:
            errors.append(f"task {task.idx}: playing it as a conversation failed: {str(exc)[:DETAIL_CHARS]}")
            continue
        if outcome.verdict == "complete":
            checks.append(ValidationCheck(name="user_scenario", task_idx=task.idx, passed=True,
                                          detail=f"played as a conversation with the scripted user: complete "
                                                 f"in {episode.steps} steps"))
            continue
        evidence = json.dumps(outcome.verifier_evidence, ensure_ascii=False, default=str)
        said = f"said {outcome.verdict!r}" if outcome.verdict else f"gave no verdict ({outcome.error})"
        errors.append((f"task {task.idx}: played as a conversation (the scripted user opening with reason_for_call "
                       f"and known_info, the reference solution as the agent; the episode ended by "
                       f"{episode.termination}) the verifier {said}; evidence: {evidence}")[:DETAIL_CHARS * 2])
    if errors:
        raise StageError(NAME, errors)
    return checks


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

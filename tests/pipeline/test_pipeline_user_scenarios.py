"""The user_scenarios stage: reply shape, the known-values check (every value the reference solution
needs from the user is in the scenario), the conversation check in the sandbox, ``apply``, the demo
recordings, and an environment published without scenarios when the stage keeps failing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from awm_core.errors import StageError
from awm_core.models import ApiSpec, DbSchema, ReferenceSolution, Scenario, SeedData, Task, ToolCall, Verifier
from awm_core.stages import FINAL_STAGES, PROMPT_VERSION, STAGES, code, user_scenarios as us
from awm_core.stages.base import StageContext, summarise_errors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from fixture_helpers import final, parsed_context  # noqa: E402

SCHEMA = {"tables": [
    {"name": "users", "ddl": "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"},
    {"name": "notes", "ddl": "CREATE TABLE notes (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id), "
                            "title TEXT NOT NULL UNIQUE, color TEXT NOT NULL, due TEXT)"},
]}
SEED = {"tables": [
    {"table_name": "users", "insert_statements": ["INSERT INTO users VALUES (1, 'Ana')"]},
    {"table_name": "notes", "insert_statements": [
        "INSERT INTO notes VALUES (1, 1, 'Groceries', 'blue', '2026-12-01')",
        "INSERT INTO notes VALUES (2, 1, 'Taxes', 'green', '2026-12-20')"]},
]}
SPEC = {"tools": [
    {"name": "list_notes", "description": "List my notes.", "tables": ["notes"]},
    {"name": "create_note", "description": "Create a note.", "tables": ["notes"], "parameters": {
        "title": {"type": "string", "required": True, "example": "Trip"},
        "color": {"type": "string", "required": True, "example": "red"},
        "due": {"type": "string", "required": False, "example": "2026-12-10"},
        "body": {"type": "string", "required": False, "example": "pack"}}},
    {"name": "delete_note", "description": "Delete a note.", "tables": ["notes"],
     "parameters": {"note_id": {"type": "integer", "required": True, "example": 2}}},
]}
CODE = '''```python
import sqlite3


def list_notes(conn: sqlite3.Connection) -> list:
    """List my notes."""
    return [{"id": r[0], "title": r[1], "due": r[2]} for r in
            conn.execute("SELECT id, title, due FROM notes WHERE user_id = 1 ORDER BY id")]


def create_note(conn: sqlite3.Connection, title: str, color: str, due: str | None = None, body: str | None = None) -> dict:
    """Create a note.

    Args:
        title: title
        color: color
        due: due date
        body: text
    """
    cur = conn.execute("INSERT INTO notes (user_id, title, color, due) VALUES (1, ?, ?, ?)", (title, color, due))
    return {"id": cur.lastrowid}


def delete_note(conn: sqlite3.Connection, note_id: int) -> dict:
    """Delete a note.

    Args:
        note_id: id
    """
    if conn.execute("DELETE FROM notes WHERE id = ? AND user_id = 1", (note_id,)).rowcount == 0:
        raise ToolError(f"no note {note_id}")
    return {"deleted": True}
```'''
CREATE_VERIFIER = '''
def verify(initial_db, final_db, final_answer):
    ch = db_changes(initial_db, final_db)
    new = ch.get("notes", {}).get("inserted", [])
    ok = set(ch) == {"notes"} and [(r["title"], r["color"], r["due"]) for r in new] == [("Dentist", "blue", "2026-03-14")]
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"inserted": new}}
'''
DELETE_VERIFIER = '''
def verify(initial_db, final_db, final_answer):
    ch = db_changes(initial_db, final_db)
    gone = [r["title"] for r in ch.get("notes", {}).get("deleted", [])]
    return {"verdict": "complete" if gone == ["Groceries"] and set(ch) == {"notes"} else "incomplete",
            "evidence": {"deleted": gone}}
'''
TASKS = ["Create a blue note titled 'Dentist' due 2026-03-14 with the text 'Call to confirm the cleaning and the X-ray.'",
         "Delete my note 'Groceries'."]
SOLUTIONS = [
    ReferenceSolution(task_idx=0, calls=[ToolCall(tool="create_note", arguments={
        "title": "Dentist", "color": "blue", "due": "2026-03-14", "body": "Please call the office to confirm."})]),
    ReferenceSolution(task_idx=1, calls=[ToolCall(tool="list_notes"), ToolCall(tool="delete_note", arguments={"note_id": 1})],
                      final_answer="Deleted 'Groceries'."),
]
POLICY = "Confirm with the user before deleting a note. Never change another user's notes."
GOOD = [
    {"task_idx": 0, "reason_for_call": "I'd like to put my dentist appointment in my notes.",
     "known_info": "Title: 'Dentist', colour blue, due March 14, 2026.", "unknown_info": None,
     "task_instructions": "Give each detail only when asked."},
    {"task_idx": 1, "reason_for_call": "I want to get rid of one of my notes.", "known_info": "It's the one called Groceries.",
     "unknown_info": "Which id it has.", "task_instructions": "Confirm before the deletion."},
]


def reply(scenarios=GOOD, policy=POLICY, changes: dict[int, dict] | None = None) -> str:
    """The reply with some fields of some tasks' scenarios changed (``changes``: task idx -> fields)."""
    scenarios = [dict(s, **(changes or {}).get(s["task_idx"], {})) for s in scenarios]
    return json.dumps({"policy": policy, "scenarios": scenarios})


@pytest.fixture
def ctx() -> StageContext:
    sc = Scenario.new("Note Pad", "Personal notes", "productivity")
    c = StageContext(scenario=sc, tasks=[Task(scenario_id=sc.id, idx=i, text=t) for i, t in enumerate(TASKS)],
                     db_schema=DbSchema.from_data(SCHEMA), seed_data=SeedData.from_data(SEED),
                     api_spec=ApiSpec.from_data(SPEC))
    c = c.with_(code=code.parse(CODE, c))
    return c.with_(solutions=SOLUTIONS, verifiers=[Verifier(task_idx=0, code=CREATE_VERIFIER),
                                                   Verifier(task_idx=1, code=DELETE_VERIFIER)])


def rejected(text: str, ctx: StageContext) -> list[str]:
    with pytest.raises(StageError) as exc:
        us.parse(text, ctx)
    assert exc.value.errors
    return exc.value.errors


def test_the_stage_is_registered_after_the_task_stages():
    assert list(FINAL_STAGES) == ["user_scenarios"] and list(STAGES)[-1] == "user_scenarios"
    assert us.PROMPT_VERSION == "user_scenarios-v1" and us.PROMPT_VERSION in PROMPT_VERSION
    assert us.PER_TASK is False and us.JSON_MODE is True


def test_prompt_shows_the_tasks_with_their_reference_calls_and_carries_errors(ctx):
    text = us.build_messages(ctx, [])[-1]["content"]
    assert TASKS[0] in text and 'create_note({"title": "Dentist"' in text and "final answer: Deleted 'Groceries'." in text
    assert '"Groceries" | "blue"' in text  # the seeded rows: what the agent can look up
    errors = ["task 0: known_info lacks 2026-03-14 (...)"]
    again = us.build_messages(ctx, errors)[-1]["content"]
    assert "previous attempt was rejected" in again and all(e in again for e in summarise_errors(errors))


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "the reply is a JSON list"),
    (json.dumps({"scenarios": GOOD}), '"policy" is missing or empty'),
    (json.dumps({"policy": POLICY, "scenarios": {"0": GOOD[0]}}), '"scenarios" must be a list'),
    (reply([GOOD[0]]), "task 1 has no scenario; write exactly one per task"),
    (reply([GOOD[0], GOOD[1], GOOD[1]]), "task 1 has 2 scenarios; write exactly one per task"),
    (reply([*GOOD, dict(GOOD[0], task_idx=7)]), "scenario 2: there is no task 7 (the tasks are 0, 1)"),
    (reply(changes={1: {"reason_for_call": "  "}}), "task 1: reason_for_call is missing or empty"),
    (reply(changes={0: {"task_instructions": None}}), "task 0: task_instructions is missing or empty"),
    (reply(changes={0: {"known_info": ["Dentist"]}}), "task 0: known_info must be a string or null, got a JSON list"),
    (reply(changes={0: {"task_idx": "first"}}), 'scenario 0: task_idx must be the task\'s number, got "first"'),
])
def test_malformed_replies_are_rejected_naming_the_task(ctx, text, expected):
    errors = rejected(text, ctx)
    assert any(expected in e for e in errors), errors


def test_a_scenario_without_the_date_the_task_needs_is_rejected_naming_it(ctx):
    errors = rejected(reply(changes={0: {"known_info": "Title: 'Dentist', colour blue, text 'Call to confirm the "
                                                        "cleaning and the X-ray.'"}}), ctx)
    assert errors == ["task 0: known_info lacks 2026-03-14 (the task states it and the reference solution passes "
                      "it to create_note.due)"]


def test_every_needed_value_is_named_and_the_database_lookups_are_not(ctx):
    errors = rejected(reply(changes={0: {"known_info": None, "reason_for_call": "I want a new note."},
                               1: {"known_info": "The list one."}}), ctx)
    assert errors == [
        'task 0: known_info lacks Dentist (the task states it and the reference solution passes it to create_note.title)',
        "task 0: known_info lacks blue (the task states it and the reference solution passes it to create_note.color)",
        "task 0: known_info lacks 2026-03-14 (the task states it and the reference solution passes it to create_note.due)",
        # The quoted text of the task; the body the solution wrote instead is its own wording (free).
        'task 0: known_info lacks "Call to confirm the cleaning and the X-ray." (the task states it)',
        # The note's id is in the database (the agent looks it up); its title is what the user must say.
        "task 1: known_info lacks Groceries (the task states it)",
    ]


def test_a_value_the_database_does_not_hold_is_needed_even_when_the_task_does_not_state_it(ctx):
    solution = SOLUTIONS[0].model_copy(update={"calls": [ToolCall(tool="create_note", arguments={
        "title": "Dentist", "color": "teal", "due": "2026-03-14"})]})
    c = ctx.with_(solutions=[solution, SOLUTIONS[1]])
    errors = rejected(reply(changes={0: {"known_info": "Title: 'Dentist', due March 14, 2026. Add the cleaning text."}}), c)
    assert "task 0: known_info lacks teal (the reference solution passes it to create_note.color and the database does " \
           "not hold it)" in errors


def test_a_scenario_holding_every_value_passes_in_any_common_form(ctx):
    text = reply(changes={0: {"known_info": "The title is DENTIST, it's Blue, due 14 March 2026, with the text \"Call to confirm "
                                      "the cleaning and the X-ray.\""}})
    result = us.parse(text, ctx)
    assert result.policy == POLICY and [s.task_idx for s in result.scenarios] == [0, 1]
    assert result.scenario(1).unknown_info == "Which id it has."
    # The same values, named by the user in other words, in reason_for_call.
    moved = reply(changes={0: {"reason_for_call": "A blue 'Dentist' note due 2026-03-14 with the text 'Call to confirm the "
                                            "cleaning and the X-ray.', please.", "known_info": None}})
    assert us.parse(moved, ctx).scenario(0).known_info is None


def test_is_stated_reads_numbers_dates_times_and_inflections():
    assert us.is_stated("about $1,500.00 total", "amount", 1500)
    assert us.is_stated("on Dec 2nd, 2026 at 3:30 PM", "start", "2026-12-02 15:30")
    assert not us.is_stated("on Dec 2nd, 2026", "start", "2026-12-02T15:30:00")
    assert us.is_stated("for October 2026", "start_date", "2026-10-31")  # a month's last day, by the month
    assert not us.is_stated("for October 2026", "start_date", "2026-10-15")
    assert us.is_stated("please reject it", "decision", "rejected") and us.is_stated("by bank transfer", "method", "bank_transfer")
    assert not us.is_stated("the 20 mg one", "dose", 2)  # numbers by value, not digits


def test_apply_puts_the_scenario_on_each_task_and_the_policy_on_the_environment(ctx):
    env = us.apply(ctx.environment(), us.parse(reply(changes={0: {"known_info": GOOD[0]["known_info"] + " Text: 'Call to "
                                                                      "confirm the cleaning and the X-ray.'"}}), ctx))
    assert env.policy == POLICY
    task = env.task(1)
    assert task.conversational and task.user_scenario == {"persona": None, "instructions": {
        "domain": "Note Pad", "reason_for_call": GOOD[1]["reason_for_call"], "known_info": GOOD[1]["known_info"],
        "unknown_info": GOOD[1]["unknown_info"], "task_instructions": GOOD[1]["task_instructions"]}}
    assert task.user_prompt.startswith("You play a customer") and "Reason for call:\n\t\tI want to get rid" in task.user_prompt
    assert task.text == TASKS[1]  # the task sentence stays the ground truth
    again = type(env).model_validate_json(env.model_dump_json())
    assert again.policy == POLICY and again.task(0).user_scenario == env.task(0).user_scenario


GOOD_TEXT = reply(changes={0: {"known_info": GOOD[0]["known_info"] + " Text: 'Call to confirm the cleaning and the X-ray.'"}})


def test_each_task_is_played_as_a_conversation_and_verified(ctx, pool):
    checks = us.execute(us.parse(GOOD_TEXT, ctx), ctx, pool)
    assert [(c.name, c.task_idx, c.passed) for c in checks] == [("user_scenario", 0, True), ("user_scenario", 1, True)]
    assert "complete" in checks[0].detail


def test_the_conversation_check_fails_when_the_verifier_would_not_accept(ctx, pool):
    """A planted reference that does not do the task (it deletes another note): the verifier's evidence is named."""
    value = us.parse(GOOD_TEXT, ctx)
    wrong = SOLUTIONS[1].model_copy(update={"calls": [ToolCall(tool="delete_note", arguments={"note_id": 2})]})
    with pytest.raises(StageError) as exc:
        us.execute(value, ctx.with_(solutions=[SOLUTIONS[0], wrong]), pool)
    [error] = exc.value.errors
    assert error.startswith("task 1: played as a conversation") and "the verifier said 'incomplete'" in error
    assert '"deleted": ["Taxes"]' in error


# ----------------------------------------------------------------------------- the demo recordings

DEMO = ("clinic_booking", "recipe_box", "team_expenses")


def _demo_context(scenario_id: str) -> StageContext:
    from awm_core.stages import solution, verifier
    from awm_core.stages.base import extract_json

    scenarios = extract_json(final("_", "scenario"), "scenario")["scenarios"]
    sc = next(Scenario.new(s["name"], s["description"], s["category"]) for s in scenarios
              if Scenario.new(s["name"], s["description"]).id == scenario_id)
    c = parsed_context(scenario_id, sc)
    return c.with_(solutions=[solution.parse(final(scenario_id, f"solution.{t.idx}"), c.with_(task_idx=t.idx)) for t in c.tasks],
                   verifiers=[verifier.parse(final(scenario_id, f"verifier.{t.idx}"), c.with_(task_idx=t.idx))
                              for t in c.tasks])


@pytest.mark.parametrize("scenario_id", DEMO)
def test_the_recorded_scenarios_pass_both_checks(scenario_id, pool):
    c = _demo_context(scenario_id)
    result = us.parse(final(scenario_id, "user_scenarios"), c)
    assert len(result.scenarios) == len(c.tasks) == 10 and result.policy.count("\n- ") >= 4
    for s in result.scenarios:  # the customer asks in their own words; the task's values come when asked
        assert s.known_info and s.reason_for_call.strip() != c.tasks[s.task_idx].text
    checks = us.execute(result, c, pool)
    assert len(checks) == 10 and all(ch.passed for ch in checks)


def test_a_recorded_scenario_without_a_value_is_rejected_naming_it(pool):
    c = _demo_context("clinic_booking")
    data = json.loads(final("clinic_booking", "user_scenarios"))
    data["scenarios"][1]["known_info"] = data["scenarios"][1]["known_info"].replace(" on 2026-12-02 at 09:30", "")
    errors = rejected(json.dumps(data), c)
    assert errors == ["task 1: known_info lacks 2026-12-02 (the task states it)",
                      "task 1: known_info lacks 09:30 (the task states it)"]


# ----------------------------------------------------------------------------- in the generate flow


@pytest.mark.slow
def test_an_environment_is_published_without_scenarios_when_the_stage_keeps_failing(prefect_server, awm_home, tmp_path,
                                                                                     monkeypatch):
    import shutil

    from awm_core.settings import DEFAULT_FIXTURES, get_settings
    from flows.generate import run_generate
    from storage.catalog import Catalog

    fixtures = tmp_path / "fixtures"
    shutil.copytree(DEFAULT_FIXTURES / "recipe_box", fixtures / "recipe_box")
    path = fixtures / "recipe_box" / "user_scenarios.json"
    data = json.loads(path.read_text())
    bad = json.loads(data["attempts"][0]["content"])
    bad["scenarios"] = bad["scenarios"][:9]  # task 9 has none, at every attempt
    data["attempts"] = [dict(data["attempts"][0], content=json.dumps(bad))]
    path.write_text(json.dumps(data))
    monkeypatch.setenv("AWM_GENERATION__STAGE_RETRIES", "1")
    get_settings.cache_clear()
    summary = run_generate(scenarios=["recipe_box"], concurrency=1, fixtures_dir=str(fixtures))
    assert summary["published"] == ["recipe_box"] and summary["user_scenarios"] == {"recipe_box": 0}
    [note] = summary["notes"]["recipe_box"]
    assert note.startswith("published without user scenarios: user_scenarios failed after 2 attempts") and "task 9" in note
    with Catalog.open(get_settings(), read_only=True) as cat:
        env = cat.get_environment("recipe_box")
    assert len(env.tasks) == 10 and not any(t.user_scenario for t in env.tasks) and env.policy is None
    assert env.validation.passed and env.provenance.stages["user_scenarios"].attempts == 2
    assert "task 9 has no scenario" in env.provenance.stages["user_scenarios"].errors[0]

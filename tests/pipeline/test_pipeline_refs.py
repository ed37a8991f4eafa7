"""``$ref`` bindings in reference solutions: a later call uses a value an earlier call returned
(the id of a row it created); every replay resolves them, and a bad ref says which call, which
ref and what was missing."""
from __future__ import annotations

import json

import pytest

from awm_core.agent.policies import ReferencePolicy
from awm_core.errors import SolutionRefError, StageError
from awm_core.models import ApiSpec, DbSchema, ReferenceSolution, Scenario, SeedData, Task, ToolCall, Verifier
from awm_core.stages import code, solution
from awm_core.stages.base import StageContext
from awm_core.validation import solution_checks

from test_pipeline_stages import CODE, SCHEMA, SEED, SPEC

TRIP_ONLY = Verifier(task_idx=0, code='''
def verify(initial_db, final_db, final_answer):
    q = "SELECT title FROM notes ORDER BY title"
    added = sorted(set(final_db.execute(q).fetchall()) - set(initial_db.execute(q).fetchall()))
    kept = set(initial_db.execute(q).fetchall()) <= set(final_db.execute(q).fetchall())
    ok = added == [("Trip",)] and kept
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"added": added, "kept": kept}}
''')


@pytest.fixture(scope="module")
def ctx() -> StageContext:
    sc = Scenario.new("Note Pad", "Personal notes", "productivity")
    c = StageContext(scenario=sc, tasks=[Task(scenario_id=sc.id, idx=0, text="Create a note titled 'Trip'.")],
                     db_schema=DbSchema.from_data(SCHEMA), seed_data=SeedData.from_data(SEED),
                     api_spec=ApiSpec.from_data(SPEC), task_idx=0)
    c = c.with_(code=code.parse(CODE, c))
    return c.with_(verifiers=[TRIP_ONLY])


REF_REPLY = json.dumps({"calls": [
    {"tool": "create_note", "arguments": {"title": "Scratch"}},
    {"tool": "delete_note", "arguments": {"note_id": {"$ref": "0.id"}}},
    {"tool": "create_note", "arguments": {"title": "Trip"}}], "final_answer": None})


def test_a_solution_with_ref_parses_replays_and_passes_its_verifier(ctx, pool):
    c = ctx
    sol = solution.parse(REF_REPLY, c)  # the $ref stands where the schema wants an integer
    checks = solution_checks(pool, c.environment(solutions=[sol]), 0)
    assert [(k.name, k.passed) for k in checks] == [("verifier_solution", True), ("replay_determinism", True)]
    # Without the binding the delete would fail: the created note's id is only known at replay.
    literal = sol.model_copy(update={"calls": [sol.calls[0], ToolCall(tool="delete_note", arguments={"note_id": 99}),
                                               sol.calls[2]]})
    assert not solution_checks(pool, c.environment(solutions=[literal]), 0)[0].passed


@pytest.mark.parametrize("ref,message", [
    ("1.id", "call 1: $ref '1.id' points at call 1, which is not an earlier call (earlier calls: 0..0)"),
    ("5.id", "call 1: $ref '5.id' points at call 5, which is not an earlier call"),
    ("first.id", "call 1: $ref 'first.id' must start with the index of an earlier call"),
])
def test_refs_that_point_forward_or_nowhere_are_rejected_when_parsed(ctx, ref, message):
    reply = json.loads(REF_REPLY)
    reply["calls"][1]["arguments"]["note_id"] = {"$ref": ref}
    with pytest.raises(StageError) as exc:
        solution.parse(json.dumps(reply), ctx)
    assert exc.value.errors[0].startswith(message)


@pytest.mark.parametrize("ref,message", [
    ("0.note_id", "call 1: $ref '0.note_id': call 0's result at '0' has no key 'note_id' (keys: id)"),
    ("0.id.x", "call 1: $ref '0.id.x': call 0's result at '0.id' is 3, not an object or list, so it has no 'x'"),
])
def test_a_ref_to_a_missing_key_fails_the_replay_clearly(ctx, pool, ref, message):
    reply = json.loads(REF_REPLY)
    reply["calls"][1]["arguments"]["note_id"] = {"$ref": ref}
    c = ctx
    with pytest.raises(StageError) as exc:
        solution.execute(solution.parse(json.dumps(reply), c), c, pool)
    assert message in exc.value.errors[0]


def test_list_indices_in_a_ref_path():
    from awm_core.models import resolve_refs

    results = [{"items": [{"id": 7}, {"id": 8}]}, '{"id": 9}']
    got = resolve_refs({"a": {"$ref": "0.items.1.id"}, "b": [{"$ref": "1.id"}], "c": {"d": 1}}, results, 2)
    assert got == {"a": 8, "b": [9], "c": {"d": 1}}
    with pytest.raises(SolutionRefError, match=r"call 0's result at '0.items' is a list of 2 item\(s\); '2' is not"):
        resolve_refs({"a": {"$ref": "0.items.2.id"}}, results, 2)


def test_reference_policy_resolves_refs_from_the_tool_results_it_is_shown():
    sol = ReferenceSolution.model_validate(json.loads(REF_REPLY) | {"task_idx": 0})
    tools = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("create_note", "delete_note")]
    policy = ReferencePolicy(sol, style="native")
    msgs = [{"role": "user", "content": "task"}]
    first = policy.act(msgs, tools)
    msgs += [{"role": "assistant", "content": None}, {"role": "tool", "tool_call_id": "x", "content": '{"id": 41}'}]
    second = policy.act(msgs, tools)
    assert first.tool_calls[0]["arguments"] == {"title": "Scratch"}
    assert second.tool_calls[0] == {"id": "ref_2", "name": "delete_note", "arguments": {"note_id": 41}}
    blind = ReferencePolicy(sol, style="native")
    blind.act(msgs[:1], tools)
    with pytest.raises(SolutionRefError, match="call 0 has no result to read"):
        blind.act(msgs[:1], tools)  # a history window of 0 hides the result

"""Pure parts of the agent layer: parsing, the history window, routing, splits, rewards, judge replies."""
import json
import random

import jsonschema
import pytest

from awm_core.agent import (
    FormatError, Generation, RandomPolicy, ReferencePolicy, TextToolCallPolicy, ToolRouter, Turn, make_splits,
    parse_judge_reply, parse_native_tool_calls, parse_text_tool_calls, random_arguments, reward_for, select,
    visible_messages,
)
from awm_core.agent.episode import ToolCallRequest
from awm_core.models import ReferenceSolution, ToolCall
from awm_core.settings import RewardSettings

TOOLS = [
    {"name": "add_note", "description": "Add a note.", "input_schema": {
        "type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["title"]}},
    {"name": "list_notes", "description": "List notes.", "input_schema": {"type": "object", "properties": {}}},
]


# --------------------------------------------------------------------------- parsing

def test_text_tool_calls_parsed_in_order_and_thinking_ignored():
    text = ('<think>maybe <tool_call>{"name": "drafted", "arguments": {}}</tool_call></think>I will add it.\n'
            '<tool_call>\n{"name": "add_note", "arguments": {"title": "x"}}\n</tool_call>\n'
            '<tool_call>{"name": "list_notes"}</tool_call>')
    calls = parse_text_tool_calls(text, id_prefix="call_2")
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_2_0", "add_note", {"title": "x"}), ("call_2_1", "list_notes", {})]
    assert parse_text_tool_calls("The answer is 42.") == []


@pytest.mark.parametrize("text,kind", [
    ('<tool_call>{"name": "add_note", "arguments": {"title": }</tool_call>', "unparsable"),
    ('<tool_call>{"name": "add_note", "arguments": {}}', "unparsable"),           # never closed
    ('<tool_call>["add_note", {}]</tool_call>', "unparsable"),
    ('<tool_call>{"arguments": {}}</tool_call>', "unparsable"),                     # no name
    ('<tool_call>{"name": "add_note", "arguments": "title=x"}</tool_call>', "arguments_not_object"),
    ('<tool_call>{"name": "add_note", "arguments": [1]}</tool_call>', "arguments_not_object"),
])
def test_malformed_text_calls_raise_format_error(text, kind):
    with pytest.raises(FormatError) as exc:
        parse_text_tool_calls(text)
    assert exc.value.kind == kind


def test_native_calls_accept_json_strings_and_reject_bad_ones():
    calls = parse_native_tool_calls([{"id": "a", "function": {"name": "add_note", "arguments": '{"title": "t"}'}},
                                     {"name": "list_notes", "arguments": ""}])
    assert [(c.id, c.name, c.arguments) for c in calls] == [("a", "add_note", {"title": "t"}), ("call_1", "list_notes", {})]
    with pytest.raises(FormatError) as exc:
        parse_native_tool_calls([{"name": "add_note", "arguments": "{oops"}])
    assert exc.value.kind == "unparsable"
    with pytest.raises(FormatError) as exc:
        parse_native_tool_calls([{"name": "add_note", "arguments": "[1, 2]"}])
    assert exc.value.kind == "arguments_not_object"


# --------------------------------------------------------------------------- routing

def test_direct_router_rejects_unknown_tools():
    r = ToolRouter(TOOLS, "direct")
    assert [t["function"]["name"] for t in r.policy_tools()] == ["add_note", "list_notes"]
    assert r.resolve(ToolCallRequest("c", "add_note", {"title": "a"})) == ("add_note", {"title": "a"})
    with pytest.raises(FormatError) as exc:
        r.resolve(ToolCallRequest("c", "delete_everything", {}))
    assert exc.value.kind == "unknown_tool"


def test_meta_router_unwraps_call_tool_with_object_or_json_string():
    r = ToolRouter(TOOLS, "meta")
    assert [t["function"]["name"] for t in r.policy_tools()] == ["list_tools", "call_tool"]
    assert r.resolve(ToolCallRequest("c", "list_tools", {})) == (None, {})
    assert r.resolve(ToolCallRequest("c", "call_tool", {"tool_name": "add_note", "arguments": {"title": "a"}})) == (
        "add_note", {"title": "a"})
    # The official AWM agent sends the inner arguments as a JSON string and prefixes names.
    assert r.resolve(ToolCallRequest("c", "call_tool", {"tool_name": "mcp_tool_add_note",
                                                        "arguments": '{"title": "b"}'})) == ("add_note", {"title": "b"})
    for args, kind in [({"tool_name": "nope"}, "unknown_tool"), ({}, "unknown_tool"),
                       ({"tool_name": "add_note", "arguments": "{bad"}, "arguments_not_object"),
                       ({"tool_name": "add_note", "arguments": [1]}, "arguments_not_object")]:
        with pytest.raises(FormatError) as exc:
            r.resolve(ToolCallRequest("c", "call_tool", args))
        assert exc.value.kind == kind
    with pytest.raises(FormatError):
        r.resolve(ToolCallRequest("c", "add_note", {"title": "a"}))  # env tools are not direct in meta mode
    assert r.listing()[0] == TOOLS[0]


# --------------------------------------------------------------------------- window

def _turn(i, calls=1):
    assistant = {"role": "assistant", "content": f"reply {i}"}
    tools = [{"role": "tool", "tool_call_id": f"call_{i}_{k}", "content": f"result {i}.{k}"} for k in range(calls)]
    return Turn(index=i, visible=[], raw=f"reply {i}", assistant=assistant, tool_messages=tools)


def test_visible_messages_window_three_and_none():
    system, task = "SYS", "TASK"
    turns = [_turn(i, calls=1 + i % 2) for i in range(5)]
    head = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "TASK"}]
    # At step t the policy has seen turns[:t]; with w=3 only the last three of them.
    for t in range(6):
        got = visible_messages(system, task, turns[:t], 3)
        assert got == head + [m for turn in turns[max(0, t - 3):t] for m in turn.messages]
        assert visible_messages(system, task, turns[:t], None) == head + [m for turn in turns[:t] for m in turn.messages]
    # Spelled out for t=4, w=3: turn 0 is gone; turns 1..3 each keep all their tool results.
    assert [m["content"] for m in visible_messages(system, task, turns[:4], 3)] == [
        "SYS", "TASK", "reply 1", "result 1.0", "result 1.1", "reply 2", "result 2.0",
        "reply 3", "result 3.0", "result 3.1"]
    assert visible_messages(None, task, turns, 0) == [{"role": "user", "content": "TASK"}]
    # Plain message lists work as turns too (the trainer may hold them that way).
    assert visible_messages(system, task, [t.messages for t in turns], 2)[2:] == turns[3].messages + turns[4].messages
    with pytest.raises(ValueError):
        visible_messages(system, task, turns, -1)


def test_visible_messages_keeps_the_user_message_being_answered_in_view():
    """A scripted task: turn 1 answered the first message and carries the second. Once that turn
    leaves the window, the second message takes the task's place; the first is no longer shown."""
    turns = [_turn(i) for i in range(4)]
    turns[1].user_message = {"role": "user", "content": "SECOND"}
    assert turns[1].messages[-1] == {"role": "user", "content": "SECOND"}
    users = lambda msgs: [m["content"] for m in msgs if m["role"] == "user"]  # noqa: E731
    assert users(visible_messages("SYS", "TASK", turns[:2], 3)) == ["TASK", "SECOND"]
    assert users(visible_messages("SYS", "TASK", turns[:4], 2)) == ["SECOND"]
    assert users(visible_messages("SYS", "TASK", turns[:4], 0)) == ["SECOND"]
    assert users(visible_messages("SYS", "TASK", turns[:4], None)) == ["TASK", "SECOND"]
    # Plain message lists carry no follow-up: a "user" message in one is not pinned.
    assert users(visible_messages("SYS", "TASK", [t.messages for t in turns], 0)) == ["TASK"]


def test_reference_policy_answers_each_user_turn_after_its_calls():
    sol = ReferenceSolution(task_idx=0, calls=[ToolCall(tool="list_notes"), ToolCall(tool="add_note", arguments={"title": "a"})],
                            turn_ends=[1, 1, 2], final_answer="all done")
    policy = ReferencePolicy(sol, style="native")
    replies = [policy.act([], []) for _ in range(5)]
    kinds = [r.tool_calls[0]["name"] if r.tool_calls else r.text for r in replies]
    assert kinds == ["list_notes", "Done.", "Done.", "add_note", "all done"]


# --------------------------------------------------------------------------- policies (pure parts)

def test_text_policy_renders_tools_and_tool_results():
    seen = {}

    def generate(messages):
        seen["messages"] = messages
        return Generation('<tool_call>{"name": "list_notes", "arguments": {}}</tool_call>', 11, 7)

    policy = TextToolCallPolicy(generate, tool_role="user")
    router = ToolRouter(TOOLS, "direct")
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "T"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "add_note", "arguments": '{"title": "x"}'}}]},
            {"role": "tool", "tool_call_id": "a", "content": '{"id": 3}'}]
    reply = policy.act(msgs, router.policy_tools())
    assert reply.tool_calls is None and reply.prompt_tokens == 11 and reply.completion_tokens == 7
    rendered = seen["messages"]
    assert rendered[0]["content"].startswith("SYS\n\n# Tools") and '"name": "add_note"' in rendered[0]["content"]
    assert parse_text_tool_calls(rendered[2]["content"])[0].arguments == {"title": "x"}
    assert rendered[3] == {"role": "user", "content": '<tool_response>\n{"id": 3}\n</tool_response>'}
    assert policy.render(msgs, router.policy_tools()) == rendered


def test_reference_policy_wraps_calls_for_meta_interface():
    sol = ReferenceSolution(task_idx=0, calls=[ToolCall(tool="add_note", arguments={"title": "a"})], final_answer="ok")
    meta_tools = ToolRouter(TOOLS, "meta").policy_tools()
    p = ReferencePolicy(sol)
    replies = [p.act([], meta_tools).text for _ in range(3)]
    assert parse_text_tool_calls(replies[0])[0].name == "list_tools"
    c = parse_text_tool_calls(replies[1])[0]
    assert (c.name, c.arguments) == ("call_tool", {"tool_name": "add_note", "arguments": {"title": "a"}})
    assert replies[2] == "ok"
    p = ReferencePolicy(sol, style="native")
    r = p.act([], ToolRouter(TOOLS, "direct").policy_tools())
    assert r.tool_calls == [{"id": "ref_1", "name": "add_note", "arguments": {"title": "a"}}]
    assert p.act([], []).tool_calls == []


def test_random_arguments_are_schema_valid():
    schema = {"type": "object", "required": ["a", "b", "c", "d", "e", "f", "g"], "additionalProperties": False,
              "properties": {
                  "a": {"type": "string", "minLength": 8}, "b": {"type": "integer", "minimum": 3, "maximum": 9},
                  "c": {"type": "number"}, "d": {"type": "boolean"}, "e": {"enum": ["x", "y"]},
                  "f": {"type": "array", "items": {"type": "integer"}},
                  "g": {"type": "object", "properties": {"h": {"type": ["string", "null"]}}, "required": ["h"]},
                  "i": {"anyOf": [{"type": "null"}, {"type": "string", "format": "date"}]}}}
    rng = random.Random(1)
    for _ in range(200):
        args = random_arguments(schema, rng)
        jsonschema.validate(args, schema)
        assert set(schema["required"]) <= set(args)
    p1, p2 = RandomPolicy(seed=5), RandomPolicy(seed=5)
    tools = ToolRouter(TOOLS, "direct").policy_tools()
    assert [p1.act([], tools).text for _ in range(4)] == [p2.act([], tools).text for _ in range(4)]


# --------------------------------------------------------------------------- splits

def test_splits_reproducible_order_independent_and_proportional():
    envs = {f"env_{i}": range(10) for i in range(10)}
    rows = make_splits(envs, seed=0)
    assert rows == make_splits(dict(reversed(list(envs.items()))), seed=0)
    by_env = select(rows, "train")
    assert len(by_env) == 8 and len(select(rows, "val")) == 2
    assert all(len(v) == 10 for v in by_env.values())
    assert make_splits(envs, seed=1) != rows
    task_rows = make_splits(envs, seed=0, by="task")
    for env_id in envs:
        sides = [r["split"] for r in task_rows if r["env_id"] == env_id]
        assert sides.count("train") == 8 and sides.count("val") == 2
    assert {r["seed"] for r in task_rows} == {0}
    # Adding an environment leaves the others' ranks alone: with the same train count they keep their side.
    three = make_splits({"a": [0], "b": [0], "c": [0]}, seed=3)
    assert sorted(r["split"] for r in three) == ["train", "train", "val"]
    with pytest.raises(ValueError):
        make_splits(envs, ratio=1.5)
    with pytest.raises(ValueError):
        make_splits(envs, by="scenario")


# --------------------------------------------------------------------------- rewards and judge replies

def test_reward_mapping_follows_settings():
    r = RewardSettings()
    assert [reward_for(x, r) for x in ("completed", "partially_completed", "agent_error", "environment_error",
                                       "format_error")] == [1.0, 0.1, 0.0, 0.0, -1.0]
    assert reward_for("partially_completed", RewardSettings(partial=0.25)) == 0.25
    with pytest.raises(ValueError):
        reward_for("partial", r)


def test_judge_reply_parsing():
    d = parse_judge_reply('```json\n{"classification": "partially_completed", "reasoning": "half"}\n```')
    assert (d.classification, d.reasoning, d.error) == ("partially_completed", "half", None)
    assert parse_judge_reply('{"classification": "great"}').error.startswith("judge classification 'great'")
    assert "not JSON" in parse_judge_reply("I think it is complete").error
    assert json.loads(parse_judge_reply('{"classification": "completed", "reasoning": "x"}').raw)["reasoning"] == "x"

"""The agent loop against real sandbox sessions: reference and random policies, the history window,
format errors, environment errors, both interfaces and both reply styles."""
import json

import pytest

from agent_bundles import notes, notes_environment, pool  # noqa: F401  (fixtures)
from awm_core.agent import (
    PolicyReply, RandomPolicy, ReferencePolicy, TextToolCallPolicy, run_episode, verify_and_reward, verify_episode,
    visible_messages,
)
from awm_core.db import snapshot_digest
from awm_core.settings import load_settings

SETTINGS = load_settings()


class Scripted:
    """Replies from a list, recording what it was shown."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.seen = []

    def act(self, messages, tools):
        self.seen.append((list(messages), tools))
        reply = self.replies.pop(0)
        return reply if isinstance(reply, PolicyReply) else PolicyReply(text=reply, prompt_tokens=10, completion_tokens=3)


def call(name, **args):
    return f'<tool_call>{json.dumps({"name": name, "arguments": args})}</tool_call>'


def episode(handle, env, policy, idx=0, **kw):
    with handle.open_session() as s:
        return run_episode(policy, s, env.task(idx), handle.tools(), **kw)


@pytest.mark.parametrize("interface", ["direct", "meta"])
@pytest.mark.parametrize("style", ["text", "native"])
def test_reference_policy_scores_one_on_every_task(pool, notes, interface, style):
    env, handle = notes
    for t in env.tasks:
        ep = episode(handle, env, ReferencePolicy(env.solution(t.idx), style=style), t.idx, interface=interface)
        assert ep.termination == "final_answer", ep.error
        assert len(ep.turns) == len(env.solution(t.idx).calls) + 1 + (interface == "meta")
        out = verify_episode(pool, env, t.idx, ep, SETTINGS)
        assert (out.label, out.reward, out.env_error) == ("completed", 1.0, False), out
    # The final database is what the session holds, and the digests are of real state.
    ep = episode(handle, env, ReferencePolicy(env.solution(1)), 1)
    assert verify_and_reward(pool, env, ep, SETTINGS).reward == 1.0  # the episode knows its task
    assert ep.initial_digest == snapshot_digest(handle.snapshot) != ep.final_digest == snapshot_digest(ep.final_snapshot)
    assert "final_snapshot" not in json.dumps(ep.to_dict()) and ep.to_dict()["termination"] == "final_answer"


def test_window_decides_exactly_what_the_policy_sees(notes):
    env, handle = notes
    replies = [call("list_notes"), call("list_notes", limit=1), call("create_note", title="a"),
               call("delete_note", note_id=99), call("list_notes", limit=2), "All done."]
    for window in (3, None):
        policy = Scripted(replies)
        ep = episode(handle, env, policy, window=window, system_prompt="SYS")
        assert ep.termination == "final_answer" and ep.final_answer == "All done." and len(ep.turns) == 6
        head = [{"role": "system", "content": "SYS"}, {"role": "user", "content": env.task(0).text}]
        for t, (seen, tools) in enumerate(policy.seen):
            shown = ep.turns[max(0, t - 3) if window == 3 else 0:t]
            expected = head + [m for turn in shown for m in turn.messages]
            assert seen == expected == ep.turns[t].visible
            assert seen == visible_messages("SYS", env.task(0).text, ep.turns[:t], window)
            assert [x["function"]["name"] for x in tools] == ["create_note", "list_notes", "delete_note"]
        # At step 5 with w=3 the policy sees turns 2, 3, 4: the assistant texts prove which.
        last = [m["content"] for m in policy.seen[5][0] if m["role"] == "assistant"]
        assert last == (replies[2:5] if window == 3 else replies[:5])
        # The full history keeps everything, whatever the window.
        assert len(ep.messages) == 2 + 5 * 2 + 1
        # The error of a failed call reaches the agent as a tool message, and does not end the episode.
        assert ep.turns[3].results[0].error_kind == "tool" and "not found" in ep.turns[3].tool_messages[0]["content"]
        assert ep.prompt_tokens == 60 and ep.completion_tokens == 18


@pytest.mark.parametrize("reply,kind", [
    (call("list_notes")[:-3], "unparsable"),
    ('<tool_call>{"name": "list_notes", "arguments": {</tool_call>', "unparsable"),
    (call("drop_database"), "unknown_tool"),
    ('<tool_call>{"name": "create_note", "arguments": "Groceries"}</tool_call>', "arguments_not_object"),
    (PolicyReply(text="", tool_calls=[{"id": "x", "name": "create_note", "arguments": "{title"}]), "unparsable"),
    (PolicyReply(text="", tool_calls=[{"id": "x", "name": "nope", "arguments": "{}"}]), "unknown_tool"),
    (PolicyReply(text="", tool_calls=[{"id": "x", "name": "create_note", "arguments": "[1]"}]), "arguments_not_object"),
])
def test_each_format_error_ends_the_episode_with_minus_one(pool, notes, reply, kind):
    env, handle = notes
    policy = Scripted([call("list_notes"), reply, "never reached"])
    ep = episode(handle, env, policy)
    assert ep.termination == "format_error" and len(ep.turns) == 2 and len(policy.replies) == 1
    assert ep.turns[1].format_error_kind == kind and ep.error.startswith(kind)
    assert ep.final_digest == ep.initial_digest  # nothing of the bad reply ran
    out = verify_episode(pool, env, 0, ep, SETTINGS)
    assert (out.label, out.reward, out.env_error) == ("format_error", -1.0, False)


@pytest.mark.parametrize("arguments", [{"tool_name": "drop_database"}, {"tool_name": "create_note", "arguments": "{x"}])
def test_meta_interface_format_errors(pool, notes, arguments):
    env, handle = notes
    ep = episode(handle, env, Scripted([call("call_tool", **arguments)]), interface="meta")
    assert ep.termination == "format_error"
    assert verify_episode(pool, env, 0, ep, SETTINGS).reward == -1.0


def test_meta_interface_accepts_json_string_arguments_and_lists_tools(pool, notes):
    env, handle = notes
    policy = Scripted([call("list_tools"),
                       call("call_tool", tool_name="create_note", arguments='{"title": "Groceries", "body": "milk, eggs"}'),
                       "ok"])
    ep = episode(handle, env, policy, interface="meta")
    listing = json.loads(ep.turns[0].tool_messages[0]["content"])
    assert [t["name"] for t in listing] == ["create_note", "list_notes", "delete_note"]
    assert listing[0]["input_schema"]["required"] == ["title"]
    assert ep.turns[1].results[0].tool == "create_note" and ep.turns[1].results[0].ok
    assert verify_episode(pool, env, 0, ep, SETTINGS).label == "completed"


def test_partial_and_agent_error_and_max_turns(pool, notes):
    env, handle = notes
    ep = episode(handle, env, Scripted([call("create_note", title="Groceries", body="bread"), "done"]))
    assert verify_episode(pool, env, 0, ep, SETTINGS).to_dict() | {"verifier_evidence": None} == {
        "label": "partially_completed", "reward": 0.1, "env_error": False, "verifier_evidence": None,
        "judge_reasoning": None, "verdict": "partial", "error": None}
    ep = episode(handle, env, Scripted(["I would rather not."]))
    out = verify_episode(pool, env, 0, ep, SETTINGS)
    assert (out.label, out.reward, out.verifier_evidence) == ("agent_error", 0.0, {"groceries_notes": 0})
    ep = episode(handle, env, Scripted([call("list_notes")] * 4), max_turns=4)
    assert ep.termination == "max_turns" and ep.final_answer is None and len(ep.turns) == 4
    assert verify_episode(pool, env, 0, ep, SETTINGS).label == "agent_error"


def test_text_policy_through_the_loop(pool, notes):
    env, handle = notes
    shown = []

    def generate(messages):
        shown.append(messages)
        if len(shown) == 1:
            return '<think>list first</think>\n' + call("create_note", title="Groceries", body="milk, eggs")
        return "<think>it worked</think>Created the note."

    ep = episode(handle, env, TextToolCallPolicy(generate))
    assert ep.final_answer == "Created the note." and verify_episode(pool, env, 0, ep, SETTINGS).reward == 1.0
    assert "<tools>" in shown[0][0]["content"] and shown[1][-1]["role"] == "tool"


def test_random_policy_scores_low_and_never_crashes(pool, notes):
    env, handle = notes
    rewards = []
    for seed in range(12):
        for interface in ("direct", "meta"):
            ep = episode(handle, env, RandomPolicy(seed, calls=4), seed % 3, interface=interface)
            assert ep.termination == "final_answer" and ep.tool_call_count >= 4
            out = verify_episode(pool, env, seed % 3, ep, SETTINGS)
            assert out.label in ("completed", "partially_completed", "agent_error") and not out.env_error
            rewards.append(out.reward)
    assert sum(rewards) / len(rewards) < 0.3


def test_environment_error_is_flagged(pool):
    env = notes_environment("sleepy_notes", sleepy=True)
    handle = pool.load(env)
    ep = episode(handle, env, Scripted([call("list_notes"), call("nap", seconds=30), "never reached"]))
    assert ep.termination == "environment_error" and ep.environment_error
    assert ep.turns[1].results[0].error_kind == "environment"
    out = verify_episode(pool, env, 0, ep, SETTINGS)
    assert (out.label, out.reward, out.env_error) == ("environment_error", 0.0, True)
    # The pool replaced the worker: the next episode on the same environment works.
    ep = episode(handle, env, ReferencePolicy(env.solution(0)))
    assert verify_episode(pool, env, 0, ep, SETTINGS).reward == 1.0


def test_verifier_crash_is_an_environment_error(pool, notes):
    env, handle = notes
    broken = env.model_copy(deep=True)
    broken.verifiers[0].code = "def verify(initial_db, final_db, final_answer):\n    return 1 / 0\n"
    ep = episode(handle, env, ReferencePolicy(env.solution(0)))
    out = verify_episode(pool, broken, 0, ep, SETTINGS)
    assert (out.label, out.env_error) == ("environment_error", True) and "ZeroDivisionError" in out.error

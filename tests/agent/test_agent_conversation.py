"""Conversational episodes (tau2-bench style): the agent loop with a user simulator, against real
sandbox sessions. Scripted and LLM (offline fixtures) users, the user's own tool calls, stop tokens,
tau2's step and error limits, and what each party is shown."""
import json

import pytest

from agent_bundles import notes, pool  # noqa: F401  (fixtures)

from awm_core.agent import (
    AGENT_GREETING, STOP_TOKENS, LLMUser, PolicyReply, ReferencePolicy, ScriptedUser, UserReply, is_stop,
    run_episode, solution_ranges, user_view, verify_episode,
)
from awm_core.agent.loop import database_state_digest
from awm_core.agent.users import default_user_prompt, render_scenario, task_key
from awm_core.errors import SettingsError
from awm_core.llm.offline import write_fixture
from awm_core.llm.records import read_ledger
from awm_core.models import ReferenceSolution, ToolCall
from awm_core.settings import load_settings

SETTINGS = load_settings()

SCENARIO = {"persona": "A busy cook.", "instructions": {
    "domain": "notes", "reason_for_call": "I want a note for my shopping.",
    "known_info": "Its title is Groceries and its text is 'milk, eggs'.",
    "unknown_info": "How many notes you have.", "task_instructions": "Ask for the note, then end the call."}}


def conversational(env, idx=0, scenario=SCENARIO, **fields):
    return env.task(idx).model_copy(update={"user_scenario": scenario, **fields})


class Device:
    """A real session the customer can act on too. The notes app has no device of the user's own (unlike
    tau2's telecom phone), so a user-side call runs the app's tool; ``prepare`` runs initialization
    actions as calls. Both are recorded, to show what reached the environment and in which order."""

    def __init__(self, session):
        self.session = session
        self.log = []

    def call(self, tool, args=None, requestor="assistant"):
        self.log.append((tool, requestor))
        return self.session.call(tool, args)

    def prepare(self, initial_state):
        self.log.append(("prepare", None))
        for action in initial_state.get("initialization_actions", []):
            self.session.call(action["func_name"], action["arguments"])

    def snapshot(self):
        self.log.append(("snapshot", None))
        return self.session.snapshot()


class Watching:
    """Passes replies of another user through, keeping every history it was shown."""

    def __init__(self, inner):
        self.inner = inner
        self.seen = []

    def reply(self, history):
        self.seen.append([dict(m) for m in history])
        return self.inner.reply(history)


class Says:
    """A user that replies from a list (text, or a UserReply)."""

    def __init__(self, *replies):
        self.replies = list(replies)

    def reply(self, history):
        r = self.replies.pop(0)
        return r if isinstance(r, UserReply) else UserReply(text=r, prompt_tokens=7, completion_tokens=2)


class Loops:
    """An agent stuck in a loop: the same call forever, recording what it was shown."""

    def __init__(self, name, **args):
        self.name, self.args, self.seen = name, args, []

    def act(self, messages, tools):
        self.seen.append(list(messages))
        return PolicyReply(text="", tool_calls=[{"id": f"loop_{len(self.seen)}", "name": self.name,
                                                 "arguments": self.args}])


class Watched(ReferencePolicy):
    """ReferencePolicy keeping what it was shown."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def act(self, messages, tools):
        self.seen.append(list(messages))
        return super().act(messages, tools)


def gold_digest(handle, solution):
    """The reference's final state: its calls replayed in order in a fresh session."""
    with handle.open_session() as s:
        for call in solution.calls:
            assert s.call(call.tool, call.arguments).ok
        return database_state_digest(s.snapshot())


def strip(messages):
    return [{k: m[k] for k in ("sender", "role")} for m in messages]


@pytest.mark.parametrize("interface,style", [("direct", "text"), ("direct", "native"), ("meta", "native")])
def test_scripted_user_and_reference_policy_converse_until_the_user_stops(pool, notes, interface, style):
    env, handle = notes
    task, solution = conversational(env), env.solution(0)
    user = Watching(ScriptedUser(task, solution))
    with handle.open_session() as s:
        ep = run_episode(ReferencePolicy(solution, style=style), s, task, handle.tools(), user=user,
                         interface=interface)
    assert ep.termination == "user_stop" and ep.error is None
    assert ep.final_answer == "Done."  # the agent's last text, not the user's stop
    opening = "I want a note for my shopping. Its title is Groceries and its text is 'milk, eggs'."
    assert ep.task_message == {"role": "user", "content": opening}
    assert ep.greeting == {"role": "assistant", "content": AGENT_GREETING}
    # Every party's messages, in order, tagged with who sent them.
    listing = [{"sender": "assistant", "role": "assistant"}, {"sender": "environment", "role": "tool"}] * (
        interface == "meta")
    assert strip(ep.conversation) == [
        {"sender": "assistant", "role": "assistant"}, {"sender": "user", "role": "user"}, *listing,
        {"sender": "assistant", "role": "assistant"}, {"sender": "environment", "role": "tool"},
        {"sender": "assistant", "role": "assistant"}, {"sender": "user", "role": "user"}]
    assert ep.conversation[0]["content"] == AGENT_GREETING and ep.conversation[-1]["content"] == "###STOP###"
    created = ep.conversation[-3]
    assert (created["tool"], created["arguments"], created["ok"], created["requestor"]) == (
        "create_note", {"title": "Groceries", "body": "milk, eggs"}, True, "assistant")
    assert json.loads(created["content"])["title"] == "Groceries"
    # The user saw the greeting, then the agent's texts only, its own replies flipped to "assistant".
    assert user.seen[0] == [{"role": "user", "content": AGENT_GREETING}]
    assert user.seen[-1] == [{"role": "user", "content": AGENT_GREETING}, {"role": "assistant", "content": opening},
                             {"role": "user", "content": "Done."}]
    assert user_view(ep.conversation) == user.seen[-1] + [{"role": "assistant", "content": "###STOP###"}]
    # tau2 counts every hop: user, agent call, its results, agent text, user.
    assert ep.steps == 5 + 2 * (interface == "meta") and ep.tool_errors == 0
    # The agent's side keeps the greeting; its token totals know nothing of the user.
    assert ep.messages[1] == ep.greeting and ep.messages[2] == ep.task_message
    assert ep.final_digest == gold_digest(handle, solution) != ep.initial_digest
    out = verify_episode(pool, env, 0, ep, SETTINGS)
    assert (out.label, out.reward) == ("completed", 1.0)
    record = json.loads(json.dumps(ep.to_dict()))
    assert record["conversation"] == ep.conversation and record["conversational"] is True
    assert record["termination"] == "user_stop" and record["steps"] == ep.steps
    assert record["opening"]["text"] == opening and record["turns"][-1]["user_exchange"]["stop"] is True


def test_the_final_answer_is_the_agents_and_reaches_the_verifier(pool, notes):
    env, handle = notes
    task, solution = conversational(env, 2, {"instructions": "How many notes do I have?"}), env.solution(2)
    with handle.open_session() as s:
        ep = run_episode(ReferencePolicy(solution), s, task, handle.tools(), user=ScriptedUser(task, solution))
    assert ep.task_message["content"] == "How many notes do I have?"  # string instructions are the opening
    assert ep.termination == "user_stop" and ep.final_answer == "You have 3 notes."
    assert verify_episode(pool, env, 2, ep, SETTINGS).reward == 1.0


def dual_control(env):
    """A solution in two user messages where the user makes a call of its own before each."""
    solution = ReferenceSolution(task_idx=0, turn_ends=[2, 4], calls=[
        ToolCall(tool="create_note", arguments={"title": "Groceries", "body": "milk, eggs"}, requestor="user"),
        ToolCall(tool="list_notes", arguments={"limit": 5}),
        ToolCall(tool="create_note", arguments={"title": "Todo"}, requestor="user"),
        ToolCall(tool="list_notes", arguments={"limit": 10})], final_answer="You have 5 notes now.")
    task = conversational(env, initial_state={"initialization_actions": [
        {"env_type": "assistant", "func_name": "delete_note", "arguments": {"note_id": 3}}]})
    return task, solution


def test_user_tool_calls_run_as_the_user_and_stay_hidden_from_the_agent(pool, notes):
    env, handle = notes
    task, solution = dual_control(env)
    assert solution_ranges(solution) == [(0, 2), (2, 4)]
    user, policy = Watching(ScriptedUser(task, solution)), Watched(solution, style="native")
    with handle.open_session() as raw:
        device = Device(raw)
        ep = run_episode(policy, device, task, handle.tools(), user=user)
        # The initial state is set before the first snapshot; every call ran as the party that made it.
        assert device.log == [("prepare", None), ("snapshot", None), ("create_note", "user"),
                              ("list_notes", "assistant"), ("create_note", "user"), ("list_notes", "assistant"),
                              ("snapshot", None)]
    assert ep.termination == "user_stop" and ep.final_answer == "You have 5 notes now."
    assert ep.initial_digest != database_state_digest(handle.snapshot)  # the prepared state, not the seed
    assert [r.tool for r in ep.user_calls] == ["create_note", "create_note"] and all(r.ok for r in ep.user_calls)
    assert len(ep.turns) == 4 and ep.user_turn_starts == [0, 2]
    assert [[[r.tool for r in step] for step in turn] for turn in ep.calls_by_user_turn()] == [
        [["list_notes"]], [["list_notes"]]]
    assert ep.turns[1].user_message == {"role": "user", "content": "I have done that: create_note."}
    # The agent's view holds no user tool traffic, in any step, nor in its full history.
    user_ids = {"user_call_0", "user_call_2"}
    for shown in [*policy.seen, *(t.visible for t in ep.turns), ep.messages]:
        for m in shown:
            assert m.get("tool_call_id") not in user_ids and m.get("content") != "###STOP###"
            assert not any(c["id"] in user_ids for c in m.get("tool_calls") or [])
    # ... and the agent's listing shows the user's notes: the user's calls changed the same state.
    listed = json.loads(ep.turns[2].tool_messages[0]["content"])
    assert [n["title"] for n in listed] == ["Reading list", "Old ideas", "Groceries", "Todo"]
    # The user saw its own calls and results, never the agent's.
    last = user.seen[-1]
    assert [m["role"] for m in last] == ["user", "assistant", "tool", "assistant", "user",
                                         "assistant", "tool", "assistant", "user"]
    assert last[1]["tool_calls"][0]["function"]["name"] == "create_note" and last[2]["tool_call_id"] == "user_call_0"
    assert all("list_notes" not in json.dumps(m) for m in last)
    # The whole transcript, tagged: user calls carry requestor "user" and so do their results.
    conv = ep.conversation
    user_calls = [c for m in conv if m["sender"] == "user" for c in m.get("tool_calls") or []]
    assert [(c["id"], c["function"]["name"], c["requestor"]) for c in user_calls] == [
        ("user_call_0", "create_note", "user"), ("user_call_2", "create_note", "user")]
    results = [(m["tool_call_id"], m["requestor"], m["tool"]) for m in conv if m["role"] == "tool"]
    assert results == [("user_call_0", "user", "create_note"), ("ref_2", "assistant", "list_notes"),
                       ("user_call_2", "user", "create_note"), ("ref_4", "assistant", "list_notes")]
    assert [m["to"] for m in conv if m["sender"] == "user"] == [
        "environment", "assistant", "environment", "assistant", "assistant"]
    assert user_view(conv) == last + [{"role": "assistant", "content": "###STOP###"}]
    # Each hop counts: 3 (user call, results, text) + 3 (agent call, results, text), twice, then the stop.
    assert ep.steps == 13 and ep.to_dict()["user_tool_calls"] == 2
    # The final state is the reference's, its calls made in order by whichever party owns them.
    with handle.open_session() as s:
        s.call("delete_note", {"note_id": 3})
        for call in solution.calls:
            s.call(call.tool, call.arguments)
        assert ep.final_digest == database_state_digest(s.snapshot())


def test_reference_policy_skips_user_calls_and_is_unchanged_without_them(notes):
    env, handle = notes
    _, solution = dual_control(env)
    policy = ReferencePolicy(solution, style="native")
    tools = [{"type": "function", "function": {"name": t.name}} for t in handle.tools()]
    names = []
    for _ in range(4):
        reply = policy.act([{"role": "user", "content": "x"}], tools)
        names.append(reply.tool_calls[0]["name"] if reply.tool_calls else reply.text)
    assert names == ["list_notes", "Done.", "list_notes", "You have 5 notes now."]
    # Without a user the user's calls are simply not made, and the first answer ends the episode.
    with handle.open_session() as s:
        ep = run_episode(ReferencePolicy(solution), s, env.task(0), handle.tools())
    assert ep.termination == "final_answer" and [c.name for t in ep.turns for c in t.calls] == ["list_notes"]
    assert ep.greeting is None and ep.conversation[0] == {"sender": "user", "to": "assistant", **ep.task_message}
    assert ep.final_digest == ep.initial_digest and ep.steps == 3


@pytest.mark.parametrize("token", STOP_TOKENS)
def test_every_stop_token_ends_the_conversation(notes, token):
    env, handle = notes
    assert is_stop(f"Thanks, bye! {token}") and not is_stop("Thanks, bye!") and not is_stop(None)
    with handle.open_session() as s:
        ep = run_episode(ReferencePolicy(env.solution(0)), s, conversational(env), handle.tools(),
                         user=Says("Please make a Groceries note with 'milk, eggs'.", f"Great. {token}"))
    assert ep.termination == "user_stop" and ep.conversation[-1]["content"] == f"Great. {token}"
    assert ep.turns[-1].user_message is None and ep.turns[-1].user_exchange.stop
    assert ep.user_prompt_tokens == 14 and ep.prompt_tokens == 0  # the user's tokens are counted apart


def test_a_user_that_stops_at_once_leaves_no_turn(notes):
    env, handle = notes
    with handle.open_session() as s:
        ep = run_episode(ReferencePolicy(env.solution(0)), s, conversational(env), handle.tools(),
                         user=Says("###OUT-OF-SCOPE###"))
    assert ep.termination == "user_stop" and ep.turns == [] and ep.final_answer is None
    assert ep.final_digest == ep.initial_digest and ep.steps == 1


def test_max_steps_counts_every_party_and_wins_over_a_stop(notes):
    env, handle = notes
    task = conversational(env)
    with handle.open_session() as s:
        ep = run_episode(Loops("list_notes"), s, task, handle.tools(), user=Says("List my notes."), max_steps=7)
    # user (1), then (call, results) x 3 = 7: the limit is read only when the next hop is not the environment.
    assert ep.termination == "max_steps" and ep.steps == 7 and len(ep.turns) == 3 and ep.final_answer is None
    for max_steps, termination in ((5, "max_steps"), (6, "user_stop")):
        with handle.open_session() as s:
            ep = run_episode(ReferencePolicy(env.solution(0)), s, task, handle.tools(),
                             user=ScriptedUser(task, env.solution(0)), max_steps=max_steps)
        # the stop is the 5th hop: at a limit of 5, tau2 records max_steps, not the user's stop
        assert ep.termination == termination and ep.steps == 5
    with handle.open_session() as s:
        ep = run_episode(Loops("list_notes"), s, task, handle.tools(), user=Says("List my notes."))
    assert ep.termination == "max_turns" and len(ep.turns) == 20  # max_turns still bounds one user message
    with handle.open_session() as s:  # the default limit of a conversation is tau2's 100 steps
        ep = run_episode(Loops("list_notes"), s, task, handle.tools(), user=Says("List my notes."), max_turns=100)
    assert ep.termination == "max_steps" and ep.steps == 101  # 1 + 2 * 50: the 100th hop was the agent's call


def test_too_many_errors_counts_both_parties(notes):
    env, handle = notes
    task = conversational(env)
    with handle.open_session() as s:
        ep = run_episode(Loops("delete_note", note_id=999), s, task, handle.tools(), user=Says("Delete note 999."),
                         max_errors=3)
    assert ep.termination == "too_many_errors" and ep.tool_errors == 3 and len(ep.turns) == 3
    assert all(t.results[0].error_kind == "tool" for t in ep.turns)
    # One error of the user's own call and one of the agent's make two.
    failing = UserReply(tool_calls=[{"name": "delete_note", "arguments": {"note_id": 998}}])
    with handle.open_session() as raw:
        ep = run_episode(Loops("delete_note", note_id=999), Device(raw), task, handle.tools(),
                         user=Says(failing, "It did not work, please delete note 999."), max_errors=2)
    assert ep.termination == "too_many_errors" and len(ep.turns) == 1 and len(ep.user_calls) == 1
    assert not ep.user_calls[0].ok and "not found" in ep.opening.messages[1]["content"]
    assert ep.opening.messages[1]["requestor"] == "user" and ep.opening.replies == 2
    # A user call of a tool the user does not have fails without reaching the environment.
    with handle.open_session() as raw:
        device = Device(raw)
        ep = run_episode(ReferencePolicy(env.solution(0)), device, task, handle.tools(), user_tools=[],
                         user=Says(UserReply(tool_calls=[{"name": "create_note", "arguments": {"title": "x"}}]),
                                   "Make a Groceries note with 'milk, eggs'.", "###STOP###"))
    assert ep.termination == "user_stop" and ep.tool_errors == 1 and ep.user_calls[0].error_kind == "unknown_tool"
    assert ("create_note", "user") not in device.log


def test_user_failures_end_with_user_error(notes):
    env, handle = notes
    task = conversational(env)
    cases = [
        (Says(UserReply(error="no reply")), "no reply"),
        (Says(UserReply(text="  ")), "neither text nor a tool call"),
        (Says(UserReply(tool_calls=[{"name": "create_note", "arguments": "{bad"}])), "could not be read"),
        (Says(*[UserReply(tool_calls=[{"name": "list_notes", "arguments": {}}])] * 3), "3 replies in a row"),
    ]
    for user, why in cases:
        with handle.open_session() as raw:
            ep = run_episode(ReferencePolicy(env.solution(0)), Device(raw), task, handle.tools(), user=user,
                             max_turns=3)
        assert ep.termination == "user_error" and why in ep.error and ep.turns == []


# --------------------------------------------------------------------------- the LLM user, offline


@pytest.fixture
def llm_settings(awm_home, tmp_path):
    return load_settings(home=tmp_path / "home", llm={"fixtures_dir": str(tmp_path / "fixtures"), "cache": False,
                                                       "user": {"backend": "offline"}})


def test_llm_user_replays_a_recorded_conversation(pool, notes, llm_settings, tmp_path):
    env, handle = notes
    task = conversational(env, user_prompt="You are a customer. <scenario>Groceries note</scenario>")
    write_fixture(llm_settings.llm.fixtures_dir, task_key(task), "user", [
        {"content": "", "tool_calls": [{"id": "u1", "name": "list_notes", "arguments": {"limit": 1}}]},
        "Hi, please create a note titled Groceries with 'milk, eggs'.",
        {"content": "Thanks, that is all. ###STOP###", "prompt_tokens": 50, "completion_tokens": 9}])
    ledger = tmp_path / "ledger.jsonl"
    user = LLMUser.for_task(llm_settings, task, tools=handle.tools()[:2], ledger=ledger)
    assert user.system_prompt == task.user_prompt and [t["function"]["name"] for t in user.tools] == [
        "create_note", "list_notes"]
    with handle.open_session() as raw:
        ep = run_episode(ReferencePolicy(env.solution(0)), Device(raw), task, handle.tools(), user=user,
                         user_tools=handle.tools()[:2])
    assert ep.termination == "user_stop" and ep.task_message["content"].startswith("Hi, please create")
    assert ep.opening.replies == 2 and ep.user_calls[0].tool == "list_notes" and ep.user_calls[0].ok
    assert ep.conversation[-1]["content"] == "Thanks, that is all. ###STOP###"
    assert ep.user_completion_tokens >= 9 and ep.user_prompt_tokens >= 50
    records = read_ledger(ledger)
    assert [(r.role, r.stage, r.scenario_id, r.attempt) for r in records] == [
        ("user", "user", "notes.task0", n) for n in (1, 2, 3)]
    assert verify_episode(pool, env, 0, ep, SETTINGS).reward == 1.0


def test_llm_user_empty_reply_is_retried_once_then_a_user_error(notes, llm_settings, tmp_path):
    env, handle = notes
    task = conversational(env)
    write_fixture(llm_settings.llm.fixtures_dir, task_key(task), "user",
                  ["Please create a Groceries note with 'milk, eggs'.", ""])
    ledger = tmp_path / "ledger.jsonl"
    with handle.open_session() as s:
        ep = run_episode(ReferencePolicy(env.solution(0)), s, task, handle.tools(),
                         user=LLMUser.for_task(llm_settings, task, ledger=ledger))
    assert ep.termination == "user_error" and "empty reply twice" in ep.error
    assert ep.final_answer == "Done." and len(ep.turns) == 2  # the agent's work stands
    assert [r.attempt for r in read_ledger(ledger)] == [1, 2, 2]  # the retry asked again
    # A task without a user prompt of its own gets one made from its scenario.
    assert "Groceries" in default_user_prompt(task) and "Reason for call:" in render_scenario(SCENARIO)


def test_settings_have_a_user_role(awm_home, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    s = load_settings()
    assert s.role("user") is s.llm.user and s.llm.user.base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(SettingsError, match="policy, user"):
        s.role("fixtures_dir")

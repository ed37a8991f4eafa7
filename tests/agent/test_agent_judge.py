"""The code-augmented judge path, over HTTP against the local fixture LLM server."""
import json

import pytest

from agent_bundles import notes_environment
from awm_core.agent import LLMJudge, ReferencePolicy, judge_messages, run_episode, verify_episode
from awm_core.llm import read_ledger
from awm_core.llm.fixture_server import FixtureServer
from awm_core.runtime import SandboxPool
from awm_core.settings import load_settings


def write_judge_fixture(root, env_id, classification, reasoning="because"):
    path = root / env_id / "judge.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    reply = json.dumps({"classification": classification, "reasoning": reasoning})
    path.write_text(json.dumps({"stage": "judge", "scenario": env_id,
                                "attempts": [{"content": reply, "prompt_tokens": 900, "completion_tokens": 40}]}))


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(load_settings().sandbox, workers=1) as p:
        yield p


def test_judge_classifies_through_the_fixture_server(tmp_path, awm_home, pool):
    fixtures = tmp_path / "fixtures"
    envs = {label: notes_environment(f"notes_{i}") for i, label in
            enumerate(["partially_completed", "environment_error", "completed"])}
    for label, env in envs.items():
        write_judge_fixture(fixtures, env.id, label, reasoning=f"judged {label}")
    settings = load_settings()
    settings.llm.cache = False
    ledger = tmp_path / "llm_calls.jsonl"
    with FixtureServer(fixtures) as srv:
        settings.llm.judge = srv.role_settings(model="judge-model")
        judge = LLMJudge.from_settings(settings, ledger=ledger)
        outcomes = {}
        for label, env in envs.items():
            handle = pool.load(env)
            with handle.open_session() as s:
                ep = run_episode(ReferencePolicy(env.solution(0)), s, env.task(0), handle.tools())
            outcomes[label] = verify_episode(pool, env, 0, ep, settings, judge=judge)
        srv.script("malformed")  # the judge answers prose: the verifier's verdict stands, with the error noted
        bad = verify_episode(pool, envs["completed"], 0, ep, settings, judge=judge)
        seen = srv.chat_requests()
    # The verifier said complete every time; the judge's classification decides the label.
    assert {k: (o.label, o.reward, o.env_error, o.verdict) for k, o in outcomes.items()} == {
        "partially_completed": ("partially_completed", 0.1, False, "complete"),
        "environment_error": ("environment_error", 0.0, True, "complete"),
        "completed": ("completed", 1.0, False, "complete")}
    assert outcomes["completed"].judge_reasoning == "judged completed"
    assert outcomes["completed"].verifier_evidence == {"groceries_notes": 1}
    assert (bad.label, bad.reward, bad.judge_reasoning) == ("completed", 1.0, None)
    assert bad.error.startswith("judge failed, used the verifier verdict: judge reply is not JSON")
    assert [(r.stage, r.scenario, r.model) for r in seen] == [("judge", e.id, "judge-model") for e in envs.values()] + [
        ("judge", "notes_2", "judge-model")]
    records = read_ledger(ledger)
    assert len(records) == 4 and {r.role for r in records} == {"judge"} and records[0].prompt_tokens == 900


def test_judge_prompt_carries_code_evidence_criteria_and_trajectory(pool):
    env = notes_environment()
    handle = pool.load(env)
    with handle.open_session() as s:
        ep = run_episode(ReferencePolicy(env.solution(0)), s, env.task(0), handle.tools())
    msgs = judge_messages(env.task(0).text, env.verifier(0), "complete", {"groceries_notes": 1}, ep)
    user = msgs[1]["content"]
    assert env.verifier(0).code.strip() in user and "a Groceries note with 'milk, eggs'" in user
    assert '"groceries_notes": 1' in user and "verdict: complete" in user
    assert 'create_note({"title": "Groceries", "body": "milk, eggs"}) -> {"id": 4' in user
    assert "## Final answer\nDone." in user and "classification" in msgs[0]["content"]


def test_openai_policy_with_native_tool_calls_over_http(tmp_path, pool):
    """OpenAIChatPolicy against an OpenAI-compatible server (the fixture server replays turn by turn)."""
    from awm_core.agent import OpenAIChatPolicy

    env = notes_environment()
    path = tmp_path / env.id / "policy.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"stage": "policy", "scenario": env.id, "attempts": [
        {"content": "", "tool_calls": [{"id": "c1", "function": {"name": "list_notes", "arguments": {}}}],
         "prompt_tokens": 300, "completion_tokens": 12},
        {"content": "Adding it.", "tool_calls": [{"id": "c2", "function": {
            "name": "create_note", "arguments": {"title": "Groceries", "body": "milk, eggs"}}}],
         "prompt_tokens": 420, "completion_tokens": 20},
        {"content": "Your note is saved.", "prompt_tokens": 500, "completion_tokens": 6}]}))

    def headers(messages):  # the fixture server keys replies by turn
        turn = 1 + sum(m["role"] == "assistant" for m in messages)
        return {"X-AWM-Stage": "policy", "X-AWM-Scenario": env.id, "X-AWM-Turn": str(turn)}

    handle = pool.load(env)
    with FixtureServer(tmp_path) as srv:
        policy = OpenAIChatPolicy(srv.base_url, "policy-model", "k", headers=headers, max_retries=0)
        with handle.open_session() as s:
            ep = run_episode(policy, s, env.task(0), handle.tools(), window=None)
    assert ep.final_answer == "Your note is saved." and len(ep.turns) == 3
    assert ep.turns[1].assistant["tool_calls"][0]["function"]["name"] == "create_note"
    assert ep.turns[1].assistant["content"] == "Adding it." and ep.turns[1].tool_messages[0]["tool_call_id"] == "c2"
    assert (ep.prompt_tokens, ep.completion_tokens) == (1220, 38)
    assert verify_episode(pool, env, 0, ep, load_settings()).reward == 1.0

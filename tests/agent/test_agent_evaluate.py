"""The evaluate flow: rollouts in the catalog (queried with SQL), splits, summary and artifacts."""
import json

import pytest

from agent_bundles import notes_environment
from awm_core.errors import AWMError
from awm_core.settings import get_settings
from awm_core.agent.eval_summary import reward_plot_png, summarize, summary_markdown
from awm_core.agent.evaluation import EvalConfig
from flows.evaluate import run_evaluation
from storage.catalog import Catalog


@pytest.fixture
def published(awm_home):
    settings = get_settings()
    envs = [notes_environment("notes_a"), notes_environment("notes_b"), notes_environment("notes_c")]
    with Catalog.open(settings) as cat:
        with cat.publish(message="test environments") as pub:
            pub.add_environments(envs)
    return settings, envs, pub.snapshot_id


def test_reference_and_random_runs_write_rollouts_sql_can_read(published):
    settings, envs, snap = published
    ref = run_evaluation(EvalConfig(policy="reference", split="all", concurrency=4, episodes_per_task=2),
                         settings=settings, run_id="ref-run")
    rnd = run_evaluation(EvalConfig(policy="random", split="all", interface="meta", concurrency=4),
                         settings=settings, run_id="rnd-run")
    assert ref.snapshot == rnd.snapshot == snap and rnd.published_snapshot > ref.published_snapshot > snap
    with Catalog.open(settings, read_only=True) as cat:
        got = cat.rows("SELECT run_id, count(*) AS n, avg(reward) AS mean, min(reward) AS lo, "
                       "count(DISTINCT env_id) AS envs, bool_or(env_error) AS env_err FROM rollouts "
                       "GROUP BY run_id ORDER BY run_id")
        calls = cat.rows("SELECT tool, count(*) AS n FROM tool_calls WHERE rollout_id LIKE 'ref-run/%' "
                         "GROUP BY tool ORDER BY tool")
        one = cat.rows("SELECT * FROM rollouts WHERE rollout_id = 'ref-run/notes_b/1/1'")[0]
    assert got[0] == {"run_id": "ref-run", "n": 18, "mean": 1.0, "lo": 1.0, "envs": 3, "env_err": False}
    assert got[1]["run_id"] == "rnd-run" and got[1]["n"] == 9 and got[1]["mean"] < 0.5 and not got[1]["env_err"]
    # Reference solutions: task 0 creates, task 1 lists then deletes, task 2 lists; twice per task, three envs.
    assert calls == [{"tool": "create_note", "n": 6}, {"tool": "delete_note", "n": 6}, {"tool": "list_notes", "n": 12}]
    assert (one["label"], one["turns"], one["tool_calls"], one["policy"], one["model"]) == (
        "completed", 3, 2, "reference", "reference-solution")
    assert one["initial_digest"] != one["final_digest"] and one["snapshot"] == snap
    assert [m["role"] for m in json.loads(one["messages_json"])] == ["system", "user", "assistant", "tool",
                                                                     "assistant", "tool", "assistant"]
    # Every episode also streamed to the run's JSONL file as it finished.
    lines = (settings.runs_dir / "ref-run" / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 18 and json.loads(lines[0])["termination"] == "final_answer"
    summary = summarize(ref, {e.id: e for e in envs})
    assert summary["overall"]["completion_rate"] == 1.0 and summary["overall"]["mean_turns"] == pytest.approx(7 / 3, abs=0.01)
    assert [s["env_id"] for s in summary["by_scenario"]] == ["notes_a", "notes_b", "notes_c"]
    assert summary["by_category"] == [{"category": "productivity", "episodes": 18, "mean_reward": 1.0,
                                       "completion_rate": 1.0, "partial_rate": 0.0, "env_error_rate": 0.0,
                                       "format_error_rate": 0.0, "mean_turns": 2.33}]
    md = summary_markdown(summary, EvalConfig(), "data:image/png;base64,xx")
    assert "| notes_a | productivity | 6 | 1.000 | 100.0% |" in md and "![reward distribution](data:" in md
    assert reward_plot_png(rnd.rows)[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_is_made_once_and_reused(published):
    settings, envs, snap = published
    val = run_evaluation(EvalConfig(policy="reference", split="val", split_by="task"), settings=settings)
    train = run_evaluation(EvalConfig(policy="reference", split="train", split_by="task"), settings=settings)
    with Catalog.open(settings, read_only=True) as cat:
        splits = cat.rows("SELECT env_id, task_idx, split FROM splits WHERE snapshot = ? ORDER BY ALL", params=[snap])
    assert len(splits) == 9 and {r["split"] for r in splits} == {"train", "val"}
    assert sorted((r["env_id"], r["task_idx"]) for r in val.rows) == sorted(
        (s["env_id"], s["task_idx"]) for s in splits if s["split"] == "val")
    assert {r["split"] for r in train.rows} == {"train"} and len(train.rows) + len(val.rows) == 9
    assert val.new_split_rows and not train.new_split_rows


def test_bad_parameters_and_missing_endpoint_are_clear_errors(published):
    settings, _, _ = published
    with pytest.raises(AWMError, match="policy must be one of"):
        run_evaluation(EvalConfig(policy="gpt"), settings=settings)
    with pytest.raises(AWMError, match="window must be >= 0"):
        run_evaluation(EvalConfig(window=-2), settings=settings)
    with pytest.raises(AWMError, match="not in snapshot"):
        run_evaluation(EvalConfig(env_ids=["nope"]), settings=settings)
    with pytest.raises(AWMError, match="needs an endpoint"):
        run_evaluation(EvalConfig(policy="openai", split="all"), settings=settings)


@pytest.mark.slow
def test_awm_eval_on_the_generated_demo_snapshot(awm_home, prefect_server, capsys, tmp_path, monkeypatch):
    """The demo environments built from the offline recordings by the generate flow; then `awm eval`
    with the reference policy on a real Prefect server: every task scores 1.0, rollouts and splits are
    in the catalog, the artifacts are in the Prefect API."""
    import asyncio

    from flows.cli import main
    from flows.generate import run_generate
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    generated = run_generate(scenarios=3)
    assert sorted(generated["published"]) == ["clinic_booking", "recipe_box", "team_expenses"]
    settings = get_settings()
    assert main(["eval", "splits", "--by", "task", "--seed", "1"]) == 0
    assert ": 24 train and 6 val task(s)" in capsys.readouterr().out
    assert main(["eval", "--policy", "reference", "--split", "all", "--concurrency", "4", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["overall"]["episodes"] == 30 and summary["overall"]["mean_reward"] == 1.0
    assert "episodes 30/30  mean reward 1.000" in captured.err
    with Catalog.open(settings, read_only=True) as cat:
        by_env = cat.rows("SELECT r.env_id, s.split, count(*) AS n, min(r.reward) AS lo, max(r.reward) AS hi "
                          "FROM rollouts r JOIN splits s ON s.snapshot = r.snapshot AND s.env_id = r.env_id "
                          "AND s.task_idx = r.task_idx AND s.split = r.split WHERE r.run_id = ? "
                          "GROUP BY ALL ORDER BY ALL", params=[summary["run_id"]])
    assert sum(r["n"] for r in by_env) == 30 and {(r["lo"], r["hi"]) for r in by_env} == {(1.0, 1.0)}
    assert {r["env_id"] for r in by_env} == {"clinic_booking", "recipe_box", "team_expenses"}
    assert sum(r["n"] for r in by_env if r["split"] == "val") == 6
    with Catalog.open(settings, read_only=True) as cat:
        made = {x["snapshot_id"]: x for x in cat.snapshots()}[summary["published_snapshot"]]["made_by"]
    # What confined the environments' code is recorded with the run.
    assert made["sandbox"]["seccomp"] is True and made["sandbox"]["landlock"] >= 1, made

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
                "evaluation-summary", "evaluation-by-scenario", "evaluation-reward-distribution",
                "evaluation-progress"])))

    # The Prefect server is shared by the session: other evaluations' artifacts carry the same keys.
    every = asyncio.run(artifacts())
    ours = next(a for a in every if a.key == "evaluation-summary" and summary["run_id"] in a.data)
    found = {a.key: a for a in every if a.flow_run_id == ours.flow_run_id}
    assert set(found) == {"evaluation-summary", "evaluation-by-scenario", "evaluation-reward-distribution",
                          "evaluation-progress"}
    assert found["evaluation-reward-distribution"].type == "image"
    assert found["evaluation-reward-distribution"].data.startswith("data:image/png;base64,iVBOR")
    assert "![reward distribution](data:image/png;base64," in found["evaluation-summary"].data
    assert "| recipe_box |" in found["evaluation-summary"].data
    assert found["evaluation-progress"].data == 100.0
    assert (settings.runs_dir / summary["run_id"] / "reward_distribution.png").read_bytes()[:4] == b"\x89PNG"

    # The same tasks as conversations: the scripted user tells what its scenario says it knows, the
    # reference acts under the environment's policy; every demo task still scores 1.0.
    assert main(["eval", "--policy", "reference", "--split", "all", "--mode", "conversation", "--user", "scripted",
                 "--concurrency", "4", "--json"]) == 0
    talk = json.loads(capsys.readouterr().out)
    assert talk["overall"]["episodes"] == 30 and talk["overall"]["mean_reward"] == 1.0
    assert {c["category"] for c in talk["by_mode"]["by_category"]} and set(talk["by_mode"]["overall"]) == {
        "message", "conversation"}
    with Catalog.open(settings, read_only=True) as cat:
        modes = cat.rows("SELECT mode, count(*) AS n, min(termination) AS ends FROM rollouts WHERE run_id = ? "
                         "GROUP BY mode", params=[talk["run_id"]])
        env = cat.get_environment("recipe_box")
    assert modes == [{"mode": "conversation", "n": 30, "ends": "user_stop"}]

    # And with the recorded user simulator (LLM role "user", offline) talking to an OpenAI-compatible
    # fixture agent that makes the reference's calls: one task, end to end.
    from awm_core.llm.fixture_server import FixtureServer

    idx = next(s.task_idx for s in env.solutions if s.calls and not any("$ref" in json.dumps(c.arguments)
                                                                         for c in s.calls))
    fixtures = tmp_path / "fixtures"
    for i in range(idx + 1):  # the run plays tasks 0..idx; the assertions are on task idx
        solution, scenario = env.solution(i), env.task(i).user_scenario["instructions"]
        (fixtures / f"recipe_box.task{i}").mkdir(parents=True)
        (fixtures / f"recipe_box.task{i}" / "user.json").write_text(json.dumps({
            "stage": "user", "scenario": f"recipe_box.task{i}", "attempts": [
                {"content": f"{scenario['reason_for_call']} {scenario.get('known_info') or ''}"},
                {"content": "That is everything, thank you. ###STOP###"}]}))
        (fixtures / "recipe_box").mkdir(exist_ok=True)
        (fixtures / "recipe_box" / f"policy.{i}.json").write_text(json.dumps({
            "stage": f"policy.{i}", "scenario": "recipe_box", "attempts": [
                *[{"content": "", "tool_calls": [{"id": f"call_{n}", "type": "function", "function": {
                    "name": c.tool, "arguments": json.dumps(c.arguments)}}]} for n, c in enumerate(solution.calls)],
                {"content": solution.final_answer or "Done."}]}))
    monkeypatch.setenv("AWM_LLM__FIXTURES_DIR", str(fixtures))
    get_settings.cache_clear()
    with FixtureServer(fixtures) as srv:
        code = main(["eval", "--policy", "openai", "--base-url", srv.base_url, "--model", "fixture-agent",
                     "--split", "all", "--env", "recipe_box", "--mode", "conversation", "--json",
                     "--max-tasks-per-env", str(idx + 1)])
    assert code == 0, capsys.readouterr().err[-2000:]
    out = json.loads(capsys.readouterr().out)
    with Catalog.open(get_settings(), read_only=True) as cat:
        row = cat.rows("SELECT label, mode, termination, messages_json FROM rollouts WHERE run_id = ? AND task_idx = ?",
                       params=[out["run_id"], idx])[0]
    assert (row["label"], row["mode"], row["termination"]) == ("completed", "conversation", "user_stop")
    senders = [m["sender"] for m in json.loads(row["messages_json"])]
    assert senders[:3] == ["system", "assistant", "user"] and senders[-1] == "user"


def test_judged_run_publishes_the_judge_calls(published, tmp_path):
    from awm_core.llm.fixture_server import FixtureServer

    settings, envs, snap = published
    for env in envs:
        path = tmp_path / env.id / "judge.json"
        path.parent.mkdir(parents=True)
        verdict = "partially_completed" if env.id == "notes_b" else "completed"
        path.write_text(json.dumps({"stage": "judge", "scenario": env.id, "attempts": [
            {"content": json.dumps({"classification": verdict, "reasoning": "checked"}), "prompt_tokens": 800,
             "completion_tokens": 30}]}))
    settings.llm.cache = False
    with FixtureServer(tmp_path) as srv:
        settings.llm.judge = srv.role_settings(model="judge-model")
        result = run_evaluation(EvalConfig(policy="reference", split="all", judge=True), settings=settings,
                                run_id="judged")
    assert {(r["env_id"], r["reward"]) for r in result.rows} == {("notes_a", 1.0), ("notes_b", 0.1), ("notes_c", 1.0)}
    with Catalog.open(settings, read_only=True) as cat:
        calls = cat.rows("SELECT role, stage, count(*) AS n, sum(prompt_tokens) AS tokens FROM llm_calls "
                         "GROUP BY ALL")
    assert calls == [{"role": "judge", "stage": "judge", "n": 9, "tokens": 7200}]
    lines = [json.loads(x) for x in (settings.runs_dir / "judged" / "rollouts.jsonl").read_text().splitlines()]
    assert {x["judge_reasoning"] for x in lines} == {"checked"} and {x["verdict"] for x in lines} == {"complete"}


@pytest.mark.parametrize("policy", ["openai", "openai-text"])
def test_endpoint_policies_replay_recorded_conversations(published, tmp_path, policy):
    """Episodes of the endpoint policies carry stage/scenario/turn headers, so the fixture server
    replays a recorded conversation per task: native tool calls, or <tool_call> text."""
    from awm_core.llm.fixture_server import FixtureServer

    settings, envs, snap = published
    create = {"title": "Groceries", "body": "milk, eggs"}
    if policy == "openai":
        turns = [{"content": "", "tool_calls": [{"id": "c1", "function": {"name": "create_note", "arguments": create}}]},
                 {"content": "Saved."}]
    else:
        turns = [{"content": '<tool_call>{"name": "create_note", "arguments": %s}</tool_call>' % json.dumps(create)},
                 {"content": "<think>done</think>Saved."}]
    for t in turns:
        t.update(prompt_tokens=100, completion_tokens=10)
    path = tmp_path / "notes_a" / "policy.0.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"stage": "policy.0", "scenario": "notes_a", "attempts": turns}))
    with FixtureServer(tmp_path) as srv:
        result = run_evaluation(EvalConfig(policy=policy, base_url=srv.base_url, model="m", split="all",
                                           env_ids=["notes_a"], max_tasks_per_env=1), settings=settings)
        seen = [(r.stage, r.scenario, r.attempt) for r in srv.chat_requests()]
    assert seen == [("policy.0", "notes_a", 1), ("policy.0", "notes_a", 2)]
    (row,) = result.rows
    assert (row["reward"], row["final_answer"], row["turns"], row["prompt_tokens"], row["model"]) == (
        1.0, "Saved.", 2, 200, "m")

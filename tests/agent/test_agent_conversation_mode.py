"""Evaluation's two modes on the demo environments: a synthesized task as one message (the default) or,
with ``mode conversation``, as a conversation with the user simulator under the environment's policy.

The demo environments (assembled from the offline recordings) are given a user scenario per task and
an agent policy, and published to a catalog with one plain environment beside them. Covered: the rule
that decides which episode is a conversation, the agent's system prompt, the ``mode`` of each rollout
row, the summary's message vs conversation table, and the refusal of conversation mode on tasks that
have no user scenario.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from awm_core.agent import (
    MODES, check_conversation_mode, conversation_system_prompt, default_system_prompt, plays_as_conversation,
    policy_system_prompt,
)
from awm_core.agent.eval_summary import mode_comparison, summarize, summary_markdown
from awm_core.agent.evaluation import EvalConfig
from awm_core.agent.users import DEFAULT_USER_GUIDELINES, user_system_prompt
from awm_core.errors import AWMError
from awm_core.models import Environment, Task
from awm_core.settings import get_settings
from awm_core.train.demo import demo_environment
from flows.evaluate import evaluation_summary, run_evaluation
from storage.catalog import Catalog

POLICY = "Confirm with the user before you change anything that cannot be undone. Never share another user's data."
KNOWN = "You are signed in to your own account."


def scenario_for(env: Environment, task: Task) -> dict:
    return {"persona": None, "instructions": {
        "domain": env.scenario.name, "reason_for_call": task.text, "known_info": KNOWN, "unknown_info": None,
        "task_instructions": "Ask for it in your own words and end the conversation once it is done."}}


def without_scenarios(env: Environment) -> Environment:
    """``env`` as the generator made it before user scenarios existed."""
    tasks = [t.model_copy(update={"user_scenario": None, "user_prompt": None}) for t in env.tasks]
    return env.model_copy(update={"tasks": tasks, "policy": None})


def with_scenarios(env: Environment, policy: str | None = POLICY) -> Environment:
    """``env`` as the conversation stage leaves it: a user scenario per task, and the agent's policy."""
    tasks = []
    for t in env.tasks:
        scenario = scenario_for(env, t)
        tasks.append(t.model_copy(update={"user_scenario": scenario,
                                          "user_prompt": user_system_prompt(DEFAULT_USER_GUIDELINES, scenario)}))
    return env.model_copy(update={"tasks": tasks, "policy": policy})


@pytest.fixture
def snapshot(awm_home):
    """recipe_box with user scenarios and a policy; clinic_booking as the generator made it before."""
    settings = get_settings()
    talk = with_scenarios(demo_environment("recipe_box"))
    with Catalog.open(settings) as cat:
        with cat.publish(message="demo environments, recipe_box with user scenarios") as pub:
            pub.add_environments([talk, without_scenarios(demo_environment("clinic_booking"))])
    return settings, talk, pub.snapshot_id


def snapshots(settings) -> list[int]:
    with Catalog.open(settings, read_only=True) as cat:
        return [s["snapshot_id"] for s in cat.snapshots()]


# --------------------------------------------------------------------------- the rule


def test_one_rule_decides_which_episode_is_a_conversation():
    plain = without_scenarios(demo_environment("team_expenses"))
    talk = with_scenarios(plain)
    tau2 = SimpleNamespace(flavour="tau2")
    assert MODES == ("message", "conversation")
    for mode in MODES:  # tau2-bench's tasks are conversations whatever the mode
        assert plays_as_conversation(tau2, plain.task(0), mode)
        assert not plays_as_conversation(plain, plain.task(0), mode)  # no user scenario: one message
    assert not plays_as_conversation(talk, talk.task(0), "message")
    assert plays_as_conversation(talk, talk.task(0), "conversation")
    with pytest.raises(AWMError, match="unknown mode 'chat'"):
        plays_as_conversation(talk, talk.task(0), "chat")

    # The agent of a conversation is shown the environment's policy as tau2-bench shows its domain policy.
    prompt = conversation_system_prompt(talk, talk.task(0), "direct")
    assert prompt == (f"<instructions>\n{default_system_prompt('direct')}\n</instructions>\n"
                      f"<policy>\n{POLICY}\n</policy>")
    assert policy_system_prompt("meta", None) == policy_system_prompt("meta", "  ") == default_system_prompt("meta")
    no_policy = with_scenarios(plain, None)
    assert conversation_system_prompt(no_policy, talk.task(0), "direct") == default_system_prompt("direct")
    own = talk.task(0).model_copy(update={"system_prompt": "tau2's own prompt"})
    assert conversation_system_prompt(talk, own, "direct") is None  # a task's own prompt is kept

    # Conversation mode needs user scenarios: none at all is refused; a few missing are played as one message.
    pairs = [(plain, t) for t in plain.tasks]
    assert check_conversation_mode("message", pairs, 3) == []
    with pytest.raises(AWMError, match=r"none of the 10 planned task\(s\) of snapshot 3 has one .*"
                                       r"awm generate --include-existing"):
        check_conversation_mode("conversation", pairs, 3)
    mixed = [(talk, talk.task(0)), (plain, plain.task(1)), (tau2, plain.task(2))]
    assert [t.id for t in check_conversation_mode("conversation", mixed, 3)] == ["team_expenses/1"]
    assert check_conversation_mode("conversation", [(tau2, plain.task(2))], 3) == []  # tau2 brings its own


# --------------------------------------------------------------------------- evaluation


def test_both_modes_on_one_snapshot_and_the_summary_compares_them(snapshot):
    settings, talk, snap = snapshot
    conv_cfg = EvalConfig(policy="reference", split="all", env_ids=["recipe_box"], mode="conversation",
                          user="scripted", concurrency=4)
    conv = run_evaluation(conv_cfg, settings=settings, run_id="conv-run")
    # Every task with a scenario is a conversation the reference policy solves with the scripted user.
    assert len(conv.rows) == 10 and not conv.failures
    for row in conv.rows:
        assert (row["mode"], row["reward"], row["label"], row["termination"]) == (
            "conversation", 1.0, "completed", "user_stop"), row
        messages = json.loads(row["messages_json"])
        assert messages[0]["sender"] == "system" and messages[0]["role"] == "system"
        assert messages[0]["content"] == policy_system_prompt("direct", POLICY)  # the policy, τ²'s layout
        opening = next(m for m in messages if m["sender"] == "user")
        assert opening["content"] == f"{talk.task(row['task_idx']).text} {KNOWN}"  # the scenario, told by the user
        assert messages[-1]["sender"] == "user" and "###STOP###" in messages[-1]["content"]

    msg_cfg = EvalConfig(policy="reference", split="all", env_ids=["recipe_box"], concurrency=4)
    assert msg_cfg.mode == "message"  # the default: no user simulator needed (none is configured here)
    msg = run_evaluation(msg_cfg, settings=settings, run_id="msg-run")
    assert len(msg.rows) == 10 and {(r["mode"], r["reward"], r["termination"]) for r in msg.rows} == {
        ("message", 1.0, "final_answer")}
    for row in msg.rows:  # one message, task.text, under the default prompt: as before modes
        messages = json.loads(row["messages_json"])
        assert messages[0] == {"role": "system", "content": default_system_prompt("direct")}
        assert messages[1] == {"role": "user", "content": talk.task(row["task_idx"]).text}
        assert not any("sender" in m for m in messages)

    with Catalog.open(settings, read_only=True) as cat:
        stored = cat.rows("SELECT run_id, mode, count(*) AS n, avg(reward) AS mean FROM rollouts "
                          "GROUP BY ALL ORDER BY ALL")
    assert stored == [{"run_id": "conv-run", "mode": "conversation", "n": 10, "mean": 1.0},
                      {"run_id": "msg-run", "mode": "message", "n": 10, "mean": 1.0}]
    streamed = [json.loads(x) for x in (settings.runs_dir / "conv-run" / "rollouts.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in streamed} == {"conversation"}

    # The message run's summary finds the conversation run of the same policy on the same snapshot.
    summary = evaluation_summary(msg, msg_cfg, settings)
    assert summary["mode"] == "message" and summary["episodes_by_mode"] == {"message": 10}
    by_mode = summary["by_mode"]
    assert by_mode["modes"] == ["message", "conversation"]
    assert by_mode["runs"] == {"message": ["msg-run"], "conversation": ["conv-run"]}
    one = {"episodes": 10, "mean_reward": 1.0, "completion_rate": 1.0}
    assert by_mode["overall"] == {"message": one, "conversation": one}
    assert by_mode["by_category"] == [{"category": "food_and_cooking", "message": one, "conversation": one}]
    md = summary_markdown(summary, msg_cfg)
    assert "Policy **reference** in mode **message** on snapshot" in md
    assert "## Message vs conversation" in md
    assert ("| category | message episodes | message mean reward | message completion rate | conversation episodes "
            "| conversation mean reward | conversation completion rate |") in md
    assert "| all | 10 | 1.000 | 100.0% | 10 | 1.000 | 100.0% |" in md
    assert "| food_and_cooking | 10 | 1.000 | 100.0% | 10 | 1.000 | 100.0% |" in md

    conv_summary = evaluation_summary(conv, conv_cfg, settings)
    assert conv_summary["by_mode"]["runs"] == {"message": ["msg-run"], "conversation": ["conv-run"]}
    assert "in mode **conversation** (10 conversation(s), user scripted)" in summary_markdown(conv_summary, conv_cfg)
    # summarize alone is as before: no comparison without the other mode's rows
    plain = summarize(conv)
    assert plain["mode"] == "conversation" and plain["by_mode"] is None
    assert "Message vs conversation" not in summary_markdown(plain, conv_cfg)
    # another policy's rollouts are not compared
    rnd_cfg = EvalConfig(policy="random", split="all", env_ids=["recipe_box"], max_tasks_per_env=2)
    assert evaluation_summary(run_evaluation(rnd_cfg, settings=settings), rnd_cfg, settings)["by_mode"] is None


def test_mode_comparison_reads_old_rows_as_messages_and_keeps_to_the_tasks_run():
    def row(run, idx, reward, mode=None, env="a"):
        return {"run_id": run, "env_id": env, "task_idx": idx, "reward": reward, "mode": mode,
                "label": "completed" if reward == 1.0 else "agent_error"}

    mine = [row("now", 0, 1.0, "conversation"), row("now", 1, 0.0, "conversation")]
    others = [row("old", 0, 1.0), row("old", 1, 1.0), row("old2", 0, 0.0, "message"),
              row("old", 5, 1.0),  # a task this run did not play
              row("old", 0, 1.0, env="b")]
    got = mode_comparison(mine, others, {"a": "shop"})
    assert got["runs"] == {"message": ["old", "old2"], "conversation": ["now"]}
    assert got["overall"] == {"message": {"episodes": 3, "mean_reward": 0.6667, "completion_rate": 0.6667},
                              "conversation": {"episodes": 2, "mean_reward": 0.5, "completion_rate": 0.5}}
    assert [c["category"] for c in got["by_category"]] == ["shop"]
    assert mode_comparison(mine, [row("x", 0, 1.0, "conversation")], {}) is None  # the same mode only
    assert mode_comparison(mine, [], {}) is None


def test_conversation_mode_refuses_tasks_without_user_scenarios(snapshot):
    settings, _, snap = snapshot
    before = snapshots(settings)
    cfg = EvalConfig(policy="reference", split="all", env_ids=["clinic_booking"], mode="conversation",
                     user="scripted")
    with pytest.raises(AWMError) as err:
        run_evaluation(cfg, settings=settings, run_id="refused")
    text = str(err.value)
    assert f"snapshot {snap}" in text and "clinic_booking/0" in text and "awm generate --include-existing" in text
    assert "\n" not in text
    assert snapshots(settings) == before and not (settings.runs_dir / "refused").exists()  # nothing evaluated


def test_the_llm_user_is_checked_only_for_the_episodes_that_are_conversations(snapshot):
    settings, _, _ = snapshot
    # No recorded user conversations: conversation mode with the LLM user is refused before any episode ...
    with pytest.raises(AWMError, match=r"no recorded conversation for 2 task\(s\) "
                                       r"\(recipe_box.task0, recipe_box.task1"):
        run_evaluation(EvalConfig(policy="reference", split="all", env_ids=["recipe_box"], max_tasks_per_env=2,
                                  mode="conversation"), settings=settings)
    # ... while message mode plays the same tasks without a user.
    out = run_evaluation(EvalConfig(policy="reference", split="all", env_ids=["recipe_box", "clinic_booking"],
                                    max_tasks_per_env=2), settings=settings)
    assert {r["mode"] for r in out.rows} == {"message"} and len(out.rows) == 4


@pytest.mark.slow
def test_awm_eval_mode_on_the_command_line(snapshot, prefect_server, capsys):
    """``awm eval --mode conversation``: one error line on tasks without scenarios; on tasks with them the
    report compares the two modes once both ran."""
    from flows.cli import main

    settings, _, snap = snapshot
    before = snapshots(settings)
    assert main(["eval", "--policy", "reference", "--split", "all", "--env", "clinic_booking",
                 "--mode", "conversation", "--user", "scripted"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"snapshot {snap}" in lines[0] and "awm generate --include-existing" in lines[0], err
    assert "Traceback" not in err and snapshots(settings) == before

    base = ["eval", "--policy", "reference", "--split", "all", "--env", "recipe_box", "--max-tasks-per-env", "3"]
    assert main([*base, "--mode", "conversation", "--user", "scripted"]) == 0
    first = capsys.readouterr().out
    assert "in mode **conversation** (3 conversation(s), user scripted)" in first
    assert "Message vs conversation" not in first
    assert main(base) == 0
    second = capsys.readouterr().out
    assert "in mode **message** on snapshot" in second and "## Message vs conversation" in second
    assert "| all | 3 | 1.000 | 100.0% | 3 | 1.000 | 100.0% |" in second

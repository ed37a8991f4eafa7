"""GRPO training in conversation mode: a synthesized task with a user scenario is played with the user
simulator, the agent shown the environment's policy; in message mode (the default) it stays one message.

The ``mode`` setting; the rollout runner in each mode on a demo environment given user scenarios and a
policy (each row records its mode); conversation mode refused before any step on tasks without user
scenarios; and one CPU GRPO step in conversation mode with the LLM user on its offline recordings.
"""
from __future__ import annotations

import json

import pytest

from awm_core.errors import AWMError, SettingsError
from awm_core.llm import read_ledger
from awm_core.llm.offline import write_fixture
from awm_core.models import Environment
from awm_core.settings import get_settings
from awm_core.train.config import MODES, TrainConfig, preset
from awm_core.train.demo import demo_environment

POLICY = "Confirm with the user before you change anything that cannot be undone."
OPENING = "Hi, I would like some help with my recipes."


def without_scenarios(env: Environment) -> Environment:
    tasks = [t.model_copy(update={"user_scenario": None, "user_prompt": None}) for t in env.tasks]
    return env.model_copy(update={"tasks": tasks, "policy": None})


def with_scenarios(env: Environment, policy: str | None = POLICY) -> Environment:
    tasks = [t.model_copy(update={"user_scenario": {"persona": None, "instructions": {
        "domain": env.scenario.name, "reason_for_call": t.text, "known_info": None, "unknown_info": None,
        "task_instructions": "End the conversation once it is done."}}, "user_prompt": None}) for t in env.tasks]
    return env.model_copy(update={"tasks": tasks, "policy": policy})


@pytest.fixture(scope="module")
def talk():
    return with_scenarios(demo_environment("recipe_box"))


@pytest.fixture(scope="module")
def tok(talk):
    from awm_core.train import models

    return models.train_tokenizer(models.corpus([talk]), vocab_size=1024)


def test_the_mode_setting():
    from awm_core.agent import MODES as AGENT_MODES

    assert MODES == AGENT_MODES and TrainConfig().mode == "message"
    assert TrainConfig.from_dict({"mode": "conversation"}, source="--set").mode == "conversation"
    with pytest.raises(SettingsError, match=r"--set: .*mode must be one of message, conversation .*got 'chat'"):
        TrainConfig.from_dict({"mode": "chat"}, source="--set")


def test_the_runner_plays_each_mode_and_rows_record_it(awm_home, pool, talk, tok):
    from awm_core.agent import policy_system_prompt
    from awm_core.train import models
    from awm_core.train.rollout import EpisodeRunner

    eos = tok.convert_tokens_to_ids(models.EOS)
    say_nothing = lambda prompts: [[eos] for _ in prompts]  # noqa: E731 - an empty text reply
    settings = get_settings()

    def run(mode: str):
        runner = EpisodeRunner(pool, [talk], settings, tokenizer=tok, interface="meta", max_turns=2, window=1,
                               max_prompt_tokens=4096, mode=mode, user="scripted")
        return runner.run([(talk.id, 0), (talk.id, 1)], say_nothing).results

    for r in run("message"):  # one message: the text reply ends the episode, no user
        row = r.row()
        assert row["mode"] == "message" and row["termination"] == "final_answer", row
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert "<policy>" not in row["messages"][0]["content"]
    for r in run("conversation"):  # the scripted user tells the task, then stops
        row = r.row()
        assert row["mode"] == "conversation" and row["termination"] == "user_stop" and not r.outcome.env_error, row
        assert row["messages"][0] == {"sender": "system", "role": "system",
                                      "content": policy_system_prompt("meta", POLICY)}
        assert [m["sender"] for m in row["messages"]] == ["system", "assistant", "user", "assistant", "user"]
        assert row["messages"][2]["content"] == talk.task(r.task_idx).text
        assert r.samples and "<policy>" in tok.decode(r.samples[0].prompt_ids)  # the policy is what it trains on


def test_conversation_mode_without_user_scenarios_is_refused_before_training(awm_home, tmp_path):
    from awm_core.train.toy import tasks_of
    from awm_core.train.trainer import run_training

    plain = without_scenarios(demo_environment("clinic_booking"))
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "r", "snapshot": 7}))
    cfg = preset("tiny", mode="conversation", user="scripted", steps=1)
    with pytest.raises(AWMError, match=r"none of the 10 planned task\(s\) of snapshot 7 has one .*"
                                       r"awm generate --include-existing"):
        run_training(cfg, [plain], tasks_of(plain), tmp_path, get_settings())
    assert not (tmp_path / "tokenizer").exists()  # refused before the model was made


@pytest.mark.slow
def test_a_grpo_step_in_conversation_mode_with_the_llm_user(awm_home, talk, tmp_path, monkeypatch):
    """One CPU step of a tiny random model on two tasks of the demo environment, each episode a
    conversation with the LLM user (offline recordings written here), under the environment's policy."""
    from awm_core.agent import policy_system_prompt
    from awm_core.agent.users import task_key
    from awm_core.train.trainer import run_training

    fixtures = tmp_path / "fixtures"
    for idx in (0, 1):
        write_fixture(fixtures, task_key(talk.task(idx)), "user", [OPENING, "Thanks, that is all. ###STOP###"])
    monkeypatch.setenv("AWM_LLM__FIXTURES_DIR", str(fixtures))
    monkeypatch.setenv("AWM_LLM__USER__BACKEND", "offline")
    get_settings.cache_clear()
    run_dir = tmp_path / "run"
    cfg = preset("tiny", mode="conversation", steps=1, tasks_per_step=1, group_size=2, max_turns=2, max_steps=12)
    tasks = [(talk.id, i, talk.task(i).text) for i in (0, 1)]
    out = run_training(cfg, [talk], tasks, run_dir, get_settings())
    assert out["steps"] == 1
    rows = [json.loads(x) for x in (run_dir / "rollouts.rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["mode"] for r in rows} == {"conversation"}, rows
    for r in rows:
        assert r["messages"][0]["content"] == policy_system_prompt("meta", POLICY)
        assert any(m.get("sender") == "user" and m.get("content") == OPENING for m in r["messages"]), r["messages"]
    calls = read_ledger(run_dir / "llm_calls.rank0.jsonl")
    assert calls and {(c.role, c.stage) for c in calls} == {("user", "user")}
    assert {c.scenario_id for c in calls} <= {"recipe_box.task0", "recipe_box.task1"}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1

"""GRPO training on conversational tasks (tau2-bench's): the user simulator plays in every episode.

The config's ``user``, ``max_steps`` and ``max_errors``; the rollout runner with a scripted user, an
LLM user (offline recordings, its calls in the ledger) and a user that cannot reply (a masked
environment error); a user role without an endpoint refused before training; and the real command
line importing tau2's mock domain and taking a GRPO step with each kind of user.
"""
from __future__ import annotations

import json
import re

import pytest

from awm_core.errors import SettingsError
from awm_core.llm import read_ledger
from awm_core.llm.offline import write_fixture
from awm_core.settings import get_settings
from awm_core.train.config import USERS, TrainConfig

OPENING = "Hi! Please create a task called 'Important Meeting' for user_1."


def test_the_user_setting_names_who_plays_the_user():
    from awm_core.agent import USER_KINDS

    assert USERS == USER_KINDS
    cfg = TrainConfig()
    assert (cfg.user, cfg.max_steps, cfg.max_errors) == ("llm", 100, 10)
    assert TrainConfig.from_dict({"user": "scripted", "max_steps": 7, "max_errors": 2}).user == "scripted"
    with pytest.raises(SettingsError, match=r"user must be one of llm, scripted .*got 'nope'"):
        TrainConfig(user="nope")
    with pytest.raises(SettingsError, match="max_steps must be an integer >= 1"):
        TrainConfig(max_steps=0)
    with pytest.raises(SettingsError, match="max_errors must be an integer >= 1"):
        TrainConfig.from_dict({"max_errors": -1}, source="--set")


def conversational_counters():
    """The toy counters environment with every task played as a conversation."""
    from awm_core.train.toy import counters

    env = counters(env_id="talk")
    tasks = [t.model_copy(update={"user_scenario": {"persona": "A tidy person.", "instructions": t.text}})
             for t in env.tasks]
    return env.model_copy(update={"tasks": tasks})


@pytest.fixture(scope="module")
def talk():
    return conversational_counters()


@pytest.fixture(scope="module")
def tok(talk):
    from awm_core.train import models

    return models.train_tokenizer(models.corpus([talk]), vocab_size=1024)


def runner_for(pool, env, tok, settings, **kw):
    from awm_core.train.rollout import EpisodeRunner

    return EpisodeRunner(pool, [env], settings, tokenizer=tok, interface="direct", max_turns=2, window=1,
                         max_prompt_tokens=2048, mode="conversation", **kw)


def say_nothing(tok):
    from awm_core.train import models

    eos = tok.convert_tokens_to_ids(models.EOS)
    return lambda prompts: [[eos] for _ in prompts]  # an empty text reply: it goes to the user


def test_rollouts_play_conversations_with_the_users(awm_home, pool, talk, tok, tmp_path, monkeypatch):
    from awm_core.agent.users import task_key

    fixtures = tmp_path / "fixtures"
    write_fixture(fixtures, task_key(talk.task(0)), "user", [OPENING, "Bye. ###STOP###"])
    write_fixture(fixtures, task_key(talk.task(1)), "user", [""])  # no reply, twice: user_error
    monkeypatch.setenv("AWM_LLM__FIXTURES_DIR", str(fixtures))
    get_settings.cache_clear()
    settings = get_settings()

    scripted = runner_for(pool, talk, tok, settings, user="scripted").run([(talk.id, 0), (talk.id, 1)],
                                                                          say_nothing(tok))
    for r in scripted.results:
        assert r.episode.termination == "user_stop" and not r.outcome.env_error, r.row()
        assert r.outcome.label != "environment_error" and r.samples and r.reward is not None
        assert [m["sender"] for m in r.row()["messages"]] == ["system", "assistant", "user", "assistant", "user"]
        assert r.row()["messages"][2]["content"] == talk.task(r.task_idx).text  # the scripted opening
        assert len(r.samples) == len(r.episode.turns) == 1

    ledger = tmp_path / "llm_calls.rank0.jsonl"
    llm = runner_for(pool, talk, tok, settings, user="llm", ledger=ledger, run_id="r1", max_steps=20,
                     max_errors=3)
    good, silent = llm.run([(talk.id, 0), (talk.id, 1)], say_nothing(tok)).results
    assert good.episode.termination == "user_stop" and not good.outcome.env_error
    assert good.row()["messages"][2] == {"sender": "user", "to": "assistant", "role": "user", "content": OPENING}
    assert good.row()["termination"] == "user_stop" and good.row()["error"] is None
    # A user that could not reply is no fault of the agent's: masked out of the loss.
    assert silent.episode.termination == "user_error" and silent.outcome.env_error
    assert silent.reward is None and silent.samples == []
    calls = read_ledger(ledger)
    assert {(c.role, c.stage, c.run_id) for c in calls} == {("user", "user", "r1")}
    assert len(calls) == 2 + 2  # the good conversation's two replies; the silent one's try and retry
    assert llm.budget is not None and llm.budget.spent_usd == pytest.approx(sum(c.cost_usd for c in calls))


def test_a_user_role_without_an_endpoint_fails_before_training(awm_home, talk, tmp_path, monkeypatch):
    from awm_core.errors import AWMError
    from awm_core.train.toy import tasks_of
    from awm_core.train.trainer import run_training

    monkeypatch.setenv("AWM_LLM__USER__BACKEND", "http")
    get_settings.cache_clear()
    cfg = TrainConfig(group_size=2, tasks_per_step=1, steps=1, sandbox_workers=1, mode="conversation")
    with pytest.raises(AWMError, match="the user simulator \\(LLM role 'user'\\) has no endpoint"):
        run_training(cfg, [talk], tasks_of(talk), tmp_path, get_settings())
    assert not (tmp_path / "tokenizer").exists()  # refused before the model was made


def _run_dir(out: str):
    found = re.search(r"training run (\w+) finished: 1 steps", out)
    assert found, out
    return get_settings().runs_dir / f"train-{found.group(1)}"


@pytest.mark.slow
def test_cli_trains_on_tau2_with_the_user_simulator(awm_home, tau2_wheel, prefect_server, tmp_path, monkeypatch,
                                                     capsys):
    from flows.cli import main

    # The user simulator is the LLM role "user" on its offline back end: one recorded conversation per task.
    fixtures = tmp_path / "fixtures"
    for idx in (0, 1):
        write_fixture(fixtures, f"tau2_mock.task{idx}", "user", [OPENING, "Thanks, that is all. ###STOP###"])
    monkeypatch.setenv("AWM_LLM__FIXTURES_DIR", str(fixtures))
    monkeypatch.setenv("AWM_LLM__USER__BACKEND", "offline")
    get_settings.cache_clear()

    assert main(["import", "tau2", "--wheel", str(tau2_wheel), "--domains", "mock", "--limit", "2"]) == 0
    assert "| mock | 2 | 2/2 |" in capsys.readouterr().out

    base = ["train", "--split", "tau2:mock", "--set", "steps=1", "--set", "tasks_per_step=1", "--set", "group_size=2",
            "--set", "max_turns=2", "--set", "max_steps=12"]
    assert main(base) == 0
    run_dir = _run_dir(capsys.readouterr().out)
    calls = [c for p in sorted(run_dir.glob("llm_calls*.jsonl")) for c in read_ledger(p)]
    user_calls = [c for c in calls if c.role == "user" and c.stage == "user"]
    assert user_calls and all(c.error is None for c in user_calls), calls
    assert {c.scenario_id for c in user_calls} <= {"tau2_mock.task0", "tau2_mock.task1"}
    assert all(c.run_id == run_dir.name[len("train-"):] for c in user_calls)
    assert any(c.cost_usd > 0 for c in user_calls)  # priced: the calls count against the run's budget
    rows = [json.loads(line) for p in run_dir.glob("rollouts.rank*.jsonl") for line in p.read_text().splitlines()]
    assert len(rows) == 2 and not any(r["env_error"] for r in rows), rows
    for r in rows:  # every party's messages, the user's opening included
        senders = {m.get("sender") for m in r["messages"]}
        assert {"system", "assistant", "user"} <= senders, r["messages"]
        assert any(m.get("sender") == "user" and m.get("content") == OPENING for m in r["messages"])

    assert main([*base, "--set", "user=scripted"]) == 0
    run_dir = _run_dir(capsys.readouterr().out)
    assert not [c for p in run_dir.glob("llm_calls*.jsonl") for c in read_ledger(p) if c.role == "user"]

"""Catalog environments under stock TRL: tool methods from the sandbox's schemas, a verifier
reward, and one GRPOTrainer step with environment_factory on a tiny CPU model."""
from __future__ import annotations

import inspect

import pytest

from awm_core.settings import load_settings
from awm_core.train.toy import counters
from awm_core.train.trl_env import (ToolCallFailed, awm_reward, trl_dataset, trl_environment_class,
                                    trl_environment_factory)


def test_tools_are_typed_methods_and_the_verifier_gives_the_reward(pool):
    from transformers.utils import get_json_schema

    settings = load_settings()
    cls = trl_environment_class(pool, counters(), settings)
    members = dict(inspect.getmembers(cls, inspect.isfunction))
    assert {"get_counter", "add"} <= set(members)
    schema = get_json_schema(members["add"])["function"]
    assert schema["parameters"]["properties"]["amount"]["type"] == "integer"
    assert set(schema["parameters"]["required"]) == {"name", "amount"}

    env = cls()
    env.reset(env_id="counters", task_idx=0)
    assert '"value": 5' in env.get_counter(name="apples")
    with pytest.raises(ToolCallFailed, match="tool"):
        env.get_counter(name="plums")
    assert awm_reward([[{"role": "assistant", "content": "not yet"}]], environments=[env]) == [settings.rewards.agent_error]
    env.add(name="apples", amount=2)
    assert awm_reward([[{"role": "assistant", "content": "Done."}]], environments=[env]) == [settings.rewards.completed]
    env.reset(env_id="counters", task_idx=0)  # back on the initial database
    assert env._reward("Done.") == settings.rewards.agent_error
    with pytest.raises(Exception, match="task_idx"):
        env.reset(env_id="counters")
    env._close()


def test_one_grpo_step_with_environment_factory(pool, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from awm_core.train.models import random_model, train_tokenizer

    env = counters()
    ds = trl_dataset([env])
    tok = train_tokenizer([t.text for t in env.tasks] * 20 + ["get_counter add apples pears amount name"] * 20,
                          vocab_size=400)
    model = random_model("tiny", tok)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=16, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
                      max_tool_calling_iterations=2)
    trainer = GRPOTrainer(model=model, processing_class=tok, train_dataset=ds, reward_funcs=[awm_reward],
                          environment_factory=trl_environment_factory(pool, [env]), args=args)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/awm_reward/mean" in h]
    assert logs and trainer.state.global_step == 1
    # An untrained model solves nothing: the verifier's reward is the agent_error reward.
    assert logs[0]["rewards/awm_reward/mean"] == load_settings().rewards.agent_error


def test_the_readme_example_runs(tmp_path):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo.py"
    main = runpy.run_path(str(script))["main"]
    last = main(["--steps", "1", "--out", str(tmp_path)])
    assert last["reward"] == load_settings().rewards.agent_error


def test_the_example_trains_on_a_catalog_snapshot(awm_home, tmp_path):
    """``examples/trl_grpo.py --catalog``: environments read from a published snapshot; without a
    gated snapshot, or with an unknown environment, it stops with one line saying so."""
    import runpy
    from pathlib import Path

    from storage.catalog import Catalog

    cat = Catalog.open(load_settings())
    try:
        with cat.publish(message="toy for stock TRL") as pub:
            pub.add_environments([counters()])
        snapshot = pub.snapshot_id
    finally:
        cat.close()
    script = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo.py"
    main = runpy.run_path(str(script))["main"]
    with pytest.raises(SystemExit, match="no gated snapshot"):
        main(["--catalog", "--steps", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="^error: no environment 'nope' in the catalog"):
        main(["--catalog", "--snapshot", str(snapshot), "--envs", "nope", "--out", str(tmp_path)])
    last = main(["--catalog", "--snapshot", str(snapshot), "--envs", "counters", "--steps", "1",
                 "--out", str(tmp_path)])
    assert last["reward"] == load_settings().rewards.agent_error

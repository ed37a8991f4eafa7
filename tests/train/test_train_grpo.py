"""The GRPO update itself: rewards of real episodes become advantages that move the weights, every
step sample carries its episode's advantage, and environment-error episodes stay out of the loss.

Uses the two-tool counter application of ``awm_core.train.toy`` (short prompts, so a CPU step takes
seconds) and runs the trainer in-process; the accelerate-launched path is covered by test_train_flow.py.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from awm_core.models import Environment
from awm_core.settings import load_settings
from awm_core.train.config import TrainConfig
from awm_core.train.samples import Sample
from awm_core.train.toy import counters

def counter_environment() -> Environment:
    return counters()


def test_grpo_step_turns_episode_rewards_into_a_weight_update(tmp_path):
    """Warm-started on the reference solutions, the tiny model's sampled episodes differ in reward;
    the GRPO step then has a non-zero gradient, and the episodes are real (verifier labels). With
    window 1 and three turns an episode yields two samples; a budget of about one sample per pass
    cuts the step into several micro-batches."""
    from awm_core.train.trainer import run_training

    env = counter_environment()
    cfg = TrainConfig(model="random:tiny", group_size=4, tasks_per_step=2, max_turns=3, window=1,
                      interface="direct", learning_rate=1e-3, steps=1, max_tokens=40, max_prompt_tokens=2048,
                      warmstart_steps=80, warmstart_lr=3e-3, sandbox_workers=1, seed=1,
                      max_tokens_per_microbatch=2100)
    run_training(cfg, [env], [(env.id, t.idx, t.text) for t in env.tasks], tmp_path, load_settings())
    warm = json.loads((tmp_path / "warmstart.json").read_text())
    assert warm["samples"] >= 2 and warm["losses"][-1] < warm["losses"][0] / 2
    (metrics,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    episodes = [json.loads(x) for x in (tmp_path / "rollouts.rank0.jsonl").read_text().splitlines()]
    assert len(episodes) == 8 and not any(e["env_error"] for e in episodes)
    paper_rewards = {"completed": 1.0, "partially_completed": 0.1, "agent_error": 0.0, "format_error": -1.0}
    assert all(e["reward"] == paper_rewards[e["label"]] for e in episodes)
    rewards = [e["reward"] for e in episodes]
    assert len(set(rewards)) > 1, f"every episode tied ({rewards}): no GRPO signal"
    assert metrics["reward_std"] > 0 and metrics["grad_norm"] > 0
    assert metrics["awm/policy_tokens"] < metrics["awm/train_tokens"]  # prompts and tool output are not trained
    assert any(e["tool_calls"] > 0 for e in episodes)  # episodes really called the environment
    # window 1: a third turn no longer sees the first, so its step is a sample of its own
    assert metrics["awm/samples"] > sum(1 for e in episodes if e["turns"] >= 1)
    assert any(e["turns"] == 3 for e in episodes)
    assert metrics["awm/microbatches"] > 1 and metrics["awm/padded_tokens"] <= metrics["awm/microbatches"] * 2100


def _fake_trainer(budget: int, busiest: int = 0):
    # gather() stands in for a second process whose count is ``busiest``: max() then picks it up.
    def gather(t):
        if t.shape == (1, 2):  # (passes, policy tokens) of this process: the other one adds its row
            return torch.cat([t, torch.tensor([[busiest, 0]], dtype=t.dtype)])
        return t.reshape(-1)

    fake = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=gather),
        _tokenizer=SimpleNamespace(pad_token_id=0), awm_token_budget=budget)
    from awm_core.train.trainer import AWMGRPOTrainer

    fake._microbatch = lambda rows, total, out: AWMGRPOTrainer._microbatch(fake, rows, total, out)
    return fake


def _rows(microbatches, key):
    return [row for mb in microbatches for row in mb[key].tolist()]


def test_step_samples_carry_their_episodes_advantage_and_env_errors_are_masked_out():
    from awm_core.train.trainer import AWMGRPOTrainer

    def result(env_error, samples):
        return SimpleNamespace(outcome=SimpleNamespace(env_error=env_error), samples=samples)

    s = lambda p, c, m: Sample(prompt_ids=p, completion_ids=c, mask=m, steps=[0], spans=[(0, len(c))])  # noqa: E731
    batch = SimpleNamespace(results=[
        result(False, [s([5, 6], [7, 8], [1, 1]), s([5], [9], [1])]),      # two step samples, advantage 1.5
        result(True, [s([5, 6, 7], [3, 4, 2], [1, 0, 1])]),               # environment error
        result(False, [s([1], [2, 3, 4], [1, 0, 1])]),                    # advantage -0.5
    ])
    out = {"advantages": torch.tensor([1.5, 0.0, -0.5])}
    new = AWMGRPOTrainer._expand_to_samples(_fake_trainer(budget=1000), out, batch)
    (mb,) = new["microbatches"]  # everything fits one pass
    by_prompt = {tuple(p): (a, t) for p, a, t in zip(mb["prompt_ids"].tolist(), mb["advantages"].tolist(),
                                                      mb["tool_mask"].tolist())}
    assert by_prompt[(0, 5, 6)] == (1.5, [1, 1, 0]) and by_prompt[(0, 0, 5)] == (1.5, [1, 0, 0])
    assert by_prompt[(5, 6, 7)] == (0.0, [0, 0, 0])  # env error: attended, never trained
    assert by_prompt[(0, 0, 1)] == (-0.5, [1, 0, 1])
    assert int(new["num_items_in_batch"]) == 5 and int(mb["num_items_in_batch"]) == 5
    assert "old_per_token_logps" not in mb


def test_micro_batches_keep_to_the_token_budget_and_match_the_busiest_process():
    from awm_core.train.trainer import AWMGRPOTrainer

    samples = [Sample([1] * (1 + i % 4), [2] * (1 + i % 3), [1] * (1 + i % 3), [i], [(0, 1 + i % 3)])
               for i in range(13)]
    batch = SimpleNamespace(results=[SimpleNamespace(outcome=SimpleNamespace(env_error=False), samples=samples)])
    out = {"advantages": torch.tensor([1.0])}
    new = AWMGRPOTrainer._expand_to_samples(_fake_trainer(budget=12), out, batch)
    mbs = new["microbatches"]
    assert len(mbs) > 1
    assert all(mb["prompt_ids"].numel() + mb["completion_ids"].numel() <= 12 for mb in mbs)
    assert sum(int(mb["tool_mask"].sum()) for mb in mbs) == sum(s.policy_tokens for s in samples)
    # another process needs 40 passes: this one makes up the difference with fully masked passes
    padded = AWMGRPOTrainer._expand_to_samples(_fake_trainer(budget=12, busiest=40), out, batch)["microbatches"]
    assert len(padded) == 40 and sum(int(mb["tool_mask"].sum()) for mb in padded[len(mbs):]) == 0

"""LoRA through peft: with ``lora.r > 0`` a GRPO step trains the adapters and nothing else.

A short warm start (supervised steps on the reference solutions) trains the whole tiny model
first; GRPO then wraps it with a ``LoraConfig`` (TRL's ``peft_config``), and after the step every
base weight is bit-identical while the adapters moved. Rewards alternate 0/1 within each group
(a stand-in for the verifier, as in test_train_precision.py), so the step always has a gradient
and the test needs only a few warm-start steps. The final checkpoint
is the adapter; since a random base lives in no folder, base and adapter are also saved merged.
With ``beta > 0`` the KL reference is the policy with its adapters disabled (no second model).
"""
from __future__ import annotations

import json

import torch

from awm_core.settings import load_settings
from awm_core.train.config import TrainConfig
from test_train_grpo import counter_environment
from test_train_precision import _alternating_reward


def test_lora_grpo_step_moves_only_the_adapters(tmp_path, monkeypatch):
    import awm_core.train.trainer as tr
    from awm_core.train import models

    seen: dict = {}
    warm = tr.warm_start

    def spy(model, *a, **k):
        out = warm(model, *a, **k)
        seen["model"] = model
        seen["base"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return out

    monkeypatch.setattr(tr, "warm_start", spy)
    monkeypatch.setattr(tr, "episode_reward", _alternating_reward)
    env = counter_environment()
    cfg = TrainConfig(model="random:tiny", group_size=4, tasks_per_step=2, max_turns=3, window=None,
                      interface="direct", learning_rate=1e-2, steps=1, max_tokens=40, max_prompt_tokens=2048,
                      max_tokens_per_microbatch=16384, warmstart_steps=10, warmstart_lr=3e-3, sandbox_workers=1,
                      seed=1, lora={"r": 8, "alpha": 16}, beta=0.04)
    out = tr.run_training(cfg, [env], [(env.id, t.idx, t.text) for t in env.tasks], tmp_path, load_settings())

    (metrics,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics["reward_std"] > 0 and metrics["grad_norm"] > 0
    # beta > 0: the reference is the same model with its adapters disabled (B = 0 at the first step)
    assert metrics["kl"] is not None and abs(metrics["kl"]) < 1e-6
    after = dict(seen["model"].named_parameters())  # peft injected the adapters into this very model
    adapters = {n: p for n, p in after.items() if "lora_" in n}
    base = {n.replace(".base_layer", ""): p for n, p in after.items() if "lora_" not in n}
    assert len(adapters) == 2 * 7 * 2  # A and B for 7 projections in each of 2 layers
    assert set(base) == set(seen["base"])
    changed = [n for n, p in base.items() if not torch.equal(p.detach(), seen["base"][n])]
    assert not changed, f"base weights moved under LoRA: {changed}"
    assert all(not p.requires_grad for p in base.values())
    moved = [n for n, p in adapters.items() if "lora_B" in n and p.detach().abs().sum() > 0]  # B starts at 0
    assert moved, "no adapter weight moved"
    assert out["precision"]["trainable_params"] == sum(p.numel() for p in adapters.values())

    final = tmp_path / "checkpoints" / "final"
    assert out["adapter"] is True and (final / "adapter_config.json").exists()
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    merged = models.load_model(out["merged_checkpoint"])
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # the merged model computes what base + adapter compute
        torch.testing.assert_close(merged(ids).logits, seen["model"].eval()(ids).logits, atol=1e-4, rtol=1e-4)
    assert models.load_tokenizer(out["merged_checkpoint"]) is not None


def test_lora_settings_from_the_command_line():
    from types import SimpleNamespace

    import pytest

    from awm_core.errors import SettingsError
    from flows.commands.train import effective_config

    def cli(*sets):
        return effective_config(SimpleNamespace(config=None, preset="tiny", set=list(sets), snapshot=None))

    cfg = cli("lora.r=16", "lora.target_modules=[\"q_proj\",\"v_proj\"]", "window=1")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.window) == (16, 32, ["q_proj", "v_proj"], 1)
    assert cli("lora.r=4", "lora.alpha=8").lora.alpha == 8
    with pytest.raises(SettingsError, match="lora has unknown setting"):
        cli("lora.rank=4")
    with pytest.raises(SettingsError, match="window is not a table"):
        cli("window.size=2")
    with pytest.raises(SettingsError, match="unknown training setting"):
        cli("lorra.r=2")


def test_a_misspelt_lora_target_is_refused():
    """peft refuses only a list of which no name matches; one typo among seven would train fewer layers."""
    import pytest

    from awm_core.errors import SettingsError
    from awm_core.train import models
    from awm_core.train.config import preset
    from awm_core.train.trainer import lora_config

    model = models.random_model("tiny", models.train_tokenizer(["add two"], vocab_size=300))
    targets = ["q_proj", "self_attn.v_proj", "gate_prj"]
    with pytest.raises(SettingsError, match=r"lora.target_modules gate_prj name no linear layer .*down_proj"):
        lora_config(preset("tiny", lora={"r": 4, "target_modules": targets}), model)
    peft = lora_config(preset("tiny", lora={"r": 4, "target_modules": targets[:2]}), model)
    assert (peft.r, set(peft.target_modules)) == (4, {"q_proj", "self_attn.v_proj"})
    assert lora_config(preset("tiny"), model) is None  # r = 0: off

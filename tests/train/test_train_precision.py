"""Precision that learns: fp32 weights under bf16 autocast, at the paper's learning rate.

A bf16 weight of 1.0 moves only in steps of 2**-7, so AdamW's first steps at lr 7e-7 (about lr per
weight) round away on bf16 weights and a pure-bf16 run does not learn at all. Training therefore
loads every model in fp32 and treats ``bf16 = true`` as autocast; a model whose trainable weights
are not fp32 is refused before any episode runs.
"""
from __future__ import annotations

import pytest
import torch

from awm_core.errors import SettingsError
from awm_core.settings import load_settings
from awm_core.train.config import preset
from test_train_grpo import counter_environment


def _paper_on_cpu(**changes):
    """The paper preset's optimisation (lr 7e-7, bf16, gradient checkpointing, dapo loss) with the
    batch and episodes shrunk to CPU-seconds."""
    return preset("paper", model="random:tiny", group_size=2, tasks_per_step=2, max_turns=1, max_tokens=8,
                  max_prompt_tokens=2048, steps=1, save_steps=0, accelerate_config="cpu", sandbox_workers=1,
                  interface="direct", **changes)


def _alternating_reward(completions, awm_reward=None, **_):
    """Rewards 0, 1, 0, 1, ...: every GRPO group of two has advantages -1/+1 whatever the random
    model writes, so the step has a gradient without a warm start (norm weights stay exactly 1.0)."""
    return [float(i % 2) for i in range(len(completions))]


def test_paper_settings_move_fp32_weights_under_bf16_autocast(tmp_path, monkeypatch):
    import awm_core.train.trainer as tr

    cfg = _paper_on_cpu()
    assert (cfg.learning_rate, cfg.bf16, cfg.gradient_checkpointing) == (7e-7, True, True)
    seen: dict = {}
    load = tr.load_policy

    def spy(*a, **k):
        model, tok = load(*a, **k)
        seen["model"] = model
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["compute"] = set()
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen["compute"].add(o.dtype))
        return model, tok

    monkeypatch.setattr(tr, "load_policy", spy)
    monkeypatch.setattr(tr, "episode_reward", _alternating_reward)
    env = counter_environment()
    out = tr.run_training(cfg, [env], [(env.id, t.idx, t.text) for t in env.tasks], tmp_path, load_settings())

    assert out["precision"]["weights"] == ["float32"] and out["precision"]["autocast"] == "bf16"
    assert seen["compute"] == {torch.bfloat16}  # matmuls ran in bf16 (CPU autocast), weights stayed fp32
    model, before = seen["model"], seen["before"]
    after = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())
    moved = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    norms = [n for n in before if "norm" in n]
    assert norms and all(torch.equal(before[n], torch.ones_like(before[n])) for n in norms)
    assert set(norms) <= moved, f"norm weights equal to 1.0 did not move: {sorted(set(norms) - moved)}"
    assert moved == set(before), f"unchanged: {sorted(set(before) - moved)}"
    # the steps are AdamW's first ones, about lr per weight: far below bf16's resolution at 1.0
    step = max(float((after[n].detach() - before[n]).abs().max()) for n in norms)
    assert 0 < step <= 2 * cfg.learning_rate
    one = torch.ones(1, dtype=torch.bfloat16)
    assert torch.equal(one + step, one)  # the same update on a bf16 weight would have been lost


def test_a_bf16_model_folder_loads_as_fp32(tmp_path):
    from awm_core.train import models
    from awm_core.train.trainer import load_policy

    tok = models.train_tokenizer(["add two to the counter"], vocab_size=300, out_dir=tmp_path / "m")
    models.random_model("tiny", tok, dtype=torch.bfloat16).save_pretrained(str(tmp_path / "m"))
    assert {p.dtype for p in models.load_model(tmp_path / "m", dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    model, _ = load_policy(preset("tiny", model=str(tmp_path / "m"), bf16=True), [], tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_pure_bf16_model_is_refused_before_any_episode(tmp_path, monkeypatch):
    import awm_core.train.trainer as tr

    load = tr.load_policy
    monkeypatch.setattr(tr, "load_policy", lambda *a, **k: (lambda m, t: (m.to(torch.bfloat16), t))(*load(*a, **k)))
    env = counter_environment()
    with pytest.raises(SettingsError, match=r"trainable parameter\(s\) are bfloat16, not fp32 .*would not learn"):
        tr.run_training(_paper_on_cpu(), [env], [(env.id, t.idx, t.text) for t in env.tasks], tmp_path,
                        load_settings())
    assert not (tmp_path / "metrics.jsonl").exists()


def test_only_deepspeed_lets_non_fp32_trainable_weights_through():
    from types import SimpleNamespace

    from awm_core.train.trainer import check_master_weights

    half = torch.nn.Linear(2, 2).to(torch.float16)
    with pytest.raises(SettingsError, match="float16"):
        check_master_weights(half, SimpleNamespace(deepspeed_plugin=None, learning_rate=7e-7))
    check_master_weights(half, SimpleNamespace(deepspeed_plugin=object(), learning_rate=7e-7))
    frozen = torch.nn.Linear(2, 2).to(torch.bfloat16).requires_grad_(False)
    check_master_weights(frozen, SimpleNamespace(deepspeed_plugin=None, learning_rate=7e-7))  # not trained

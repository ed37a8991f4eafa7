"""Token-budget micro-batches: the same gradient as one big batch, whatever the cut.

The loss is the mean over every policy token of the step (DAPO token-level normalisation), so
summing the micro-batches' gradients must give exactly the single-pass gradient. Runs TRL's own
loss (``_compute_loss``) on a real ``AWMGRPOTrainer`` around a tiny model.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from awm_core.train.samples import Sample, microbatch_cost, pack_microbatches


def test_packing_respects_the_budget_and_keeps_every_row():
    rng = random.Random(0)
    lengths = [(rng.randint(1, 60), rng.randint(1, 30)) for _ in range(200)]
    groups = pack_microbatches(lengths, budget=256)
    assert sorted(i for g in groups for i in g) == list(range(200))
    assert all(microbatch_cost([lengths[i] for i in g]) <= 256 for g in groups)
    # first-fit decreasing wastes little: far fewer passes than one row each
    assert len(groups) < 60
    with pytest.raises(ValueError, match="does not fit the micro-batch budget of 50 tokens"):
        pack_microbatches([(40, 20)], budget=50)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig

    from awm_core.train.models import random_model, train_tokenizer
    from awm_core.train.trainer import AWMGRPOTrainer

    tok = train_tokenizer(["add the counter", "get counter apples pears", "<tool_call> name arguments"],
                          vocab_size=300)
    model = random_model("tiny", tok, seed=0, max_positions=512)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("out")), per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=8, loss_type="dapo", report_to="none",
                      use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}], "env_id": "e", "task_idx": 0}] * 2)
    t = AWMGRPOTrainer(model=model, args=args, awm_rollout=SimpleNamespace(), processing_class=tok,
                       train_dataset=data, token_budget=10_000)
    t.current_gradient_accumulation_steps = 1  # what Trainer.train sets before the first step
    return t


def _batch(seed: int):
    rng = random.Random(seed)
    results = []
    for e in range(6):
        samples = []
        for _ in range(rng.randint(1, 3)):
            p = [rng.randint(5, 250) for _ in range(rng.randint(3, 40))]
            c = [rng.randint(5, 250) for _ in range(rng.randint(1, 20))]
            m = [int(rng.random() < 0.7) for _ in c]
            samples.append(Sample(p, c, m, [0], [(0, len(c))]))
        results.append(SimpleNamespace(outcome=SimpleNamespace(env_error=e == 4), samples=samples))
    advantages = torch.tensor([rng.uniform(-1.5, 1.5) for _ in results])
    return SimpleNamespace(results=results), {"advantages": advantages}


def _gradient(trainer, budget: int, seed: int) -> tuple[torch.Tensor, int, float]:
    batch, out = _batch(seed)
    trainer.awm_token_budget = budget
    trainer.model.zero_grad(set_to_none=True)
    micro = trainer._expand_to_samples(out, batch)["microbatches"]
    loss = trainer.backward_microbatches(trainer.model, micro)
    grad = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return grad, len(micro), float(loss)


@pytest.mark.parametrize("seed", [0, 1])
def test_budget_cut_micro_batches_give_the_gradient_of_one_batch(trainer, seed):
    trainer.model.train()
    whole, passes, loss = _gradient(trainer, 100_000, seed)
    assert passes == 1 and whole.abs().sum() > 0
    for budget in (80, 150):
        cut, n, cut_loss = _gradient(trainer, budget, seed)
        assert n > 2, f"budget {budget} should need several passes"
        torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-7)
        assert cut_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)

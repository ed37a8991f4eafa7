"""The pinned TRL still has every private piece AWMGRPOTrainer leans on (``TRL_COUPLING``).

When a TRL upgrade drops or reshapes one, this fails naming it, before any training test fails
somewhere deep in a step."""
from __future__ import annotations

import inspect

import pytest

trl = pytest.importorskip("trl", reason="the train extra is not installed")

from awm_core.train.trainer import TRL_COUPLING, AWMGRPOTrainer  # noqa: E402


def _fail(entry: str, what: str) -> str:
    return (f"the installed TRL {trl.__version__} {what}; AWMGRPOTrainer relies on {entry!r} "
            f"({TRL_COUPLING[entry]}): see TRL_COUPLING in awm_core/train/trainer.py")


def _entry(prefix: str) -> str:
    return next(k for k in TRL_COUPLING if k.startswith(prefix))


@pytest.mark.parametrize("method, params", [
    ("_generate_and_score_completions", ["inputs"]),
    ("_prepare_inputs", ["generation_batch"]),
    ("_get_per_token_logps_and_entropies", ["model", "input_ids", "attention_mask", "logits_to_keep", "batch_size"]),
    ("_compute_loss", ["model", "inputs"]),
])
def test_the_private_methods_are_there_with_their_parameters(method, params):
    entry = _entry(f"GRPOTrainer.{method}(")
    fn = getattr(trl.GRPOTrainer, method, None)
    assert fn is not None, _fail(entry, f"has no GRPOTrainer.{method}")
    got = list(inspect.signature(fn).parameters)[1:1 + len(params)]
    assert got == params, _fail(entry, f"takes GRPOTrainer.{method}({', '.join(got)}, ...)")


def test_the_overrides_are_the_ones_listed():
    overridden = {name for name, v in vars(AWMGRPOTrainer).items()
                  if callable(v) and name.startswith("_") and not name.startswith("__")
                  and hasattr(trl.GRPOTrainer, name)}
    listed = {k.split(".", 1)[1].split("(", 1)[0] for k in TRL_COUPLING if k.startswith("GRPOTrainer._")}
    assert overridden <= listed, f"AWMGRPOTrainer overrides {sorted(overridden - listed)} of TRL without a " \
                                 "TRL_COUPLING entry saying why"


def test_the_rollout_hook_the_attributes_and_the_helpers():
    entry = _entry("GRPOTrainer.__init__(rollout_func")
    assert "rollout_func" in inspect.signature(trl.GRPOTrainer.__init__).parameters, \
        _fail(entry, "has no rollout_func parameter")
    entry = _entry("self._step")
    source = inspect.getsource(trl.GRPOTrainer)
    for attr in ("_step", "_metrics", "num_iterations", "_tokenizer", "ref_model"):
        assert f"self.{attr} =" in source or f"self.{attr}:" in source, _fail(entry, f"never sets self.{attr}")
    from trl.trainer import utils

    entry = _entry("trl.trainer.utils.use_adapter")
    assert list(inspect.signature(utils.use_adapter).parameters) == ["model", "adapter_name"], \
        _fail(entry, "has another use_adapter")
    from trl import models

    assert hasattr(models, "unwrap_model_for_generation"), \
        _fail(_entry("trl.models.unwrap_model_for_generation"), "has no unwrap_model_for_generation")

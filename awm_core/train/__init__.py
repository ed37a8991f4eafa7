"""Multi-turn GRPO training on the catalog's environments (TRL ``GRPOTrainer`` + Accelerate).

- ``config``: ``TrainConfig`` and the presets (``paper``: group 16, 64 tasks per step,
  lr 7e-7, 20 turns, window 3; ``tiny``: a CPU smoke run).
- ``samples``: per-step samples and loss masks from an episode's recorded generations.
- ``rollout``: episodes in sandbox sessions with batched generation; TRL's ``rollout_func``.
- ``trainer``: ``AWMGRPOTrainer`` and ``run_training`` (what ``accelerate launch`` runs via
  ``launch``). Importing it pulls in torch, transformers and trl; the modules above do not
  import trl.
- ``models``: a locally trained tokenizer and models built from a config.
- ``demo``: the offline demo environments assembled from the recordings.
"""
from awm_core.train.config import PAPER, PRESETS, TrainConfig, preset
from awm_core.train.samples import Sample, StepRecord, build_samples

__all__ = ["PAPER", "PRESETS", "Sample", "StepRecord", "TrainConfig", "build_samples", "preset"]

"""Stages around a GRPO run that show whether it learns: warm start, then a fixed evaluation.

- ``warm_start_stage`` builds the policy of a config, takes its supervised warm-start steps on
  the tasks' reference solutions and saves model and tokenizer to a folder; a GRPO run (and its
  control) then starts from that folder (``model = tokenizer = <folder>``).
- ``evaluate_policy`` runs a fixed set of episodes (every task ``episodes_per_task`` times,
  sampled with a fixed seed at the training temperature, so before and after see the same
  draws) and returns the completion, format-error and mean-reward rates.
- ``learning_run`` does both around a GRPO run and its negated-advantage control, and returns
  the before/after table and each run's per-step curve (what ``benchmarks/learning.py`` prints
  and the learning test asserts).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from awm_core.train.config import TrainConfig


def warm_start_stage(config: TrainConfig, environments: Sequence[Any], tasks: Sequence[tuple[str, int, str]],
                     out_dir: str | Path, settings: Any) -> Path:
    """Warm-start ``config``'s policy (``config.warmstart_steps`` steps) and save it to ``out_dir``."""
    from accelerate import PartialState

    from awm_core.errors import SettingsError
    from awm_core.runtime import SandboxPool
    from awm_core.train.rollout import EpisodeRunner
    from awm_core.train.trainer import load_policy, warm_start

    if config.warmstart_steps < 1:
        raise SettingsError("the warm-start stage needs warmstart_steps >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_policy(config, environments, out_dir)
    with SandboxPool(settings.sandbox, workers=config.sandbox_workers) as pool:
        runner = EpisodeRunner(pool, list(environments), settings, tokenizer=tok, interface=config.interface,
                               max_turns=config.max_turns, window=config.window,
                               max_prompt_tokens=config.max_prompt_tokens)
        warm_start(model, tok, runner, tasks, config, out_dir, PartialState(cpu=True))
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir


def evaluate_policy(model_dir: str | Path, environments: Sequence[Any], tasks: Sequence[tuple[str, int, str]],
                    settings: Any, config: TrainConfig, *, episodes_per_task: int = 8, seed: int = 1234
                    ) -> dict[str, float]:
    """Rates of a saved policy on a fixed set of episodes (see the module docstring)."""
    import torch

    from awm_core.runtime import SandboxPool
    from awm_core.train.models import EOS, load_model, load_tokenizer
    from awm_core.train.rollout import EpisodeRunner, hf_generate_fn

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    eos = [tok.convert_tokens_to_ids(EOS), tok.pad_token_id]
    plan = [(env_id, idx) for env_id, idx, _ in tasks for _ in range(episodes_per_task)]
    torch.manual_seed(seed)
    with SandboxPool(settings.sandbox, workers=config.sandbox_workers) as pool:
        runner = EpisodeRunner(pool, list(environments), settings, tokenizer=tok, interface=config.interface,
                               max_turns=config.max_turns, window=config.window,
                               max_prompt_tokens=config.max_prompt_tokens)
        batch = runner.run(plan, hf_generate_fn(model, tok, max_new_tokens=config.max_tokens,
                                                temperature=config.temperature, eos_token_ids=eos))
    rewards = [r.outcome.reward for r in batch.results]
    return {**batch.rates(), "reward_mean": sum(rewards) / max(1, len(rewards)), "episodes": len(rewards)}


def learning_run(config: TrainConfig, environments: Sequence[Any], tasks: Sequence[tuple[str, int, str]],
                 work_dir: str | Path, settings: Any, *, episodes_per_task: int = 8, control: bool = True,
                 log: Any = print) -> dict[str, Any]:
    """Warm start once, then GRPO and (with ``control``) the negated-advantage control from the same
    weights; the fixed evaluation before and after each. Returns a JSON-able report."""
    from awm_core.train.trainer import run_training

    work_dir = Path(work_dir)
    t0 = time.perf_counter()
    start = warm_start_stage(config, environments, tasks, work_dir / "warm", settings)
    log(f"warm start: {config.warmstart_steps} steps in {time.perf_counter() - t0:.1f}s")
    before = evaluate_policy(start, environments, tasks, settings, config, episodes_per_task=episodes_per_task)
    log(f"before: {_rates(before)}")
    report: dict[str, Any] = {"config": config.to_dict(), "before": before, "runs": {}}
    arms = [("grpo", False)] + ([("negated", True)] if control else [])
    for name, negate in arms:
        t1 = time.perf_counter()
        arm = config.replace(model=str(start), tokenizer=str(start), warmstart_steps=0, negate_advantages=negate)
        summary = run_training(arm, environments, tasks, work_dir / name, settings)
        after = evaluate_policy(summary["final_checkpoint"], environments, tasks, settings, config,
                                episodes_per_task=episodes_per_task)
        curve = [json.loads(x) for x in (work_dir / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
        report["runs"][name] = {"after": after, "curve": curve, "seconds": time.perf_counter() - t1}
        log(f"{name}: after {_rates(after)} ({time.perf_counter() - t1:.0f}s)")
    return report


def _rates(r: dict[str, float]) -> str:
    return (f"completed {r['completion_rate']:.0%}, format errors {r['format_error_rate']:.0%}, "
            f"reward {r['reward_mean']:+.3f}")


__all__ = ["evaluate_policy", "learning_run", "warm_start_stage"]

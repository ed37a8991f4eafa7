"""The reward curve of one or more training runs as a PNG (the train flow's artifact, the learning
benchmark's figure). ``metrics`` rows are the lines of a run's ``metrics.jsonl``; rows without a
reward (optimizer steps that reused a batch of episodes) are left out."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def reward_curves_png(runs: Mapping[str, Sequence[dict[str, Any]]], path: str | Path, *,
                      title: str = "GRPO training") -> Path:
    """Mean reward (with a ±std band) and completion rate per step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    for i, (name, metrics) in enumerate(runs.items()):
        colour = f"C{i}"
        # With updates_per_batch > 1 only the steps that rolled out new episodes have a reward.
        metrics = [m for m in metrics if m.get("reward") is not None]
        steps = [m["step"] for m in metrics]
        mean = [m.get("reward") if m.get("reward") is not None else float("nan") for m in metrics]
        std = [m.get("reward_std") or 0.0 for m in metrics]
        comp = [m.get("awm/completion_rate") or 0.0 for m in metrics]
        prefix = "" if len(runs) == 1 else f"{name}: "
        ax.plot(steps, mean, marker="o", color=colour, label=f"{prefix}reward mean")
        ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                        color=colour, alpha=0.15)
        ax.plot(steps, comp, marker=".", linestyle="--", color=colour, label=f"{prefix}completion rate")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["reward_curves_png"]

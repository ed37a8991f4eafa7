"""What every run report is made of: markdown tables and PNG charts.

The generate, evaluate and train flows publish a markdown summary with a chart (as Prefect
artifacts), and the learning benchmark writes the same reward chart; they all render through
this module so a table or a chart looks the same wherever it appears. No Prefect here:
publishing the rendered parts is ``flows/artifacts.py``.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

# One colour per outcome label, so the evaluation and training charts agree.
LABEL_COLOURS = {"completed": "#2e7d32", "partially_completed": "#9ccc65", "agent_error": "#ef6c00",
                 "environment_error": "#757575", "format_error": "#c62828"}


def markdown_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a markdown table. ``columns``: (header, alignment) with alignment ``"l"`` or ``"r"``;
    cells are written as given (format them first) with ``|`` escaped so a reason cannot break a row."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for _, a in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |")
    return lines


def data_uri(png: bytes) -> str:
    """The PNG as a data URI: the Prefect UI renders it in markdown and image artifacts without a file server."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _render(draw: Callable[[Any, Any], None], size: tuple[float, float], dpi: int = 100) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    try:
        draw(fig, ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def stacked_bars_png(categories: Sequence[str], series: Mapping[str, Sequence[float]], *, xlabel: str = "",
                     ylabel: str = "", title: str = "", colours: Mapping[str, str] | None = None,
                     size: tuple[float, float] = (6, 3.2)) -> bytes:
    """One bar per category, stacked by series (empty series are left out of the legend)."""
    def draw(fig, ax):
        bottom = [0.0] * len(categories)
        for name, values in series.items():
            if not any(values):
                continue
            ax.bar(list(categories), list(values), bottom=bottom, label=name,
                   **({"color": colours[name]} if colours and name in colours else {}))
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
        if any(any(v) for v in series.values()):  # an empty legend warns
            ax.legend(fontsize=7)

    return _render(draw, size)


def reward_curves_png(runs: Mapping[str, Sequence[dict[str, Any]]], path: str | Path | None = None, *,
                      title: str = "GRPO training") -> bytes:
    """Mean reward (with a ±std band) and completion rate per step, one colour per run. ``runs``
    maps a name to the lines of a run's ``metrics.jsonl``; written to ``path`` too when given."""
    def draw(fig, ax):
        for i, (name, metrics) in enumerate(runs.items()):
            colour = f"C{i}"
            # With updates_per_batch > 1 only the steps that rolled out new episodes have a reward.
            metrics = [m for m in metrics if m.get("reward") is not None]
            steps = [m["step"] for m in metrics]
            mean = [m["reward"] for m in metrics]
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

    png = _render(draw, (6.4, 3.4))
    if path is not None:
        Path(path).write_bytes(png)
    return png


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


__all__ = ["LABEL_COLOURS", "data_uri", "markdown_table", "pct", "reward_curves_png", "stacked_bars_png"]

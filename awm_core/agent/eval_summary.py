"""An evaluation's summary: statistics by scenario and category, its markdown, its reward chart.

A summary names the run's mode (``message`` or ``conversation``); given the same policy's rollouts of the
other mode on the same snapshot (``other_rows``, read from the catalog by the evaluate flow) it compares
the two modes side by side on the tasks this run played (``by_mode``)."""
from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Any

from awm_core.agent.evaluation import EvalConfig, EvalResult
from awm_core.agent.rewards import LABELS
from awm_core.agent.users import MODES
from awm_core.models import Environment
from awm_core.report import LABEL_COLOURS, markdown_table, stacked_bars_png


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _share(n: int, of: int) -> float:
    return round(n / of, 4) if of else 0.0


def group_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Episodes, mean reward, outcome shares and mean turns of a group of rollout rows."""
    labels = Counter(r["label"] for r in rows)
    n = len(rows)
    return {"episodes": n, "mean_reward": round(_mean([r["reward"] for r in rows]), 4),
            "completion_rate": _share(labels["completed"], n),
            "partial_rate": _share(labels["partially_completed"], n),
            "env_error_rate": _share(sum(r["env_error"] for r in rows), n),
            "format_error_rate": _share(labels["format_error"], n),
            "mean_turns": round(_mean([r["turns"] for r in rows]), 2)}


def row_mode(row: dict[str, Any]) -> str:
    """A rollout row's mode; a row from before modes were recorded (no mode, or NULL) was one message."""
    return row.get("mode") or "message"


def run_mode(rows: list[dict[str, Any]], mode: str | None = None) -> str:
    """The mode a summary names: the one asked for, else the rows' own (``mixed`` when they differ)."""
    if mode:
        return mode
    found = {row_mode(r) for r in rows}
    return found.pop() if len(found) == 1 else ("mixed" if found else "message")


def _mode_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {"episodes": n, "mean_reward": round(_mean([r["reward"] for r in rows]), 4),
            "completion_rate": _share(sum(1 for r in rows if r["label"] == "completed"), n)}


def mode_comparison(rows: list[dict[str, Any]], other_rows: list[dict[str, Any]] | None,
                    categories: dict[str, str]) -> dict[str, Any] | None:
    """Message vs conversation: episodes, mean reward and completion rate per mode, overall and by category,
    over this run's rows and ``other_rows`` (the same policy's rollouts of earlier runs on the same snapshot)
    of the tasks this run played. None when no other row of such a task is in another mode than this run's."""
    played = {(r["env_id"], int(r["task_idx"])) for r in rows}
    others = [r for r in other_rows or () if (r["env_id"], int(r["task_idx"])) in played]
    mine = {row_mode(r) for r in rows}
    if not others or not {row_mode(r) for r in others} - mine:
        return None
    every = [*rows, *others]
    modes = [m for m in MODES if any(row_mode(r) == m for r in every)]
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in every:
        by_cat[categories.get(r["env_id"], "general")].append(r)

    def per_mode(group: list[dict[str, Any]]) -> dict[str, Any]:
        return {m: _mode_stats([r for r in group if row_mode(r) == m]) for m in modes}

    return {"modes": modes,
            "runs": {m: sorted({r["run_id"] for r in every if row_mode(r) == m and r.get("run_id")}) for m in modes},
            "overall": per_mode(every),
            "by_category": [{"category": c, **per_mode(g)} for c, g in sorted(by_cat.items())]}


def summarize(result: EvalResult, environments: dict[str, Environment] | None = None,
              categories: dict[str, str] | None = None, *, mode: str | None = None,
              other_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Reward by scenario and category, completion rate, mean turns and error classes.

    ``mode``: the run's (default: the rows' own). ``other_rows``: rollouts of other runs of the same
    policy and model on the same snapshot (``run_id``, ``env_id``, ``task_idx``, ``mode``, ``reward``,
    ``label``); where some are of another mode, ``by_mode`` compares the modes (``mode_comparison``)."""
    rows = result.rows
    cats = dict(categories or {})
    for e, env in (environments or {}).items():
        cats.setdefault(e, env.scenario.category)
    by_env, by_cat = defaultdict(list), defaultdict(list)
    for r in rows:
        by_env[r["env_id"]].append(r)
        by_cat[cats.get(r["env_id"], "general")].append(r)
    durations = [r["duration_s"] for r in rows]
    env_time = sum(r["env_time_s"] or 0.0 for r in rows)
    return {
        "run_id": result.run_id, "snapshot": result.snapshot, "published_snapshot": result.published_snapshot,
        "mode": run_mode(rows, mode), "episodes_by_mode": dict(Counter(row_mode(r) for r in rows)),
        "overall": {**group_stats(rows), "failed": len(result.failures),
                    "reward_std": round(statistics.pstdev([r["reward"] for r in rows]), 4) if rows else 0.0,
                    "mean_tool_calls": round(_mean([r["tool_calls"] for r in rows]), 2),
                    "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
                    "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
                    "mean_episode_s": round(_mean(durations), 4),
                    "env_time_share": round(env_time / sum(durations), 4) if sum(durations) else 0.0,
                    "wall_s": round(result.wall_s, 2)},
        "by_scenario": [{"env_id": e, "category": cats.get(e, "general"), **group_stats(rs)}
                        for e, rs in sorted(by_env.items())],
        "by_category": [{"category": c, **group_stats(rs)} for c, rs in sorted(by_cat.items())],
        "labels": dict(Counter(r["label"] for r in rows).most_common()),
        "errors": dict(Counter((r["error"] or "").split(":")[0] for r in rows if r["error"]).most_common(10)),
        "failures": result.failures[:20],
        "bfcl": bfcl_accuracy(by_cat),
        "tau2": tau2_pass_hat_k(by_cat),
        "by_mode": mode_comparison(rows, other_rows, cats),
    }


def pass_hat_k(successes: int, trials: int, k: int) -> float:
    """τ²'s pass^k of one task: the chance that k of its n trials, drawn without replacement, all succeed."""
    return math.comb(successes, k) / math.comb(trials, k) if trials >= k else 0.0


def tau2_pass_hat_k(by_category: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """τ²'s leaderboard numbers per domain: pass^1..pass^K (K = the fewest episodes of any task), each the
    unweighted mean over tasks, with τ²'s success rule (reward 1); None when the run holds no τ² environment."""
    domains: dict[str, Any] = {}
    for category, rows in sorted(by_category.items()):
        if not category.startswith("tau2_"):
            continue
        by_task: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_task[(r["env_id"], r["task_idx"])].append(r)
        k_max = min(len(v) for v in by_task.values())
        passed = {t: sum(1 for r in v if r["label"] == "completed") for t, v in by_task.items()}
        domains[category.removeprefix("tau2_")] = {
            "tasks": len(by_task), "episodes": len(rows),
            "pass_hat_k": {str(k): round(statistics.fmean(pass_hat_k(passed[t], len(v), k)
                                                          for t, v in by_task.items()), 4)
                           for k in range(1, k_max + 1)},
            "avg_reward": round(_mean([r["reward"] for r in rows]), 4)}
    if not domains:
        return None
    from awm_core.interop.tau2 import DATA_VERSION

    return {"domains": domains, "data_version": DATA_VERSION}


# BFCL's leaderboard columns for its multi-turn categories.
BFCL_COLUMNS = {"bfcl_base": "Multi Turn Base", "bfcl_miss_func": "Multi Turn Miss Func",
                "bfcl_miss_param": "Multi Turn Miss Param", "bfcl_long_context": "Multi Turn Long Context"}


def bfcl_accuracy(by_category: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Accuracy per BFCL category (entries BFCL's checker passed / episodes) and their unweighted mean,
    BFCL's "Multi Turn Overall Acc"; None when the run holds no BFCL environment."""
    columns = {}
    for category, title in BFCL_COLUMNS.items():
        rows = by_category.get(category)
        if rows:
            passed = sum(1 for r in rows if r["label"] == "completed")
            columns[title] = {"passed": passed, "episodes": len(rows), "accuracy": round(passed / len(rows), 4)}
    if not columns:
        return None
    overall = round(statistics.fmean(c["accuracy"] for c in columns.values()), 4)
    return {"columns": columns, "Multi Turn Overall Acc": overall, "complete": len(columns) == len(BFCL_COLUMNS)}


def reward_plot_png(rows: list[dict[str, Any]], title: str = "Reward distribution") -> bytes:
    """Episode counts per reward value, stacked by outcome label (PNG bytes)."""
    values = sorted({r["reward"] for r in rows})
    series = {label: [sum(1 for r in rows if r["reward"] == v and r["label"] == label) for v in values]
              for label in LABELS}
    return stacked_bars_png([str(v) for v in values], series, xlabel="reward", ylabel="episodes",
                            title=f"{title} (n={len(rows)}, mean={_mean([r['reward'] for r in rows]):.3f})",
                            colours=LABEL_COLOURS)


def mode_markdown(by_mode: dict[str, Any]) -> list[str]:
    """The message vs conversation table: a row per category and one for all, the modes side by side."""
    modes = by_mode["modes"]
    columns = [("category", "l")] + [(f"{m} {what}", "r") for m in modes
                                     for what in ("episodes", "mean reward", "completion rate")]

    def cells(stats: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for m in modes:
            s = stats[m]
            out += ([s["episodes"], f"{s['mean_reward']:.3f}", f"{s['completion_rate']:.1%}"] if s["episodes"]
                    else [0, "-", "-"])
        return out

    runs = "; ".join(f"{m}: {', '.join(f'`{r}`' for r in by_mode['runs'][m])}" for m in modes)
    return ["", "## Message vs conversation", "",
            f"The same policy on the same snapshot and tasks, one message per task vs a conversation with the "
            f"user simulator (runs {runs}).", "",
            *markdown_table(columns, [["all", *cells(by_mode["overall"])]]
                            + [[c["category"], *cells(c)] for c in by_mode["by_category"]])]


def summary_markdown(summary: dict[str, Any], config: EvalConfig, image_src: str | None = None) -> str:
    o = summary["overall"]
    mode = summary.get("mode", config.mode)
    conversations = summary.get("episodes_by_mode", {}).get("conversation", 0)
    lines = [
        f"# Evaluation `{summary['run_id']}`", "",
        f"Policy **{config.policy}** in mode **{mode}**"
        + (f" ({conversations} conversation(s), user {config.user})" if conversations else "")
        + f" on snapshot {summary['snapshot']} (split `{config.split}`, interface "
        f"`{config.interface}`, window {config.window}, max turns {config.max_turns}, judge "
        f"{'on' if config.judge else 'off'}); rollouts published as snapshot {summary['published_snapshot']}.", "",
        *markdown_table([("episodes", "r"), ("mean reward", "r"), ("completion rate", "r"), ("partial", "r"),
                         ("env errors", "r"), ("format errors", "r"), ("mean turns", "r"), ("failed", "r")],
                        [[o["episodes"], f"{o['mean_reward']:.3f}", f"{o['completion_rate']:.1%}",
                          f"{o['partial_rate']:.1%}", f"{o['env_error_rate']:.1%}", f"{o['format_error_rate']:.1%}",
                          f"{o['mean_turns']:.2f}", o["failed"]]]),
        "", "## Reward by scenario", "",
        *markdown_table([("scenario", "l"), ("category", "l"), ("episodes", "r"), ("mean reward", "r"),
                         ("completion rate", "r"), ("mean turns", "r"), ("env errors", "r")],
                        [[s["env_id"], s["category"], s["episodes"], f"{s['mean_reward']:.3f}",
                          f"{s['completion_rate']:.1%}", f"{s['mean_turns']:.2f}", f"{s['env_error_rate']:.1%}"]
                         for s in summary["by_scenario"]]),
        "", "## Reward by category", "",
        *markdown_table([("category", "l"), ("episodes", "r"), ("mean reward", "r"), ("completion rate", "r")],
                        [[c["category"], c["episodes"], f"{c['mean_reward']:.3f}", f"{c['completion_rate']:.1%}"]
                         for c in summary["by_category"]]),
        "", "## Outcome classes", "", *markdown_table([("label", "l"), ("episodes", "r")], summary["labels"].items()),
    ]
    if summary.get("bfcl"):
        b = summary["bfcl"]
        lines += ["", "## BFCL accuracy (by BFCL's checker)", "",
                  *markdown_table([("column", "l"), ("passed", "r"), ("accuracy", "r")],
                                  [[t, f"{c['passed']}/{c['episodes']}", f"{c['accuracy']:.2%}"]
                                   for t, c in b["columns"].items()]
                                  + [["Multi Turn Overall Acc" + ("" if b["complete"] else " (categories run)"), "",
                                      f"{b['Multi Turn Overall Acc']:.2%}"]])]
    if summary.get("tau2"):
        t = summary["tau2"]
        ks = sorted({int(k) for d in t["domains"].values() for k in d["pass_hat_k"]})
        lines += ["", "## tau2-bench pass^k (by tau2's evaluator)", "",
                  *markdown_table([("domain", "l"), ("tasks", "r"), ("episodes", "r"),
                                   *[(f"pass^{k}", "r") for k in ks], ("avg reward", "r")],
                                  [[d, n["tasks"], n["episodes"],
                                    *[f"{n['pass_hat_k'][str(k)]:.2%}" if str(k) in n["pass_hat_k"] else "-"
                                      for k in ks], f"{n['avg_reward']:.3f}"]
                                   for d, n in t["domains"].items()])]
        if t.get("data_version"):
            lines += ["", f"Data: {t['data_version']}. Not comparable with tau2-bench 1.0 leaderboard rows."]
    if summary.get("by_mode"):
        lines += mode_markdown(summary["by_mode"])
    if summary["errors"]:
        lines += ["", "## Error classes", "", *markdown_table([("error", "l"), ("episodes", "r")],
                                                               summary["errors"].items())]
    if summary["failures"]:
        lines += ["", "## Episodes that could not run", ""] + [f"- {f}" for f in summary["failures"]]
    if image_src:
        lines += ["", "## Reward distribution", "", f"![reward distribution]({image_src})"]
    return "\n".join(lines)


__all__ = ["group_stats", "mode_comparison", "mode_markdown", "pass_hat_k", "reward_plot_png", "row_mode", "run_mode",
           "summarize", "summary_markdown", "tau2_pass_hat_k"]

"""The loop from evaluation and training back to the data: per-task telemetry, and what the next
generate run does with it.

``task_telemetry_rows`` turns a run's rollout rows into the catalog's ``task_telemetry`` rows
(one ``stats`` row per task and policy: episodes, pass rate, environment-error rate,
format-error rate, mean turns; plus the ``always_solved`` / ``never_solved`` / ``env_errors``
flags). ``plan_curation`` reads them back and says what the nightly run should do:

- **regenerate** an environment whose environment-error rate is above
  ``generation.regenerate_env_error_rate`` (its code stage is re-run with the recorded errors);
- **retire** a task that every policy solves, or that no policy ever solved while its reference
  solution passes (marked with the reason, never deleted);
- **top up**: make enough new scenarios to bring the live tasks back to ``generation.live_tasks``.

Plain data in, plain data out: ``flows/curate.py`` reads the catalog and applies the plan.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from awm_core.settings import Settings

# Baselines measure the environment, not how hard a task is: a random policy solving nothing
# (or the reference solution solving everything) must not retire tasks.
BASELINE_POLICIES = ("reference", "random")


def task_telemetry_rows(run_id: str, rollouts: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``task_telemetry`` rows of one run from its rollout rows (catalog ``rollouts`` shape)."""
    per: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rollouts:
        per[(r["env_id"], int(r["task_idx"]), r.get("policy") or "?")].append(r)
    now = datetime.now(timezone.utc)
    rows = []
    for (env_id, idx, policy), eps in sorted(per.items()):
        scored = [e for e in eps if not e["env_error"]]
        completed = sum(e["label"] == "completed" for e in scored)
        base = {"run_id": run_id, "env_id": env_id, "task_idx": idx, "policy": policy, "created_at": now}
        n = len(eps)
        rows.append({**base, "kind": "stats", "count": n, "episodes": n, "completed": completed,
                     "pass_rate": completed / len(scored) if scored else None,
                     "env_error_rate": (n - len(scored)) / n,
                     "format_error_rate": sum(e["label"] == "format_error" for e in eps) / n,
                     "mean_turns": sum(e.get("turns") or 0 for e in eps) / n})
        if scored and completed == len(scored):
            rows.append({**base, "kind": "always_solved", "count": len(scored)})
        if scored and completed == 0:
            rows.append({**base, "kind": "never_solved", "count": len(scored)})
        if n > len(scored):
            rows.append({**base, "kind": "env_errors", "count": n - len(scored)})
    return rows


@dataclass
class CurationPlan:
    """What the next generate run will do, each item with its reason."""

    regenerate: dict[str, list[str]] = field(default_factory=dict)  # env_id -> errors for the code stage
    regenerate_reasons: dict[str, str] = field(default_factory=dict)
    retire: dict[str, dict[int, str]] = field(default_factory=dict)  # env_id -> {task_idx: reason}
    live_tasks: int = 0
    target_live_tasks: int | None = None
    top_up_scenarios: int = 0

    def empty(self) -> bool:
        return not (self.regenerate or self.retire or self.top_up_scenarios)

    def lines(self) -> list[str]:
        out = [f"regenerate {e}: {why}" for e, why in sorted(self.regenerate_reasons.items())]
        out += [f"retire {e}/{i}: {why}" for e, tasks in sorted(self.retire.items()) for i, why in sorted(tasks.items())]
        retiring = sum(len(t) for t in self.retire.values())
        if self.target_live_tasks is None:
            out.append(f"live tasks: {self.live_tasks} (no target: generation.live_tasks is not set)")
        else:
            out.append(f"live tasks: {self.live_tasks} - {retiring} retiring, target {self.target_live_tasks}: "
                       + (f"top up with {self.top_up_scenarios} new scenario(s)" if self.top_up_scenarios
                          else "no top-up needed"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"regenerate": self.regenerate_reasons, "retire": {e: {str(i): w for i, w in t.items()}
                                                                   for e, t in self.retire.items()},
                "live_tasks": self.live_tasks, "target_live_tasks": self.target_live_tasks,
                "top_up_scenarios": self.top_up_scenarios}


def plan_curation(telemetry: list[dict[str, Any]], tasks: list[dict[str, Any]], settings: Settings, *,
                  reference_passes: set[tuple[str, int]] = frozenset(),
                  env_errors: dict[str, list[str]] | None = None) -> CurationPlan:
    """The plan from ``task_telemetry`` ``stats`` rows and the live catalog's ``tasks`` rows
    (env_id, task_idx, dropped_reason, retired_reason). ``reference_passes``: tasks whose reference
    solution passed its verifier; ``env_errors``: sample error messages per environment."""
    gen = settings.generation
    live = {(t["env_id"], int(t["task_idx"])) for t in tasks
            if not t.get("dropped_reason") and not t.get("retired_reason")}
    stats = [r for r in telemetry if r.get("kind") == "stats" and (r["env_id"], int(r["task_idx"])) in live]
    plan = CurationPlan(live_tasks=len(live), target_live_tasks=gen.live_tasks)

    per_env: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # episodes, env errors
    for r in stats:
        n = int(r.get("episodes") or r.get("count") or 0)
        per_env[r["env_id"]][0] += n
        per_env[r["env_id"]][1] += round((r.get("env_error_rate") or 0.0) * n)
    for env_id, (n, errs) in sorted(per_env.items()):
        if n >= gen.curation_min_episodes and errs / n > gen.regenerate_env_error_rate:
            plan.regenerate[env_id] = [f"agents hit environment errors in {errs} of {n} episodes on this "
                                       "environment's tools; make the tools robust to the inputs below"] + \
                                      list((env_errors or {}).get(env_id, []))[:10]
            plan.regenerate_reasons[env_id] = (f"environment errors in {errs}/{n} episodes "
                                               f"({errs / n:.0%} > {gen.regenerate_env_error_rate:.0%})")

    per_task: dict[tuple[str, int], dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in stats:
        if r.get("policy") in BASELINE_POLICIES or r.get("pass_rate") is None:
            continue
        scored = round(int(r.get("episodes") or 0) * (1 - (r.get("env_error_rate") or 0.0)))
        cell = per_task[(r["env_id"], int(r["task_idx"]))][r["policy"]]
        cell[0] += scored
        cell[1] += int(r.get("completed") if r.get("completed") is not None else round(r["pass_rate"] * scored))
    for (env_id, idx), by_policy in sorted(per_task.items()):
        if env_id in plan.regenerate:  # its tasks are judged again on the new code
            continue
        episodes = sum(s for s, _ in by_policy.values())
        if episodes < gen.curation_min_episodes:
            continue
        names = ", ".join(sorted(by_policy))
        if all(s and c == s for s, c in by_policy.values()):
            plan.retire.setdefault(env_id, {})[idx] = f"solved by every policy ({names}) in {episodes} episodes"
        elif sum(c for _, c in by_policy.values()) == 0 and (env_id, idx) in reference_passes:
            plan.retire.setdefault(env_id, {})[idx] = (f"never solved in {episodes} episodes ({names}) while its "
                                                       "reference solution passes")
    if gen.live_tasks is not None:
        remaining = len(live) - sum(len(t) for t in plan.retire.values())
        deficit = max(0, gen.live_tasks - remaining)
        plan.top_up_scenarios = math.ceil(deficit / max(1, gen.tasks_per_scenario))
    return plan


__all__ = ["BASELINE_POLICIES", "CurationPlan", "plan_curation", "task_telemetry_rows"]

"""Curation: the catalog's task telemetry turned into what the next generate run does.

``read_plan`` reads the live catalog (the newest state) and returns the ``CurationPlan``
(``awm_core.curation``) with the environments it touches; ``awm curate`` prints it and the
generate flow applies it at the start of a run (``generation.curate``): regenerated
environments are rebuilt with their recorded errors in the code stage's prompt, retired tasks
are marked in a republished bundle, and the top-up sets how many new scenarios to make.

Telemetry counts from the time an environment's bundle was made on: a regenerated environment
is judged afresh, while retiring a task (same bundle, marked) keeps the others' history.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from awm_core.curation import CurationPlan, plan_curation
from awm_core.errors import AWMError
from awm_core.models import BENCHMARKS, Environment
from awm_core.settings import Settings, get_settings


@dataclass
class Curation:
    plan: CurationPlan
    retired: list[Environment] = field(default_factory=list)  # bundles with the plan's retirements marked
    regenerate: dict[str, Any] = field(default_factory=dict)  # env_id -> Scenario to rebuild


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def read_plan(settings: Settings | None = None) -> Curation:
    """The plan for the catalog as it is now (an empty plan when there is no catalog yet)."""
    from storage.catalog import Catalog

    settings = settings or get_settings()
    try:
        cat = Catalog.open(settings, read_only=True)
    except AWMError:
        return Curation(CurationPlan(target_live_tasks=settings.generation.live_tasks))
    try:
        envs = {r["env_id"]: r for r in cat.rows("SELECT env_id, source, created_at FROM environments")}
        # Imported environments (AWM-1K, the benchmarks) have no code of ours to regenerate or
        # tasks of ours to retire: a benchmark that curation thinned would no longer be the benchmark.
        ours = {e for e, r in envs.items() if r["source"] != "awm1k" and r["source"] not in BENCHMARKS}
        tasks = [t for t in cat.rows("SELECT * FROM tasks") if t["env_id"] in ours]
        made = {e: _utc(r["created_at"]) for e, r in envs.items()}
        telemetry = [r for r in cat.rows("SELECT * FROM task_telemetry WHERE kind = 'stats'")
                     if r["env_id"] in ours and (made.get(r["env_id"]) is None or r.get("created_at") is None
                                                 or _utc(r["created_at"]) >= made[r["env_id"]])]
        passes = {(r["env_id"], int(r["task_idx"])) for r in cat.rows(
            "SELECT env_id, task_idx FROM validation_results WHERE name = 'verifier_solution' AND passed")}
        errors: dict[str, list[str]] = defaultdict(list)
        for r in cat.rows("SELECT DISTINCT env_id, error FROM rollouts WHERE env_error AND error IS NOT NULL "
                          "ORDER BY env_id, error"):
            if r["env_id"] in ours and len(errors[r["env_id"]]) < 10:
                errors[r["env_id"]].append(str(r["error"])[:300])
        plan = plan_curation(telemetry, tasks, settings, reference_passes=passes, env_errors=dict(errors))
        out = Curation(plan)
        for env_id, retire in sorted(plan.retire.items()):
            env = cat.get_environment(env_id)
            out.retired.append(env.model_copy(update={"retired_tasks": {**env.retired_tasks, **retire}}))
        for env_id in plan.regenerate:
            out.regenerate[env_id] = cat.get_environment(env_id).scenario
        return out
    finally:
        cat.close()


__all__ = ["Curation", "read_plan"]

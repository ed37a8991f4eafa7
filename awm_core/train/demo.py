"""The offline demo environments, assembled from the recorded model replies without a catalog.

Each stage's final recorded attempt goes through the same stage parser the pipeline uses, in
pipeline order, so the result is the environment the generate flow would publish for that
scenario (minus its validation report). Used by the GPU benchmark, which runs where neither
the catalog nor Prefect is installed, and by tests that need real environments quickly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from awm_core.errors import AWMError
from awm_core.models import Environment, Scenario
from awm_core.settings import DEFAULT_FIXTURES

DEMO_SCENARIOS = ("recipe_box", "clinic_booking", "team_expenses")


def _final(folder: Path, stage: str) -> str:
    path = folder / f"{stage}.json"
    try:
        return json.loads(path.read_text())["attempts"][-1]["content"]
    except (OSError, KeyError, IndexError, json.JSONDecodeError) as exc:
        raise AWMError(f"cannot read the recorded {stage} reply at {path}: {exc}") from None


def _scenarios(fixtures_dir: Path) -> dict[str, Scenario]:
    from awm_core.stages import scenario as scenario_stage

    out = {}
    for cand in scenario_stage.parse(_final(fixtures_dir / "_", "scenario")):
        s = Scenario.new(cand.name, cand.description, cand.category)
        out.setdefault(s.id, s)
    return out


def demo_environment(scenario_id: str, fixtures_dir: str | Path = DEFAULT_FIXTURES) -> Environment:
    from awm_core.stages import code, schema, seed_data, solution, spec, tasks, verifier
    from awm_core.stages.base import StageContext

    fixtures_dir = Path(fixtures_dir)
    folder = fixtures_dir / scenario_id
    if not folder.is_dir():
        raise AWMError(f"no recording for {scenario_id!r} under {fixtures_dir}")
    scenarios = _scenarios(fixtures_dir)
    if scenario_id not in scenarios:
        raise AWMError(f"{scenario_id!r} is not one of the recorded scenarios: {', '.join(sorted(scenarios))}")
    ctx = StageContext(scenario=scenarios[scenario_id])
    ctx = ctx.with_(tasks=tasks.parse(_final(folder, "tasks"), ctx))
    ctx = ctx.with_(db_schema=schema.parse(_final(folder, "schema"), ctx))
    ctx = ctx.with_(seed_data=seed_data.parse(_final(folder, "seed_data"), ctx))
    ctx = ctx.with_(api_spec=spec.parse(_final(folder, "spec"), ctx))
    ctx = ctx.with_(code=code.parse(_final(folder, "code"), ctx))
    verifiers, solutions = [], []
    for t in ctx.tasks:
        c = ctx.with_(task_idx=t.idx)
        if not (folder / f"verifier.{t.idx}.json").exists():
            continue
        v = verifier.parse(_final(folder, f"verifier.{t.idx}"), c)
        verifiers.append(v)
        if (folder / f"solution.{t.idx}.json").exists():
            solutions.append(solution.parse(_final(folder, f"solution.{t.idx}"), c.with_(verifiers=[v])))
    return ctx.environment(verifiers=verifiers, solutions=solutions)


def demo_environments(names: Iterable[str] = DEMO_SCENARIOS,
                      fixtures_dir: str | Path = DEFAULT_FIXTURES) -> list[Environment]:
    return [demo_environment(n, fixtures_dir) for n in names]

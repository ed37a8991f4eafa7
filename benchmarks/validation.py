"""What the verifier soundness checks cost: validation of the demo environments, now and at a
baseline revision, in the same run.

Every task of the three demo recordings (recipe_box, clinic_booking, team_expenses: 30 tasks,
their final recorded verifiers and solutions) is validated with ``validate_environment`` in one
sandbox pool: the no-op check, the solution replay and determinism check, then the mutation
checks and (now) the equivalence checks. The baseline is the same function as it was at
``--baseline`` (a git revision: by default the commit before the soundness checks, which had
four mutation kinds and no equivalences), loaded from git into a private module so both run
against the same pool, alternating, on the same recordings.

    python benchmarks/validation.py             # 5 rounds
    python benchmarks/validation.py --rounds 3

Prints one table: median seconds per environment and checks run, now and at the baseline.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = ("recipe_box", "clinic_booking", "team_expenses")
BASELINE = "b64d792"


def demo_environment(scenario_id: str):
    """The environment the demo publishes for a scenario, from its final recorded replies."""
    import json

    from awm_core.models import Scenario
    from awm_core.settings import DEFAULT_FIXTURES
    from awm_core.stages import code, schema, seed_data, solution, spec, tasks, verifier
    from awm_core.stages.base import StageContext

    def final(stage: str) -> str:
        return json.loads((DEFAULT_FIXTURES / scenario_id / f"{stage}.json").read_text())["attempts"][-1]["content"]
    ctx = StageContext(scenario=Scenario(id=scenario_id, name=scenario_id.replace("_", " "), description="demo",
                                         category="demo"))
    for name, module in (("tasks", tasks), ("db_schema", schema), ("seed_data", seed_data), ("api_spec", spec),
                         ("code", code)):
        ctx = ctx.with_(**{name: module.parse(final(module.NAME), ctx)})
    verifiers = [verifier.parse(final(f"verifier.{t.idx}"), ctx.with_(task_idx=t.idx)) for t in ctx.tasks]
    solutions = [solution.parse(final(f"solution.{t.idx}"), ctx.with_(task_idx=t.idx)) for t in ctx.tasks]
    return ctx.environment(verifiers=verifiers, solutions=solutions)


def baseline_validation(rev: str) -> types.ModuleType:
    """``awm_core.validation`` as it was at ``rev``, with the ``awm_core.mutations`` of ``rev``."""
    def source(path: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    def load(name: str, text: str) -> types.ModuleType:
        spec = importlib.util.spec_from_loader(name, loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        exec(compile(text, f"<{rev}:{name}>", "exec"), module.__dict__)
        return module
    load("_baseline_mutations", source("awm_core/mutations.py"))
    text = source("awm_core/validation.py").replace("from awm_core import mutations",
                                                     "import _baseline_mutations as mutations")
    return load("_baseline_validation", text)


def timed(validate, pool, env) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    report = validate(pool, env)
    return time.perf_counter() - t0, len(report.checks), len(report.dropped_tasks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare with (default: %(default)s)")
    args = ap.parse_args()

    from awm_core import validation
    from awm_core.runtime import SandboxPool

    try:
        old = baseline_validation(args.baseline)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        sys.exit(f"error: cannot read the baseline revision {args.baseline!r} from git: {exc}")
    envs = {sid: demo_environment(sid) for sid in DEMO}
    runs: dict[tuple[str, str], list[tuple[float, int, int]]] = {}
    with SandboxPool(workers=1) as pool:
        for sid, env in envs.items():  # warm: the environment loaded in the worker, imports done
            validation.validate_environment(pool, env)
        for r in range(args.rounds):
            for sid, env in envs.items():
                # Alternate which goes first, so neither always finds the worker's caches warm.
                order = [("now", validation.validate_environment), ("baseline", old.validate_environment)]
                for label, fn in (order if r % 2 == 0 else order[::-1]):
                    runs.setdefault((sid, label), []).append(timed(fn, pool, env))
    print(f"validate_environment on the demo recordings, median of {args.rounds} rounds "
          f"(baseline: {args.baseline})\n")
    print("| environment | baseline s | now s | now / baseline | checks baseline | checks now | "
          "tasks dropped baseline | tasks dropped now |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    total = {"now": 0.0, "baseline": 0.0}
    for sid in envs:
        now = statistics.median(t for t, _, _ in runs[(sid, "now")])
        base = statistics.median(t for t, _, _ in runs[(sid, "baseline")])
        total["now"] += now
        total["baseline"] += base
        print(f"| {sid} | {base:.3f} | {now:.3f} | {now / base:.2f}x | {runs[(sid, 'baseline')][0][1]} | "
              f"{runs[(sid, 'now')][0][1]} | {runs[(sid, 'baseline')][0][2]} | {runs[(sid, 'now')][0][2]} |")
    print(f"| all three | {total['baseline']:.3f} | {total['now']:.3f} | {total['now'] / total['baseline']:.2f}x | | | | |")


if __name__ == "__main__":
    main()

"""awm curate: what the next generate run will do with the catalog's task telemetry.

    awm curate [--json]
"""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "curate", help="show what the next generate run will regenerate, retire and top up",
        description="Read the per-task telemetry that evaluation and training runs published (task_telemetry) and "
                    "print the curation plan the next generate run applies (unless generation.curate is off or "
                    "it runs with --no-curate): environments whose environment-error rate is above "
                    "generation.regenerate_env_error_rate are regenerated (code stage, with the recorded errors); "
                    "tasks every policy solves, or none ever solved while their reference solution passes, are "
                    "retired (marked, not deleted); new scenarios top the live tasks up to generation.live_tasks. "
                    "Changes nothing.")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from flows.curate import read_plan

    plan = read_plan().plan
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    if plan.empty():
        print("curation: nothing to do")
    for line in plan.lines():
        print(line)
    return 0

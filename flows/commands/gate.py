"""awm gate [--snapshot N]: run the quality gate on a catalog snapshot (exit 0 pass, 1 fail)."""
from __future__ import annotations

from flows.commands import group  # noqa: F401  (gate is a single command, not a group)


def register(sub) -> None:
    p = sub.add_parser("gate", help="run the quality gate on a catalog snapshot",
                       description="Validate a catalog snapshot with the Great Expectations suite, store the "
                                   "report in quality_reports and as Prefect artifacts. Exit 0 when it passes, "
                                   "1 when it fails.")
    p.add_argument("--snapshot", type=int, default=None, help="snapshot to validate (default: latest)")
    p.add_argument("--no-flow", action="store_true",
                   help="run without Prefect (no flow run, no artifacts); the report is still stored")
    p.set_defaults(func=run)


def run(args) -> int:
    from flows.gate import GateFailed, gate, run_gate

    if args.no_flow:
        report = run_gate(args.snapshot)
        print(report.markdown())
        return 0 if report.passed else 1
    state = gate(args.snapshot, return_state=True)
    if state.is_completed():
        res = state.result()
        print(f"gate passed for snapshot {res['snapshot']} (report {res['report_id']})")
        return 0
    try:
        state.result()
    except GateFailed as exc:
        print(f"gate FAILED: {exc}")
        return 1
    print(f"gate run ended {state.type.value}: {state.message}")
    return 1

"""awm gate [--snapshot N]: run the quality gate on a catalog snapshot (exit 0 pass, 1 fail)."""
from __future__ import annotations

from flows.commands import non_negative, run_flow, uses_prefect


def register(sub) -> None:
    p = sub.add_parser("gate", help="run the quality gate on a catalog snapshot",
                       description="Validate a catalog snapshot with the Great Expectations suite, store the "
                                   "report in quality_reports and as Prefect artifacts. Exit 0 when it passes, "
                                   "1 when it fails.")
    p.add_argument("--snapshot", type=non_negative, default=None, help="snapshot to validate (default: latest)")
    p.add_argument("--no-flow", action="store_true",
                   help="run without Prefect (no flow run, no artifacts); the report is still stored")
    uses_prefect(p).set_defaults(func=run)


def run(args) -> int:
    from awm_core.settings import get_settings
    from flows.gate import GateFailed, gate, run_gate
    from storage.catalog import Catalog

    if args.snapshot is not None:  # a snapshot that is not there fails here, before a flow run
        with Catalog.open(get_settings(), read_only=True) as cat:
            cat.check_snapshot(args.snapshot)

    if args.no_flow:
        report = run_gate(args.snapshot)
        print(report.markdown())
        return 0 if report.passed else 1
    try:
        res = run_flow(gate, args.snapshot)
    except GateFailed as exc:  # an expected verdict, not a crash: no traceback
        print(f"gate FAILED: {exc}")
        return 1
    print(f"gate passed for snapshot {res['snapshot']} (report {res['report_id']})")
    return 0

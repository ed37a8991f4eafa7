"""awm deploy: register the deployments of deployments/prefect.yaml with the running Prefect server."""
from __future__ import annotations

from flows.commands import count


def register(sub) -> None:
    p = sub.add_parser(
        "deploy", help="register the nightly generate, gate, evaluate, train and import deployments",
        description="Register every deployment in deployments/prefect.yaml with the Prefect server at "
                    "PREFECT_API_URL (start one with `awm server start`), applying the settings: work pool "
                    "server.work_pool, nightly cron server.nightly_cron in server.timezone, generate "
                    "parameters from generation.*, and the train-after-gate automation when "
                    "server.train_after_gate is true. Safe to run again: deployments are updated in place.")
    p.add_argument("--cron", help="nightly schedule for generate/nightly (default: server.nightly_cron)")
    p.add_argument("--timezone", help="timezone of the cron schedule (default: server.timezone)")
    p.add_argument("--scenarios", type=count, help="scenarios per nightly run (default: generation.scenarios)")
    p.add_argument("--tasks-per-scenario", type=count, help="tasks per scenario (default: generation.tasks_per_scenario)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="another generate/nightly parameter; VALUE is JSON when it parses (repeatable)")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--train-after-gate", dest="train_after_gate", action="store_true", default=None,
                       help="create the automation that runs train/manual when a gate passes")
    train.add_argument("--no-train-after-gate", dest="train_after_gate", action="store_false",
                       help="register train/manual without that automation")
    p.add_argument("--only", action="append", metavar="FLOW",
                   help="register only this flow's deployments (generate, gate, evaluate, train, import_awm1k, "
                        "import_bfcl, import_tau2; "
                        "repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from awm_core.settings import get_settings
    from flows.deploy import parse_param, register as register_all

    params = dict(parse_param(t) for t in args.param)
    if args.scenarios is not None:
        params["scenarios"] = args.scenarios
    if args.tasks_per_scenario is not None:
        params["tasks_per_scenario"] = args.tasks_per_scenario
    settings = get_settings()
    done, skipped = register_all(settings, generate_params=params, cron=args.cron, timezone=args.timezone,
                                 train_after_gate=args.train_after_gate, only=args.only)
    for r in done:
        extra = []
        if r.schedules:
            extra.append("schedule " + "; ".join(r.schedules))
        if r.triggers:
            extra.append("runs on event " + "; ".join(r.triggers))
        if r.parameters:
            extra.append("parameters " + ", ".join(f"{k}={v!r}" for k, v in r.parameters.items()))
        print(f"{r.full_name:<28} {'  '.join(extra) or 'manual'}")
    for s in skipped:
        print(f"skipped {s}")
    if done:
        first = done[0].full_name
        print(f"\nwork pool {settings.server.work_pool}; run one now with e.g.\n"
              f"  prefect deployment run '{first}' --param scenarios=2")
    return 0

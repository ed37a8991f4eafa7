"""awm train --config FILE: GRPO training on a gated snapshot (through the ``train`` flow)."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="GRPO training on a gated catalog snapshot",
        description="Train a policy with multi-turn GRPO (TRL + Accelerate) on a snapshot whose quality gate "
                    "passed. Settings come from --config (JSON or TOML with TrainConfig fields), else --preset, "
                    "with --set KEY=VALUE overrides. Exit 0 when training finished and was published.")
    p.add_argument("--config", metavar="FILE", help="training config file (.json or .toml)")
    p.add_argument("--preset", choices=["paper", "tiny"], help="start from a named preset (default: tiny)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one setting; VALUE is read as JSON when it parses (--set window=null)")
    p.add_argument("--snapshot", type=int, default=None, help="catalog snapshot (default: newest gated one)")
    p.add_argument("--no-flow", action="store_true", help="run without Prefect (no flow run, no artifacts)")
    p.add_argument("--show", action="store_true", help="print the effective config and exit")
    p.add_argument("--publish", metavar="RUN_DIR",
                   help="publish an existing run folder (metrics, episodes, telemetry) and exit")
    p.set_defaults(func=run)


def effective_config(args):
    from awm_core.errors import SettingsError
    from awm_core.train.config import TrainConfig, preset

    cfg = TrainConfig.load(args.config) if args.config else preset(args.preset or "tiny")
    if args.config and args.preset:
        raise SettingsError("give --config or --preset, not both (a config file can say preset = \"paper\")")
    changes = {}
    for item in args.set:
        if "=" not in item:
            raise SettingsError(f"--set needs KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            changes[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            changes[key.strip()] = value
    if args.snapshot is not None:
        changes["snapshot"] = args.snapshot
    return TrainConfig.from_dict({**cfg.to_dict(), **changes}, source="--set") if changes else cfg


def run(args) -> int:
    if args.publish:
        from flows.train import publish_run

        summary = publish_run(args.publish)
        print(f"published run {summary['run_id']}: {summary['steps']} steps, {summary['episodes']} episodes "
              f"(catalog snapshot {summary['catalog_snapshot']})")
        return 0
    cfg = effective_config(args)
    if args.show:
        print(cfg.to_json())
        return 0
    if args.no_flow:
        from flows.train import run_train

        summary = run_train(cfg)
    else:
        from flows.train import train

        state = train(config=cfg.to_dict(), return_state=True)
        if not state.is_completed():
            state.result()  # raises the flow's error (GateRefused, AWMError) for the CLI to report
            return 1
        summary = state.result()
    print(f"training run {summary['run_id']} finished: {summary['steps']} steps on snapshot {summary['snapshot']}, "
          f"final checkpoint {summary['final_checkpoint']}, metrics in catalog snapshot {summary['catalog_snapshot']}")
    return 0

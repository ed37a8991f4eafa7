"""awm train --config FILE: GRPO training on a gated snapshot (through the ``train`` flow)."""
from __future__ import annotations

import json

from flows.commands import non_negative, run_flow, uses_prefect

# Enough for a fresh tiny model to write well-formed calls on the demo environments (docs/train.md).
WARM_START_STEPS = 200


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
    p.add_argument("--snapshot", type=non_negative, default=None, help="catalog snapshot (default: newest gated one)")
    p.add_argument("--split", default=None, help="train, val, all, or an imported benchmark: bfcl, bfcl:base,..., tau2:retail:train, ... "
                                                 "(the same as --set split=...)")
    p.add_argument("--warm-start", nargs="?", type=non_negative, const=WARM_START_STEPS, default=None, metavar="STEPS",
                   help="first take STEPS supervised steps on the training tasks' reference solutions (default "
                        f"{WARM_START_STEPS}; sets warmstart_steps), so a fresh model starts out writing tool calls")
    p.add_argument("--no-flow", action="store_true", help="run without Prefect (no flow run, no artifacts)")
    p.add_argument("--show", action="store_true", help="print the effective config and exit")
    p.add_argument("--publish", metavar="RUN_DIR",
                   help="publish an existing run folder (metrics, episodes, telemetry) and exit")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue a killed run from its last checkpoint (its own settings), then publish it")
    uses_prefect(p).set_defaults(func=run)


def effective_config(args):
    from awm_core.errors import SettingsError
    from awm_core.train.config import TrainConfig, preset

    cfg = TrainConfig.load(args.config) if args.config else preset(args.preset or "tiny")
    if args.config and args.preset:
        raise SettingsError("give --config or --preset, not both (a config file can say preset = \"paper\")")
    data = cfg.to_dict()
    changed = False
    for item in args.set:
        if "=" not in item:
            raise SettingsError(f"--set needs KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        # a dotted key sets one setting of a nested table: --set lora.r=16
        *parents, leaf = key.strip().split(".")
        table = data
        for i, part in enumerate(parents):
            if part not in table:
                table[part] = {}  # an unknown key: from_dict names it
            elif not isinstance(table[part], dict):
                raise SettingsError(f"--set {key.strip()}: {'.'.join(parents[:i + 1])} is not a table of settings")
            table = table[part]
        table[leaf] = value
        changed = True
    if args.snapshot is not None:
        data["snapshot"] = args.snapshot
        changed = True
    if getattr(args, "split", None) is not None:
        data["split"] = args.split
        changed = True
    if getattr(args, "warm_start", None) is not None:
        data["warmstart_steps"] = args.warm_start
        changed = True
    return TrainConfig.from_dict(data, source="--set") if changed else cfg


def run(args) -> int:
    if args.publish:
        from flows.train import publish_run

        summary = publish_run(args.publish)
        print(f"published run {summary['run_id']}: {summary['steps']} steps, {summary['episodes']} episodes "
              f"(catalog snapshot {summary['catalog_snapshot']})")
        return 0
    if args.resume:
        return _resume(args)
    cfg = effective_config(args)
    if args.show:
        print(cfg.to_json())
        return 0
    if args.no_flow:
        from flows.train import run_train

        summary = run_train(cfg)
    else:
        from flows.train import train

        summary = run_flow(train, config=cfg.to_dict())
    print(f"training run {summary['run_id']} finished: {summary['steps']} steps on snapshot {summary['snapshot']}, "
          f"final checkpoint {summary['final_checkpoint']}, metrics in catalog snapshot {summary['catalog_snapshot']}")
    return 0


def _resume(args) -> int:
    from awm_core.errors import SettingsError
    from awm_core.settings import get_settings
    from flows.train import resume_target

    given = [flag for flag, v in (("--config", args.config), ("--preset", args.preset), ("--set", args.set),
                                  ("--snapshot", args.snapshot is not None), ("--split", args.split), ("--show", args.show),
                                  ("--warm-start", args.warm_start is not None)) if v]
    if given:
        raise SettingsError(f"--resume continues a run with the settings in its folder; drop {', '.join(given)}")
    resume_target(get_settings(), args.resume)  # unknown, finished or checkpoint-less runs fail here, before Prefect
    if args.no_flow:
        from flows.train import run_train

        summary = run_train(None, resume=args.resume)
    else:
        from flows.train import train

        summary = run_flow(train, resume=args.resume)
    print(f"training run {summary['run_id']} resumed and finished: {summary['steps']} steps on snapshot "
          f"{summary['snapshot']}, final checkpoint {summary['final_checkpoint']}, metrics in catalog snapshot "
          f"{summary['catalog_snapshot']}")
    return 0

"""awm generate: run the nightly generation flow from the command line, with progress lines."""
from __future__ import annotations

import sys

from flows.commands import add_config_options, config_from_args, count, uses_prefect


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="synthesise, validate and publish environments (the nightly flow)",
        description="Run the generate flow: scenarios (expanded from the seed list, or named) -> tasks, schema, "
                    "seed data, tool spec, tool code, verifiers and reference solutions per scenario, each stage "
                    "retried with its errors in the prompt -> execution validation in the sandbox -> one catalog "
                    "snapshot. Prints a line per stage as it finishes.")
    from awm_core.configs import GenerateConfig

    what = p.add_mutually_exclusive_group()
    what.add_argument("-n", "--scenarios", type=count, default=None,
                      help="how many scenarios to make (default: generation.scenarios)")
    what.add_argument("-s", "--scenario", action="append", default=None, metavar="NAME",
                      help="make exactly this seed-list scenario (name or id; repeatable)")
    add_config_options(p, GenerateConfig, skip=("scenarios", "skip_existing", "progress", "publish", "curate"),
                       flags={"tasks_per_scenario": ("-k", "--tasks-per-scenario"), "generator_model": "--model",
                              "concurrency": ("-c", "--concurrency"), "offline_latency_s": "--offline-latency"})
    p.add_argument("--include-existing", action="store_true",
                   help="also rebuild scenarios that are already in the catalog (default: skip them)")
    p.add_argument("--no-publish", action="store_true", help="validate but do not write the catalog")
    p.add_argument("--no-curate", action="store_true",
                   help="do not apply the curation plan first (see `awm curate`; default: generation.curate)")
    uses_prefect(p).set_defaults(func=run)


def print_summary(summary: dict) -> None:
    print()
    print(f"run {summary['run_id']}: {summary['status']}" + (f" ({summary['message']})" if summary['message'] else ""))
    print(f"  published {len(summary['published'])}: {', '.join(summary['published']) or '-'}"
          + (f"  -> catalog snapshot {summary['snapshot']}" if summary.get("snapshot") is not None else ""))
    for sid, why in summary["dropped"].items():
        print(f"  dropped {sid}: {why}")
    for d in summary.get("scenario_drops", []):
        print(f"  scenario candidate {d['name']} dropped: {d['reason']}")
    for sid, tasks in summary.get("dropped_tasks", {}).items():
        for idx, why in tasks.items():
            print(f"  task {sid}/{idx} dropped: {why[:160]}")
    for sid, r in summary.get("verifier_soundness", {}).items():
        print(f"  verifiers of {sid}: lenient {r['lenient_regenerated']} regenerated, {r['lenient_dropped']} dropped; "
              f"too strict {r['too_strict_regenerated']} regenerated, {r['too_strict_dropped']} dropped")
    curation = summary.get("curation") or {}
    for env_id in curation.get("regenerated", []):
        print(f"  regenerated {env_id}: {curation['regenerate'].get(env_id, '')}")
    for env_id, tasks in curation.get("retire", {}).items():
        for idx, why in tasks.items():
            print(f"  retired task {env_id}/{idx}: {why}")
    a = summary.get("accounting")
    if a:
        print(f"  accounted for: {a['asked']} asked" + (f" + {a['regenerated']} regenerated" if a["regenerated"] else "")
              + f" = {a['published']} published + {a['dropped']} dropped + {a['skipped']} already in the catalog"
              + f" + {a['not_made']} not made" + (f" ({a['not_made_reason']})" if a["not_made"] else ""))
    repairs = ", ".join(f"{k} {v}" for k, v in sorted(summary["repairs"].items())) or "none"
    print(f"  repairs per stage: {repairs}")
    print(f"  {summary['llm_calls']} LLM calls, {summary['tokens']:,} tokens, ${summary['cost_usd']:.4f}, "
          f"{summary['seconds']:.1f} s")


def run(args) -> int:
    from awm_core.configs import GenerateConfig
    from awm_core.llm.embed import preload
    from awm_core.settings import get_settings

    preload(get_settings())
    from flows.generate import run_generate

    scenarios = args.scenario if args.scenario else args.scenarios
    print("awm generate: starting (Prefect may take a few seconds to come up)", flush=True)
    config = config_from_args(GenerateConfig, args, scenarios=scenarios, skip_existing=not args.include_existing,
                              progress=True, publish=not args.no_publish,
                              curate=False if args.no_curate else None)
    summary = run_generate(config)
    print_summary(summary)
    if summary["status"] == "budget_exceeded":
        print(f"stopped: {summary['message']}", file=sys.stderr)
        return 3
    return 0 if summary["status"] in ("completed",) or summary["published"] else 1

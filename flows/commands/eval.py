"""awm eval: run a policy on a snapshot's tasks (the evaluate flow), or store a train/val split.

    awm eval --policy reference [--snapshot N] [--split val] [--episodes-per-task 1] ...
    awm eval splits [--snapshot N] [--by environment|task] [--seed 0] [--ratio 0.8]
"""
from __future__ import annotations

import json
import sys

from flows.commands import add_config_options, config_from_args, non_negative, rate, run_flow, uses_prefect


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a policy on a catalog snapshot (rollouts into the catalog)",
        description="Run the evaluate flow: episodes of POLICY on the tasks of a split of a catalog snapshot, over "
                    "one sandbox pool; rollouts are published to the catalog as one snapshot, with a summary "
                    "(Prefect artifacts: report, table, reward plot). `awm eval splits` stores a train/val split.")
    from awm_core.agent.evaluation import EvalConfig

    add_config_options(p, EvalConfig, flags={"env_ids": "--env"}, metavars={"env_ids": "ENV_ID"})
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    uses_prefect(p).set_defaults(func=run_eval)

    actions = p.add_subparsers(dest="action", metavar="ACTION")
    s = actions.add_parser("splits", help="make a reproducible train/val split and store it in the catalog",
                           description="Split the snapshot's tasks into train and val (hash of ids and seed, so the "
                                       "same seed always gives the same split) and publish it to the splits table.")
    s.add_argument("--snapshot", type=non_negative, default=None, help="snapshot to split (default: last environments publish)")
    s.add_argument("--by", default="environment", choices=["environment", "task"],
                   help="environment: whole environments go to one side; task: split each environment's tasks")
    s.add_argument("--seed", type=non_negative, default=0, help="split seed (default: 0)")
    s.add_argument("--ratio", type=rate, default=0.8, help="share of train (default: 0.8)")
    s.set_defaults(func=run_splits)


class _ProgressLine:
    """One self-rewriting line on stderr: episodes done / total and the running mean reward."""

    def __init__(self, stream=None):
        # Looked up per instance: a default bound at import would keep whatever stderr was
        # then (a test's capture, long closed).
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_printed = -1

    def __call__(self, state) -> None:
        mean = "-" if state["mean_reward"] is None else f"{state['mean_reward']:.3f}"
        text = (f"episodes {state['done']}/{state['total']}  mean reward {mean}  completed {state['completed']}"
                + (f"  failed {state['failed']}" if state["failed"] else ""))
        if self.tty:
            self.stream.write("\r" + text.ljust(70))
            if state["done"] == state["total"]:
                self.stream.write("\n")
        else:  # a log file: a line per tenth of the way
            step = max(1, state["total"] // 10)
            if state["done"] == state["total"] or state["done"] // step != self.last_printed:
                self.last_printed = state["done"] // step
                self.stream.write(text + "\n")
        self.stream.flush()


def run_eval(args) -> int:
    from flows.evaluate import EvalConfig, add_progress_listener, evaluate, remove_progress_listener, summary_markdown

    config = config_from_args(EvalConfig, args)  # bad values fail here, before a flow run is created
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    Catalog.open(get_settings(), read_only=True).close()
    progress = _ProgressLine()
    add_progress_listener(progress)
    try:
        summary = run_flow(evaluate, **config.parameters())
    finally:
        remove_progress_listener(progress)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(summary_markdown(summary, config))
    return 0


def run_splits(args) -> int:
    from flows.evaluate import publish_splits

    out = publish_splits(snapshot=args.snapshot, by=args.by, seed=args.seed, ratio=args.ratio)
    print(f"snapshot {out['snapshot']}: {out['train']} train and {out['val']} val task(s) "
          f"({out['environments']['train']} / {out['environments']['val']} environment(s)), by {out['by']}, "
          f"seed {out['seed']}; stored in snapshot {out['published_snapshot']}")
    return 0

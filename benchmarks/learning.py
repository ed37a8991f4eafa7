"""Does GRPO learn? A warm-started tiny policy on the paint-shop toy task, before and after.

One warm start (supervised steps on the reference solutions), then two GRPO runs from the same
weights: the real one, and a control with every advantage negated. Each policy is evaluated on
the same fixed set of sampled episodes (every task ``--episodes`` times, one seed). Prints the
per-step training curve of both runs side by side and the before/after table, and saves the
curves as a PNG (``--png``). Repeat with ``--seeds 0 1 2`` for the spread.

    .venv/bin/python benchmarks/learning.py --png learning.png
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config(args, seed: int):
    from awm_core.train.toy import LEARNING_PRESET

    return LEARNING_PRESET.replace(steps=args.steps, seed=seed, learning_rate=args.lr,
                                   warmstart_steps=args.warmstart_steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--warmstart-steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--episodes", type=int, default=128, help="evaluation episodes per task")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--png", default=None, help="save the reward curves here")
    p.add_argument("--json", default=None, help="save the whole report here")
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from awm_core.settings import load_settings
    from awm_core.train.learning import learning_run
    from awm_core.report import reward_curves_png
    from awm_core.train.toy import LEARNING_PRESET, learning_family

    if args.steps is None:
        args.steps = LEARNING_PRESET.steps
    if args.lr is None:
        args.lr = LEARNING_PRESET.learning_rate
    if args.warmstart_steps is None:
        args.warmstart_steps = LEARNING_PRESET.warmstart_steps
    env, tasks = learning_family()
    reports = []
    for seed in args.seeds:
        # The trainer's progress lines go to stderr with the log, so stdout is just the tables.
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            reports.append(learning_run(config(args, seed), [env], tasks, tmp, load_settings(),
                                        episodes_per_task=args.episodes, log=lambda m: print(m, file=sys.stderr)))

    # Per-step curve (first seed): training episodes of each step, both arms side by side.
    first = reports[0]["runs"]
    print(f"\nper-step training episodes, seed {args.seeds[0]} ({env.id}, task {tasks[0][2]!r})")
    print(f"{'step':>4} | {'GRPO reward':>11} {'completed':>9} {'fmt err':>7} | "
          f"{'negated reward':>14} {'completed':>9} {'fmt err':>7}")
    def rolled(curve):  # steps that rolled out episodes (others reused a batch)
        return [m for m in curve if m.get("reward") is not None]

    for a, b in zip(rolled(first["grpo"]["curve"]), rolled(first["negated"]["curve"])):
        print(f"{a['step']:>4} | {a.get('reward', 0):>+11.3f} {a.get('awm/completion_rate', 0):>9.0%} "
              f"{a.get('awm/format_error_rate', 0):>7.0%} | {b.get('reward', 0):>+14.3f} "
              f"{b.get('awm/completion_rate', 0):>9.0%} {b.get('awm/format_error_rate', 0):>7.0%}")

    def med(key: str, where) -> float:
        return statistics.median(where(r)[key] for r in reports)

    print(f"\nfixed evaluation ({args.episodes} episodes per task, median of {len(reports)} seed(s))")
    print(f"{'policy':<22} {'completed':>9} {'format errors':>13} {'reward':>8}")
    rows = [("warm start (before)", lambda r: r["before"]), ("GRPO (after)", lambda r: r["runs"]["grpo"]["after"]),
            ("negated control", lambda r: r["runs"]["negated"]["after"])]
    for name, where in rows:
        print(f"{name:<22} {med('completion_rate', where):>9.0%} {med('format_error_rate', where):>13.0%} "
              f"{med('reward_mean', where):>+8.3f}")
    for r, seed in zip(reports, args.seeds):
        b, g, n = r["before"], r["runs"]["grpo"]["after"], r["runs"]["negated"]["after"]
        print(f"seed {seed}: completion {b['completion_rate']:.0%} -> GRPO {g['completion_rate']:.0%} / "
              f"negated {n['completion_rate']:.0%}; time GRPO {r['runs']['grpo']['seconds']:.0f}s")
    if args.png:
        reward_curves_png({name: run["curve"] for name, run in first.items()}, Path(args.png),
                          title=f"GRPO vs negated control on {env.id} (seed {args.seeds[0]})")
        print(f"curves saved to {args.png}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

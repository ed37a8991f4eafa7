"""BFCL ground truth: seconds per entry through this runtime vs BFCL's own executor, in one run.

    .venv/bin/python benchmarks/bfcl_replay.py [--wheel FILE] [--categories base] [--limit 50] [--rounds 3]

This side: per entry, load the environment in a sandbox worker, run the reference policy through
the agent loop (one reply per call, the user turns in order, the tool results rendered as the agent
sees them), then score it with BFCL's checker in the worker (``awm_core.interop.bfcl.replay_ground_truth``).
BFCL's side: ``multi_turn_checker`` with the ground truth as the model's result, in a plain
process with the unpacked wheel on ``sys.path``: BFCL executes the ground truth twice (as "model"
and as ground truth) with its executor and compares. That is the work its evaluation does per
entry, without inference; it runs without a sandbox. The wheel is downloaded without dependencies
(once, to benchmarks/out/) when ``--wheel`` is not given.

Prints a table: median seconds per entry of each round, side by side, and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.wheels import OUT, fetch_wheel  # noqa: E402
VERSION = "2026.3.23"

BFCL_SIDE = r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import multi_turn_checker
entries = [json.loads(l) for l in open(sys.argv[2])]
rounds = int(sys.argv[3])
out = []
for r in range(rounds):
    times, passed = [], 0
    for i, (entry, gt) in enumerate(entries):
        t = time.perf_counter()
        # The model's result per turn is a list of steps: the whole ground-truth turn as one step.
        res = multi_turn_checker([[turn] for turn in gt], gt, entry, entry["id"].rsplit("_", 1)[0], f"bench_r{r}_{i}")
        times.append(time.perf_counter() - t)
        passed += bool(res["valid"])
    out.append({"times": times, "passed": passed})
print(json.dumps(out))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, default=None)
    ap.add_argument("--categories", default="base")
    ap.add_argument("--limit", type=int, default=50, help="entries per category")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from awm_core.interop import bfcl
    from awm_core.runtime import SandboxPool
    from awm_core.settings import get_settings

    wheel = args.wheel or fetch_wheel(f"bfcl-eval=={VERSION}", f"bfcl_eval-{VERSION}-*.whl")
    package = bfcl.locate(wheel)
    read = bfcl.read_package(package, args.categories, limit=args.limit)
    envs = read.environments
    settings = get_settings()

    # BFCL's side reads the same entries (initial config, classes, ground truth) from the wheel.
    unpacked = OUT / f"bfcl_eval-{package.version}"
    if not (unpacked / "bfcl_eval").is_dir():
        zipfile.ZipFile(wheel).extractall(unpacked)
    entries_file = OUT / "bfcl_replay_entries.jsonl"
    with entries_file.open("w") as f:
        for env in envs:
            bundle = json.loads(env.code.source)
            gt = json.loads(env.verifier(0).code)["ground_truth"]
            entry = {"id": bundle["entry_id"], "initial_config": bundle["initial_config"],
                     "involved_classes": bundle["involved_classes"]}
            f.write(json.dumps([entry, gt]) + "\n")
    proc = subprocess.run([sys.executable, "-c", BFCL_SIDE, str(unpacked), str(entries_file), str(args.rounds)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"BFCL's side failed:\n{proc.stderr[-2000:]}")
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])

    ours = []
    with SandboxPool(settings.sandbox) as pool:
        for _ in range(args.rounds):
            times, passed = [], 0
            for env in envs:
                t = time.perf_counter()
                result = bfcl.replay_ground_truth(pool, env, settings)
                times.append(time.perf_counter() - t)
                pool.unload(env)  # every round loads the environment again, as a fresh evaluation would
                passed += result.passed
            ours.append({"times": times, "passed": passed})

    rows = []
    for r, (a, b) in enumerate(zip(ours, theirs), 1):
        ma, mb = statistics.median(a["times"]), statistics.median(b["times"])
        rows.append((r, ma, mb, ma / mb, a["passed"], b["passed"]))
    print(f"BFCL {package.version} multi-turn {args.categories}: {len(envs)} entries, {args.rounds} rounds\n")
    print("| round | runtime s/entry (load + loop + checker) | BFCL executor + checker s/entry | ratio | passed here | passed by BFCL |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r, ma, mb, ratio, pa, pb in rows:
        print(f"| {r} | {ma:.4f} | {mb:.4f} | {ratio:.1f}x | {pa}/{len(envs)} | {pb}/{len(envs)} |")
    med = statistics.median(x[3] for x in rows)
    print(f"\nmedian ratio of rounds: {med:.1f}x (the runtime's path also loads the environment in a sandbox "
          "worker and renders every result for the agent)")


if __name__ == "__main__":
    main()

"""Generate fan-out: Prefect's thread task runner vs a local Dask cluster of worker processes.

Same work for both: N environments (copies of the demo recordings, see benchmarks/pipeline.py)
with an offline backend that sleeps ``--latency`` seconds per LLM call, C scenarios at a time
(C threads, or C Dask worker processes with one thread each). The Dask column includes
starting the cluster and, in every worker, the run's LLM client and sandbox pool
(flows/scaleout.py). Runs alternate between the two runners; each run has a fresh AWM_HOME,
so nothing is cached.

    python benchmarks/ops_fanout.py                    # 4 envs, 0.25 s per call, C=2, 3 runs each
    python benchmarks/ops_fanout.py -n 6 -c 3 --runs 5

Needs a Prefect API: PREFECT_API_URL when set, else a temporary server. Prints one table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.pipeline import make_fixtures, prefect_api  # noqa: E402  (one place for the workload)


def one_run(kind: str, n: int, concurrency: int, latency: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="awm-fanout-"))
    try:
        fixtures, seed_list, names, _ = make_fixtures(root, n)
        os.environ["AWM_HOME"] = str(root / "home")
        from awm_core.settings import get_settings

        get_settings.cache_clear()
        from flows.generate import run_generate

        runner = None
        if kind == "dask":
            from prefect_dask import DaskTaskRunner

            runner = DaskTaskRunner(cluster_kwargs={"n_workers": concurrency, "threads_per_worker": 1,
                                                    "dashboard_address": None})
        t0 = time.perf_counter()
        summary = run_generate(scenarios=names, concurrency=concurrency, task_runner=runner,
                               fixtures_dir=str(fixtures), seed_list=str(seed_list), offline_latency_s=latency,
                               skip_existing=False)
        return {"wall_s": time.perf_counter() - t0, "published": len(summary["published"]),
                "calls": summary["llm_calls"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--envs", type=int, default=4)
    ap.add_argument("-c", "--concurrency", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.25, help="seconds per LLM call")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {"threads": [], "dask": []}
    with prefect_api("awm-fanout-prefect-"):
        for _ in range(args.runs):
            for kind in results:
                results[kind].append(one_run(kind, args.envs, args.concurrency, args.latency))
    print(f"\n{args.envs} environments, {args.latency:g} s per LLM call, {args.concurrency} at a time, "
          f"{os.cpu_count()} CPUs, median of {args.runs} run(s) each, load {os.getloadavg()[0]:.1f}\n")
    print(f"| runner | wall time (s) | min-max (s) | published | LLM calls |\n|---|---:|---:|---:|---:|")
    labels = {"threads": f"ThreadPoolTaskRunner({args.concurrency}) (baseline)",
              "dask": f"DaskTaskRunner, {args.concurrency} worker processes x 1 thread"}
    for kind, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        print(f"| {labels[kind]} | {statistics.median(walls):.1f} | {min(walls):.1f}-{max(walls):.1f} | "
              f"{runs[0]['published']} | {runs[0]['calls']} |")


if __name__ == "__main__":
    main()

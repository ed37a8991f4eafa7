"""Fan-out: generate and evaluation on threads of one process vs 1 and 2 Dask worker processes.

Generate: N environments (copies of the demo recordings, see benchmarks/pipeline.py) with an
offline backend that sleeps ``--latency`` seconds per LLM call, C scenarios at a time (C threads,
or Dask worker processes with one thread each). The Dask columns include starting the cluster
and, in every worker, the run's LLM client and sandbox pool (flows/scaleout.py). Each run has a
fresh AWM_HOME, so nothing is cached.

Evaluation: the reference policy, ``--episodes`` episodes per task on the environments that
generate published, in this process (the sandbox pool's workers) vs spread over a Dask cluster of
1 or 2 worker processes, each with its own sandbox pool (``awm eval --dask-address``); the cluster
is started before the clock, and each worker's pool starts in the first run (kept warm after).

Runs alternate between the runners.

    python benchmarks/ops_fanout.py                    # 4 envs, 0.25 s per call, C=2, 3 runs each
    python benchmarks/ops_fanout.py -n 6 -c 3 --runs 5 --episodes 8

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
        if kind.startswith("dask"):
            from prefect_dask import DaskTaskRunner

            runner = DaskTaskRunner(cluster_kwargs={"n_workers": int(kind[4:]), "threads_per_worker": 1,
                                                    "dashboard_address": None})
        t0 = time.perf_counter()
        summary = run_generate(scenarios=names, concurrency=concurrency, task_runner=runner,
                               fixtures_dir=str(fixtures), seed_list=str(seed_list), offline_latency_s=latency,
                               skip_existing=False)
        return {"wall_s": time.perf_counter() - t0, "published": len(summary["published"]),
                "calls": summary["llm_calls"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def eval_runs(n: int, episodes: int, runs: int) -> dict[str, list[dict]]:
    """Evaluation in-process vs 1 and 2 Dask workers, on one catalog of N generated environments."""
    from distributed import LocalCluster

    from awm_core.agent.evaluation import EvalConfig
    from awm_core.settings import get_settings
    from flows.evaluate import run_evaluation
    from flows.generate import run_generate

    root = Path(tempfile.mkdtemp(prefix="awm-fanout-eval-"))
    clusters = {}
    try:
        fixtures, seed_list, names, _ = make_fixtures(root, n)
        os.environ["AWM_HOME"] = str(root / "home")
        get_settings.cache_clear()
        run_generate(scenarios=names, concurrency=2, fixtures_dir=str(fixtures), seed_list=str(seed_list),
                     skip_existing=False)
        clusters = {f"dask{w}": LocalCluster(n_workers=w, threads_per_worker=1, dashboard_address=None)
                    for w in (1, 2)}
        out: dict[str, list[dict]] = {"process": [], "dask1": [], "dask2": []}
        for _ in range(runs):
            for kind in out:
                address = clusters[kind].scheduler_address if kind in clusters else None
                config = EvalConfig(policy="reference", split="all", episodes_per_task=episodes, dask_address=address)
                t0 = time.perf_counter()
                result = run_evaluation(config)
                out[kind].append({"wall_s": time.perf_counter() - t0, "episodes": len(result.rows)})
        return out
    finally:
        for c in clusters.values():
            c.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--envs", type=int, default=4)
    ap.add_argument("-c", "--concurrency", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.25, help="seconds per LLM call")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--episodes", type=int, default=4, help="evaluation episodes per task")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {"threads": [], "dask1": [], "dask2": []}
    with prefect_api("awm-fanout-prefect-"):
        for _ in range(args.runs):
            for kind in results:
                results[kind].append(one_run(kind, args.envs, args.concurrency, args.latency))
        evals = eval_runs(args.envs, args.episodes, args.runs)
    print(f"\ngenerate: {args.envs} environments, {args.latency:g} s per LLM call, {args.concurrency} at a time, "
          f"{os.cpu_count()} CPUs, median of {args.runs} run(s) each, load {os.getloadavg()[0]:.1f}\n")
    print("| runner | wall time (s) | min-max (s) | published | LLM calls |\n|---|---:|---:|---:|---:|")
    labels = {"threads": f"ThreadPoolTaskRunner({args.concurrency}) (baseline)",
              "dask1": "DaskTaskRunner, 1 worker process x 1 thread",
              "dask2": "DaskTaskRunner, 2 worker processes x 1 thread"}
    for kind, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        print(f"| {labels[kind]} | {statistics.median(walls):.1f} | {min(walls):.1f}-{max(walls):.1f} | "
              f"{runs[0]['published']} | {runs[0]['calls']} |")
    print(f"\nevaluation: reference policy, {args.episodes} episodes per task, median of {args.runs} run(s)\n")
    print("| where | wall time (s) | min-max (s) | episodes | episodes/s |\n|---|---:|---:|---:|---:|")
    labels = {"process": "this process, its sandbox pool (baseline)", "dask1": "Dask, 1 worker process",
              "dask2": "Dask, 2 worker processes"}
    for kind, runs in evals.items():
        walls = [r["wall_s"] for r in runs]
        med = statistics.median(walls)
        print(f"| {labels[kind]} | {med:.2f} | {min(walls):.2f}-{max(walls):.2f} | {runs[0]['episodes']} | "
              f"{runs[0]['episodes'] / med:.1f} |")


if __name__ == "__main__":
    main()

"""Generate-flow overhead: N environments with an offline backend that sleeps per LLM call.

The N scenarios reuse the three demo recordings (recipe_box, clinic_booking, team_expenses,
with their failing first attempts) under N distinct scenario ids in a temporary fixtures
folder. Every LLM call sleeps ``--latency`` seconds. The ideal run time is the critical path
of LLM latency alone: each environment is a chain of sequential calls (stages, repairs,
one verifier and one solution per task), and with C environments built at once the ideal is
``ceil(N / C) * chain * latency`` (+ the one scenario-less start). Everything above that is
orchestration and validation overhead: Prefect task runs, sandbox checks, caching, the
catalog publish.

    python benchmarks/pipeline.py                      # 100 envs, 1 s per call, C=20, 1 run
    python benchmarks/pipeline.py -n 12 -c 4 --runs 3  # a quicker look

Needs a Prefect API: it uses PREFECT_API_URL when set, else starts a temporary server.
Prints one table (median over --runs; each run in a fresh AWM_HOME, so nothing is cached).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = ("recipe_box", "clinic_booking", "team_expenses")


def make_fixtures(root: Path, n: int) -> tuple[Path, Path, list[str], dict[str, int]]:
    """Fixtures and seed list for n scenario ids; returns (fixtures, seed list, names, chain length per id)."""
    from awm_core.settings import DEFAULT_FIXTURES

    fixtures = root / "fixtures"
    seeds, names, chain = [], [], {}
    for i in range(n):
        base = DEMO[i % len(DEMO)]
        name = f"{base.replace('_', ' ').title()} {i:03d}"
        sid = f"{base}_{i:03d}"
        dst = fixtures / sid
        dst.mkdir(parents=True)
        calls = 0
        for f in (DEFAULT_FIXTURES / base).glob("*.json"):
            data = json.loads(f.read_text())
            data["scenario"] = sid
            (dst / f.name).write_text(json.dumps(data))
            # Calls this stage makes on the chain: one per recorded attempt (the last is good).
            calls += len(data["attempts"])
        chain[sid] = calls
        seeds.append({"name": name, "description": f"copy {i} of the {base} demo", "category": base})
        names.append(name)
    seed_list = root / "seeds.json"
    seed_list.write_text(json.dumps(seeds))
    return fixtures, seed_list, names, chain


@contextmanager
def prefect_api(prefix: str) -> Iterator[str]:
    """The Prefect API a benchmark talks to: PREFECT_API_URL when set, else a temporary server of
    its own (home: a fresh temporary folder whose name starts with ``prefix``) for the ``with`` block."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "PREFECT_API_URL" in os.environ:
        yield os.environ["PREFECT_API_URL"]
        return
    from flows.server import temporary_api_server

    with temporary_api_server(Path(tempfile.mkdtemp(prefix=prefix)), timeout=180) as url:
        yield url


def one_run(n: int, concurrency: int, latency: float, workers: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="awm-bench-"))
    try:
        fixtures, seed_list, names, chain = make_fixtures(root, n)
        os.environ["AWM_HOME"] = str(root / "home")
        os.environ["AWM_SANDBOX__WORKERS"] = str(workers)
        from awm_core.settings import get_settings

        get_settings.cache_clear()
        from flows.generate import run_generate

        import resource

        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        summary = run_generate(scenarios=names, concurrency=concurrency, fixtures_dir=str(fixtures),
                               seed_list=str(seed_list), offline_latency_s=latency, skip_existing=False)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_self = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        cpu_children = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
        load = os.getloadavg()[0]
        per_env = max(chain.values())
        ideal = math.ceil(n / concurrency) * per_env * latency
        return {"wall_s": wall, "ideal_s": ideal, "chain": per_env, "published": len(summary["published"]),
                "calls": summary["llm_calls"], "flow_s": summary["seconds"],
                "build_s": summary["timings"]["build_s"], "publish_s": summary["timings"]["publish_s"],
                "cpu_self_s": cpu_self, "cpu_sandbox_s": cpu_children, "load": load}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--envs", type=int, default=100)
    ap.add_argument("-c", "--concurrency", type=int, default=20)
    ap.add_argument("--latency", type=float, default=1.0, help="seconds per LLM call")
    ap.add_argument("--workers", type=int, default=2, help="sandbox worker processes")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    with prefect_api("awm-bench-prefect-"):
        runs = [one_run(args.envs, args.concurrency, args.latency, args.workers) for _ in range(args.runs)]
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("wall_s", "ideal_s", "flow_s", "build_s", "publish_s", "cpu_self_s", "cpu_sandbox_s", "load")}
    r0 = runs[0]
    overhead = (med["wall_s"] - med["ideal_s"]) / med["ideal_s"] if med["ideal_s"] else float("nan")
    print(f"\n{args.envs} environments, {args.latency:g} s per LLM call, concurrency {args.concurrency}, "
          f"{args.workers} sandbox workers, {os.cpu_count()} CPUs, median of {len(runs)} run(s)\n")
    print("| measure | value |\n|---|---:|")
    print(f"| LLM calls on one environment's chain | {r0['chain']} |")
    print(f"| LLM calls in the run | {r0['calls']} |")
    print(f"| environments published | {r0['published']} |")
    print(f"| ideal: critical path of LLM latency, ceil(N/C) x chain x latency | {med['ideal_s']:.1f} s |")
    print(f"| generate flow, wall time (call to return) | {med['wall_s']:.1f} s |")
    print(f"| of which building the environments (fan-out until the last is validated) | {med['build_s']:.1f} s |")
    print(f"| of which publishing (catalog snapshot with every LLM call) | {med['publish_s']:.1f} s |")
    print(f"| orchestration + validation overhead | {overhead * 100:+.1f} % |")
    print(f"| CPU of this process (flow, Prefect, LLM layer, stage checks) per environment | "
          f"{med['cpu_self_s'] / args.envs:.2f} s |")
    print(f"| CPU of the sandbox workers per environment | {med['cpu_sandbox_s'] / args.envs:.2f} s |")
    print(f"| machine load average at the end (other processes included) | {med['load']:.1f} |")


if __name__ == "__main__":
    main()

"""Generate-flow overhead: N environments with an offline backend that sleeps per LLM call.

The N scenarios reuse the three demo recordings (recipe_box, clinic_booking, team_expenses,
with their failing first attempts) under N distinct scenario ids in a temporary fixtures
folder. Every LLM call sleeps ``--latency`` seconds. The ideal run time is the critical path
of LLM latency alone: each environment is a chain of sequential calls (stages, repairs,
one verifier and one solution per task), and with C environments built at once the ideal is
``ceil(N / C) * chain * latency`` (+ the one scenario-less start). Everything above that is
orchestration and validation overhead: Prefect task runs, sandbox checks, caching, the
catalog publish.

Where the flow process's CPU goes is metered while it runs (``benchmarks/cpu_profile.py``:
each thread's CPU clock charged to the component whose entry point it is inside) and printed per
environment, with the sandbox workers' CPU, the peak memory of the flow process and of
Prefect's server, and the Prefect API requests per environment.

The run's LLM budget is raised to fit it (``--budget-usd``, default $0.50 per environment,
about twice what a demo environment costs) and the table says what was spent: a benchmark
stopped by the default cap measures the cap, not the pipeline.

    python benchmarks/pipeline.py                                # 100 envs, 1 s per call, C=20
    python benchmarks/pipeline.py --quick                        # 12 envs, C=6: a profile in ~1 min
    python benchmarks/pipeline.py -n 200 -c 40                   # the scale check
    python benchmarks/pipeline.py -n 1000 -c 200 --latency 5     # the paper's nightly scale
    python benchmarks/pipeline.py -n 40 -c 20 --runner dask      # scenarios on Dask worker processes

Needs a Prefect API: it uses PREFECT_API_URL when set, else starts a temporary server.
Prints one table (median over --runs; each run in a fresh AWM_HOME, so nothing is cached).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = ("recipe_box", "clinic_booking", "team_expenses")
REST = "Prefect's engine, event and log threads, and the rest"


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


def server_process():
    """The Prefect server this benchmark started (a child process), or None when it uses another."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "prefect" in " ".join(child.cmdline()) and "server" in child.cmdline():
                return child
        except psutil.Error:
            continue
    return None


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def count_api_requests(url: str) -> Iterator[Counter]:
    """Count the HTTP requests this process sends to the Prefect API at ``url`` (sync and async clients,
by method) and the events it emits (``events``)."""
    import httpx

    counts: Counter = Counter()
    originals = {cls: cls.send for cls in (httpx.Client, httpx.AsyncClient)}

    def sync_send(self, request, *a, **kw):
        if str(request.url).startswith(url):
            counts[request.method] += 1
        return originals[httpx.Client](self, request, *a, **kw)

    async def async_send(self, request, *a, **kw):
        if str(request.url).startswith(url):
            counts[request.method] += 1
        return await originals[httpx.AsyncClient](self, request, *a, **kw)

    from prefect.events.worker import EventsWorker

    handle = EventsWorker._handle

    async def counted_handle(self, event):  # events go to the server over a websocket, not the REST API
        counts["events"] += 1
        return await handle(self, event)

    httpx.Client.send, httpx.AsyncClient.send = sync_send, async_send
    EventsWorker._handle = counted_handle
    try:
        yield counts
    finally:
        httpx.Client.send, httpx.AsyncClient.send = originals[httpx.Client], originals[httpx.AsyncClient]
        EventsWorker._handle = handle


def one_run(n: int, concurrency: int, latency: float, workers: int, budget_usd: float, runner: str,
            api_url: str, profile: bool) -> dict:
    import resource

    from cpu_profile import CpuMeter

    root = Path(tempfile.mkdtemp(prefix="awm-bench-"))
    try:
        fixtures, seed_list, names, chain = make_fixtures(root, n)
        os.environ["AWM_HOME"] = str(root / "home")
        os.environ["AWM_SANDBOX__WORKERS"] = str(workers)
        os.environ["AWM_GENERATION__TASK_RUNNER"] = runner
        from awm_core.settings import get_settings

        get_settings.cache_clear()
        from flows.generate import run_generate

        server = server_process()
        server_cpu0 = sum(server.cpu_times()[:2]) if server else 0.0
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        meter = CpuMeter.for_generate() if profile else contextlib.nullcontext()
        t0 = time.perf_counter()
        with count_api_requests(api_url) as api, meter:
            summary = run_generate(scenarios=names, concurrency=concurrency, fixtures_dir=str(fixtures),
                                   seed_list=str(seed_list), offline_latency_s=latency, skip_existing=False,
                                   budget_usd=budget_usd)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_self = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        cpu_children = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
        per_env = max(chain.values())
        ideal = math.ceil(n / concurrency) * per_env * latency
        dropped = summary["dropped"]
        return {"wall_s": wall, "ideal_s": ideal, "chain": per_env, "published": len(summary["published"]),
                "dropped": len(dropped), "drop_reasons": dropped, "status": summary["status"],
                "accounting": summary["accounting"],
                "calls": summary["llm_calls"], "cost_usd": summary["cost_usd"], "flow_s": summary["seconds"],
                "build_s": summary["timings"]["build_s"], "publish_s": summary["timings"]["publish_s"],
                "cpu_self_s": cpu_self, "cpu_children_s": cpu_children,
                "cpu_server_s": (sum(server.cpu_times()[:2]) - server_cpu0) if server else float("nan"),
                "rss_self_mb": r1.ru_maxrss / 1024, "rss_server_mb": peak_rss_mb(server.pid) if server else float("nan"),
                "api_requests": sum(v for k, v in api.items() if k != "events"),
                "events": api["events"], "load": os.getloadavg()[0],
                "components": dict(meter.seconds) if profile else {}}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--envs", type=int, default=100)
    ap.add_argument("-c", "--concurrency", type=int, default=20)
    ap.add_argument("--latency", type=float, default=1.0, help="seconds per LLM call")
    ap.add_argument("--workers", type=int, default=2, help="sandbox worker processes")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--runner", choices=("threads", "dask"), default="threads",
                    help="fan-out of scenarios: threads in the flow process, or Dask worker processes")
    ap.add_argument("--budget-usd", type=float, default=None,
                    help="the run's LLM budget (default $0.50 per environment)")
    ap.add_argument("--quick", action="store_true", help="12 environments at concurrency 6: a profile in a minute")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="no CPU split by component")
    args = ap.parse_args()
    if args.quick:
        args.envs, args.concurrency = 12, 6
    budget = args.budget_usd if args.budget_usd is not None else 0.5 * args.envs
    with prefect_api("awm-bench-prefect-") as url:
        runs = [one_run(args.envs, args.concurrency, args.latency, args.workers, budget, args.runner, url,
                        args.profile) for _ in range(args.runs)]
    print(report(args, budget, runs))


def accounted(a: dict) -> bool:
    """The run summary's accounting adds up: every environment asked for is published, dropped
    with a reason, skipped or said to be not made."""
    return a["published"] + a["dropped"] + a["skipped"] + a["not_made"] == a["asked"] + a["regenerated"]


def report(args: argparse.Namespace, budget: float, runs: list[dict]) -> str:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    n, r0 = args.envs, runs[0]
    overhead = (med("wall_s") - med("ideal_s")) / med("ideal_s") if med("ideal_s") else float("nan")
    out = [f"\n{n} environments, {args.latency:g} s per LLM call, concurrency {args.concurrency}, runner "
           f"{args.runner}, {args.workers} sandbox workers, {os.cpu_count()} CPUs, median of {len(runs)} run(s)\n",
           "| measure | value |", "|---|---:|",
           f"| LLM calls on one environment's chain | {r0['chain']} |",
           f"| LLM calls in the run | {r0['calls']} |",
           f"| LLM budget of the run (raised to fit it) / spent | ${budget:.2f} / ${r0['cost_usd']:.2f} |",
           f"| environments published / dropped / asked for | {r0['published']} / {r0['dropped']} / {n} |",
           "| every environment accounted for (published + dropped + skipped + not made = asked) | "
           + ("yes" if accounted(r0["accounting"]) else f"**no**: {r0['accounting']}") + " |",
           f"| ideal: critical path of LLM latency, ceil(N/C) x chain x latency | {med('ideal_s'):.1f} s |",
           f"| generate flow, wall time (call to return) | {med('wall_s'):.1f} s |",
           f"| of which building the environments (fan-out until the last is validated) | {med('build_s'):.1f} s |",
           f"| of which publishing (catalog snapshot with every LLM call) | {med('publish_s'):.1f} s |",
           f"| orchestration + validation overhead | {overhead * 100:+.1f} % |",
           f"| CPU of the flow process per environment | {med('cpu_self_s') / n:.2f} s |",
           f"| CPU of child processes (check processes, sandbox workers, Dask workers) per environment | {med('cpu_children_s') / n:.2f} s |",
           f"| CPU of Prefect's server per environment | {med('cpu_server_s') / n:.2f} s |",
           f"| Prefect API requests / events per environment (flow process) | "
           f"{med('api_requests') / n:.1f} / {med('events') / n:.1f} |",
           f"| peak memory: flow process / Prefect's server | {med('rss_self_mb'):.0f} / {med('rss_server_mb'):.0f} MiB |",
           f"| machine load average at the end (other processes included) | {med('load'):.1f} |"]
    if r0["components"]:
        for r in runs:  # what no component claims: Prefect's engine and threads, the flow between calls
            r["components"][REST] = r["cpu_self_s"] - sum(r["components"].values())
        names = sorted({k for r in runs for k in r["components"]}, key=lambda k: -r0["components"].get(k, 0))
        total = med("cpu_self_s") / n
        out += ["", "CPU of the flow process per environment, by component (benchmarks/cpu_profile.py):", "",
                "| component | s / environment | share |", "|---|---:|---:|"]
        for k in names:
            v = statistics.median(r["components"].get(k, 0.0) for r in runs) / n
            out.append(f"| {k} | {v:.3f} | {v / total * 100:.0f} % |" if total else f"| {k} | {v:.3f} | |")
    if r0["dropped"]:
        out += ["", "Dropped (first run):"] + [f"- {sid}: {why[:200]}" for sid, why in r0["drop_reasons"].items()]
    return "\n".join(out)


if __name__ == "__main__":
    main()

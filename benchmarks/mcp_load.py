"""Many concurrent MCP clients against one server: `awm env serve` vs the official server.

    .venv/bin/python benchmarks/mcp_load.py [--samples DIR] [--clients 256] [--calls 20] [--runs 3]

N MCP client sessions at once (asyncio, loopback only), each doing ``--calls`` tool calls
(``search_channels`` on AgentWorldModel-1K ``content_platform_1``), against:

- one ``awm env serve --transport http`` process (its sandbox workers included in the
  memory figure), in two modes: every client naming its environment session with
  ``X-AWM-Session`` (stateless JSON fast path, one environment session per client), and
  every client opening an MCP session (the SDK's session path, one environment session per
  MCP session), and the first again with a bearer token on every request (``--token-file``);
- the official server: one uvicorn process with fastapi-mcp 0.4.0 (all clients share its
  one database, as they would there).

The same client runs against both: the official side's mcp 1.x client, in the virtual
environment ``env_runtime.py`` builds under ``benchmarks/out/``, all N sessions in one
process. Reported per server: throughput (calls/s over the call phase, after every session
is open), p50/p99 latency per call, errors (failed calls, and calls a failed session did not
make), and the server's peak resident memory (VmRSS of the process and its children,
sampled during the run). The median run is shown (by throughput).
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_runtime import OfficialServer, OurMCPServer, awm1k_environment, parse_with_samples, rss_mb  # noqa: E402

LOAD_CLIENT = '''
import anyio, json, sys, time
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

url, clients, calls, named = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
token = sys.argv[5] if len(sys.argv) > 5 else ""
lat, errors, ready = [], [0], [0]
all_ready = anyio.Event()
t0 = [0.0]

async def one(i):
    headers = {"X-AWM-Session": f"load-{i}"} if named else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    done, counted = 0, False
    try:
        async with streamablehttp_client(url, headers=headers, timeout=300) as (r, w, _):
            async with ClientSession(r, w) as s:
                await s.initialize()
                ready[0] += 1
                counted = True
                if ready[0] == clients:
                    t0[0] = time.perf_counter()
                    all_ready.set()
                await all_ready.wait()
                for _ in range(calls):
                    t = time.perf_counter()
                    res = await s.call_tool("search_channels", {"query": "Kurz"})
                    lat.append((time.perf_counter() - t) * 1000)
                    done += 1
                    if res.isError:
                        errors[0] += 1
    except Exception as exc:
        print(f"client {i}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
        errors[0] += calls - done
        if not counted:  # the others must not wait for this one
            ready[0] += 1
            if ready[0] >= clients:
                t0[0] = time.perf_counter()
                all_ready.set()

async def main():
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(one, i)
    wall = time.perf_counter() - t0[0]
    print(json.dumps({"lat": lat, "errors": errors[0], "wall_s": wall}))

anyio.run(main)
'''


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_mb(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def run_load(python: Path, script: Path, url: str, pid: int, clients: int, calls: int, named: bool,
             token: str = "") -> dict:
    peak = [tree_rss_mb(pid)]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak[0] = max(peak[0], tree_rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = subprocess.run([str(python), str(script), url, str(clients), str(calls), "1" if named else "0", token],
                             capture_output=True, text=True, timeout=1800)
    finally:
        stop.set()
        sampler.join()
    if out.returncode != 0:
        raise RuntimeError(f"load client failed: {out.stderr[-2000:]}")
    if out.stderr.strip():
        print(out.stderr.strip()[-1500:], file=sys.stderr)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    lat = sorted(got["lat"])
    n = len(lat)
    return {"calls": n, "errors": got["errors"], "throughput": n / got["wall_s"] if got["wall_s"] > 0 else 0.0,
            "p50": statistics.median(lat) if lat else float("nan"),
            "p99": lat[min(n - 1, int(round(0.99 * (n - 1))))] if lat else float("nan"), "rss_mb": peak[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=256, help="concurrent MCP client sessions")
    ap.add_argument("--calls", type=int, default=20, help="tool calls per client")
    ap.add_argument("--runs", type=int, default=3, help="runs per server and mode (the median is shown)")
    ap.add_argument("--skip-official", action="store_true", help="leave out the official server")
    parsed = parse_with_samples(ap, "mcp-load-")
    if parsed is None:
        return 2
    args, work = parsed
    env = awm1k_environment(args.samples)
    official = OfficialServer(env, work)  # builds the official venv if needed; its client runs there
    script = work / "load_client.py"
    script.write_text(LOAD_CLIENT)
    results: dict[str, list[dict]] = {}
    token = secrets.token_urlsafe(32)
    servers = [("`awm env serve`, X-AWM-Session (stateless JSON)", "ours", True),
               ("`awm env serve`, X-AWM-Session (stateless JSON), bearer token", "ours-auth", True),
               ("`awm env serve`, an MCP session per client", "ours", False)]
    if not args.skip_official:
        servers.append(("official: uvicorn + fastapi-mcp, one process", "official", False))
    for run in range(args.runs):  # servers alternate per run, so both see the same machine load
        for label, which, named in servers:
            print(f"run {run + 1}/{args.runs}: {label}, {args.clients} clients x {args.calls} calls ...",
                  file=sys.stderr, flush=True)
            if which.startswith("ours"):
                server = OurMCPServer(env, work, token=token if which == "ours-auth" else None)
                url, pid = f"http://127.0.0.1:{server.port}/mcp", server.proc.pid
            else:
                server = official
                server.start()
                url, pid = f"http://127.0.0.1:{server.port}/mcp", server.proc.pid
            try:
                results.setdefault(label, []).append(
                    run_load(official.python, script, url, pid, args.clients, args.calls, named,
                             token if which == "ours-auth" else ""))
            finally:
                server.stop()
    print()
    print(f"{args.clients} concurrent MCP client sessions x {args.calls} calls (content_platform_1 search_channels), "
          f"median of {args.runs} run(s) by throughput")
    print()
    print("| server | calls | errors | throughput calls/s | p50 ms | p99 ms | server RSS MB (peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, runs in results.items():
        r = sorted(runs, key=lambda x: x["throughput"])[len(runs) // 2]
        errors = sum(x["errors"] for x in runs)
        print(f"| {label} | {r['calls']} | {errors} (all runs) | {r['throughput']:.0f} | {r['p50']:.1f} | "
              f"{r['p99']:.1f} | {r['rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

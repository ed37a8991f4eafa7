"""Many sessions opened on one `awm env serve` and left idle: does its memory come back?

    .venv/bin/python benchmarks/serve_soak.py [--sessions 10000] [--wave 1000] [--idle-s 3] [--runs 1]

Starts ``awm env serve --transport http`` with a bearer token (a token file), AgentWorldModel-1K
``content_platform_1``, ``--max-sessions`` = ``--wave`` and ``--session-idle-s`` = ``--idle-s``.
Then, wave after wave until ``--sessions`` have been opened: ``--wave`` sessions, each issued by the
server on its first call (a write, ``subscribe_to_channel``, so each holds a database of its own in
a sandbox worker) and used once more under its id; one session past the limit (it must get the limit
error while the wave is live, and a live session must still answer); then nothing, until the server
has expired them (idle past ``--idle-s``), checked by calling one: it must say "session expired".

Prints the memory of the server's process tree (the server and its sandbox workers, VmRSS) at the
start, with each wave live, and after it expired: the curve. Memory returns if the last "expired"
figure stays within a margin of the first; a leak shows as a staircase.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env_runtime import REPO, awm1k_environment, free_port, parse_with_samples, stop, wait_port  # noqa: E402
from mcp_load import tree_rss_mb  # noqa: E402

SESSION_EXPIRED, SESSION_LIMIT = -32050, -32051


class Soak:
    def __init__(self, url: str, token: str, concurrency: int):
        import httpx

        self.url = url
        self.headers = {"authorization": f"Bearer {token}", "accept": "application/json, text/event-stream",
                        "mcp-protocol-version": "2025-06-18"}
        self.http = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency))
        self.gate = asyncio.Semaphore(concurrency)
        self.limit_waits = 0

    async def call(self, name: str, args: dict, session: str | None = None) -> tuple[dict, str | None]:
        headers = dict(self.headers)
        if session:
            headers["x-awm-session"] = session
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": args}}
        r = await self.http.post(self.url, json=body, headers=headers)
        return r.json(), r.headers.get("x-awm-session")

    async def open_one(self, i: int) -> str:
        async with self.gate:  # both calls of a session back to back: a queued one would idle out
            for _ in range(120):
                reply, sid = await self.call("subscribe_to_channel", {"channel_id": 1 + i % 10})
                if reply.get("error", {}).get("code") != SESSION_LIMIT:
                    break
                # A session the expiry probe touched is still live: the limit holds until it expires.
                self.limit_waits += 1
                await asyncio.sleep(1.0)
            if "result" not in reply or sid is None:
                raise RuntimeError(f"opening session {i} failed: {reply}")
            again, _ = await self.call("list_user_subscriptions", {"limit": 5}, sid)
        if "result" not in again or again["result"]["isError"]:
            raise RuntimeError(f"session {i} did not answer under its id: {again}")
        return sid


async def soak(url: str, token: str, pid: int, args) -> list[dict]:
    client = Soak(url, token, args.concurrency)
    rows = []
    warm, _ = await client.call("list_tools", {})
    assert "result" in warm, warm
    rows.append({"step": "start (no session)", "opened": 0, "rss_mb": tree_rss_mb(pid), "s": 0.0})
    t0, opened, wave = time.perf_counter(), 0, 0
    while opened < args.sessions:
        wave += 1
        n = min(args.wave, args.sessions - opened)
        ids = await asyncio.gather(*(client.open_one(opened + i) for i in range(n)))
        opened += n
        over, _ = await client.call("list_user_subscriptions", {})
        limit_ok = n < args.wave or over.get("error", {}).get("code") == SESSION_LIMIT
        alive, _ = await client.call("list_user_subscriptions", {}, ids[0])
        check = "limit error, live ones answer" if limit_ok and "result" in alive else (
            f"FAILED: one more session got {over.get('error', {}).get('code', 'a result')}, the first "
            f"got {alive.get('error', {}).get('code', 'a result')} (did the wave take longer than --idle-s?)")
        rows.append({"step": f"wave {wave}: {n} sessions live", "opened": opened, "rss_mb": tree_rss_mb(pid),
                     "s": time.perf_counter() - t0, "check": check})
        deadline = time.monotonic() + args.idle_s * 4 + 30
        await asyncio.sleep(args.idle_s * 1.25 + 2)  # idle, plus one sweep period and a margin
        for attempt in range(1, n):  # a probe touches the session it names: each probes another
            probe, _ = await client.call("list_user_subscriptions", {}, ids[-attempt])
            if probe.get("error", {}).get("code") == SESSION_EXPIRED:
                break
            if time.monotonic() > deadline or attempt == n - 1:
                raise RuntimeError(f"wave {wave} did not expire: {probe}")
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # the workers free what the sweep closed
        rows.append({"step": f"wave {wave}: expired", "opened": opened, "rss_mb": tree_rss_mb(pid),
                     "s": time.perf_counter() - t0, "check": "session expired"})
    await client.http.aclose()
    rows[-1]["limit_waits"] = client.limit_waits
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000, help="sessions opened in all")
    ap.add_argument("--wave", type=int, default=1000, help="sessions live at once (the server's max_sessions)")
    ap.add_argument("--idle-s", type=float, default=30.0,
                    help="the server's session_idle_s (longer than a wave takes to open, so the wave is whole)")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    ap.add_argument("--runs", type=int, default=1, help="whole soaks, each on a fresh server (the median per step)")
    parsed = parse_with_samples(ap, "serve-soak-")
    if parsed is None:
        return 2
    args, work = parsed
    bundle = work / "content_platform_1.json"
    bundle.write_text(awm1k_environment(args.samples).to_json())
    token = secrets.token_urlsafe(32)
    (work / "tokens").write_text(token + "\n")
    os.chmod(work / "tokens", 0o600)
    runs = []
    for run in range(args.runs):
        port = free_port()
        log = work / f"serve-{run}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "env", "serve", str(bundle), "--transport", "http", "--port", str(port),
             "--token-file", str(work / "tokens"), "--max-sessions", str(args.wave), "--session-idle-s",
             str(args.idle_s)], cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=open(log, "w"),
            env={**os.environ, "PYTHONPATH": str(REPO), "AWM_SANDBOX__MEMORY_MB": "4096"})
        try:
            wait_port(port, proc, what=f"awm env serve (see {log})")
            print(f"run {run + 1}/{args.runs}: {args.sessions} sessions in waves of {args.wave}, idle expiry "
                  f"{args.idle_s:g} s ...", file=sys.stderr, flush=True)
            runs.append(asyncio.run(soak(f"http://127.0.0.1:{port}/mcp", token, proc.pid, args)))
        finally:
            stop(proc)
    print()
    print(f"`awm env serve` (bearer token, max_sessions {args.wave}, session_idle_s {args.idle_s:g}), content_platform_1: "
          f"{args.sessions} sessions opened in waves, each left idle until expired; process-tree RSS "
          f"(server + sandbox workers), median of {args.runs} run(s)")
    print()
    print("| step | sessions opened so far | time s | RSS MB | check |")
    print("|---|---:|---:|---:|---|")
    for i, row in enumerate(runs[0]):
        rss = sorted(r[i]["rss_mb"] for r in runs)[len(runs) // 2]
        secs = sorted(r[i]["s"] for r in runs)[len(runs) // 2]
        checks = {r[i].get("check", "") for r in runs}
        print(f"| {row['step']} | {row['opened']} | {secs:.1f} | {rss:.0f} | {', '.join(sorted(checks))} |")
    first = next(r for r in runs[0] if "expired" in r["step"])
    last = [r for r in runs[0] if "expired" in r["step"]][-1]
    start = runs[0][0]["rss_mb"]
    print()
    print(f"after the first wave expired: {first['rss_mb']:.0f} MB; after the last: {last['rss_mb']:.0f} MB "
          f"({last['rss_mb'] - first['rss_mb']:+.0f} MB over {args.sessions - args.wave} more sessions); "
          f"start {start:.0f} MB")
    waits = sum(r[-1].get("limit_waits", 0) for r in runs)
    print(f"new sessions that waited for room at the limit (an expiry probe had touched a session): {waits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

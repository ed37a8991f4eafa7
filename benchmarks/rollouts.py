"""Rollout throughput of the agent loop with a zero-latency scripted policy.

The reference policy replays each task's reference solution, so the policy costs nothing and
what is measured is the loop plus the environment. Side by side in one run (median of --repeats):

- ``direct replay``: the same tool calls straight on a session, no loop (the environment's floor);
- ``loop, sequential``: ``run_episode`` one episode at a time;
- ``loop, N concurrent``: N episodes at once on N threads over one pool (N = --episodes, 1,024);
- ``loop + verifier, N concurrent``: the same, each episode also verified in the sandbox.

Each row gives episodes per second and how an episode's time splits between the environment
(tool calls and database snapshots, including waiting for a worker), the policy and the loop
itself (parsing, bookkeeping, digests). Environments come from the catalog under AWM_HOME; with
``--demo`` (or an empty catalog) the offline demo snapshot is generated first.

    python benchmarks/rollouts.py [--episodes 1024] [--repeats 3] [--workers 2] [--interface direct]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awm_core.agent import ReferencePolicy, run_episode, verify_episode  # noqa: E402
from awm_core.runtime import SandboxPool  # noqa: E402
from awm_core.settings import get_settings  # noqa: E402


def load_environments(settings, demo: bool):
    from storage.catalog import Catalog

    def read():
        try:
            with Catalog.open(settings, read_only=True) as cat:
                return [e for e in cat.environments() if e.solutions and e.verifiers]
        except Exception:
            return []

    envs = [] if demo else read()
    if not envs:
        print("no environments in the catalog: generating the offline demo snapshot first ...", file=sys.stderr)
        from flows.generate import run_generate

        run_generate(scenarios=3)
        envs = read()
    if not envs:
        raise SystemExit("no environments with reference solutions to benchmark")
    return envs


def jobs_for(envs, n: int):
    tasks = [(env, s.task_idx) for env in envs for s in env.solutions if env.verifier(s.task_idx)]
    return [tasks[i % len(tasks)] for i in range(n)]


class Totals:
    def __init__(self):
        self.lock = threading.Lock()
        self.env_s = self.policy_s = self.loop_s = self.verify_s = 0.0
        self.rewards = []

    def add(self, env_s=0.0, policy_s=0.0, loop_s=0.0, verify_s=0.0, reward=None):
        with self.lock:
            self.env_s += env_s
            self.policy_s += policy_s
            self.loop_s += loop_s
            self.verify_s += verify_s
            if reward is not None:
                self.rewards.append(reward)


def direct_replay(pool, handles, jobs, totals):
    """The environment's floor: the same calls and snapshots, without the loop."""
    for env, idx in jobs:
        t0 = time.perf_counter()
        with handles[env.id].open_session() as s:
            s.snapshot()
            for call in env.solution(idx).calls:
                s.call(call.tool, call.arguments)
            s.snapshot()
        totals.add(env_s=time.perf_counter() - t0)


def one_episode(pool, handles, env, idx, interface, settings, verify, totals, barrier=None):
    handle = handles[env.id]
    t0 = time.perf_counter()
    s = handle.open_session()
    opened = time.perf_counter() - t0
    if barrier is not None:
        barrier.wait()  # every session is open: the episodes really run at the same time
    ep = run_episode(ReferencePolicy(env.solution(idx)), s, env.task(idx), handle.tools(), interface=interface)
    t0 = time.perf_counter()
    s.close()
    session_s = opened + time.perf_counter() - t0  # opening and closing the session is environment time too
    verify_s, reward = 0.0, None
    if verify:
        t0 = time.perf_counter()
        reward = verify_episode(pool, env, idx, ep, settings).reward
        verify_s = time.perf_counter() - t0
    totals.add(env_s=ep.env_s + session_s, policy_s=ep.policy_s, loop_s=ep.loop_s, verify_s=verify_s, reward=reward)


def run_mode(mode, pool, handles, jobs, interface, settings):
    totals = Totals()
    t0 = time.perf_counter()
    if mode == "direct":
        direct_replay(pool, handles, jobs, totals)
    elif mode == "sequential":
        for env, idx in jobs:
            one_episode(pool, handles, env, idx, interface, settings, False, totals)
    else:
        verify = mode == "concurrent+verify"
        barrier = threading.Barrier(len(jobs))
        with ThreadPoolExecutor(max_workers=len(jobs)) as ex:
            futures = [ex.submit(one_episode, pool, handles, env, idx, interface, settings, verify, totals, barrier)
                       for env, idx in jobs]
            for f in futures:
                f.result()
    wall = time.perf_counter() - t0
    return wall, totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=1024, help="episodes per measurement (and concurrent episodes)")
    ap.add_argument("--sequential-episodes", type=int, default=256, help="episodes of the sequential rows")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row; the table shows the median")
    ap.add_argument("--workers", type=int, default=None, help="sandbox workers (default: settings.sandbox.workers)")
    ap.add_argument("--interface", default="direct", choices=["direct", "meta"])
    ap.add_argument("--demo", action="store_true", help="generate the offline demo snapshot first")
    args = ap.parse_args()

    settings = get_settings()
    envs = load_environments(settings, args.demo)
    overrides = {"workers": args.workers} if args.workers else {}
    # Every concurrent episode holds a session; the per-call timeout must allow for the queue.
    with SandboxPool(settings.sandbox, call_timeout_s=max(settings.sandbox.call_timeout_s, 120.0), **overrides) as pool:
        handles = {e.id: pool.load(e) for e in envs}
        n_tasks = sum(1 for e in envs for s in e.solutions if e.verifier(s.task_idx))
        rows = [("direct replay (no loop), sequential", "direct", args.sequential_episodes),
                ("loop, sequential", "sequential", args.sequential_episodes),
                (f"loop, {args.episodes} concurrent", "concurrent", args.episodes),
                (f"loop + verifier, {args.episodes} concurrent", "concurrent+verify", args.episodes)]
        results = []
        for label, mode, n in rows:
            jobs = jobs_for(envs, n)
            walls, last = [], None
            for _ in range(args.repeats):
                wall, totals = run_mode(mode, pool, handles, jobs, args.interface, settings)
                walls.append(wall)
                last = totals
            wall = statistics.median(walls)
            busy = last.env_s + last.policy_s + last.loop_s + last.verify_s
            results.append((label, n, wall, n / wall, 1000 * wall / n, last, busy))
            if mode == "concurrent+verify" and last.rewards and min(last.rewards) < 1.0:
                print(f"warning: {sum(r < 1.0 for r in last.rewards)} episode(s) scored below 1.0", file=sys.stderr)

    print(f"\nRollouts: reference policy (zero latency) on {len(envs)} environment(s), {n_tasks} task(s); "
          f"{pool.config.workers} sandbox worker(s); interface {args.interface}; median of {args.repeats} run(s)\n")
    print("| mode | episodes | wall s | episodes/s | env ms/ep | policy ms/ep | loop ms/ep | verifier ms/ep "
          "| env share | loop share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, n, wall, eps, ms, t, busy in results:
        per = lambda x: f"{1000 * x / n:.2f}"  # noqa: E731
        share = (lambda x: f"{100 * x / busy:.1f}%") if busy else (lambda x: "-")  # noqa: E731
        print(f"| {label} | {n} | {wall:.2f} | {eps:.0f} | {per(t.env_s)} | {per(t.policy_s)} | {per(t.loop_s)} | "
              f"{per(t.verify_s) if t.verify_s else '-'} | {share(t.env_s)} | {share(t.loop_s)} |")
    print("\nPer-episode times are sums over episodes divided by their number; with concurrent episodes the "
          "environment time includes waiting for a worker (each worker serves one request at a time), so it "
          "exceeds the wall time per episode.")


if __name__ == "__main__":
    main()

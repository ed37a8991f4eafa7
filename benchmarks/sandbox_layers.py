"""What the kernel layers (namespaces, Landlock, seccomp) cost: tool-call latency and worker
start time with them on and off, interleaved round by round in one run.

    python benchmarks/sandbox_layers.py [--calls 2000] [--rounds 5] [--samples ../shared/awm1k-samples]

"off" is the in-process guards alone (what ``allow_weak_sandbox`` permits on a kernel
without the layers). The AWM-1K row needs the shared samples and is left out without them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from env_runtime import REPO, awm1k_environment, native_environment, stats, time_calls  # noqa: E402

from awm_core.runtime import SandboxPool, kernel  # noqa: E402

OFF = dict(landlock=False, seccomp=False, user_namespace=False, network_namespace=False, separate_uid=False,
           allow_weak_sandbox=True)


def one_round(envs, layers: dict, calls: int) -> dict:
    t = time.perf_counter()
    with SandboxPool(workers=1, call_timeout_s=30, **layers) as pool:
        handles = [pool.load(e) for e, _, _ in envs]
        started = (time.perf_counter() - t) * 1000
        out = {"start_ms": [started], "protections": pool.protections()}
        for (env, tool, args), h in zip(envs, handles):
            with h.open_session() as s:
                out[env.id] = time_calls(s, tool, args, calls)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per environment, all rounds together")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=Path, default=REPO.parent / "shared" / "awm1k-samples")
    args = ap.parse_args()
    envs = [(native_environment(), "get_item", {"item_id": 7})]
    if args.samples.is_dir():
        envs.append((awm1k_environment(args.samples), "search_channels", {"query": "Kurz"}))
    else:
        print(f"no AWM-1K samples at {args.samples}: native environment only", file=sys.stderr)
    results = {"on": {}, "off": {}}
    ratios: dict[str, list[float]] = {e.id: [] for e, _, _ in envs}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        got = {mode: one_round(envs, {} if mode == "on" else OFF, args.calls // args.rounds) for mode in ("on", "off")}
        for mode, res in got.items():
            for k, v in res.items():
                if k != "protections":
                    results[mode].setdefault(k, []).extend(v)
            results[mode]["protections"] = res["protections"]
        for e, _, _ in envs:
            ratios[e.id].append(statistics.median(got["on"][e.id]) / statistics.median(got["off"][e.id]))
    print()
    for mode in ("on", "off"):
        print(f"layers {mode}: {kernel.describe(results[mode]['protections'])}")
    print()
    print("| measure | layers on median | layers off median | on p90 | off p90 | on / off (median of rounds) |")
    print("|---|---:|---:|---:|---:|---:|")
    for e, tool, _ in envs:
        on, off = stats(results["on"][e.id]), stats(results["off"][e.id])
        print(f"| call ms, {e.id} `{tool}` | {on[0]:.3f} | {off[0]:.3f} | {on[1]:.3f} | {off[1]:.3f} | "
              f"{statistics.median(ratios[e.id]):.2f}x |")
    on, off = stats(results["on"]["start_ms"]), stats(results["off"]["start_ms"])
    print(f"| worker start + load ms | {on[0]:.1f} | {off[0]:.1f} | {on[1]:.1f} | {off[1]:.1f} | {on[0] / off[0]:.2f}x |")


if __name__ == "__main__":
    main()

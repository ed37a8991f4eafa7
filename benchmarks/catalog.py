"""Catalog query latency on a synthetic catalog of realistic size.

Builds 1,000 environments (20 categories), 10,000 tasks, 40,000 validation checks, 200,000
LLM calls over a week, 1,000,000 rollouts (two publishes, so the older snapshot can be
queried too) and 1,000,000 tool-call timings, all bulk-inserted from Arrow. Then it times
five typical queries through ``Catalog.sql`` (DuckLake, latest snapshot), the same through
time travel (the snapshot before the second rollout publish), and, as the baseline, the same
SQL on identical data held in plain in-memory DuckDB tables. Median of several runs.

    python benchmarks/catalog.py [--runs 5] [--rollouts 1000000] [--dir PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awm_core.settings import load_settings  # noqa: E402
from storage.catalog import Catalog, connect  # noqa: E402
from storage.rows import ARROW_TYPES  # noqa: E402
from storage.schema import TABLES  # noqa: E402

QUERIES = {
    "pass rate per scenario category": """
        SELECT s.category, avg(v.passed::INT) AS pass_rate, count(DISTINCT v.env_id) AS envs
        FROM validation_results v JOIN scenarios s USING (env_id)
        GROUP BY s.category ORDER BY pass_rate""",
    "reward by model and snapshot": """
        SELECT model, snapshot, avg(reward) AS mean_reward, count(*) AS episodes
        FROM rollouts GROUP BY ALL ORDER BY ALL""",
    "failing stages last night": """
        SELECT stage, count(*) AS failures, count(DISTINCT scenario_id) AS scenarios
        FROM llm_calls WHERE error IS NOT NULL AND created_at >= TIMESTAMPTZ '{night}'
        GROUP BY stage ORDER BY failures DESC""",
    "top-10 slowest tools (p95)": """
        SELECT env_id, tool, count(*) AS calls, quantile_cont(latency_s, 0.95) AS p95_s
        FROM tool_calls GROUP BY ALL ORDER BY p95_s DESC LIMIT 10""",
    "token cost per environment": """
        SELECT scenario_id AS env_id, sum(prompt_tokens + completion_tokens) AS tokens, sum(cost_usd) AS cost_usd
        FROM llm_calls GROUP BY 1 ORDER BY cost_usd DESC LIMIT 20""",
}


def table(name: str, cols: dict[str, np.ndarray | list]) -> pa.Table:
    t = TABLES[name]
    n = len(next(iter(cols.values())))
    arrays = []
    for c in t.columns:
        v = cols.get(c.name)
        arrays.append(pa.nulls(n, ARROW_TYPES[c.type]) if v is None else pa.array(v, ARROW_TYPES[c.type]))
    return pa.Table.from_arrays(arrays, names=list(t.column_names))


def synthesize(rng: np.random.Generator, n_envs: int, n_rollouts: int, now: datetime) -> dict[str, pa.Table]:
    cats = [f"category_{i:02d}" for i in range(20)]
    env_ids = np.array([f"env_{i:04d}" for i in range(n_envs)])
    env_cat = rng.choice(cats, n_envs)
    tasks_per_env = 10
    t_env = np.repeat(env_ids, tasks_per_env)
    t_idx = np.tile(np.arange(tasks_per_env), n_envs)
    now_arr = [now] * n_envs
    out = {
        "scenarios": table("scenarios", {"env_id": env_ids, "name": env_ids, "description": ["synthetic"] * n_envs,
                                         "category": env_cat, "published_at": now_arr}),
        "environments": table("environments", {
            "env_id": env_ids, "name": env_ids, "category": env_cat, "flavour": ["native"] * n_envs,
            "source": ["generated"] * n_envs, "digest": env_ids, "tool_count": rng.integers(20, 50, n_envs),
            "task_count": [tasks_per_env] * n_envs, "verifier_count": [tasks_per_env] * n_envs,
            "table_count": rng.integers(5, 20, n_envs), "seed_statement_count": rng.integers(50, 200, n_envs),
            "missing": [[] for _ in range(n_envs)], "validation_passed": rng.random(n_envs) < 0.9,
            "published_at": now_arr, "bundle": ['{"id": "%s"}' % e for e in env_ids]}),
        "tasks": table("tasks", {"env_id": t_env, "task_idx": t_idx,
                                 "task_id": [f"{e}/{i}" for e, i in zip(t_env, t_idx)],
                                 "text": ["do something useful"] * len(t_env), "has_verifier": [True] * len(t_env)}),
    }
    checks_per_task = 4
    v_env = np.repeat(t_env, checks_per_task)
    nv = len(v_env)
    out["validation_results"] = table("validation_results", {
        "env_id": v_env, "check_idx": np.tile(np.arange(tasks_per_env * checks_per_task), n_envs),
        "name": rng.choice(["verifier_solution", "verifier_noop", "tool_example", "replay_determinism"], nv),
        "passed": rng.random(nv) < 0.93, "task_idx": np.repeat(t_idx, checks_per_task)})
    n_calls = 200_000
    week = rng.random(n_calls) * 7 * 86400
    out["llm_calls"] = table("llm_calls", {
        "call_id": [f"c{i}" for i in range(n_calls)], "run_id": [f"night-{int(w // 86400)}" for w in week],
        "role": ["generator"] * n_calls,
        "stage": rng.choice(["scenario", "tasks", "schema", "seed_data", "spec", "code", "verifier.0", "solution.0"], n_calls),
        "scenario_id": rng.choice(env_ids, n_calls), "attempt": rng.integers(1, 6, n_calls), "model": ["gpt-5"] * n_calls,
        "prompt_tokens": rng.integers(500, 8000, n_calls), "completion_tokens": rng.integers(100, 6000, n_calls),
        "latency_s": rng.random(n_calls) * 30, "cost_usd": rng.random(n_calls) * 0.05,
        "error": np.where(rng.random(n_calls) < 0.05, "validation failed", None),
        "created_at": [now - timedelta(seconds=float(w)) for w in week]})
    r_env = rng.choice(env_ids, n_rollouts)
    labels = rng.choice(["completed", "partial", "agent_error", "environment_error", "format_error"], n_rollouts,
                        p=[0.45, 0.15, 0.3, 0.05, 0.05])
    reward = np.select([labels == "completed", labels == "partial", labels == "format_error"], [1.0, 0.1, -1.0], 0.0)
    created = pa.array(np.full(n_rollouts, np.datetime64(now.replace(tzinfo=None), "us")), pa.timestamp("us", tz="UTC"))
    out["rollouts"] = table("rollouts", {
        "rollout_id": pa.array([f"r{i}" for i in range(n_rollouts)]), "run_id": rng.choice(["eval-a", "eval-b", "train-1"], n_rollouts),
        "snapshot": rng.integers(1, 8, n_rollouts), "env_id": r_env, "task_idx": rng.integers(0, tasks_per_env, n_rollouts),
        "split": rng.choice(["train", "val", "test"], n_rollouts, p=[0.8, 0.1, 0.1]),
        "policy": ["llm"] * n_rollouts, "model": rng.choice(["qwen3-4b", "qwen3-8b", "gpt-5-mini", "ckpt-200"], n_rollouts),
        "episode_idx": rng.integers(0, 4, n_rollouts), "reward": reward, "label": labels,
        "env_error": labels == "environment_error", "turns": rng.integers(1, 20, n_rollouts),
        "prompt_tokens": rng.integers(1000, 30000, n_rollouts), "completion_tokens": rng.integers(50, 3000, n_rollouts),
        "tool_calls": rng.integers(0, 15, n_rollouts), "duration_s": rng.random(n_rollouts) * 60,
        "env_time_s": rng.random(n_rollouts), "created_at": created})
    tools = np.array([f"tool_{i:02d}" for i in range(40)])
    out["tool_calls"] = table("tool_calls", {
        "rollout_id": out["rollouts"].column("rollout_id"), "call_idx": np.zeros(n_rollouts, dtype=np.int32),
        "env_id": r_env, "tool": rng.choice(tools, n_rollouts), "ok": rng.random(n_rollouts) < 0.9,
        "latency_s": rng.lognormal(-6, 1, n_rollouts), "created_at": created})
    return out


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up: metadata and file footers cached as they would be in a live session
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--envs", type=int, default=1000)
    ap.add_argument("--rollouts", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None, help="AWM_HOME to build in (default: a temporary folder)")
    ap.add_argument("--target-ms", type=float, default=200.0)
    args = ap.parse_args()

    home = Path(args.dir or tempfile.mkdtemp(prefix="awm-bench-"))
    os.environ["AWM_HOME"] = str(home)
    settings = load_settings(home=home)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    rng = np.random.default_rng(7)
    t0 = time.perf_counter()
    data = synthesize(rng, args.envs, args.rollouts, now)
    t_synth = time.perf_counter() - t0

    cat = Catalog.open(settings)
    half = args.rollouts // 2
    t0 = time.perf_counter()
    with cat.publish(message="bench: environments, llm calls, first half of rollouts") as pub:
        for name in ("scenarios", "environments", "tasks", "validation_results", "llm_calls"):
            pub.add_arrow(name, data[name])
        pub.add_arrow("rollouts", data["rollouts"].slice(0, half))
        pub.add_arrow("tool_calls", data["tool_calls"].slice(0, half))
    older = pub.snapshot_id
    with cat.publish(message="bench: second half of rollouts") as pub:
        pub.add_arrow("rollouts", data["rollouts"].slice(half))
        pub.add_arrow("tool_calls", data["tool_calls"].slice(half))
    t_load = time.perf_counter() - t0

    base = connect()
    for name, tbl in data.items():
        base.register(f"_{name}", tbl)
        base.execute(f"CREATE TABLE {name} AS SELECT * FROM _{name}")
    night = (now - timedelta(days=1)).isoformat()

    print(f"synthetic catalog: {args.envs:,} environments, {data['tasks'].num_rows:,} tasks, "
          f"{data['validation_results'].num_rows:,} validation checks, {data['llm_calls'].num_rows:,} LLM calls, "
          f"{args.rollouts:,} rollouts, {data['tool_calls'].num_rows:,} tool calls")
    print(f"generated in {t_synth:.1f} s, published (2 snapshots) in {t_load:.1f} s; median of {args.runs} runs, "
          f"target <= {args.target_ms:.0f} ms\n")
    header = ("query", "rows", "catalog latest (ms)", f"catalog @ snapshot {older} (ms)", "in-memory DuckDB (ms)", "target")
    rows = []
    for label, sql in QUERIES.items():
        sql = sql.format(night=night)
        n = cat.sql(sql).num_rows
        latest = median_ms(lambda: cat.sql(sql), args.runs)
        travel = median_ms(lambda: cat.sql(sql, snapshot=older), args.runs)
        plain = median_ms(lambda: base.execute(sql).fetchall(), args.runs)
        rows.append((label, str(n), f"{latest:.1f}", f"{travel:.1f}", f"{plain:.1f}",
                     "met" if latest <= args.target_ms else "MISSED"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    cat.close()
    base.close()
    if not args.dir:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GRPO training throughput on the offline demo environments: rollout tokens per second, step
time, and the share of step time spent outside the model (environments, verifiers, the loop).

    python benchmarks/train_gpu.py --out DIR                  # GPU: Qwen3-0.6B shapes, bf16, CUDA
    python benchmarks/train_gpu.py --out DIR --tiny           # CPU smoke run (about a minute)
    python benchmarks/train_gpu.py --out DIR --shape qwen3-1.7b --modes batched,unbatched

Everything is local: the demo environments are assembled from the recorded replies in
awm_core/fixtures/demo, the tokenizer is trained on their text, the model is randomly
initialised from a Qwen3-shaped config and warm-started on the reference solutions (so it calls
tools and episodes span several turns), then the real trainer (``AWMGRPOTrainer``, TRL's
GRPOTrainer) runs a few steps with episodes in real sandbox sessions. Modes: ``batched``
generates every waiting episode's turn in one batch (the trainer's default), ``unbatched``
generates one turn at a time (``generation_batch=1``), the naive loop, as the baseline.
Writes ``DIR/train_gpu.json`` and prints a table (medians over the steps after the first).
Needs no prefect, duckdb, mcp or openai; the sandbox workers need fastapi, starlette and
sqlalchemy installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NEEDED = ["torch", "transformers", "accelerate", "tokenizers", "trl", "datasets", "pydantic", "pydantic_settings",
          "jsonschema", "fastapi", "starlette", "sqlalchemy"]


def preflight() -> None:
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"missing packages: {', '.join(missing)} (fastapi, starlette and sqlalchemy are imported by the "
              "sandbox worker processes; the rest by the trainer)", file=sys.stderr)
        sys.exit(2)


def build_config(args, mode: str):
    from awm_core.train.config import TrainConfig

    cuda = not args.tiny
    return TrainConfig(
        model=f"random:{args.shape}", group_size=args.group, tasks_per_step=args.tasks_per_step,
        max_turns=args.max_turns, window=args.window, interface=args.interface, learning_rate=1e-6,
        steps=args.steps, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, temperature=1.0,
        max_tokens_per_microbatch=args.max_tokens_per_microbatch, bf16=cuda, gradient_checkpointing=cuda, sandbox_workers=args.sandbox_workers,
        generation_batch=1 if mode == "unbatched" else args.generation_batch, accelerate_config="single_gpu" if cuda
        else "cpu", warmstart_steps=args.warmstart_steps, warmstart_lr=args.warmstart_lr, seed=0)


def run_mode(args, mode: str, envs, tasks, settings) -> dict:
    from awm_core.train.trainer import run_training

    run_dir = Path(args.out) / f"run-{mode}"
    cfg = build_config(args, mode)
    t0 = time.perf_counter()
    run_training(cfg, envs, tasks, run_dir, settings)
    total = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    warm = json.loads((run_dir / "warmstart.json").read_text()) if (run_dir / "warmstart.json").exists() else None
    steps = []
    for m in metrics:
        step_s, rollout_s, gen_s = m.get("step_s") or 0.0, m.get("awm/rollout_s") or 0.0, m.get("awm/generate_s") or 0.0
        tokens = m.get("awm/rollout_tokens") or 0.0
        outside = max(0.0, rollout_s - gen_s)  # rollout wall time with no generation running
        steps.append({
            "step": m["step"], "step_s": step_s, "rollout_s": rollout_s, "generate_s": gen_s, "outside_model_s": outside,
            "update_s": m.get("update_s"), "env_s_sum": m.get("awm/env_s"), "verify_s_sum": m.get("awm/verify_s"),
            "episodes": m.get("awm/episodes"), "rollout_tokens": tokens, "samples": m.get("awm/samples"),
            "train_tokens": m.get("awm/train_tokens"),
            "tokens_per_s_generate": tokens / gen_s if gen_s else None,
            "tokens_per_s_rollout": tokens / rollout_s if rollout_s else None,
            "env_share_of_step": outside / step_s if step_s else None,
            "reward": m.get("reward"), "completion_rate": m.get("awm/completion_rate"),
            "format_error_rate": m.get("awm/format_error_rate"), "mean_turns_proxy": m.get("awm/samples"),
        })
    timed = steps[1:] if len(steps) > 1 else steps
    keys = ["step_s", "rollout_s", "generate_s", "outside_model_s", "update_s", "rollout_tokens",
            "tokens_per_s_generate", "tokens_per_s_rollout", "env_share_of_step", "reward", "completion_rate",
            "format_error_rate"]
    median = {k: statistics.median([s[k] for s in timed if s[k] is not None]) if any(s[k] is not None for s in timed)
              else None for k in keys}
    return {"mode": mode, "config": cfg.to_dict(), "wall_s": total, "warmstart": warm, "steps": steps,
            "median_after_first": median}


def table(results: list[dict]) -> str:
    head = ("| mode | step | step s | rollout s | generate s | outside model s | update s | rollout tokens | "
            "tok/s generate | tok/s rollout | env share | reward | completed | format err |")
    lines = [head, "|" + "---|" * 14]

    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    for r in results:
        rows = r["steps"] + [{"step": "median", **r["median_after_first"]}]
        for s in rows:
            lines.append(f"| {r['mode']} | {s['step']} | {f(s['step_s'])} | {f(s['rollout_s'])} | {f(s['generate_s'])} | "
                         f"{f(s['outside_model_s'])} | {f(s['update_s'])} | {f(s['rollout_tokens'], '{:.0f}')} | "
                         f"{f(s['tokens_per_s_generate'], '{:.0f}')} | {f(s['tokens_per_s_rollout'], '{:.0f}')} | "
                         f"{f(s['env_share_of_step'], '{:.1%}')} | {f(s['reward'], '{:.3f}')} | "
                         f"{f(s['completion_rate'], '{:.0%}')} | {f(s['format_error_rate'], '{:.0%}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train_gpu.json and the run folders")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model")
    p.add_argument("--shape", default=None, help="model shape (default qwen3-0.6b; tiny with --tiny)")
    p.add_argument("--modes", default=None, help="comma list of batched,unbatched (default batched; both with --tiny)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--tasks-per-step", type=int, default=None)
    p.add_argument("--group", type=int, default=None)
    p.add_argument("--max-turns", type=int, default=None)
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--interface", default="meta", choices=["meta", "direct"])
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per turn")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longer contexts end the episode (default 8192; 1024 with --tiny: CPU attention is quadratic)")
    p.add_argument("--max-tokens-per-microbatch", type=int, default=None)
    p.add_argument("--generation-batch", type=int, default=64)
    p.add_argument("--warmstart-steps", type=int, default=None)
    p.add_argument("--warmstart-lr", type=float, default=None)
    p.add_argument("--sandbox-workers", type=int, default=4)
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the run folders' model checkpoints (deleted by default: large)")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(shape="tiny" if tiny else "qwen3-0.6b", max_prompt_tokens=1024 if tiny else 8192, modes="batched,unbatched" if tiny else "batched",
                    steps=2 if tiny else 4, tasks_per_step=2 if tiny else 4, group=2 if tiny else 8,
                    max_turns=3 if tiny else 8, max_tokens=24 if tiny else 128,
                    max_tokens_per_microbatch=4096 if tiny else 32768,
                    warmstart_steps=20 if tiny else 200, warmstart_lr=1e-3 if tiny else 3e-4)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if tiny:
        args.sandbox_workers = min(args.sandbox_workers, 2)
    preflight()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AWM_HOME", str(out / "home"))
    os.environ.setdefault("AWM_CONFIG", str(out / "none.toml"))
    for k, v in {"TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)

    import torch
    import transformers
    import trl

    from awm_core.settings import load_settings
    from awm_core.train.demo import demo_environments

    if not tiny and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    envs = demo_environments()
    tasks = [(e.id, t.idx, t.text) for e in envs for t in e.tasks if e.verifier(t.idx) is not None]
    settings = load_settings()
    results = [run_mode(args, mode.strip(), envs, tasks, settings) for mode in args.modes.split(",") if mode.strip()]

    from awm_core.train.models import SHAPES

    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not tiny else platform.processor()
        or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__},
        "shape": {"name": args.shape, **SHAPES[args.shape]}, "environments": [e.id for e in envs],
        "tasks": len(tasks), "results": results,
        "notes": "env share = (rollout wall time with no generation running) / step time; it covers tool calls, "
                 "snapshots, verifiers and the loop's own work. tok/s generate = generated tokens / time inside "
                 "generate; tok/s rollout = generated tokens / rollout wall time. Medians exclude the first step.",
    }
    params = None
    run_dir = out / f"run-{results[0]['mode']}" / "checkpoints" / "final"
    if (run_dir / "config.json").exists():
        cfg = json.loads((run_dir / "config.json").read_text())
        report["model_config"] = {k: cfg.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                          "intermediate_size", "num_attention_heads")}
        params = sum(v for v in [_param_count(cfg)] if v)
    report["parameters"] = params
    if not args.keep_checkpoints:
        import shutil

        for r in results:
            shutil.rmtree(out / f"run-{r['mode']}" / "checkpoints", ignore_errors=True)
    (out / "train_gpu.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"device: {report['device']}; shape {args.shape} ({params or '?'} parameters); "
          f"{len(envs)} environments, {len(tasks)} tasks; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}")
    for r in results:
        if r["warmstart"]:
            w = r["warmstart"]
            print(f"{r['mode']}: warm start {len(w['losses'])} steps on {w['samples']} samples in {w['seconds']:.1f}s, "
                  f"loss {w['losses'][0]:.3f} -> {w['losses'][-1]:.3f}" if w["losses"] else f"{r['mode']}: no warm start samples")
    print(table(results))
    print(f"wrote {out / 'train_gpu.json'}")
    return 0


def _param_count(cfg: dict) -> int | None:
    """Parameters of a Qwen3 config (tied embeddings), from its shapes."""
    try:
        h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim") or h // cfg[
            "num_attention_heads"]
    except KeyError:
        return None
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * hd
    mlp = 3 * h * i
    return v * h + n * (attn + mlp + 2 * h) + h


if __name__ == "__main__":
    sys.exit(main())

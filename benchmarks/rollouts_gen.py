"""Rollout generation throughput: the continuous scheduler against lockstep, in one run.

Rollouts with a tiny random Qwen3-shaped model (``models.random_model("tiny")``, a tokenizer trained
on the application's text), on CPU. Three workloads:

- ``equal``: real rollouts (``EpisodeRunner``: the agent loop, real sandbox sessions of a small
  counter application, verifiers); every completion is exactly ``--max-tokens`` long (end of
  sequence never sampled) and every episode one turn: nothing for the scheduler to win, and it
  must not lose either;
- ``mixed completions``: the same real rollouts with end of sequence likely (completions of 1 to
  ``--max-tokens`` tokens, one turn each);
- ``mixed turns``: the same real rollouts and model, and every reply the model generates for the
  second task is swapped for a well-formed tool call (a random model never writes one), so those
  episodes run four turns (three real tool calls in the sandbox) and the first task's episodes
  one; generation cost and lengths are the model's own.

Each workload runs ``--repeats`` times per scheduler, alternating, and the table gives medians:
rollout (step) seconds, generated tokens per second of rollout wall time, engine calls (generate
calls, or for the step and paged engines the decode steps that ended at least one row), cuts
(generate batches ended early for waiting requests) and episodes per second. Engines
(``--engines``): ``transformers`` is what training uses, ``model.generate`` under lockstep and
``HFStepEngine`` (per-token continuous batching) under the continuous scheduler; ``generate-cut``
is ``model.generate`` under both (the continuous scheduler handing rows back as they finish and
cutting batches for waiting requests), kept to show why training does not use it on CPU;
``paged`` is transformers' continuous batching (for GPUs).

    python benchmarks/rollouts_gen.py [--repeats 5] [--episodes 16] [--max-tokens 48]
    python benchmarks/rollouts_gen.py --gpu        # on a CUDA machine: Qwen3-0.6B shapes, bf16,
                                                   # 64 episodes, 256 tokens, also the paged engine

Wall times on a shared machine swing; compare the two schedulers within one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awm_core.models import Environment, ToolCall  # noqa: E402
from awm_core.train.toy import counters  # noqa: E402

MIXED_PLANS = [
    # Task 0: one call (two turns with the answer); task 1: three calls (four turns).
    ("Add 2 to the counter named apples.", [ToolCall(tool="add", arguments={"name": "apples", "amount": 2})],
     {"apples": 7, "pears": 1}),
    ("Read the pears counter, then add 3 to pears and 1 to apples.",
     [ToolCall(tool="get_counter", arguments={"name": "pears"}),
      ToolCall(tool="add", arguments={"name": "pears", "amount": 3}),
      ToolCall(tool="add", arguments={"name": "apples", "amount": 1})], {"apples": 6, "pears": 4}),
]


def counter_environment() -> Environment:
    return counters(MIXED_PLANS)


def eos_bias(model, token_ids, bias: float):
    """An untied output layer with a bias on ``token_ids`` (a model that stops early, or never)."""
    import torch

    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device,
                           dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for t in token_ids:
            head.bias[t] = bias
    model.lm_head = head
    return model


def build_model(args, tok, workload: str):
    import torch

    from awm_core.train import models

    model = models.random_model(args.shape, tok, seed=0)
    model.to("cuda" if args.gpu else "cpu")
    stop = [tok.convert_tokens_to_ids(models.EOS), tok.pad_token_id]
    if workload == "equal":
        eos_bias(model, stop, -1e4)
    else:
        eos_bias(model, stop[:1], args.eos_bias)
    if args.gpu:
        model.to(torch.bfloat16)
    model.eval()
    return model, stop


class ToolCallingEngine:
    """Real generation, with the replies to prompts of one task swapped for a tool call."""

    def __init__(self, inner, tok, marker: str, stop):
        from awm_core.agent import format_text_tool_call

        self.inner, self.tok, self.marker = inner, tok, marker
        self.streaming = inner.streaming
        self.max_new_tokens = inner.max_new_tokens
        text = format_text_tool_call("get_counter", {"name": "pears"})
        self.call = tok(text, add_special_tokens=False)["input_ids"] + [stop[0]]
        self.swapped: set[str] = set()

    def _swap(self, prompt, tokens):
        return list(self.call) if self.marker in self.tok.decode(prompt) else tokens

    def run(self, prompts, budgets, on_done=None, should_cut=None):  # batch engines
        done = None if on_done is None else (lambda i, t: on_done(i, self._swap(prompts[i], t)))
        outs = self.inner.run(prompts, budgets, done, should_cut)
        return [(self._swap(p, t) if fin else t, fin) for p, (t, fin) in zip(prompts, outs)]

    def submit(self, key, prompt, budget):  # streaming engines
        if self.marker in self.tok.decode(prompt):
            self.swapped.add(key)
        self.inner.submit(key, prompt, budget)

    def collect(self, timeout):
        return [(k, list(self.call) if k in self.swapped else t, e) for k, t, e in self.inner.collect(timeout)]

    def cancel(self, key):
        self.inner.cancel(key)

    def start(self):
        getattr(self.inner, "start", lambda: None)()

    def stop(self):
        getattr(self.inner, "stop", lambda: None)()


def engine_for(name: str, mode: str, model, tok, args, stop):
    """``transformers``: lockstep batches run ``model.generate`` (``HFEngine``, the old path), the
    continuous scheduler runs ``HFStepEngine``; ``generate-cut``: ``HFEngine`` under the continuous
    scheduler (rows handed back as they finish, batches cut for waiting requests); ``paged``:
    transformers' continuous batching."""
    from awm_core.train.rollout import make_engine

    return make_engine("paged" if name == "paged" else "transformers",
                       mode if name == "transformers" else "lockstep",  # generate-cut: HFEngine, whatever the mode
                       model, tok, max_new_tokens=args.max_tokens, temperature=1.0, eos_token_ids=stop,
                       max_rows=args.episodes, max_context=args.max_prompt_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per scheduler and workload (median shown)")
    ap.add_argument("--episodes", type=int, default=None, help="episodes per rollout (default 16; 64 with --gpu)")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per turn (default 48; 256 with --gpu)")
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-prompt-tokens", type=int, default=2048)
    ap.add_argument("--eos-bias", type=float, default=3.5, help="logit bias of EOS in the mixed-completions model")
    ap.add_argument("--workloads", default="equal,mixed completions,mixed turns")
    ap.add_argument("--engines", default=None, help="comma list of transformers,generate-cut,paged (default "
                                                     "transformers; transformers,paged with --gpu)")
    ap.add_argument("--gpu", action="store_true", help="CUDA, Qwen3-0.6B shapes, bf16")
    ap.add_argument("--shape", default=None, help="model shape (default tiny; qwen3-0.6b with --gpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: steadier on a shared machine)")
    args = ap.parse_args(argv)
    args.episodes = args.episodes or (64 if args.gpu else 16)
    args.max_tokens = args.max_tokens or (256 if args.gpu else 48)
    args.shape = args.shape or ("qwen3-0.6b" if args.gpu else "tiny")
    engines = (args.engines or ("transformers,paged" if args.gpu else "transformers")).split(",")

    import torch

    from awm_core.runtime import SandboxPool
    from awm_core.settings import load_settings
    from awm_core.train import models
    from awm_core.train.rollout import EpisodeRunner

    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 2
    if args.threads or not args.gpu:
        torch.set_num_threads(args.threads or 1)
    env = counter_environment()
    tok = models.train_tokenizer(models.corpus([env]), vocab_size=1024)
    settings = load_settings()
    tasks = [(env.id, i % 2) for i in range(args.episodes)]
    rows = []
    with SandboxPool(settings.sandbox, workers=2) as pool:
        runners = {mode: EpisodeRunner(pool, [env], settings, tokenizer=tok, interface="direct",
                                       max_turns=args.max_turns, window=3, max_prompt_tokens=args.max_prompt_tokens,
                                       max_batch=args.episodes, scheduler=mode)
                   for mode in ("lockstep", "continuous")}
        for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            model, stop = build_model(args, tok, workload)
            for engine_name in engines:
                runs: dict[str, list] = {"lockstep": [], "continuous": []}
                for rep in range(args.repeats + 1):  # the first round warms up (not counted)
                    for mode in ("lockstep", "continuous") if rep % 2 == 0 else ("continuous", "lockstep"):
                        torch.manual_seed(rep)
                        engine = engine_for(engine_name, mode, model, tok, args, stop)
                        t0 = time.perf_counter()
                        if workload == "mixed turns":
                            engine = ToolCallingEngine(engine, tok, "Read the pears counter", stop)
                        batch = runners[mode].run(tasks, engine)
                        wall = time.perf_counter() - t0
                        if rep:
                            turns = sum(len(r.episode.turns) for r in batch.results)
                            runs[mode].append((wall, batch.completion_tokens, batch.batches, batch.cuts, turns))
                for mode in ("lockstep", "continuous"):
                    rs = runs[mode]
                    med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
                    rows.append((workload, engine_name, mode, med(0), statistics.median(r[1] / r[0] for r in rs),
                                 med(1), med(4), med(2), med(3), args.episodes / med(0)))
                print(f"done: {workload} / {engine_name}", file=sys.stderr)

    device = torch.cuda.get_device_name(0) if args.gpu else "CPU"
    print(f"\nRollout generation: {args.episodes} episodes per rollout, shape {args.shape}, {device} "
          f"({torch.get_num_threads()} threads), up to {args.max_turns} turns x {args.max_tokens} new tokens, "
          f"median of {args.repeats} run(s) per row\n")
    print("| workload | engine | scheduler | rollout s | tokens/s | tokens | turns | engine calls | cuts | "
          "episodes/s | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for w, e, mode, wall, tps, tokens, turns, calls, cuts, eps in rows:
        if mode == "lockstep":
            base[(w, e)] = wall
        speed = base.get((w, e), wall) / wall
        print(f"| {w} | {e} | {mode} | {wall:.3f} | {tps:.0f} | {tokens:.0f} | {turns:.0f} | {calls:.0f} | "
              f"{cuts:.0f} | {eps:.1f} | {speed:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

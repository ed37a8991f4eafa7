"""Stock TRL GRPO on AWM environments: ``GRPOTrainer(..., environment_factory=...)``.

    python examples/trl_grpo.py                       # the built-in counters toy, tiny random model
    python examples/trl_grpo.py --catalog --envs a,b  # environments of the newest gated catalog snapshot
    python examples/trl_grpo.py --model PATH          # a saved causal LM folder instead of the tiny one

Tool calls run in sandbox workers through a SandboxPool; the reward is the task verifier's verdict
mapped with the project's reward settings.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", action="store_true", help="train on the catalog instead of the toy")
    ap.add_argument("--snapshot", type=int, default=None, help="catalog snapshot (default: newest gated)")
    ap.add_argument("--envs", default=None, help="comma-separated environment ids (default: all in the snapshot)")
    ap.add_argument("--model", default=None, help="saved model folder (default: a tiny random Qwen3-shaped model)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from trl import GRPOConfig, GRPOTrainer

    from awm_core.runtime.pool import SandboxPool
    from awm_core.settings import get_settings
    from awm_core.train.models import load_model, load_tokenizer, random_model, train_tokenizer
    from awm_core.train.toy import counters
    from awm_core.train.trl_env import awm_reward, trl_dataset, trl_environment_factory

    settings = get_settings()
    if a.catalog:
        from awm_core.errors import CatalogError
        from storage.catalog import Catalog

        try:  # no catalog, an unknown snapshot or environment: one line, not a traceback
            cat = Catalog.open(settings, read_only=True)
            try:
                snap = a.snapshot if a.snapshot is not None else cat.latest_gated_snapshot()
                if snap is None:
                    raise SystemExit("error: the catalog has no gated snapshot; pass --snapshot")
                ids = a.envs.split(",") if a.envs else None
                envs = list(cat.environments(snap, ids=ids))
            finally:
                cat.close()
        except CatalogError as exc:
            raise SystemExit(f"error: {exc}") from None
    else:
        envs = [counters()]
    dataset = trl_dataset(envs)
    if a.model:
        tok, model = load_tokenizer(a.model), load_model(a.model)
    else:
        texts = [t.text for e in envs for t in e.tasks] * 20
        tok = train_tokenizer(texts, vocab_size=400)
        model = random_model("tiny", tok)
    out = a.out or tempfile.mkdtemp(prefix="trl-grpo-")
    args = GRPOConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=32, max_tool_calling_iterations=4, logging_steps=1,
                      report_to=[], save_strategy="no", use_cpu=not a.model)
    with SandboxPool(settings.sandbox) as pool:
        trainer = GRPOTrainer(model=model, processing_class=tok, train_dataset=dataset, reward_funcs=[awm_reward],
                              environment_factory=trl_environment_factory(pool, envs, settings), args=args)
        trainer.train()
    last = [h for h in trainer.state.log_history if "reward" in h][-1]
    print({"steps": trainer.state.global_step, "reward": last["reward"]})
    return last


if __name__ == "__main__":
    main()

"""GRPO on multi-turn tool-use episodes with TRL's ``GRPOTrainer``.

Each dataset row is a task; TRL repeats it ``group_size`` times and hands the prompts to its
``rollout_func`` hook (``EpisodeRollout``), which runs every repeat as a full episode in a fresh
sandbox session and returns the verifier's reward. TRL then computes the group-relative
advantages (environment-error episodes carry reward None: they are left out of the group
baseline and get advantage 0). ``AWMGRPOTrainer`` finally replaces TRL's one-sequence-per-
episode batch with the episodes' training samples (``awm_core.train.samples``): with a window
``w`` one sample per step conditioned on the context the agent loop showed, each carrying its
episode's advantage; tool results are masked out of the loss, and environment-error episodes
are masked out completely.

``run_training(config, environments, tasks, run_dir, settings)`` is what ``accelerate launch``
runs (through ``awm_core.train.launch``): per-step metrics go to ``run_dir/metrics.jsonl``,
episodes to ``run_dir/rollouts.rank<k>.jsonl`` (each with its ``mode``: ``message``, or
``conversation`` for tau2-bench's tasks and, with ``config.mode = "conversation"``, synthesized tasks
with a user scenario), LLM calls (the judge's, the user simulator's; one budget for the run) to
``run_dir/llm_calls.rank<k>.jsonl``, checkpoints to the checkpoint folder, and the final model and
tokenizer to ``<checkpoint folder>/final``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from awm_core.errors import AWMError, SettingsError
from awm_core.train.config import TrainConfig
from awm_core.train.rollout import EpisodeRollout, EpisodeRunner, episode_reward, make_engine
from awm_core.train.samples import microbatch_cost, pack_microbatches

FINAL = "final"

# Where this trainer leans on TRL beyond its public API, each with why. The pinned TRL has them;
# tests/train/test_trl_coupling.py fails naming the entry when an upgrade drops or reshapes one.
TRL_COUPLING: dict[str, str] = {
    "GRPOTrainer.__init__(rollout_func=...)": "TRL's experimental rollout hook: an episode per repeat, "
                                              "in a sandbox session, instead of one generate call",
    "GRPOTrainer._generate_and_score_completions(inputs)": "overridden: start the episodes' batch, let TRL "
                                                           "score them (group advantages), then replace its "
                                                           "one-sequence batch with the episodes' step samples",
    "GRPOTrainer._prepare_inputs(generation_batch)": "overridden: one generation per num_iterations optimizer "
                                                     "steps, handed to training_step whole (no row-count split)",
    "GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, "
    "batch_size)": "called: old and reference log-probabilities of each micro-batch",
    "GRPOTrainer._compute_loss(model, inputs)": "called: TRL's GRPO loss on each micro-batch",
    "self._step, self._metrics, self.num_iterations, self._tokenizer, self.ref_model": "attributes TRL sets "
                                                                                       "and this trainer reads",
    "trl.trainer.utils.use_adapter(model, adapter_name)": "LoRA: the reference is the policy without its adapters",
    "trl.models.unwrap_model_for_generation": "the model the rollout engines generate with",
}


class AWMGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rollouts are episodes and whose samples are the episodes' steps."""

    def __init__(self, *args: Any, awm_rollout: EpisodeRollout, token_budget: int = 32768,
                 negate_advantages: bool = False, **kwargs: Any):
        self.awm_rollout = awm_rollout
        self.awm_token_budget = token_budget
        self.awm_advantage_sign = -1.0 if negate_advantages else 1.0
        super().__init__(*args, rollout_func=awm_rollout, reward_funcs=[episode_reward], **kwargs)
        self.awm_last: dict[str, Any] = {}

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self.awm_rollout.begin([(x["env_id"], int(x["task_idx"])) for x in inputs])
        out = super()._generate_and_score_completions(inputs)
        batch = self.awm_rollout.last
        if batch is None:
            raise AWMError("the rollout produced no episodes")
        t0 = time.perf_counter()
        out = self._expand_to_samples(out, batch)
        self._record_rollout_metrics(batch, out, time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------------ samples
    def _prepare_inputs(self, generation_batch: Any) -> Any:
        # One generation per ``num_iterations`` optimizer steps (steps_per_generation = 1): the
        # samples go to ``training_step`` whole, as token-budget micro-batches, without TRL's
        # row-count split.
        if self.model.training:
            # With updates_per_batch > 1 the same episodes serve that many optimizer steps (their
            # sampling-time log-probabilities are kept, so the clipped ratio bounds every update).
            if self._step % self.num_iterations == 0 or getattr(self, "_awm_batch", None) is None:
                self._awm_batch = self._generate_and_score_completions(generation_batch)
            return self._awm_batch
        return super()._prepare_inputs(generation_batch)

    def _expand_to_samples(self, out: dict[str, Any], batch: Any) -> dict[str, Any]:
        """This process's step samples as micro-batches of at most ``max_tokens_per_microbatch``.

        ``num_items_in_batch`` (every policy token of the step, all processes) is the loss
        normaliser of every micro-batch, so the summed gradient is the one of a single batch.
        Every process runs as many micro-batches as the busiest one (fully masked stand-ins make
        up the difference): sharded engines gather weights per forward pass and would otherwise
        wait forever.
        """
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        sign = getattr(self, "awm_advantage_sign", 1.0)
        advantages = [sign * a for a in out["advantages"].tolist()]
        rows: list[tuple[list[int], list[int], list[int], float]] = []
        for adv, r in zip(advantages, batch.results, strict=True):
            for s in r.samples:
                if r.outcome.env_error:  # not the agent's fault: no gradient, no KL, no token count
                    rows.append((s.prompt_ids, s.completion_ids, [0] * len(s.mask), 0.0))
                else:
                    rows.append((s.prompt_ids, s.completion_ids, s.mask, float(adv)))
        real = len(rows)
        groups = pack_microbatches([(len(r[0]), len(r[1])) for r in rows], self.awm_token_budget)
        policy = sum(sum(r[2]) for r in rows)
        # One exchange for both: the busiest process's pass count and the step's policy tokens.
        counts = self.accelerator.gather(torch.tensor([[len(groups), policy]], device=device)).view(-1, 2)
        most, total = int(counts[:, 0].max()), counts[:, 1].sum()
        filler = ([pad_id], [pad_id], [0], 0.0)
        groups += [[len(rows)]] * (most - len(groups))
        rows.append(filler)
        micro = [self._microbatch([rows[i] for i in g], total, out) for g in groups]
        self.awm_last = {"samples": real, "policy_tokens": policy, "microbatches": len(groups),
                         "train_tokens": sum(len(rows[i][0]) + len(rows[i][1]) for g in groups for i in g
                                             if i < real),
                         "padded_tokens": sum(microbatch_cost([(len(rows[i][0]), len(rows[i][1])) for i in g])
                                              for g in groups)}
        return {"microbatches": micro, "num_items_in_batch": total}

    def _microbatch(self, rows: list[tuple[list[int], list[int], list[int], float]], total: torch.Tensor,
                    out: dict[str, Any]) -> dict[str, Any]:
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id

        def left(seqs: list[list[int]], value: int) -> torch.Tensor:
            width = max(len(s) for s in seqs)
            return torch.tensor([[value] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)

        def right(seqs: list[list[int]], value: int) -> torch.Tensor:
            width = max(len(s) for s in seqs)
            return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

        prompt_ids = left([r[0] for r in rows], pad_id).to(device)
        prompt_mask = left([[1] * len(r[0]) for r in rows], 0).to(device)
        completion_ids = right([r[1] for r in rows], pad_id).to(device)
        completion_mask = right([[1] * len(r[1]) for r in rows], 0).to(device)
        tool_mask = right([r[2] for r in rows], 0).to(device)
        mb: dict[str, Any] = {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask, "tool_mask": tool_mask,
            "advantages": torch.tensor([r[3] for r in rows], dtype=torch.float32, device=device),
            "num_items_in_batch": total,
        }
        if "old_per_token_logps" in out or "ref_per_token_logps" in out:
            ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attn = torch.cat([prompt_mask, completion_mask], dim=1)
            keep = completion_ids.size(1)
            with torch.no_grad():
                if "old_per_token_logps" in out:
                    mb["old_per_token_logps"] = self._get_per_token_logps_and_entropies(
                        self.model, ids, attn, keep, batch_size=len(rows))[0]
                if "ref_per_token_logps" in out:
                    if self.ref_model is None:  # LoRA (peft): the reference is the policy without its adapters
                        from trl.trainer.utils import use_adapter

                        peft_model = self.accelerator.unwrap_model(self.model)
                        with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
                            mb["ref_per_token_logps"] = self._get_per_token_logps_and_entropies(
                                self.model, ids, attn, keep, batch_size=len(rows))[0]
                    else:
                        mb["ref_per_token_logps"] = self._get_per_token_logps_and_entropies(
                            self.ref_model, ids, attn, keep, batch_size=len(rows))[0]
        return mb

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; one gradient sync at the end."""
        t0 = time.perf_counter()
        model.train()
        batch = self._prepare_inputs(inputs)
        loss = self.backward_microbatches(model, batch["microbatches"])
        self._step += 1
        self._metrics["train"]["step_time"].append(time.perf_counter() - t0)
        return loss

    def backward_microbatches(self, model: Any, microbatches: list[dict[str, Any]]) -> torch.Tensor:
        from accelerate.utils import DistributedType

        ddp = self.accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
        total = torch.zeros((), device=self.accelerator.device)
        for i, mb in enumerate(microbatches):
            last = i == len(microbatches) - 1
            # DDP all-reduces on every backward; accumulate locally and sync once, on the last.
            sync = contextlib.nullcontext() if last or not ddp else self.accelerator.no_sync(model)
            with sync, self._uneven_row_gather():
                with self.compute_loss_context_manager():
                    loss = self._compute_loss(model, mb)
                self.accelerator.backward(loss)
            total = total + loss.detach()
        return total

    @contextlib.contextmanager
    def _uneven_row_gather(self):
        """TRL's loss gathers one clip statistic per row for its min/max metrics, which needs the same
        row count on every process; a micro-batch of packed samples has its own. Rows are padded
        with NaN for that gather (TRL reduces them with nanmin/nanmax)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            yield
            return
        plain = acc.gather

        def gather(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point():
                t = acc.pad_across_processes(t, dim=0, pad_index=float("nan"))
            return plain(t)

        acc.gather = gather
        try:
            yield
        finally:
            del acc.gather

    # ------------------------------------------------------------------ metrics
    def _record_rollout_metrics(self, batch: Any, out: dict[str, Any], expand_s: float) -> None:
        labels = [r.outcome.label for r in batch.results]
        local = torch.tensor([
            len(batch.results), labels.count("completed"), labels.count("format_error"),
            sum(r.outcome.env_error for r in batch.results), batch.completion_tokens, batch.prompt_tokens,
            self.awm_last["train_tokens"], self.awm_last["policy_tokens"], self.awm_last["samples"],
            batch.rollout_s, batch.gen_s, batch.env_s, batch.verify_s,
            self.awm_last["microbatches"], self.awm_last["padded_tokens"],
        ], dtype=torch.float64, device=self.accelerator.device)
        all_ranks = self.accelerator.gather(local.unsqueeze(0)).view(-1, local.numel())
        sums, slowest = all_ranks.sum(dim=0).tolist(), all_ranks.max(dim=0).values.tolist()
        n = max(1.0, sums[0])
        rewards = [r.reward for r in batch.results]
        m = self._metrics["train"]
        m["awm/episodes"].append(sums[0])
        m["awm/completion_rate"].append(sums[1] / n)
        m["awm/format_error_rate"].append(sums[2] / n)
        m["awm/env_error_rate"].append(sums[3] / n)
        m["awm/rollout_tokens"].append(sums[4])
        m["awm/rollout_prompt_tokens"].append(sums[5])
        m["awm/train_tokens"].append(sums[6])
        m["awm/policy_tokens"].append(sums[7])
        m["awm/samples"].append(sums[8])
        # Ranks roll out in parallel: the slowest one sets the pace.
        m["awm/rollout_s"].append(slowest[9])
        m["awm/generate_s"].append(slowest[10])
        m["awm/env_s"].append(slowest[11])
        m["awm/verify_s"].append(slowest[12])
        m["awm/microbatches"].append(slowest[13])  # per process: every process runs the busiest one's count
        m["awm/padded_tokens"].append(sums[14])
        m["awm/local_reward_mean"].append(
            sum(x for x in rewards if x is not None) / max(1, sum(x is not None for x in rewards)))
        # Each row keeps the episode's messages (a conversation's: every party's, tagged with its sender).
        self.awm_rollout_rows = [r.row(step=self.state.global_step + 1, rank=self.accelerator.process_index)
                                 for r in batch.results]


class MetricsCallback(TrainerCallback):
    """Writes one JSON line per logged step (rank 0) and each rank's episodes, and prints progress."""

    def __init__(self, run_dir: Path, trainer_ref: list, total_steps: int):
        self.run_dir = run_dir
        self.trainer_ref = trainer_ref
        self.total = total_steps
        self._t0 = None
        self._step_s = None

    def on_step_begin(self, args, state, control, **kw):
        if self._t0 is None:  # first micro-batch of the optimizer step (rollouts happen here)
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self._t0 is not None:
            self._step_s = time.perf_counter() - self._t0
            self._t0 = None
        trainer = self.trainer_ref[0]
        rows = getattr(trainer, "awm_rollout_rows", None)
        if rows:
            rank = trainer.accelerator.process_index
            with open(self.run_dir / f"rollouts.rank{rank}.jsonl", "a") as fh:
                for row in rows:
                    fh.write(json.dumps(row, default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            trainer.awm_rollout_rows = []

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs or "loss" not in logs and "reward" not in logs:
            return
        rec = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        if self._step_s is not None:
            rec["step_s"] = self._step_s
            rollout = rec.get("awm/rollout_s") or 0.0
            rec["update_s"] = max(0.0, self._step_s - rollout)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        print(progress_line(rec, self.total), flush=True)

    def on_save(self, args, state, control, **kw):
        # HF writes no end mark: once every process has saved, mark the folder resumable.
        from awm_core.train.resume import mark_complete

        trainer = self.trainer_ref[0]
        trainer.accelerator.wait_for_everyone()
        if state.is_world_process_zero:
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)


def _plain(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def progress_line(rec: dict[str, Any], total: int) -> str:
    def f(key: str, fmt: str = "{:.3f}") -> str:
        v = rec.get(key)
        return "n/a" if v is None else fmt.format(v)

    if rec.get("reward") is None:  # updates_per_batch > 1: this step reused the last batch of episodes
        return (f"step {rec.get('step')}/{total} (same episodes as the step before) loss {f('loss', '{:.4f}')} "
                f"update {f('update_s', '{:.1f}')}s")
    return (f"step {rec.get('step')}/{total} reward {f('reward')}±{f('reward_std')} "
            f"completed {f('awm/completion_rate', '{:.0%}')} format-errors {f('awm/format_error_rate', '{:.0%}')} "
            f"env-errors {f('awm/env_error_rate', '{:.0%}')} loss {f('loss', '{:.4f}')} "
            f"rollout {f('awm/rollout_s', '{:.1f}')}s update {f('update_s', '{:.1f}')}s "
            f"tokens {f('awm/rollout_tokens', '{:.0f}')}")


def build_dataset(tasks: Sequence[tuple[str, int, str]], tasks_per_step: int, seed: int = 0):
    """One row per task (repeated so one step has enough distinct rows); TRL repeats each per group."""
    import random

    from datasets import Dataset

    if not tasks:
        raise AWMError("no tasks to train on")
    rows = [{"prompt": [{"role": "user", "content": text}], "env_id": env_id, "task_idx": int(idx)}
            for env_id, idx, text in tasks]
    rng = random.Random(seed)
    out = list(rows)
    while len(out) < tasks_per_step or len(out) % tasks_per_step:
        extra = list(rows)
        rng.shuffle(extra)
        out += extra[: tasks_per_step - len(out) % tasks_per_step]
    return Dataset.from_list(out)


def grpo_args(config: TrainConfig, output_dir: Path, num_processes: int) -> GRPOConfig:
    # One TRL micro-step per optimizer step: the trainer itself cuts each process's samples into
    # token-budget micro-batches (``AWMGRPOTrainer.training_step``), so TRL's row-count
    # accumulation is not used.
    per_device, rem = divmod(config.episodes_per_step, num_processes)
    if rem or per_device < 1:
        raise SettingsError(
            f"tasks_per_step x group_size = {config.episodes_per_step} episodes per step must split evenly over "
            f"{num_processes} processes")
    cuda = torch.cuda.is_available()
    if config.generation_backend == "vllm" and config.vllm_mode == "server" and num_processes > 1:
        raise SettingsError("vllm_mode=server gathers every process's prompts per call, which episodes of "
                            "different lengths cannot do in step; use vllm_mode=colocate with several processes")
    save = config.save_steps > 0
    args = GRPOConfig(
        output_dir=str(output_dir), max_steps=config.steps, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1, num_generations=config.group_size,
        max_completion_length=config.max_tokens, learning_rate=config.learning_rate, beta=config.beta,
        warmup_steps=config.warmup_steps, num_iterations=config.updates_per_batch,
        temperature=config.temperature, loss_type="dapo", logging_steps=1, report_to="none",
        save_strategy="steps" if save else "no", save_steps=config.save_steps if save else 500,
        use_cpu=not cuda, bf16=bool(config.bf16), gradient_checkpointing=config.gradient_checkpointing,
        remove_unused_columns=False, seed=config.seed, disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=config.generation_backend == "vllm", vllm_mode=config.vllm_mode,
        vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        vllm_importance_sampling_correction=False, log_completions=False, ddp_timeout=int(config.sync_timeout_s),
    )
    # bf16 is autocast (CPU or CUDA) over fp32 weights. ``config.bf16`` decides it, not the accelerate
    # yaml: the yaml's mixed_precision reaches TrainingArguments through ACCELERATE_MIXED_PRECISION and
    # would otherwise switch autocast on behind a bf16 = false config. DeepSpeed takes its own.
    if args.deepspeed_plugin is None:
        args.mixed_precision = "bf16" if config.bf16 else "no"
    return args


def load_policy(config: TrainConfig, environments: Sequence[Any], work_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) for ``config.model``: a saved folder or ``random:<shape>``.

    The weights are fp32 whatever ``config.bf16`` says or the folder was saved in: bf16 is autocast
    (``grpo_args``), and AdamW steps at the paper's lr 7e-7 round away on bf16 weights (a bf16
    weight of 1.0 moves only in steps of 2**-7).
    """
    from awm_core.train import models

    dtype = torch.float32
    if config.model.startswith("random:"):
        shape = config.model.split(":", 1)[1]
        if config.tokenizer:
            tok = models.load_tokenizer(config.tokenizer)
        else:
            vocab = 1024 if shape in ("tiny", "small") else 8192
            # every process trains the same tokenizer (deterministic); only the first one writes it
            main = os.environ.get("RANK", "0") == "0"
            tok = models.train_tokenizer(models.corpus(environments), vocab_size=vocab,
                                         out_dir=work_dir / "tokenizer" if main else None)
        model = models.random_model(shape, tok, seed=config.seed, dtype=dtype)
        return model, tok
    tok = models.load_tokenizer(config.tokenizer or config.model)
    model = models.load_model(config.model, dtype=dtype)
    return model, tok


def check_master_weights(model: Any, args: Any) -> None:
    """Refuse trainable weights that are not fp32 when no engine keeps fp32 master copies.

    DDP and FSDP step the weights in the dtype they hold, so bf16/fp16 trainable weights would
    round the optimizer's small steps away and the run would not learn; DeepSpeed's bf16
    optimizer keeps fp32 masters of whatever the module holds, so it is let through.
    """
    if getattr(args, "deepspeed_plugin", None) is not None:
        return
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        dtypes = ", ".join(sorted({str(d).replace("torch.", "") for _, d in low}))
        raise SettingsError(
            f"{len(low)} trainable parameter(s) are {dtypes}, not fp32 (first: {low[0][0]}): optimizer steps at "
            f"learning rate {args.learning_rate:g} round away in {dtypes}, so this run would not learn. Keep the "
            "trainable weights fp32 (load_policy loads every model so) and set bf16 = true for bf16 autocast, or "
            "train under DeepSpeed (deployments/accelerate/deepspeed_zero3.yaml), whose optimizer keeps fp32 "
            "master weights")


def lora_config(config: TrainConfig, model: Any = None) -> Any:
    """``config.lora`` as a peft ``LoraConfig`` for ``GRPOTrainer(peft_config=...)``; None when off.

    TRL wraps the policy (adapters in fp32 over the frozen base), and with ``beta > 0`` the reference
    is the same model with its adapters disabled, so no second copy is loaded. With ``model``, every
    target module must exist in it: peft itself only refuses a list of which none matches, so a
    misspelt name would silently leave those layers untrained.
    """
    if not config.lora.enabled:
        return None
    if model is not None:
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        linear = sorted({n.rsplit(".", 1)[-1] for n in names})
        missing = [t for t in config.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise SettingsError(f"lora.target_modules {', '.join(missing)} name no linear layer of {config.model}; "
                                f"its linear layers: {', '.join(linear)}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise SettingsError("lora.r > 0 needs peft: install the train extra (pip install -e '.[train]')") from None
    return LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")


def save_merged_lora(trainer: Any, tok: Any, final: Path, config: TrainConfig) -> Path | None:
    """``final/merged``: base and adapter merged into one model folder, when the adapter alone is
    no use (the base is a ``random:`` model or was changed by the warm start, so no folder holds
    it). Not for sharded engines (no process holds the whole model). Merges a copy: the trained
    model keeps its adapters."""
    if not (config.model.startswith("random:") or config.warmstart_steps):
        return None
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    out = final / "merged"
    if trainer.accelerator.is_main_process:
        import copy

        merged = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model_wrapped)).merge_and_unload()
        merged.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    return out


def describe_precision(trainer: Any) -> dict[str, Any]:
    """What the run trains in: weight dtypes, autocast, trainable share (and a line saying so)."""
    acc = trainer.accelerator
    params = list(trainer.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    autocast = acc.mixed_precision if acc.mixed_precision != "no" else "off"
    size = lambda p: getattr(p, "ds_numel", None) or p.numel()  # noqa: E731  (ZeRO-3 partitions hold ds_numel)
    n_train, n_all = sum(size(p) for p in trainable), sum(size(p) for p in params)
    line = (f"precision: trainable weights {'/'.join(dtypes)}, autocast {autocast} on {acc.device.type}, "
            f"{n_train:,} of {n_all:,} parameters trained")
    return {"weights": dtypes, "autocast": autocast, "device": acc.device.type, "trainable_params": n_train,
            "params": n_all, "line": line}


def parameter_sums(model: Any) -> torch.Tensor:
    """Per parameter (``named_parameters`` order), the int64 sum of its fp32 bit patterns."""
    with torch.no_grad():
        return torch.stack([p.detach().float().contiguous().view(torch.int32).sum(dtype=torch.int64)
                            for p in model.parameters()])


def checksum_digest(sums: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(sums.cpu().numpy().tobytes()).hexdigest()[:16]


def weights_checksum(trainer: Any) -> dict[str, Any]:
    """Checks that every process ends with the same weights; raises when they diverged.

    Each process reduces every parameter to the integer sum of its fp32 bit patterns on its device
    (exact and independent of summation order, so equal weights always give equal sums and a change
    in one bit shows); the vectors are gathered and must be identical (DDP all-reduces gradients,
    so replicas that drifted apart mean a broken step). Sharded engines (FSDP, DeepSpeed) hold
    different shards per process and are not compared.
    """
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return {"weights_checksum": None, "weights_compared": f"not compared ({acc.distributed_type.value} shards)"}
    model = acc.unwrap_model(trainer.model_wrapped)
    named = list(model.named_parameters())
    every = acc.gather(parameter_sums(model).unsqueeze(0)).view(acc.num_processes, -1).cpu()
    digests = [checksum_digest(row) for row in every]
    if len(set(digests)) > 1:
        bad = int((every != every[0]).any(dim=0).nonzero()[0])
        raise AWMError(f"the {acc.num_processes} processes ended training with different weights (checksums "
                       f"{', '.join(digests)}; first differing parameter {named[bad][0]}): the replicas diverged")
    return {"weights_checksum": digests[0], "weights_compared": acc.num_processes}


def warm_start(model: Any, tok: Any, runner: EpisodeRunner, tasks: Sequence[tuple[str, int, str]],
               config: TrainConfig, run_dir: Path, state: Any) -> list[float]:
    """Supervised steps on the reference solutions (same seed on every rank, so ranks agree)."""
    from awm_core.train.models import EOS
    from awm_core.train.warmstart import reference_samples, supervised_steps

    model.to(state.device)
    samples = reference_samples(runner, tasks, eos_id=tok.convert_tokens_to_ids(EOS))
    log = print if state.is_main_process else None
    t0 = time.perf_counter()
    losses = supervised_steps(model, samples, steps=config.warmstart_steps, lr=config.warmstart_lr,
                              pad_id=tok.pad_token_id, seed=config.seed, log=log)
    if state.is_main_process:
        (run_dir / "warmstart.json").write_text(json.dumps({"samples": len(samples), "losses": losses,
                                                            "seconds": time.perf_counter() - t0}))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return losses


def ledger_file(run_dir: Path, state: Any) -> Path:
    """This process's LLM call ledger in the run folder (the judge's and the user simulator's calls)."""
    return run_dir / f"llm_calls.rank{state.process_index}.jsonl"


def training_judge(config: TrainConfig, settings: Any, run_dir: Path, state: Any, budget: Any = None) -> Any:
    """The code-augmented LLM judge when ``config.judge`` (the paper's reward labels: the verifier's
    code and evidence, the task's criteria and the trajectory go to the judge role's LLM). Each
    process keeps its own call ledger; a judge that cannot answer falls back to the verdict.
    ``budget``: the run's LLM budget, shared with the user simulator."""
    if not config.judge:
        return None
    from awm_core.agent import LLMJudge

    return LLMJudge.from_settings(settings, budget=budget, ledger=ledger_file(run_dir, state))


def planned_tasks(environments: Sequence[Any], tasks: Sequence[tuple[str, int, str]]) -> list[tuple[Any, Any]]:
    """``(environment, task)`` of each planned task (of a loaded environment)."""
    by_id = {e.id: e for e in environments}
    return [(by_id[env_id], by_id[env_id].task(int(idx))) for env_id, idx, _ in tasks if env_id in by_id]


def conversational_tasks(environments: Sequence[Any], tasks: Sequence[tuple[str, int, str]],
                         mode: str = "message") -> list[Any]:
    """The planned tasks that are conversations in ``mode`` (played with a user simulator)."""
    from awm_core.agent import plays_as_conversation

    return [t for env, t in planned_tasks(environments, tasks) if plays_as_conversation(env, t, mode)]


def snapshot_of(run_dir: Path, config: TrainConfig) -> int | None:
    """The catalog snapshot the flow planned the run on (``run.json``), else the config's."""
    try:
        return int(json.loads((run_dir / "run.json").read_text())["snapshot"])
    except (OSError, ValueError, KeyError, TypeError):
        return config.snapshot


def run_llm_budget(config: TrainConfig, settings: Any, run_id: str, conversations: Sequence[Any]) -> Any:
    """One LLM budget for the run's judge and user simulator calls (``run_budget``: shared between
    processes through ``llm.budget_dsn`` when set); None when the run calls no LLM."""
    if not (config.judge or (conversations and config.user == "llm")):
        return None
    from awm_core.llm.shared_budget import run_budget

    return run_budget(settings, run_id)


def run_id_of(run_dir: Path, config: TrainConfig) -> str:
    """The run id the flow gave the run folder (``run.json``), else the config's name or the folder's."""
    try:
        return str(json.loads((run_dir / "run.json").read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return config.run_name or run_dir.name


def run_training(config: TrainConfig, environments: Sequence[Any], tasks: Sequence[tuple[str, int, str]],
                 run_dir: str | Path, settings: Any, *, resume: bool = False) -> dict[str, Any]:
    """Train; returns a summary (final checkpoint folder, steps). Meant to run under accelerate launch.
    ``resume``: continue from the newest complete checkpoint (``awm_core.train.resume``)."""
    from accelerate import PartialState

    from awm_core.runtime import SandboxPool

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else run_dir / "checkpoints"
    state = PartialState(cpu=not torch.cuda.is_available())
    from awm_core.agent import check_conversation_mode, check_user_role

    # Before any step: mode conversation on tasks that have no user scenario, and a user role with no
    # endpoint (or no recordings), fail here.
    check_conversation_mode(config.mode, planned_tasks(environments, tasks), snapshot_of(run_dir, config))
    conversations = conversational_tasks(environments, tasks, config.mode)
    if conversations and config.user == "llm":
        check_user_role(settings, conversations)
    run_id = run_id_of(run_dir, config)
    budget = run_llm_budget(config, settings, run_id, conversations)
    args = grpo_args(config, ckpt_dir, state.num_processes)
    model, tok = load_policy(config, environments, run_dir)
    wanted = {e for e, _, _ in tasks}
    envs = [e for e in environments if e.id in wanted]
    with SandboxPool(settings.sandbox, workers=config.sandbox_workers) as pool:
        if state.is_main_process:  # recorded with the run's catalog snapshot (flows/train.py)
            (run_dir / "sandbox.json").write_text(json.dumps(pool.protections()))
        runner = EpisodeRunner(pool, envs, settings, tokenizer=tok, interface=config.interface,
                               max_turns=config.max_turns, window=config.window,
                               max_prompt_tokens=config.max_prompt_tokens, threads=config.rollout_threads,
                               max_batch=config.generation_batch, scheduler=config.rollout_scheduler,
                               episode_timeout_s=config.episode_timeout_s,
                               judge=training_judge(config, settings, run_dir, state, budget),
                               mode=config.mode, user=config.user, max_steps=config.max_steps,
                               max_errors=config.max_errors,
                               budget=budget, ledger=ledger_file(run_dir, state), run_id=run_id)
        if config.warmstart_steps and not resume:  # a resumed run loads the checkpoint's weights
            warm_start(model, tok, runner, tasks, config, run_dir, state)

        @contextlib.contextmanager
        def generation(trainer: Any):
            # The rollout's engine (awm_core.train.rollout; docs/train.md "Rollouts"). Sampling is
            # always plain: temperature from the config, top_p 1, top_k off, as the loss assumes.
            if config.generation_backend == "vllm":
                # TRL's colocated vLLM (vllm_gpu_memory_utilization of the GPU); one call per batch
                # the scheduler forms, so tensor parallelism must stay 1 (its per-call all-gather
                # would pair calls of different processes).
                def gen(prompts: list[list[int]]) -> list[list[int]]:
                    _, completion_ids, _, _ = trainer.vllm_generation.generate(prompts, None, 1)
                    return [list(c) for c in completion_ids]

                yield gen
                return
            from trl.models import unwrap_model_for_generation

            with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                             gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs
                                             ) as unwrapped:
                paged = config.generation_backend == "paged"
                per_process = max(1, config.episodes_per_step // max(1, state.num_processes))
                # Continuous: requests join and leave the batch per token (HFStepEngine); paged: for GPUs.
                yield make_engine(config.generation_backend, config.rollout_scheduler, unwrapped, tok,
                                  max_new_tokens=config.max_tokens, temperature=config.temperature,
                                  eos_token_ids=trainer.eos_token_ids,
                                  max_rows=min(config.generation_batch, per_process) if paged
                                  else config.generation_batch,
                                  max_context=config.max_prompt_tokens,
                                  memory_share=config.vllm_gpu_memory_utilization if paged else None)

        rollout = EpisodeRollout(runner, generation)
        ref: list = []
        trainer = AWMGRPOTrainer(model=model, args=args, awm_rollout=rollout, processing_class=tok,
                                 token_budget=config.max_tokens_per_microbatch, peft_config=lora_config(config, model),
                                 negate_advantages=config.negate_advantages,
                                 train_dataset=build_dataset(tasks, config.tasks_per_step, config.seed),
                                 callbacks=[MetricsCallback(run_dir, ref, config.steps)])
        ref.append(trainer)
        check_master_weights(trainer.model, args)
        precision = describe_precision(trainer)
        if state.is_main_process:
            print(precision["line"], flush=True)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # MetricsCallback prints one readable line per step instead
        resumed = None
        if resume:  # every process checks (and fails alike); the main one drops later rows, then all go on
            from awm_core.train.resume import prepare_resume, require_resumable

            resumed = require_resumable(run_dir, ckpt_dir, config.save_steps)
            if state.is_main_process:
                prepare_resume(run_dir, ckpt_dir, config.save_steps)
            state.wait_for_everyone()
            if state.is_main_process:
                print(f"resuming from {resumed[1]} (step {resumed[0]})", flush=True)
        trainer.train(resume_from_checkpoint=str(resumed[1]) if resumed else None)
        checksum = weights_checksum(trainer)
        final = ckpt_dir / FINAL
        trainer.save_model(str(final))
        if trainer.accelerator.is_main_process:
            tok.save_pretrained(str(final))
            print(f"weights checksum {checksum['weights_checksum']} (processes compared: "
                  f"{checksum['weights_compared']})", flush=True)
        merged = save_merged_lora(trainer, tok, final, config) if config.lora.enabled else None
        if trainer.accelerator.is_main_process and config.lora.enabled:
            print(f"final checkpoint {final} holds the LoRA adapter only (adapter_config.json, "
                  f"adapter_model.safetensors), to load over the base model {config.model}"
                  + (f"; base and adapter merged into {merged}" if merged else ""), flush=True)
    return {"final_checkpoint": str(final), "steps": config.steps, "adapter": config.lora.enabled,
            "merged_checkpoint": str(merged) if merged else None,
            "precision": {k: v for k, v in precision.items() if k != "line"}, **checksum}

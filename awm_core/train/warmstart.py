"""Warm start: a few supervised steps on reference solutions before GRPO.

A freshly initialised model never writes a tool call, so every episode would end at its first
reply and every reward would tie (no GRPO signal). Replaying the tasks' reference solutions
through the same agent loop, window and chat template gives samples in exactly the format GRPO
later trains on (``build_samples`` with the loss on the assistant tokens only). A conversational
task's reference is replayed as a conversation with the scripted user (no model, no cost).
"""
from __future__ import annotations

import random
import time
from typing import Any, Sequence

from awm_core.agent import ReferencePolicy, TextToolCallPolicy, run_episode
from awm_core.train.samples import Sample, StepRecord, build_samples


class _ReplayRecorder:
    """Replays a reference solution and records each step as token ids, like ``RecordingPolicy``."""

    def __init__(self, solution: Any, tokenizer: Any, eos_id: int):
        self.ref = ReferencePolicy(solution, style="text")
        self.text = TextToolCallPolicy(lambda messages: "")
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.steps: list[StepRecord] = []

    def act(self, messages, tools):
        reply = self.ref.act(messages, tools)
        rendered = self.text.render(messages, tools)
        prompt = self.tokenizer(self.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
        completion = self.tokenizer(reply.text, add_special_tokens=False)["input_ids"] + [self.eos_id]
        self.steps.append(StepRecord(prompt, completion))
        return reply


def reference_samples(runner: Any, tasks: Sequence[tuple[str, int, str]], *, eos_id: int) -> list[Sample]:
    """Samples of every task's reference solution, run in real sessions of ``runner``'s pool."""
    samples: list[Sample] = []
    for env_id, idx, _ in tasks:
        env = runner.environments.get(env_id)
        solution = env.solution(idx) if env is not None else None
        if solution is None:
            continue
        recorder = _ReplayRecorder(solution, runner.tokenizer, eos_id)
        user = runner.user_for(env_id, idx, kind="scripted")
        with runner.handles[env_id].open_session() as session:
            run_episode(recorder, session, env.task(idx), runner.tools[env_id], interface=runner.interface,
                        max_turns=runner.max_turns, window=runner.window,
                        **runner.conversation_args(env_id, user))
        steps = [s for s in recorder.steps if len(s.prompt_ids) <= runner.max_prompt_tokens]
        samples += build_samples(steps)
    return samples


def supervised_steps(model: Any, samples: Sequence[Sample], *, steps: int, lr: float, pad_id: int,
                     batch_size: int = 4, seed: int = 0, log: Any = None) -> list[float]:
    """``steps`` AdamW steps of cross-entropy on the masked-in tokens; returns the loss per step."""
    import torch

    if not samples:
        return []
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    # A linear warm-up over the first tenth keeps a freshly initialised deep model from diverging.
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    rng = random.Random(seed)
    was_training = model.training
    model.train()
    losses = []
    for step in range(steps):
        batch = rng.sample(list(samples), k=min(batch_size, len(samples)))
        seqs = [s.prompt_ids + s.completion_ids for s in batch]
        labels = [[-100] * len(s.prompt_ids) + [t if m else -100 for t, m in zip(s.completion_ids, s.mask)]
                  for s in batch]
        width = max(len(x) for x in seqs)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in seqs], device=device)
        att = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=device)
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        if not torch.isfinite(loss):
            # One bad batch must not poison the weights that GRPO then samples from.
            opt.zero_grad(set_to_none=True)
            losses.append(float("nan"))
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"warm start step {step + 1}/{steps}: loss {losses[-1]:.3f} ({time.perf_counter() - t0:.2f}s)")
    del opt, sched
    if not was_training:
        model.eval()
    return losses

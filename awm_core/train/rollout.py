"""Multi-turn rollouts for GRPO: every completion of a group is a whole episode in its own session.

Episodes run through the agent loop (``awm_core.agent.run_episode``), so training sees exactly
what inference sees. Each episode has its own thread and a fresh session from the sandbox pool.
The model is shared through a ``GenerationScheduler``, whose engine runs in the thread that
called ``EpisodeRunner.run`` (the training process's main thread):

- ``continuous`` (the default): an episode's next turn is queued as soon as its tool results are
  back, and whenever the engine is free and anything is pending it runs. With the
  ``transformers`` backend the engine is ``HFStepEngine``: continuous batching over the model's
  plain forward pass, where a request joins the running batch at the next token (its prompt
  prefilled and its KV cache merged in) and a row leaves it the step it ends, so no row waits
  for a longer one and nothing is generated twice. ``paged`` is transformers' own continuous
  batching with paged attention (``PagedEngine``: for GPUs). ``HFEngine`` (``model.generate``)
  can also run under this scheduler: it then hands each finished row back at once and cuts a
  batch short when more requests wait than rows still decode, the unfinished rows continuing
  from their tokens so far (exact, since sampling is per token); on CPU the re-prefill of cut
  rows costs more than it saves (``benchmarks/rollouts_gen.py``), so training does not use it.
- ``lockstep``: a batch starts only when every live episode waits, and ends with its longest
  completion (``HFEngine``; the baseline of ``benchmarks/rollouts_gen.py``).

Failures stay inside their episode: a session that does not open, an exception in the policy or
the loop, a verifier that crashes or is missing, a generation/turn misalignment, or an episode
running past ``episode_timeout_s`` all end the episode as an environment error (reward None,
masked out of the loss) with the reason in its row. A timed-out episode's requests are dropped
and its thread is abandoned, so it cannot hold the step. What must stop training (the engine
itself raising, e.g. out of GPU memory; every episode of a step failing) raises one
``AWMError`` on every process at the same point (``EpisodeRollout``), so no process waits for
the collective timeout.

A conversation (tau2-bench's tasks; a synthesized task with a user scenario in mode ``conversation``:
``awm_core.agent.users.plays_as_conversation``) is played with a user simulator
(``EpisodeRunner.user_for``: the LLM role ``user``, its calls on the run's budget and ledger, or the
scripted user) within tau2's limits (``max_steps``, ``max_errors``), the agent of a synthesized task
shown its environment's policy; each row records its episode's ``mode``. The policy's samples are still
what it saw (``turns[t].visible``: the user's own tool traffic is not in it); a user that could not
reply ends the episode as ``user_error``, which verification labels an environment error (masked).

``EpisodeRollout`` is the ``rollout_func`` handed to TRL's ``GRPOTrainer``.
"""
from __future__ import annotations

import copy
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from awm_core.agent import Episode, Generation, Outcome, TextToolCallPolicy, episode_mode, run_episode, verify_episode
from awm_core.agent.users import RunUsers, conversation_args
from awm_core.agent.evaluation import episode_columns
from awm_core.errors import AWMError, EngineError, EpisodeCancelled
from awm_core.train.samples import Sample, StepRecord, build_samples

GenerateFn = Callable[[list[list[int]]], list[list[int]]]
SCHEDULERS = ("continuous", "lockstep")


# --------------------------------------------------------------------------- engines

class FnEngine:
    """A batch engine over a plain ``generate(prompts) -> completions`` function (vLLM, tests)."""

    streaming = False

    def __init__(self, fn: GenerateFn):
        self.fn = fn

    def run(self, prompts: list[list[int]], budgets: list[int | None], on_done=None, should_cut=None):
        outs = self.fn(prompts)
        if len(outs) != len(prompts):
            raise EngineError(f"generation returned {len(outs)} completions for {len(prompts)} prompts")
        return [(list(o), True) for o in outs]


def sampling_config(*, max_new_tokens: int, temperature: float, eos_token_ids: Sequence[int], pad_token_id: int):
    """The ``GenerationConfig`` the GRPO loss assumes: plain sampling at ``temperature`` (top_p 1, top_k off).

    Every other logits-shaping option stays unset. ``generate`` would fill unset options from
    the model's own ``generation_config`` (a released checkpoint often sets top_k, top_p, a
    temperature, sometimes a repetition penalty), so ``HFEngine`` hides that one during its calls.
    """
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0, num_beams=1,
                            num_return_sequences=1, max_new_tokens=int(max_new_tokens),
                            eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id)


class HFEngine:
    """Batched sampling with ``model.generate`` (left padding); each completion ends at its first EOS.

    Called as a function (``engine(prompts)``) it is the plain batch generate of before. Through
    ``run`` (the continuous scheduler) a row is handed back (``on_done``) the moment it hits EOS
    or its token budget, and ``should_cut(live_rows)`` may end the whole call early; rows still
    decoding then come back unfinished, to be continued.
    """

    streaming = False

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int, temperature: float,
                 eos_token_ids: Sequence[int], generation_config: Any = None):
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        self.eos = [int(e) for e in eos_token_ids]
        self.max_new_tokens = int(max_new_tokens)
        self.generation_config = generation_config or sampling_config(
            max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=self.eos, pad_token_id=self.pad_id)

    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        return [tokens for tokens, _ in self.run(prompts, [None] * len(prompts))]

    def run(self, prompts: list[list[int]], budgets: list[int | None], on_done=None, should_cut=None):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        model = self.model
        device = next(model.parameters()).device
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        budget = [self.max_new_tokens if b is None else max(1, min(int(b), self.max_new_tokens)) for b in budgets]
        longest = max(budget)
        eos_t = torch.tensor(self.eos, dtype=torch.long, device=device)
        finished: dict[int, list[int]] = {}
        state = {"cut": False}
        eos = set(self.eos)

        class _Rows(StoppingCriteria):
            """Hands finished rows out as they finish; may end the call for everyone (a cut)."""

            def __call__(self, input_ids, scores, **kwargs):
                steps = input_ids.shape[1] - width
                hit = torch.isin(input_ids[:, -1], eos_t).tolist()
                done = [False] * n
                for i in range(n):
                    if i in finished:
                        done[i] = True
                    elif hit[i] or steps >= budget[i]:
                        row = input_ids[i, width:].tolist()
                        finished[i] = row
                        done[i] = True
                        if on_done is not None:
                            on_done(i, row)
                live = n - len(finished)
                if live and should_cut is not None and should_cut(live):
                    state["cut"] = True
                    return torch.ones(n, dtype=torch.bool, device=input_ids.device)
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        cfg = self.generation_config
        if cfg.max_new_tokens != longest:
            cfg = copy.deepcopy(cfg)
            cfg.max_new_tokens = longest
        from transformers import GenerationConfig

        # Nothing of the model's own sampling defaults may reach the sampler: its generation config
        # is swapped for a bare one during the call (on the base model under a peft wrapper).
        owner = model.get_base_model() if hasattr(model, "get_base_model") else model
        own = owner.generation_config
        owner.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
        try:
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                                     stopping_criteria=StoppingCriteriaList([_Rows()]))
        finally:
            owner.generation_config = own
        rows = out[:, width:].tolist()
        result = []
        for i in range(n):
            if i in finished:
                result.append((finished[i], True))
                continue
            row = rows[i]
            cut = next((k + 1 for k, tok in enumerate(row) if tok in eos), None)
            if cut is not None:
                result.append((row[:cut], True))
            elif state["cut"]:  # still decoding when the call was cut: every token so far is real
                result.append((row[: budget[i]], False))
            else:
                result.append((row[: budget[i]], True))
        return result


class HFStepEngine:
    """Continuous batching over the model's plain forward pass (the ``transformers`` engine of the
    continuous scheduler).

    A request joins the running batch at the next token: its prompt is prefilled on its own and
    its KV cache merged into the batch's (left padding, a 2D attention mask and per-row
    positions); every step decodes one token for every running row; a row that reaches EOS or its
    token budget leaves the batch at once and goes back to its episode. Nothing is generated
    twice and no row waits for a longer one. Sampling is the loss's: ``softmax(logits /
    temperature)``, no top-k or top-p. ``collect`` runs one step (the scheduler's serving thread
    calls it in a loop).
    """

    streaming = True

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int, temperature: float,
                 eos_token_ids: Sequence[int], max_rows: int = 64, prefill_rows: int = 16):
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        self.eos = {int(e) for e in eos_token_ids}
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.max_rows = max(1, int(max_rows))
        self.prefill_rows = max(1, int(prefill_rows))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queue: list[tuple[str, list[int], int]] = []
        self._cancelled: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        self._rows: list[dict[str, Any]] = []  # key, budget, out, pos
        self._cache = None
        self._mask = None
        self._last = None

    def start(self) -> None:
        self._reset()

    def stop(self) -> None:
        self._reset()
        with self._lock:
            self._queue = []
            self._cancelled = set()

    def submit(self, key: str, prompt: list[int], budget: int | None) -> None:
        with self._lock:
            self._queue.append((key, list(prompt), self.max_new_tokens if budget is None else int(budget)))
        self._wake.set()

    def cancel(self, key: str) -> None:
        with self._lock:
            self._queue = [q for q in self._queue if q[0] != key]
            self._cancelled.add(key)

    def _sample(self, logits):
        import torch

        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(-1)

    def collect(self, timeout: float) -> list[tuple[str, list[int], str | None]]:
        import torch

        with self._lock:
            idle = not self._rows and not self._queue
        if idle:
            self._wake.wait(timeout)
            self._wake.clear()
            return []
        finished: list[tuple[str, list[int], str | None]] = []
        with torch.no_grad():
            with self._lock:
                cancelled, self._cancelled = self._cancelled, set()
                room = self.max_rows - len(self._rows)
                new, self._queue = self._queue[: max(0, room)], self._queue[max(0, room):]
            if cancelled and any(r["key"] in cancelled for r in self._rows):
                self._keep([i for i, r in enumerate(self._rows) if r["key"] not in cancelled])
            for lo in range(0, len(new), self.prefill_rows):
                finished += self._admit(new[lo: lo + self.prefill_rows])
            if self._rows:
                finished += self._decode()
        return finished

    def _admit(self, reqs: list[tuple[str, list[int], int]]) -> list[tuple[str, list[int], str | None]]:
        """Prefill new requests and merge them into the running batch; their first token is sampled."""
        import torch
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        width = max(len(p) for _, p, _ in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, (_, p, _) in enumerate(reqs):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1)
        if cache.get_seq_length() != width:
            raise EngineError("the model did not fill its KV cache during prefill (gradient checkpointing still on?)")
        odd = {type(layer).__name__ for layer in cache.layers} - {"DynamicLayer"}
        if odd:  # sliding-window or recurrent layers keep state this engine cannot merge
            raise EngineError(f"the step engine merges plain KV caches only, this model has {', '.join(sorted(odd))}; "
                              "use generation_backend = \"paged\" or rollout_scheduler = \"lockstep\"")
        first = self._sample(out.logits[:, -1, :])
        rows = [{"key": k, "budget": b, "out": [], "pos": len(p)} for k, p, b in reqs]
        if self._rows:  # merge: left-pad the shorter cache to a common length, then stack the rows
            t_old, t_new = self._mask.shape[1], mask.shape[1]
            width = max(t_old, t_new)
            for mine, theirs in zip(self._cache.layers, cache.layers):
                for name in ("keys", "values"):
                    a, b = getattr(mine, name), getattr(theirs, name)
                    a = torch.nn.functional.pad(a, (0, 0, width - t_old, 0))
                    b = torch.nn.functional.pad(b, (0, 0, width - t_new, 0))
                    setattr(mine, name, torch.cat([a, b], dim=0))
            self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - t_old, 0)),
                                    torch.nn.functional.pad(mask, (width - t_new, 0))], dim=0)
            self._last = torch.cat([self._last, first], dim=0)
        else:
            self._cache, self._mask, self._last = cache, mask, first
        self._rows += rows
        return self._advance(first.tolist(), start=len(self._rows) - len(rows))

    def _decode(self) -> list[tuple[str, list[int], str | None]]:
        import torch

        device = self._mask.device
        mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=device)], 1)
        pos = torch.tensor([[r["pos"]] for r in self._rows], dtype=torch.long, device=device)
        out = self.model(input_ids=self._last.unsqueeze(-1), attention_mask=mask, position_ids=pos,
                         cache=self._cache, use_cache=True, logits_to_keep=1)
        self._mask = mask  # the cache grew by one column in place
        for r in self._rows:
            r["pos"] += 1
        self._last = self._sample(out.logits[:, -1, :])
        return self._advance(self._last.tolist(), start=0)

    def _advance(self, tokens: list[int], start: int) -> list[tuple[str, list[int], str | None]]:
        """Append each row's new token; rows that ended leave the batch."""
        done, keep = [], []
        for i, r in enumerate(self._rows):
            if i >= start:
                tok = tokens[i - start]
                r["out"].append(tok)
                if tok in self.eos or len(r["out"]) >= r["budget"]:
                    done.append((r["key"], r["out"], None))
                    continue
            keep.append(i)
        if len(keep) < len(self._rows):
            self._keep(keep)
        return done

    def _keep(self, keep: list[int]) -> None:
        import torch

        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._cache.batch_select_indices(idx)
        self._mask, self._last = self._mask[idx], self._last[idx]
        self._rows = [self._rows[i] for i in keep]
        lead = int((self._mask.sum(0) > 0).nonzero()[0])  # columns that are padding for every row left
        if lead:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self._mask = self._mask[:, lead:]


def hf_generate_fn(model: Any, tokenizer: Any, *, max_new_tokens: int, temperature: float,
                   eos_token_ids: Sequence[int], generation_config: Any = None) -> HFEngine:
    """Batched sampling with ``model.generate`` (a callable ``HFEngine``)."""
    return HFEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                    eos_token_ids=eos_token_ids, generation_config=generation_config)


class PagedEngine:
    """transformers' continuous batching with paged attention (``model.init_continuous_batching``).

    Requests go to the manager as episodes ask (``submit``) and come back as each finishes
    (``collect``); the manager's background thread decodes every running request one token at a
    time, so a finished request frees its place at once and a new one joins at the next step.
    Meant for GPUs: on CPU it runs, but far slower than ``HFEngine``. The KV cache takes
    ``memory_share`` of the free GPU memory while the rollout runs and is released afterwards.
    """

    streaming = True

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int, temperature: float,
                 eos_token_ids: Sequence[int], memory_share: float = 0.3, max_requests: int = 64,
                 max_context: int = 4096, page_size: int = 64):
        self.model = model
        self.eos = [int(e) for e in eos_token_ids]
        self.max_new_tokens = int(max_new_tokens)
        self.generation_config = sampling_config(max_new_tokens=max_new_tokens, temperature=temperature,
                                                 eos_token_ids=self.eos, pad_token_id=tokenizer.pad_token_id)
        self.memory_share = memory_share
        self.max_requests = max(1, int(max_requests))
        self.max_context = int(max_context)
        self.page_size = int(page_size)
        self.manager = None
        self._was_training = False

    def start(self) -> None:
        import torch
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        kwargs: dict[str, Any] = {"page_size": self.page_size, "max_memory_percent": self.memory_share}
        if next(self.model.parameters()).device.type == "cpu":
            # Sized from the workload: on CPU the default would take a share of the whole RAM.
            per_request = math.ceil((self.max_context + self.max_new_tokens) / self.page_size) + 1
            kwargs.update(num_blocks=per_request * self.max_requests, max_batch_tokens=max(512, 4 * self.page_size),
                          max_requests_per_batch=self.max_requests)
        self._was_training = self.model.training
        with torch.no_grad():
            self.manager = self.model.init_continuous_batching(
                generation_config=self.generation_config,
                continuous_batching_config=ContinuousBatchingConfig(**kwargs))
        self.manager.start()

    def submit(self, key: str, prompt: list[int], budget: int | None) -> None:
        if self.manager is None:
            raise EngineError("the paged engine was not started")
        self._check()
        got = self.manager.add_request(list(prompt), request_id=key, eos_token_id=self.eos,
                                       max_new_tokens=self.max_new_tokens if budget is None else int(budget))
        if got is None:
            raise EngineError("the continuous batching manager refused a request (it is stopping or failed)")

    def collect(self, timeout: float) -> list[tuple[str, list[int], str | None]]:
        """Finished requests as (key, tokens, error); blocks up to ``timeout`` for the first one."""
        out = []
        r = self.manager.get_result(timeout=timeout)
        while r is not None:
            if r.error is not None or r.is_finished():
                out.append((r.request_id, list(r.generated_tokens), r.error))
            r = self._nowait()
        if not out:
            self._check()
        return out

    def _nowait(self):
        import queue

        try:
            return self.manager.output_router.output_queue.get_nowait()
        except queue.Empty:
            return None

    def _check(self) -> None:
        status = self.manager.background_thread_status
        if status.fatal_error is not None:
            raise EngineError(f"paged generation failed: {status.fatal_error}")
        if not self.manager.is_running():
            raise EngineError("the continuous batching thread stopped unexpectedly")

    def cancel(self, key: str) -> None:
        if self.manager is not None:
            self.manager.cancel_request(key)

    def stop(self) -> None:
        manager, self.manager = self.manager, None
        if manager is None:
            return
        try:
            manager.stop(block=True, timeout=30, hard_stop=True)
            manager.destroy()
        finally:
            if self._was_training:
                self.model.train()


def as_engine(engine: Any) -> Any:
    """An engine object, or a plain generate function wrapped as one."""
    if hasattr(engine, "run") or hasattr(engine, "submit"):
        return engine
    if callable(engine):
        return FnEngine(engine)
    raise TypeError(f"not a generation engine: {engine!r}")


# --------------------------------------------------------------------------- scheduler

@dataclass(eq=False)
class _Request:
    prompt: list[int]
    slot: "Slot | None"
    key: str
    engine_prompt: list[int] = field(default_factory=list)
    prefix: list[int] = field(default_factory=list)
    budget: int | None = None
    done: bool = False
    result: list[int] | None = None
    error: BaseException | None = None


class Slot:
    """One episode's place in the scheduler: ``generate`` its turns, ``leave`` when it asks no more."""

    def __init__(self, scheduler: "GenerationScheduler"):
        self.scheduler = scheduler
        self.left = False
        self.cancelled: str | None = None

    def generate(self, prompt_ids: list[int]) -> list[int]:
        return self.scheduler.generate(prompt_ids, slot=self)

    def leave(self) -> None:
        self.scheduler.leave(self)


class GenerationScheduler:
    """Shares one generation engine between episode threads (see the module docstring).

    An episode calls ``join()`` (a ``Slot``) before its first request and ``leave()`` when it
    will ask for no more; ``generate(prompt_ids)`` blocks until its completion is back (or raises
    the engine's error, or ``EpisodeCancelled``). One thread serves the engine: ``serve_once``
    in a loop (``EpisodeRunner.run`` does this in the thread that called it; ``serve_in_thread``
    starts a background one). Without a serving thread a batch engine runs in the episode thread
    whose request (or leave) made the batch ready; a streaming engine's requests wait until a
    thread serves it.
    """

    def __init__(self, engine: Any, *, mode: str = "continuous", max_batch: int = 64, cut: bool = True,
                 cut_ratio: float = 1.0, settle_steps: int = 2):
        if mode not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {mode!r}")
        self.engine = as_engine(engine)
        self.mode = mode
        self._max_batch = max(1, max_batch)
        self.cut = cut and mode == "continuous"
        self.cut_ratio = cut_ratio
        self.settle_steps = settle_steps
        self._arrivals = 0
        self._cond = threading.Condition()
        self._active = 0
        self._pending: list[_Request] = []
        self._inflight: dict[str, _Request] = {}
        self._keys = itertools.count()
        self.serving = False
        self.failure: BaseException | None = None
        self.batches = 0
        self.requests = 0
        self.cuts = 0
        self.gen_s = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    # ---------------------------------------------------------------- episode side
    def join(self) -> Slot:
        with self._cond:
            self._active += 1
        return Slot(self)

    def leave(self, slot: Slot | None = None) -> None:
        with self._cond:
            if slot is not None:
                if slot.left:
                    return
                slot.left = True
            self._active -= 1
            self._cond.notify_all()
        self._run_inline_if_ready()

    def generate(self, prompt_ids: list[int], slot: Slot | None = None) -> list[int]:
        with self._cond:
            if slot is not None and slot.cancelled is not None:
                raise EpisodeCancelled(slot.cancelled)
            if self.failure is not None:
                raise EngineError(f"generation failed: {self.failure}")
            req = _Request(list(prompt_ids), slot, f"r{next(self._keys)}", engine_prompt=list(prompt_ids))
            self.prompt_tokens += len(req.prompt)
            self._arrivals += 1
            if self.engine.streaming and self.serving and self.mode == "continuous":
                self._submit([req])  # straight to the engine: it batches by itself
            else:
                self._pending.append(req)
            self._cond.notify_all()
        self._run_inline_if_ready()
        with self._cond:
            while not req.done:
                self._cond.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def cancel(self, slot: Slot, reason: str) -> None:
        """End an episode from outside: its requests are dropped and its thread gets ``EpisodeCancelled``."""
        with self._cond:
            slot.cancelled = reason
            err = EpisodeCancelled(reason)
            for r in [r for r in self._pending if r.slot is slot]:
                self._pending.remove(r)
                self._finish(r, error=err)
            for key, r in list(self._inflight.items()):
                if r.slot is slot:
                    self._finish(r, error=err)
                    if self.engine.streaming:
                        self._inflight.pop(key, None)
                        try:
                            self.engine.cancel(key)
                        except Exception:  # noqa: BLE001 - a failed cancel only wastes a few tokens
                            pass
            if not slot.left:
                slot.left = True
                self._active -= 1
            self._cond.notify_all()
        self._run_inline_if_ready()

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---------------------------------------------------------------- engine side
    def _ready(self) -> bool:
        if not self._pending:
            return False
        return self.mode == "continuous" or len(self._pending) >= self._active

    def _run_inline_if_ready(self) -> None:
        # No serving thread: the episode thread that made a batch ready runs it (and whatever
        # became ready while it ran, so no request is left without a thread to run it).
        if self.serving or self.engine.streaming:
            return
        while True:
            with self._cond:
                if self._inflight or not self._ready():
                    return
                batch = self._take()
            self._run_batch(batch)

    def serve_once(self, timeout: float) -> None:
        """Run the engine once if anything is ready, else wait up to ``timeout`` for something to happen."""
        if self.engine.streaming:
            with self._cond:
                if self._ready():
                    self._submit(self._pending)
                    self._pending = []
                busy = bool(self._inflight)
                if not busy:
                    self._cond.wait(timeout)
                    return
            self._collect(timeout)
            return
        with self._cond:
            if not self._ready():
                self._cond.wait(timeout)
                if not self._ready():
                    return
            batch = self._take()
        self._run_batch(batch)

    def _take(self) -> list[_Request]:
        if self.mode == "lockstep":  # everything waiting, in prompt-length order (less left padding)
            batch, self._pending = sorted(self._pending, key=lambda r: len(r.engine_prompt)), []
        else:  # oldest first (continuations of a cut batch are at the front)
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch:]
        for r in batch:
            self._inflight[r.key] = r
        return batch

    def _finish(self, r: _Request, result: list[int] | None = None, error: BaseException | None = None) -> None:
        if r.done:
            return
        r.done = True
        if error is not None:
            r.error = error
        else:
            r.result = result
            self.completion_tokens += len(result)
        self.requests += 1

    def _fail(self, exc: BaseException) -> None:
        """The engine failed: every waiting and future request sees it (caller holds the lock)."""
        self.failure = exc
        for r in list(self._inflight.values()) + self._pending:
            self._finish(r, error=exc)  # the waiters see the engine's own exception; later callers an EngineError
        self._inflight.clear()
        self._pending = []
        self._cond.notify_all()

    def _run_batch(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        try:
            for lo in range(0, len(batch), self._max_batch):
                self._run_chunk(batch[lo: lo + self._max_batch])
        except BaseException as exc:  # every waiting episode must wake up and see the failure
            with self._cond:
                self._fail(exc)
        finally:
            with self._cond:
                self.gen_s += time.perf_counter() - t0
                for r in batch:
                    self._inflight.pop(r.key, None)
                self._cond.notify_all()

    def _run_chunk(self, chunk: list[_Request]) -> None:
        self.batches += 1
        continuous = self.mode == "continuous"

        def on_done(i: int, tokens: list[int]) -> None:
            with self._cond:
                r = chunk[i]
                self._finish(r, result=r.prefix + list(tokens))
                self._cond.notify_all()

        seen = {"arrivals": self._arrivals, "quiet": 0}

        def should_cut(live: int) -> bool:
            # Cut when at least as many requests wait as rows still decode, and either every
            # other episode is waiting or no request arrived for ``settle_steps`` tokens (a burst
            # of arrivals is taken in one cut, not one cut per arrival).
            with self._cond:
                waiting, arrivals, others = len(self._pending), self._arrivals, self._active - live
            if arrivals != seen["arrivals"]:
                seen["arrivals"], seen["quiet"] = arrivals, 0
            else:
                seen["quiet"] += 1
            if not waiting or waiting < live * self.cut_ratio:
                return False
            return waiting >= others or seen["quiet"] >= self.settle_steps

        outs = self.engine.run([r.engine_prompt for r in chunk], [r.budget for r in chunk],
                               on_done if continuous else None, should_cut if self.cut else None)
        if len(outs) != len(chunk):
            raise EngineError(f"generation returned {len(outs)} completions for {len(chunk)} prompts")
        with self._cond:
            again = []
            for r, (tokens, complete) in zip(chunk, outs):
                if r.done:
                    continue
                if complete:
                    self._finish(r, result=r.prefix + list(tokens))
                else:  # cut short: continue from here, with the rest of the token budget
                    r.prefix = r.prefix + list(tokens)
                    r.engine_prompt = r.prompt + r.prefix
                    left = (self.engine.max_new_tokens if r.budget is None else r.budget) - len(tokens)
                    if left <= 0:
                        self._finish(r, result=r.prefix)
                    else:
                        r.budget = left
                        again.append(r)
            if again:
                self.cuts += 1
                for r in again:
                    self._inflight.pop(r.key, None)
                self._pending = again + self._pending
            self._cond.notify_all()

    def _submit(self, reqs: list[_Request]) -> None:
        """Hand requests to a streaming engine (caller holds the lock)."""
        for r in reqs:
            self._inflight[r.key] = r
        try:
            for r in reqs:
                self.engine.submit(r.key, r.engine_prompt, r.budget)
        except BaseException as exc:
            self._fail(exc)

    def _collect(self, timeout: float) -> None:
        t0 = time.perf_counter()
        try:
            got = self.engine.collect(timeout)
        except BaseException as exc:
            with self._cond:
                self._fail(exc)
            return
        with self._cond:
            self.gen_s += time.perf_counter() - t0
            if got:
                self.batches += 1
            for key, tokens, error in got:
                r = self._inflight.pop(key, None)
                if r is None:  # cancelled meanwhile
                    continue
                if error is not None:
                    self._fail(EngineError(f"paged generation failed: {error}"))
                    return
                self._finish(r, result=list(tokens))
            self._cond.notify_all()

    def serve_in_thread(self) -> "_ServeThread":
        """Serve from a background thread (``with scheduler.serve_in_thread(): ...``), for standalone use."""
        return _ServeThread(self)


class _ServeThread:
    def __init__(self, scheduler: GenerationScheduler):
        self.s = scheduler
        self.stop = False
        self.thread = threading.Thread(target=self._loop, name="awm-generation", daemon=True)

    def _loop(self) -> None:
        while not self.stop:
            self.s.serve_once(0.02)

    def __enter__(self):
        if hasattr(self.s.engine, "start"):
            self.s.engine.start()
        self.s.serving = True
        self.thread.start()
        return self.s

    def __exit__(self, *exc):
        self.stop = True
        self.s.poke()
        self.thread.join(30)
        self.s.serving = False
        if hasattr(self.s.engine, "stop"):
            self.s.engine.stop()


class GenerationBatcher(GenerationScheduler):
    """The lockstep scheduler: a batch runs when every active episode waits (the old behaviour)."""

    def __init__(self, generate_fn: Any, *, max_batch: int = 64, mode: str = "lockstep"):
        super().__init__(generate_fn, mode=mode, max_batch=max_batch)


# --------------------------------------------------------------------------- policy

class RecordingPolicy:
    """The trained model as an agent-loop policy; records every step's token ids.

    Messages are rendered by ``TextToolCallPolicy`` (tool signatures in the system prompt, tool
    results as ``tool`` messages) and then by the tokenizer's chat template; the model writes
    ``<tool_call>`` blocks that the loop parses. ``batcher`` is anything with
    ``generate(prompt_ids)``: a scheduler ``Slot`` or a scheduler.
    """

    def __init__(self, batcher: Any, tokenizer: Any, *, max_prompt_tokens: int, lock: Any = None):
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        # Episode threads share one tokenizer; the Rust backend refuses concurrent mutable use.
        self.lock = lock or threading.Lock()
        self.steps: list[StepRecord] = []
        self._text = TextToolCallPolicy(self._generate)

    def prompt_ids(self, rendered: list[dict[str, Any]]) -> list[int]:
        with self.lock:
            text = self.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _generate(self, rendered: list[dict[str, Any]]) -> Generation:
        ids = self.prompt_ids(rendered)
        if len(ids) > self.max_prompt_tokens:
            # Nothing fits: the step produces no reply (an empty final answer) and no training tokens.
            self.steps.append(StepRecord(ids, [], overflow=True))
            return Generation("", len(ids), 0)
        out = self.batcher.generate(ids)
        self.steps.append(StepRecord(ids, out))
        with self.lock:
            text = self.tokenizer.decode(out, skip_special_tokens=True)
        return Generation(text, len(ids), len(out))

    def act(self, messages, tools):
        return self._text.act(messages, tools)

    def render(self, messages, tools):
        return self._text.render(messages, tools)


# --------------------------------------------------------------------------- episodes

@dataclass
class EpisodeResult:
    env_id: str
    task_idx: int
    episode: Episode
    outcome: Outcome
    steps: list[StepRecord]
    samples: list[Sample]
    verify_s: float = 0.0
    mode: str = "message"  # "conversation" when the episode was played with a user simulator

    @property
    def reward(self) -> float | None:
        """The episode's reward; None for environment errors (left out of the loss and the baseline)."""
        return None if self.outcome.env_error else self.outcome.reward

    def row(self, **extra: Any) -> dict[str, Any]:
        """The episode as the run's ``rollouts.rank<k>.jsonl`` keeps it: the ``rollouts`` columns
        (``episode_columns``; a conversation's messages are every party's, tagged with its sender)
        plus which task, the mode, the verdict and the verifier's time."""
        return {"env_id": self.env_id, "task_idx": self.task_idx, "mode": self.mode, "verdict": self.outcome.verdict,
                "verify_s": self.verify_s,
                **episode_columns(self.episode, self.outcome, duration_s=self.episode.duration_s), **extra}


@dataclass
class RolloutBatch:
    results: list[EpisodeResult] = field(default_factory=list)
    rollout_s: float = 0.0
    gen_s: float = 0.0
    batches: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cuts: int = 0
    engine_error: str | None = None

    @property
    def env_s(self) -> float:
        return sum(r.episode.env_s for r in self.results)

    @property
    def verify_s(self) -> float:
        return sum(r.verify_s for r in self.results)

    @property
    def env_errors(self) -> int:
        return sum(bool(r.outcome.env_error) for r in self.results)

    def rates(self) -> dict[str, float]:
        n = max(1, len(self.results))
        labels = [r.outcome.label for r in self.results]
        return {"completion_rate": labels.count("completed") / n,
                "format_error_rate": labels.count("format_error") / n,
                "env_error_rate": self.env_errors / n}


@dataclass(eq=False)
class _Run:
    index: int
    env_id: str
    task_idx: int
    slot: Slot | None = None
    thread: threading.Thread | None = None
    started: float = 0.0
    result: EpisodeResult | None = None


class EpisodeRunner:
    """Runs episodes of known tasks with a generation engine, in real sandbox sessions.

    ``environments`` are ``Environment`` bundles; each is loaded once into ``pool``.
    ``scheduler`` is ``continuous`` or ``lockstep``; ``episode_timeout_s`` bounds one episode.
    ``mode`` (``message`` or ``conversation``) says which episodes are conversations
    (``plays_as_conversation``); ``user`` (``llm`` or ``scripted``) plays them, within ``max_steps`` and
    ``max_errors``; an LLM user's calls go against ``budget`` (default: the run's, ``run_budget``,
    made on first use) and into the ``ledger`` file, under ``run_id``.
    """

    def __init__(self, pool: Any, environments: Sequence[Any], settings: Any, *, tokenizer: Any,
                 interface: str = "direct", max_turns: int = 20, window: int | None = 3,
                 max_prompt_tokens: int = 16384, threads: int = 0, max_batch: int = 64, merge: bool = True,
                 scheduler: str = "continuous", episode_timeout_s: float | None = None, cut: bool = True,
                 judge: Any = None, mode: str = "message", user: str = "llm", max_steps: int = 100,
                 max_errors: int = 10, budget: Any = None, ledger: Any = None, run_id: str | None = None):
        if scheduler not in SCHEDULERS:
            raise AWMError(f"rollout scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        self.pool = pool
        self.environments = {e.id: e for e in environments}
        self.handles = {e.id: pool.load(e) for e in environments}
        self.tools = {k: h.tools() for k, h in self.handles.items()}
        self.settings = settings
        self.tokenizer = tokenizer
        self.interface = interface
        self.max_turns = max_turns
        self.window = window
        self.max_prompt_tokens = max_prompt_tokens
        self.threads = threads
        self.max_batch = max_batch
        self.merge = merge
        self.scheduler = scheduler
        self.episode_timeout_s = episode_timeout_s
        self.cut = cut
        # The code-augmented LLM judge (``awm_core.agent.LLMJudge``) labels episodes on the
        # verifier's evidence when set; None: the verifier's verdict decides.
        self.judge = judge
        self.mode = mode
        self.max_steps = max_steps
        self.max_errors = max_errors
        self.users = RunUsers(settings, user, run_id=run_id, ledger=ledger, budget=budget)
        self.tokenizer_lock = threading.Lock()

    def mode_of(self, env_id: str, task_idx: int) -> str:
        """What the episode's row records as its ``mode``."""
        env = self.environments.get(env_id)
        try:
            return episode_mode(env, env.task(task_idx), self.mode)
        except Exception:  # noqa: BLE001 - an unknown task: its failed row still needs a mode
            return "message"

    @property
    def budget(self) -> Any:
        """The LLM budget of the run's user simulator calls (None until the first LLM user, unless given)."""
        return self.users.budget

    def user_for(self, env_id: str, task_idx: int, kind: str | None = None) -> Any:
        """The user simulator of one episode that is a conversation in the runner's mode (None for one
        message); ``kind`` overrides the runner's (the warm start replays references with the scripted user)."""
        return self.users.user(self.environments[env_id], task_idx, self.handles[env_id].user_tools(), self.mode, kind)

    def conversation_args(self, env_id: str, user: Any, task_idx: int | None = None) -> dict[str, Any]:
        """``run_episode``'s keyword arguments for a conversation with ``user`` (``conversation_args``); the
        task is ``task_idx``'s, else the one the user plays."""
        if user is None:
            return {}
        env = self.environments[env_id]
        task = env.task(task_idx) if task_idx is not None else user.task
        return conversation_args(env, task, user, self.handles[env_id].user_tools(), interface=self.interface,
                                 max_steps=self.max_steps, max_errors=self.max_errors)

    def run(self, tasks: Sequence[tuple[str, int]], engine: Any) -> RolloutBatch:
        """Every task as one episode; ``engine`` is a generate function or an engine object.

        Raises ``EngineError`` when the engine itself failed; any other failure of an episode is
        that episode's environment error.
        """
        for env_id, idx in tasks:
            if env_id not in self.environments:
                raise AWMError(f"task {env_id}/{idx}: environment {env_id!r} is not loaded for training")
        sched = GenerationScheduler(engine, mode=self.scheduler, max_batch=self.max_batch, cut=self.cut)
        runs = [_Run(i, env_id, int(idx)) for i, (env_id, idx) in enumerate(tasks)]
        limit = max(1, self.threads or len(runs))
        timeout = self.episode_timeout_s
        lock = threading.Lock()
        started = time.perf_counter()
        todo = list(runs)
        running: list[_Run] = []
        if hasattr(sched.engine, "start"):
            sched.engine.start()
        sched.serving = True
        try:
            while True:
                now = time.perf_counter()
                with lock:
                    running = [r for r in running if r.result is None]
                    if timeout is not None:
                        for r in [r for r in running if now - r.started >= timeout]:
                            reason = f"episode timed out after {timeout:g}s"
                            r.result = self._failed(r.env_id, r.task_idx, reason)
                            sched.cancel(r.slot, reason)
                            running.remove(r)
                    if sched.failure is not None:  # the engine is gone: nothing can finish; stop now
                        for r in running:
                            r.result = self._failed(r.env_id, r.task_idx, f"generation failed: {sched.failure}")
                            sched.cancel(r.slot, "generation failed")
                        running = []
                        todo = []
                    while todo and len(running) < limit:
                        r = todo.pop(0)
                        r.slot = sched.join()
                        r.started = time.perf_counter()
                        r.thread = threading.Thread(target=self._episode_thread, args=(r, sched, lock),
                                                    name=f"awm-episode-{r.index}", daemon=True)
                        running.append(r)
                        r.thread.start()
                    if not running and not todo:
                        break
                    wait = 0.5
                    if timeout is not None:
                        wait = min(wait, max(0.0, min(r.started + timeout for r in running) - now))
                sched.serve_once(max(0.001, wait))
        finally:
            sched.serving = False
            if hasattr(sched.engine, "stop"):
                sched.engine.stop()
        for r in runs:
            if r.result is None:  # never started (the engine failed first)
                r.result = self._failed(r.env_id, r.task_idx, f"generation failed: {sched.failure}")
        batch = RolloutBatch(results=[r.result for r in runs], rollout_s=time.perf_counter() - started,
                             gen_s=sched.gen_s, batches=sched.batches, prompt_tokens=sched.prompt_tokens,
                             completion_tokens=sched.completion_tokens, cuts=sched.cuts)
        if sched.failure is not None:
            f = sched.failure
            batch.engine_error = str(f) if isinstance(f, EngineError) else f"{type(f).__name__}: {f}"
            raise EngineError(batch.engine_error)
        return batch

    def _episode_thread(self, r: _Run, sched: GenerationScheduler, lock: threading.Lock) -> None:
        try:
            result = self._episode(r.env_id, r.task_idx, r.slot)
        except BaseException as exc:  # noqa: BLE001 - the last net: nothing may escape an episode thread
            result = self._failed(r.env_id, r.task_idx, f"episode failed: {type(exc).__name__}: {exc}")
        finally:
            r.slot.leave()
        with lock:
            if r.result is None:  # else it was ended from outside (timeout) and this result is stale
                r.result = result
        sched.poke()

    def _episode(self, env_id: str, task_idx: int, slot: Any) -> EpisodeResult:
        env = self.environments[env_id]
        policy = RecordingPolicy(slot, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens,
                                 lock=self.tokenizer_lock)
        try:
            user = self.user_for(env_id, task_idx)
        except Exception as exc:  # no LLM user client, or no reference for the scripted one
            return self._failed(env_id, task_idx, f"no user simulator: {type(exc).__name__}: {exc}")
        try:
            session = self.handles[env_id].open_session()
        except Exception as exc:
            return self._failed(env_id, task_idx, f"open_session failed: {type(exc).__name__}: {exc}")
        try:
            try:
                episode = run_episode(policy, session, env.task(task_idx), self.tools[env_id],
                                      interface=self.interface, max_turns=self.max_turns, window=self.window,
                                      **self.conversation_args(env_id, user, task_idx))
            finally:
                try:
                    session.close()
                except Exception:  # noqa: BLE001 - the episode is over; a close failure changes nothing
                    pass
        except EngineError:
            raise
        except Exception as exc:  # the policy or the loop raised: not the agent's doing
            return self._failed(env_id, task_idx, f"episode failed after {len(policy.steps)} generation(s): "
                                                  f"{type(exc).__name__}: {exc}", policy.steps)
        finally:
            slot.leave()
        if len(policy.steps) != len(episode.turns):  # one generation per turn, or the samples are misaligned
            return self._failed(env_id, task_idx, f"{len(policy.steps)} generations for {len(episode.turns)} turns",
                                policy.steps, episode)
        t0 = time.perf_counter()
        try:
            outcome = verify_episode(self.pool, env, task_idx, episode, self.settings, judge=self.judge)
        except Exception as exc:
            return self._failed(env_id, task_idx, f"verifier failed: {type(exc).__name__}: {exc}", policy.steps,
                                episode, verify_s=time.perf_counter() - t0)
        verify_s = time.perf_counter() - t0
        samples = build_samples(policy.steps, merge=self.merge) if not outcome.env_error else []
        return EpisodeResult(env_id, task_idx, episode, outcome, policy.steps, samples, verify_s,
                             self.mode_of(env_id, task_idx))

    def _failed(self, env_id: str, task_idx: int, reason: str, steps: list[StepRecord] | None = None,
                episode: Episode | None = None, verify_s: float = 0.0) -> EpisodeResult:
        """An environment-error episode (masked out of the loss) with its reason."""
        if episode is None:
            env = self.environments.get(env_id)
            try:
                text = env.task(task_idx).text
            except Exception:  # noqa: BLE001
                text = ""
            episode = Episode(task=text, interface=self.interface, env_id=env_id, task_idx=task_idx,
                              window=self.window, max_turns=self.max_turns, system=None,
                              task_message={"role": "user", "content": text})
        episode.termination = "environment_error"
        episode.error = episode.error or reason
        try:
            penalty = float(self.settings.rewards.environment_error)
        except Exception:  # noqa: BLE001
            penalty = 0.0
        outcome = Outcome(label="environment_error", reward=penalty, env_error=True, error=reason)
        return EpisodeResult(env_id, task_idx, episode, outcome, list(steps or []), [], verify_s,
                             self.mode_of(env_id, task_idx))


class EpisodeRollout:
    """TRL ``rollout_func``: one episode per prompt it receives (prompts come repeated per group).

    The trainer tells it which task each prompt is (``begin(tasks)``) because TRL hands the
    function only the prompts. It returns, per episode, its first training sample (TRL's own
    bookkeeping runs on it) and the reward as ``awm_reward``; the trainer then swaps in every
    sample of every episode (``last``). After the rollout every process reports to the others
    whether its engine failed and how many of its episodes failed; a failed engine anywhere, or
    every episode of the step failing, stops training on every process with the same message.
    """

    def __init__(self, runner: EpisodeRunner, generate_fn_for: Callable[[Any], Any]):
        self.runner = runner
        self.generate_fn_for = generate_fn_for
        self.pending: list[tuple[str, int]] | None = None
        self.last: RolloutBatch | None = None

    def begin(self, tasks: list[tuple[str, int]]) -> None:
        self.pending = list(tasks)

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        tasks, self.pending = self.pending, None
        if tasks is None or len(tasks) != len(prompts):
            raise AWMError("EpisodeRollout needs begin(tasks) with one task per prompt before each call")
        batch, fatal = None, None
        try:
            with self.generate_fn_for(trainer) as generate_fn:
                batch = self.runner.run(tasks, generate_fn)
        except EngineError as exc:
            fatal = f"the generation engine failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. the engine did not start: reported on every process
            fatal = f"the rollout failed: {type(exc).__name__}: {exc}"
        self._check_all_processes(trainer, batch, fatal)
        self.last = batch
        pad = trainer.processing_class.pad_token_id
        prompt_ids, completion_ids, env_mask = [], [], []
        for r in batch.results:
            if r.samples:
                s = r.samples[0]
                prompt_ids.append(s.prompt_ids)
                completion_ids.append(s.completion_ids)
                env_mask.append(s.mask)
            else:  # nothing to train on (context overflow, environment error): a one-token stand-in, masked out
                prompt_ids.append(r.steps[0].prompt_ids[-1:] if r.steps else [pad])
                completion_ids.append([pad])
                env_mask.append([0])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None,
                "env_mask": env_mask, "awm_reward": [r.reward for r in batch.results]}

    @staticmethod
    def _check_all_processes(trainer: Any, batch: RolloutBatch | None, fatal: str | None) -> None:
        """One exchange between processes after every rollout, so all of them stop together or none."""
        results = batch.results if batch is not None else []
        failed = [r for r in results if r.outcome.env_error]
        mine = {"fatal": fatal, "episodes": len(results), "env_errors": len(failed),
                "reasons": sorted({r.outcome.error or "" for r in failed})[:3]}
        reports = [mine]
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            from accelerate.utils import gather_object

            reports = gather_object([mine])
        broken = [(k, r["fatal"]) for k, r in enumerate(reports) if r["fatal"]]
        if broken:
            k, msg = broken[0]
            where = f" (process {k})" if len(reports) > 1 else ""
            raise AWMError(f"training stopped{where}: {msg}")
        total = sum(r["episodes"] for r in reports)
        errors = sum(r["env_errors"] for r in reports)
        if total and errors == total:
            reasons = sorted({x for r in reports for x in r["reasons"]})[:3]
            raise AWMError(f"training stopped: every episode of this step ({total}) failed as an environment "
                           f"error; first reasons: {'; '.join(reasons)}")


def episode_reward(completions: list[Any], awm_reward: list[float | None] | None = None, **_: Any) -> list[float | None]:
    """TRL reward function: the verifier's reward of each episode (None: environment error)."""
    if awm_reward is None:
        raise AWMError("episode_reward needs the awm_reward column that EpisodeRollout returns")
    return list(awm_reward)

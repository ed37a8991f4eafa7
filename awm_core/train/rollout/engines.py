"""Generation engines of the rollout scheduler: what turns prompts into completions.

Two kinds, told apart by their Protocol, not by probing attributes:

- ``BatchEngine`` (``FnEngine`` over a plain function, e.g. vLLM's; ``HFEngine``, ``model.generate``):
  ``run(prompts, budgets, on_done, should_cut)`` generates a batch in the calling thread;
- ``StreamingEngine`` (``HFStepEngine``: continuous batching over the model's forward pass;
  ``PagedEngine``: transformers' paged continuous batching, for GPUs): requests are ``submit``-ted
  and ``collect``-ed as they finish, between ``start`` and ``stop``.

``make_engine`` picks one for a backend and scheduler; the trainer and ``benchmarks/rollouts_gen.py``
both build theirs with it.
"""
from __future__ import annotations

import copy
import math
import threading
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

from awm_core.errors import EngineError

GenerateFn = Callable[[list[list[int]]], list[list[int]]]


@runtime_checkable
class BatchEngine(Protocol):
    """Generates a whole batch per call; the scheduler forms the batches."""

    streaming: Literal[False]

    def run(self, prompts: list[list[int]], budgets: list[int | None], on_done: Any = None,
            should_cut: Any = None) -> list[tuple[list[int], bool]]:
        """(completion, finished) per prompt; ``on_done(i, tokens)`` as a row ends, ``should_cut(live)``
        may end the call early (unfinished rows come back with finished False)."""


@runtime_checkable
class StreamingEngine(Protocol):
    """Keeps its own running batch: requests join and leave it one token step at a time."""

    streaming: Literal[True]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, key: str, prompt: list[int], budget: int | None) -> None: ...

    def cancel(self, key: str) -> None: ...

    def collect(self, timeout: float) -> list[tuple[str, list[int], str | None]]:
        """(key, completion, error) of the requests finished within ``timeout``."""


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


def as_engine(engine: Any) -> "BatchEngine | StreamingEngine":
    """An engine object, or a plain generate function wrapped as one."""
    if isinstance(engine, (BatchEngine, StreamingEngine)):
        return engine
    if callable(engine):
        return FnEngine(engine)
    raise TypeError(f"not a generation engine: {engine!r}")


def make_engine(backend: str, scheduler: str, model: Any, tokenizer: Any, *, max_new_tokens: int,
                temperature: float, eos_token_ids: Sequence[int], max_rows: int, max_context: int | None = None,
                memory_share: float | None = None) -> "BatchEngine | StreamingEngine":
    """The engine for a generation backend (vLLM aside: the trainer wraps TRL's as a function):

    - ``paged``: ``PagedEngine`` (at most ``max_rows`` requests, ``max_context`` tokens each,
      ``memory_share`` of the GPU for its cache);
    - ``transformers`` under the ``continuous`` scheduler: ``HFStepEngine`` (at most ``max_rows``);
    - ``transformers`` otherwise: ``HFEngine`` (``model.generate`` batches).
    """
    common = {"max_new_tokens": max_new_tokens, "temperature": temperature, "eos_token_ids": eos_token_ids}
    if backend == "paged":
        extra = {} if memory_share is None else {"memory_share": memory_share}
        return PagedEngine(model, tokenizer, max_requests=max_rows, max_context=max_context, **common, **extra)
    if backend != "transformers":
        raise ValueError(f"no engine for generation backend {backend!r} (transformers, paged)")
    if scheduler == "continuous":
        return HFStepEngine(model, tokenizer, max_rows=max_rows, **common)
    return hf_generate_fn(model, tokenizer, **common)

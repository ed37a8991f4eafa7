"""The rollout scheduler: episode threads share one generation engine (``awm_core.train.rollout``'s
docstring says how the ``continuous`` and ``lockstep`` modes batch)."""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from awm_core.errors import EngineError, EpisodeCancelled
from awm_core.train.rollout.engines import StreamingEngine, as_engine

SCHEDULERS = ("continuous", "lockstep")


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
        if isinstance(self.s.engine, StreamingEngine):
            self.s.engine.start()
        self.s.serving = True
        self.thread.start()
        return self.s

    def __exit__(self, *exc):
        self.stop = True
        self.s.poke()
        self.thread.join(30)
        self.s.serving = False
        if isinstance(self.s.engine, StreamingEngine):
            self.s.engine.stop()


class GenerationBatcher(GenerationScheduler):
    """The lockstep scheduler: a batch runs when every active episode waits (the old behaviour)."""

    def __init__(self, generate_fn: Any, *, max_batch: int = 64, mode: str = "lockstep"):
        super().__init__(generate_fn, mode=mode, max_batch=max_batch)



"""Multi-turn rollouts for GRPO: every completion of a group is a whole episode in its own session.

Episodes run through the agent loop (``awm_core.agent.run_episode``), so training sees exactly
what inference sees. Each episode has its own thread and a fresh session from the sandbox pool.
The model is shared: a ``GenerationBatcher`` holds each episode's request until every running
episode is waiting for the model, then generates all of them as one batch (one forward pass
per token for the whole group instead of one per episode). Environment calls, snapshots and
verifiers of the other episodes run while no generation is pending.

``EpisodeRollout`` is the ``rollout_func`` handed to TRL's ``GRPOTrainer``.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from awm_core.agent import Episode, Generation, Outcome, TextToolCallPolicy, run_episode, verify_episode
from awm_core.errors import AWMError
from awm_core.train.samples import Sample, StepRecord, build_samples

GenerateFn = Callable[[list[list[int]]], list[list[int]]]


class GenerationBatcher:
    """Batches generation requests from episode threads (see the module docstring).

    An episode thread calls ``join()`` before its first request and ``leave()`` when it will
    ask for no more; ``generate(prompt_ids)`` blocks until its batch ran. The batch runs in the
    thread whose request (or leave) made every active episode wait.
    """

    def __init__(self, generate_fn: GenerateFn, *, max_batch: int = 64):
        self._generate_fn = generate_fn
        self._max_batch = max(1, max_batch)
        self._cond = threading.Condition()
        self._active = 0
        self._pending: list[dict[str, Any]] = []
        self.batches = 0
        self.requests = 0
        self.gen_s = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def join(self) -> None:
        with self._cond:
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._run_if_ready()

    def generate(self, prompt_ids: list[int]) -> list[int]:
        req: dict[str, Any] = {"prompt": prompt_ids, "done": False, "result": None, "error": None}
        with self._cond:
            self._pending.append(req)
            self._run_if_ready()
            while not req["done"]:
                self._cond.wait()
        if req["error"] is not None:
            raise req["error"]
        return req["result"]

    def _run_if_ready(self) -> None:
        if not self._pending or len(self._pending) < self._active:
            return
        batch, self._pending = self._pending, []
        # Similar lengths together: less left padding per forward pass.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]["prompt"]))
        t0 = time.perf_counter()
        try:
            for lo in range(0, len(order), self._max_batch):
                chunk = [batch[i] for i in order[lo: lo + self._max_batch]]
                outs = self._generate_fn([r["prompt"] for r in chunk])
                if len(outs) != len(chunk):
                    raise AWMError(f"generation returned {len(outs)} completions for {len(chunk)} prompts")
                for r, out in zip(chunk, outs):
                    r["result"] = list(out)
                    self.prompt_tokens += len(r["prompt"])
                    self.completion_tokens += len(out)
        except BaseException as exc:  # every waiting episode must wake up and see the failure
            for r in batch:
                if r["result"] is None:
                    r["error"] = exc
        finally:
            self.gen_s += time.perf_counter() - t0
            self.batches += 1
            self.requests += len(batch)
            for r in batch:
                r["done"] = True
            self._cond.notify_all()


def hf_generate_fn(model: Any, tokenizer: Any, *, max_new_tokens: int, temperature: float,
                   eos_token_ids: Sequence[int], generation_config: Any = None) -> GenerateFn:
    """Batched sampling with ``model.generate`` (left padding); each completion ends at its first EOS."""
    import torch

    pad_id = tokenizer.pad_token_id
    eos = set(eos_token_ids)

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature,
                                  "top_p": 1.0, "top_k": 0, "pad_token_id": pad_id, "eos_token_id": list(eos)}
        if generation_config is not None:
            kwargs = {"generation_config": generation_config, "max_new_tokens": max_new_tokens}
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        result = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
            result.append(row[:cut])
        return result

    return generate


class RecordingPolicy:
    """The trained model as an agent-loop policy; records every step's token ids.

    Messages are rendered by ``TextToolCallPolicy`` (tool signatures in the system prompt, tool
    results as ``tool`` messages) and then by the tokenizer's chat template; the model writes
    ``<tool_call>`` blocks that the loop parses.
    """

    def __init__(self, batcher: GenerationBatcher, tokenizer: Any, *, max_prompt_tokens: int,
                 lock: Any = None):
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


@dataclass
class EpisodeResult:
    env_id: str
    task_idx: int
    episode: Episode
    outcome: Outcome
    steps: list[StepRecord]
    samples: list[Sample]
    verify_s: float = 0.0

    @property
    def reward(self) -> float | None:
        """The episode's reward; None for environment errors (left out of the loss and the baseline)."""
        return None if self.outcome.env_error else self.outcome.reward

    def row(self, **extra: Any) -> dict[str, Any]:
        ep = self.episode
        return {"env_id": self.env_id, "task_idx": self.task_idx, "reward": self.outcome.reward,
                "label": self.outcome.label, "env_error": self.outcome.env_error, "turns": len(ep.turns),
                "prompt_tokens": ep.prompt_tokens, "completion_tokens": ep.completion_tokens,
                "tool_calls": ep.tool_call_count, "duration_s": ep.duration_s, "env_time_s": ep.env_s,
                "verify_s": self.verify_s, "initial_digest": ep.initial_digest, "final_digest": ep.final_digest,
                "final_answer": ep.final_answer, "error": self.outcome.error or ep.error,
                "termination": ep.termination, **extra}


@dataclass
class RolloutBatch:
    results: list[EpisodeResult] = field(default_factory=list)
    rollout_s: float = 0.0
    gen_s: float = 0.0
    batches: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def env_s(self) -> float:
        return sum(r.episode.env_s for r in self.results)

    @property
    def verify_s(self) -> float:
        return sum(r.verify_s for r in self.results)

    def rates(self) -> dict[str, float]:
        n = max(1, len(self.results))
        labels = [r.outcome.label for r in self.results]
        return {"completion_rate": labels.count("completed") / n,
                "format_error_rate": labels.count("format_error") / n,
                "env_error_rate": sum(r.outcome.env_error for r in self.results) / n}


class EpisodeRunner:
    """Runs episodes of known tasks with a generate function, in real sandbox sessions.

    ``environments`` are ``Environment`` bundles; each is loaded once into ``pool``.
    """

    def __init__(self, pool: Any, environments: Sequence[Any], settings: Any, *, tokenizer: Any,
                 interface: str = "direct", max_turns: int = 20, window: int | None = 3,
                 max_prompt_tokens: int = 16384, threads: int = 0, max_batch: int = 64, merge: bool = True):
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
        self.tokenizer_lock = threading.Lock()

    def run(self, tasks: Sequence[tuple[str, int]], generate_fn: GenerateFn) -> RolloutBatch:
        for env_id, idx in tasks:
            if env_id not in self.environments:
                raise AWMError(f"task {env_id}/{idx}: environment {env_id!r} is not loaded for training")
        batcher = GenerationBatcher(generate_fn, max_batch=self.max_batch)
        started = time.perf_counter()
        workers = self.threads or len(tasks)
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="awm-episode") as ex:
            results = list(ex.map(lambda t: self._episode(t[0], t[1], batcher), tasks))
        return RolloutBatch(results=results, rollout_s=time.perf_counter() - started, gen_s=batcher.gen_s,
                            batches=batcher.batches, prompt_tokens=batcher.prompt_tokens,
                            completion_tokens=batcher.completion_tokens)

    def _episode(self, env_id: str, task_idx: int, batcher: GenerationBatcher) -> EpisodeResult:
        env = self.environments[env_id]
        policy = RecordingPolicy(batcher, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens,
                                 lock=self.tokenizer_lock)
        batcher.join()
        try:
            session = self.handles[env_id].open_session()
            try:
                episode = run_episode(policy, session, env.task(task_idx), self.tools[env_id],
                                      interface=self.interface, max_turns=self.max_turns, window=self.window)
            finally:
                session.close()
        finally:
            batcher.leave()
        t0 = time.perf_counter()
        outcome = verify_episode(self.pool, env, task_idx, episode, self.settings)
        verify_s = time.perf_counter() - t0
        if len(policy.steps) != len(episode.turns):  # one generation per turn, or the samples are misaligned
            raise AWMError(f"{env_id}/{task_idx}: {len(policy.steps)} generations for {len(episode.turns)} turns")
        return EpisodeResult(env_id, task_idx, episode, outcome, policy.steps,
                             build_samples(policy.steps, merge=self.merge), verify_s)


class EpisodeRollout:
    """TRL ``rollout_func``: one episode per prompt it receives (prompts come repeated per group).

    The trainer tells it which task each prompt is (``begin(tasks)``) because TRL hands the
    function only the prompts. It returns, per episode, its first training sample (TRL's own
    bookkeeping runs on it) and the reward as ``awm_reward``; the trainer then swaps in every
    sample of every episode (``last``).
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
        with self.generate_fn_for(trainer) as generate_fn:
            batch = self.runner.run(tasks, generate_fn)
        self.last = batch
        pad = trainer.processing_class.pad_token_id
        prompt_ids, completion_ids, env_mask = [], [], []
        for r in batch.results:
            if r.samples:
                s = r.samples[0]
                prompt_ids.append(s.prompt_ids)
                completion_ids.append(s.completion_ids)
                env_mask.append(s.mask)
            else:  # no step generated anything (context overflow): a one-token stand-in, masked out
                prompt_ids.append(r.steps[0].prompt_ids[-1:] if r.steps else [pad])
                completion_ids.append([pad])
                env_mask.append([0])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None,
                "env_mask": env_mask, "awm_reward": [r.reward for r in batch.results]}


def episode_reward(completions: list[Any], awm_reward: list[float | None] | None = None, **_: Any) -> list[float | None]:
    """TRL reward function: the verifier's reward of each episode (None: environment error)."""
    if awm_reward is None:
        raise AWMError("episode_reward needs the awm_reward column that EpisodeRollout returns")
    return list(awm_reward)

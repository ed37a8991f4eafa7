"""Episodes for GRPO: the trained model as an agent-loop policy, episodes run on threads of a
rollout, their results, and ``EpisodeRollout``, the ``rollout_func`` handed to TRL."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from awm_core.agent import Episode, Generation, Outcome, TextToolCallPolicy, episode_mode, run_episode, verify_episode
from awm_core.agent.evaluation import episode_columns
from awm_core.agent.users import RunUsers, conversation_args
from awm_core.errors import AWMError, EngineError
from awm_core.train.rollout.engines import StreamingEngine
from awm_core.train.rollout.scheduler import SCHEDULERS, GenerationScheduler, Slot
from awm_core.train.samples import Sample, StepRecord, build_samples


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
        if isinstance(sched.engine, StreamingEngine):
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
            if isinstance(sched.engine, StreamingEngine):
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

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
from awm_core.train.rollout.engines import (
    BatchEngine,
    FnEngine,
    GenerateFn,
    HFEngine,
    HFStepEngine,
    PagedEngine,
    StreamingEngine,
    as_engine,
    hf_generate_fn,
    make_engine,
    sampling_config,
)
from awm_core.train.rollout.episodes import (
    EpisodeResult,
    EpisodeRollout,
    EpisodeRunner,
    RecordingPolicy,
    RolloutBatch,
    episode_reward,
)
from awm_core.train.rollout.scheduler import SCHEDULERS, GenerationBatcher, GenerationScheduler, Slot

__all__ = ["SCHEDULERS", "BatchEngine", "EpisodeResult", "EpisodeRollout", "EpisodeRunner", "FnEngine", "GenerateFn",
           "GenerationBatcher", "GenerationScheduler", "HFEngine", "HFStepEngine", "PagedEngine", "RecordingPolicy",
           "RolloutBatch", "Slot", "StreamingEngine", "as_engine", "episode_reward", "hf_generate_fn", "make_engine",
           "sampling_config"]

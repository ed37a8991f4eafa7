"""Per-step samples of real episodes: the context of every step is exactly what the agent loop
showed the policy, and the loss mask covers the policy's tokens only.

The "model" is scripted at the token level (it replays a reference solution as <tool_call>
blocks), everything else is real: the agent loop, a sandbox session of the Clinic Booking demo
environment, its verifier, the locally trained tokenizer and its chat template.
"""
from __future__ import annotations

import threading

import pytest

from awm_core.agent import default_system_prompt, format_text_tool_call, verify_episode, visible_messages
from awm_core.settings import load_settings
from awm_core.train import models
from awm_core.train.demo import demo_environment
from awm_core.train.rollout import EpisodeRunner, GenerationBatcher, RecordingPolicy
from awm_core.train.samples import StepRecord, build_samples

TASK = 3  # clinic_booking task 3: four tool calls, then the final answer -> a 5-turn episode


@pytest.fixture(scope="module")
def env():
    return demo_environment("clinic_booking")


@pytest.fixture(scope="module")
def tok(env):
    return models.train_tokenizer(models.corpus([env]), vocab_size=2048)


def scripted_replies(env) -> list[str]:
    sol = env.solution(TASK)
    return [format_text_tool_call(c.tool, c.arguments) for c in sol.calls] + [sol.final_answer or "Done."]


def run_scripted(env, tok, pool, window):
    """One episode whose generations replay the reference solution; returns (episode, policy, replies)."""
    from awm_core.agent import run_episode

    replies = scripted_replies(env)
    eos = tok.convert_tokens_to_ids(models.EOS)
    script = iter([tok(r, add_special_tokens=False)["input_ids"] + [eos] for r in replies])

    def generate(prompts):
        return [next(script) for _ in prompts]

    batcher = GenerationBatcher(generate)
    policy = RecordingPolicy(batcher, tok, max_prompt_tokens=100_000)
    handle = pool.load(env)
    batcher.join()
    with handle.open_session() as session:
        episode = run_episode(policy, session, env.task(TASK), handle.tools(), interface="direct",
                              max_turns=10, window=window)
    batcher.leave()
    return episode, policy, handle.tools(), replies


@pytest.mark.parametrize("window", [3, None])
def test_step_samples_hold_exactly_the_visible_context_and_mask_only_policy_tokens(env, tok, pool, window):
    episode, policy, tools, replies = run_scripted(env, tok, pool, window)
    assert len(episode.turns) == 5 and episode.termination == "final_answer"
    outcome = verify_episode(pool, env, TASK, episode, load_settings())
    assert outcome.label == "completed" and outcome.reward == 1.0  # the real verifier agrees

    system = default_system_prompt("direct")
    samples = build_samples(policy.steps)
    where = {t: (s, k) for s in samples for k, t in enumerate(s.steps)}
    assert sorted(where) == list(range(5))
    for t, turn in enumerate(episode.turns):
        # what the loop showed at step t is visible_messages over the earlier turns, windowed
        expected_msgs = visible_messages({"role": "system", "content": system}, {"role": "user", "content": episode.task},
                                         episode.turns[:t], window)
        assert turn.visible == expected_msgs
        shown = len(episode.turns[:t]) if window is None else min(t, window)
        assert len(turn.visible) == 2 + 2 * shown
        rendered = policy.render(turn.visible, [{"type": "function", "function": {
            "name": x.name, "description": x.description, "parameters": x.input_schema}} for x in tools])
        text = tok.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
        expected_ids = tok(text, add_special_tokens=False)["input_ids"]
        s, k = where[t]
        assert s.context_of(k) == expected_ids, f"step {t}: context differs from what the loop showed"
        start, end = s.spans[k]
        assert tok.decode(s.completion_ids[start:end], skip_special_tokens=True) == replies[t]

    for s in samples:
        assert len(s.mask) == len(s.completion_ids)
        policy_positions = {i for a, b in s.spans for i in range(a, b)}
        assert {i for i, m in enumerate(s.mask) if m} == policy_positions
        masked_text = tok.decode([tok_id for tok_id, m in zip(s.completion_ids, s.mask) if not m])
        assert "<tool_response>" in masked_text or len(s.steps) == 1  # tool output sits only in masked tokens
        kept_text = tok.decode([tok_id for tok_id, m in zip(s.completion_ids, s.mask) if m], skip_special_tokens=True)
        assert "tool_response" not in kept_text
    if window is None:
        assert len(samples) == 1  # the whole trajectory is one sequence
    else:
        # steps 0..3 see every earlier turn (one growing sequence); step 4 has lost turn 0
        assert [s.steps for s in samples] == [[0, 1, 2, 3], [4]]
        assert samples[1].prompt_ids != samples[0].prompt_ids[: len(samples[1].prompt_ids)]


def test_build_samples_skips_empty_steps_and_splits_on_any_mismatch():
    steps = [StepRecord([1, 2], [3, 9]), StepRecord([1, 2, 3, 9, 7], [4, 9]), StepRecord([5, 6], [8, 9]),
             StepRecord([5, 6, 8, 9, 1], [], overflow=True)]
    a, b = build_samples(steps)
    assert (a.prompt_ids, a.completion_ids, a.mask) == ([1, 2], [3, 9, 7, 4, 9], [1, 1, 0, 1, 1])
    assert a.steps == [0, 1] and a.spans == [(0, 2), (3, 5)]
    assert (b.prompt_ids, b.completion_ids, b.mask, b.steps) == ([5, 6], [8, 9], [1, 1], [2])
    assert len(build_samples(steps, merge=False)) == 3


def test_batcher_runs_one_batch_when_every_episode_waits():
    seen = []

    def generate(prompts):
        seen.append(sorted(len(p) for p in prompts))
        return [[len(p)] for p in prompts]

    batcher = GenerationBatcher(generate)
    results = {}
    for n in (1, 2, 3):
        batcher.join()  # all three registered before any asks, as the runner's threads are
    threads = [threading.Thread(target=lambda n=n: (results.__setitem__(n, batcher.generate([0] * n)),
                                                    batcher.leave())) for n in (1, 2, 3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert seen == [[1, 2, 3]] and results == {1: [1], 2: [2], 3: [3]}
    assert batcher.batches == 1 and batcher.completion_tokens == 3


def test_batcher_wakes_every_waiter_when_generation_fails():
    def generate(prompts):
        raise RuntimeError("device lost")

    batcher = GenerationBatcher(generate)
    errors = []

    def episode():
        try:
            batcher.generate([1])
        except RuntimeError as exc:
            errors.append(str(exc))
        finally:
            batcher.leave()

    batcher.join()
    batcher.join()
    threads = [threading.Thread(target=episode) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert errors == ["device lost", "device lost"]


def test_runner_loads_each_environment_once_and_rejects_unknown_tasks(env, tok, pool):
    runner = EpisodeRunner(pool, [env], load_settings(), tokenizer=tok, max_turns=1)
    with pytest.raises(Exception, match="not loaded"):
        runner.run([("no_such_env", 0)], lambda prompts: [[1] for _ in prompts])

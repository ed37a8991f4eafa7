"""Rollout scheduling and failure handling.

The scheduler: every request answered exactly once and to its own episode, generation that never
waits for a busy episode, an engine failure that wakes every waiter, cancelled and departing
episodes that cannot deadlock the others; the engines: plain sampling at the configured
temperature, rows handed back as they finish and continued after a cut, the paged engine on
CPU. The runner: continuous and lockstep rollouts of the same structure, and every failure inside
an episode (a session that does not open, a verifier or the policy raising, a timeout) an
environment-error episode with its reason, while an engine failure or a step where every
episode failed stops with one message.
"""
from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from awm_core.errors import AWMError, EngineError, EpisodeCancelled
from awm_core.models import Environment, ToolCall
from awm_core.settings import load_settings
from awm_core.train import models
from awm_core.train import rollout as R
from awm_core.train.rollout import episodes
from awm_core.train.samples import build_samples
from awm_core.train.toy import counters

def counter_environment(env_id: str = "counters") -> Environment:
    add = ToolCall(tool="add", arguments={"name": "apples", "amount": 2})
    return counters([(f"Add 2 to the counter named apples ({i}).", [add], {"apples": 7, "pears": 1})
                     for i in range(2)], env_id=env_id)


@pytest.fixture(scope="module")
def env():
    return counter_environment()


@pytest.fixture(scope="module")
def tok(env):
    return models.train_tokenizer(models.corpus([env]), vocab_size=1024)


def biased_model(tok, eos_bias: float):
    """A tiny random model whose end-of-turn token gets a logit bias (likely, or never with -1e4)."""
    model = models.random_model("tiny", tok, seed=0)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids(models.EOS)] = eos_bias
        if eos_bias < 0:
            head.bias[tok.pad_token_id] = eos_bias
    model.lm_head = head
    return model.eval()


def stop_ids(tok):
    return [tok.convert_tokens_to_ids(models.EOS), tok.pad_token_id]


def run_episodes(sched, turns, *, tool_s=0.0, prompt_of=None):
    """Scripted episodes on a served scheduler: episode i asks ``turns[i]`` times; returns {i: [(prompt, out)]}."""
    seen: dict[int, list] = {}
    slots = [sched.join() for _ in turns]
    prompt_of = prompt_of or (lambda i, t: [100 + i, t] + [7] * ((i + t) % 3))

    def episode(i):
        try:
            for t in range(turns[i]):
                p = prompt_of(i, t)
                seen.setdefault(i, []).append((p, slots[i].generate(p)))
                time.sleep(tool_s * random.random())
        finally:
            slots[i].leave()

    threads = [threading.Thread(target=episode, args=(i,)) for i in range(len(turns))]
    with sched.serve_in_thread():
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
    assert not any(th.is_alive() for th in threads), "an episode never got its answer"
    return seen


# --------------------------------------------------------------------------- scheduler

@pytest.mark.parametrize("mode", ["continuous", "lockstep"])
def test_every_request_is_answered_exactly_once_and_to_its_own_episode(mode):
    calls = []

    def generate(prompts):
        calls.append([tuple(p) for p in prompts])
        time.sleep(0.002)
        return [[p[0], p[1], len(p)] for p in prompts]

    sched = R.GenerationScheduler(generate, mode=mode, max_batch=4)
    turns = [random.Random(i).randint(1, 4) for i in range(10)]
    seen = run_episodes(sched, turns, tool_s=0.004)
    for i, n in enumerate(turns):
        assert [out for _, out in seen[i]] == [[100 + i, t, len(p)] for t, (p, _) in enumerate(seen[i])]
        assert len(seen[i]) == n
    asked = [p for batch in calls for p in batch]
    assert len(asked) == len(set(asked)) == sum(turns) == sched.requests  # nothing generated twice
    assert max(len(b) for b in calls) <= 4 or mode == "lockstep"


def test_continuous_generation_never_waits_for_a_busy_episode():
    """Episode 0 is in a long tool call that ends only once episode 1 had three more turns."""
    busy = threading.Event()
    sched = R.GenerationScheduler(lambda ps: [[1] for _ in ps], mode="continuous")
    slots = [sched.join(), sched.join()]
    done = []

    def slow():
        slots[0].generate([1])
        assert busy.wait(10), "the other episode was held back"
        slots[0].generate([2])
        slots[0].leave()
        done.append(0)

    def fast():
        for t in range(4):
            slots[1].generate([3, t])
        busy.set()
        slots[1].leave()
        done.append(1)

    with sched.serve_in_thread():
        threads = [threading.Thread(target=slow), threading.Thread(target=fast)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(15)
    assert sorted(done) == [0, 1] and sched.requests == 6


@pytest.mark.parametrize("served", [True, False])
def test_an_engine_failure_wakes_every_waiter_and_fails_later_requests(served):
    def generate(prompts):
        time.sleep(0.05)
        raise RuntimeError("CUDA out of memory")

    sched = R.GenerationScheduler(generate, mode="continuous" if served else "lockstep")
    slots = [sched.join() for _ in range(3)]
    errors = []

    def episode(k):
        try:
            slots[k].generate([k])
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
        finally:
            slots[k].leave()

    threads = [threading.Thread(target=episode, args=(k,)) for k in range(3)]
    if served:
        with sched.serve_in_thread():
            for th in threads:
                th.start()
            for th in threads:
                th.join(10)
    else:
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
    assert len(errors) == 3 and all("CUDA out of memory" in e for e in errors)
    with pytest.raises(EngineError, match="CUDA out of memory"):
        sched.join().generate([9])


def test_cancelled_and_departing_episodes_never_hold_lockstep_back():
    sched = R.GenerationBatcher(lambda ps: [[len(p)] for p in ps])  # lockstep, no serving thread
    a, b, idle = sched.join(), sched.join(), sched.join()
    got = {}
    threads = [threading.Thread(target=lambda s=s, n=n: got.__setitem__(n, s.generate([0] * n)))
               for s, n in ((a, 1), (b, 2))]
    for th in threads:
        th.start()
    time.sleep(0.1)
    assert not got  # lockstep: the idle episode might still ask
    sched.cancel(idle, "timed out")  # it is ended from outside: the batch runs without it
    for th in threads:
        th.join(5)
    assert got == {1: [1], 2: [2]}
    with pytest.raises(EpisodeCancelled, match="timed out"):
        idle.generate([1])
    # a request waiting when its episode is cancelled is released with the reason
    errors = []

    def waiter():
        try:
            a.generate([5])
        except EpisodeCancelled as exc:
            errors.append(str(exc))

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    sched.cancel(a, "episode timed out after 1s")
    th.join(5)
    assert errors == ["episode timed out after 1s"]
    b.leave()
    b.leave()  # leaving twice is harmless


# --------------------------------------------------------------------------- engines

def test_sampling_is_plain_temperature_whatever_the_model_config_says(tok):
    from transformers.generation.logits_process import TemperatureLogitsWarper

    model = biased_model(tok, 0.0)
    model.generation_config.top_k, model.generation_config.top_p = 5, 0.5
    model.generation_config.repetition_penalty, model.generation_config.temperature = 2.0, 0.3
    seen = []
    original = model._get_logits_processor

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(list(out))
        return out

    model._get_logits_processor = spy
    engine = R.HFEngine(model, tok, max_new_tokens=3, temperature=0.7, eos_token_ids=stop_ids(tok))
    engine([[5, 6], [7]])
    (procs,) = seen
    assert [type(p) for p in procs] == [TemperatureLogitsWarper] and procs[0].temperature == 0.7
    assert model.generation_config.top_k == 5  # the model's own config is left as it was
    paged = R.PagedEngine(model, tok, max_new_tokens=3, temperature=0.7, eos_token_ids=stop_ids(tok), max_requests=2,
                          max_context=16, page_size=16)
    paged.start()
    try:
        procs = list(paged.manager.logit_processor.logits_processor)
    finally:
        paged.stop()
    assert [type(p) for p in procs] == [TemperatureLogitsWarper] and procs[0].temperature == 0.7


def test_hf_engine_honours_budgets_and_continues_cut_rows(tok):
    never = biased_model(tok, -1e4)
    engine = R.HFEngine(never, tok, max_new_tokens=6, temperature=1.0, eos_token_ids=stop_ids(tok))
    handed = []
    out = engine.run([[5, 6], [7], [8, 9, 10]], [2, None, 4], on_done=lambda i, t: handed.append((i, len(t))))
    assert [(len(t), fin) for t, fin in out] == [(2, True), (6, True), (4, True)]
    assert handed == [(0, 2), (2, 4), (1, 6)]  # each row handed back the step it finished
    cut = engine.run([[5, 6], [7]], [None, None], should_cut=lambda live: True)
    assert [(len(t), fin) for t, fin in cut] == [(1, False), (1, False)]
    # through the scheduler: cut rows come back as continuations, every answer has its full length
    sched = R.GenerationScheduler(engine, mode="continuous", max_batch=8)
    seen = run_episodes(sched, [3] * 8, tool_s=0.01)
    assert all(len(out) == 6 for v in seen.values() for _, out in v)
    assert sched.requests == 24


def test_step_engine_samples_from_exactly_the_full_context(tok):
    """Rows join a running batch at different steps and leave at different lengths; every
    distribution sampled from equals the model's on the row's own prompt plus its tokens so far."""
    model = biased_model(tok, 0.0)
    engine = R.HFStepEngine(model, tok, max_new_tokens=10, temperature=0.5, eos_token_ids=[-1])
    seen = []
    real_sample = engine._sample

    def spy(logits):
        seen.extend(logits.float())
        return real_sample(logits)

    engine._sample = spy
    prompts, budgets = {"a": [5, 6, 7, 8, 9, 30, 31], "b": [10, 11], "c": [12, 13, 14, 40]}, {"a": 10, "b": 4, "c": 7}
    engine.start()
    engine.submit("a", prompts["a"], budgets["a"])
    got, step = {}, 0
    while len(got) < 3:
        got.update({k: t for k, t, _ in engine.collect(0.01)})
        step += 1
        if step in (2, 3):
            engine.submit("bc"[step - 2], prompts["bc"[step - 2]], budgets["bc"[step - 2]])
    assert {k: len(v) for k, v in got.items()} == budgets
    worst = 0.0
    with torch.no_grad():
        for k, out in got.items():
            for j in range(len(out)):
                full = model(input_ids=torch.tensor([prompts[k] + out[:j]])).logits[0, -1]
                worst = max(worst, min(float((full - x).abs().max()) for x in seen))
    assert worst < 1e-4


def test_step_engine_under_the_scheduler_ends_completions_at_eos(tok):
    eos = stop_ids(tok)
    engine = R.HFStepEngine(biased_model(tok, 6.0), tok, max_new_tokens=12, temperature=1.0, eos_token_ids=eos,
                            max_rows=5)
    sched = R.GenerationScheduler(engine, mode="continuous")
    seen = run_episodes(sched, [random.Random(i).randint(1, 4) for i in range(10)], tool_s=0.005)
    outs = [out for v in seen.values() for _, out in v]
    assert len(outs) == sched.requests
    assert all(1 <= len(o) <= 12 and (o[-1] in eos or len(o) == 12) for o in outs)
    assert all(t not in eos for o in outs for t in o[:-1])


def test_continuous_hf_completions_end_at_eos_or_the_token_limit(tok):
    eos = stop_ids(tok)
    engine = R.HFEngine(biased_model(tok, 6.0), tok, max_new_tokens=12, temperature=1.0, eos_token_ids=eos)
    sched = R.GenerationScheduler(engine, mode="continuous", max_batch=16)
    seen = run_episodes(sched, [random.Random(i).randint(1, 4) for i in range(12)], tool_s=0.005)
    outs = [out for v in seen.values() for _, out in v]
    assert all(1 <= len(o) <= 12 and (o[-1] in eos or len(o) == 12) for o in outs)
    assert all(t not in eos for o in outs for t in o[:-1])  # nothing after an end of turn


def test_paged_engine_on_cpu_returns_completions_ending_at_eos(tok):
    model = biased_model(tok, 6.0)
    model.train()
    attn = model.config._attn_implementation
    eos = stop_ids(tok)[:1]
    engine = R.PagedEngine(model, tok, max_new_tokens=40, temperature=1.0, eos_token_ids=eos, max_requests=4,
                           max_context=128, page_size=32)
    sched = R.GenerationScheduler(engine, mode="continuous")
    seen = run_episodes(sched, [2, 1, 2, 1], prompt_of=lambda i, t: [20 + i] * (3 + t))
    outs = [out for v in seen.values() for _, out in v]
    assert len(outs) == 6 and all(o and o[-1] == eos[0] and eos[0] not in o[:-1] for o in outs)
    assert model.training and model.config._attn_implementation == attn  # handed back as it was


# --------------------------------------------------------------------------- runner

def make_runner(pool, envs, tok, **kw):
    return R.EpisodeRunner(pool, envs, load_settings(), tokenizer=tok, interface="direct", max_turns=2, window=1,
                           max_prompt_tokens=2048, **kw)


def test_continuous_and_lockstep_rollouts_have_the_same_structure(env, tok, pool):
    tasks = [(env.id, i % 2) for i in range(6)]
    model = biased_model(tok, 3.0)
    out = {}
    kw = dict(max_new_tokens=10, temperature=1.0, eos_token_ids=stop_ids(tok))
    engines = {"continuous": R.HFStepEngine(model, tok, **kw), "lockstep": R.hf_generate_fn(model, tok, **kw)}
    for mode, engine in engines.items():
        out[mode] = make_runner(pool, [env], tok, scheduler=mode).run(tasks, engine)
    c, lk = out["continuous"], out["lockstep"]
    assert [(r.env_id, r.task_idx) for r in c.results] == [(r.env_id, r.task_idx) for r in lk.results] == tasks
    for a, b in zip(c.results, lk.results):
        assert a.row().keys() == b.row().keys()
        assert not a.outcome.env_error and not b.outcome.env_error
        assert len(a.steps) == len(a.episode.turns) and len(b.steps) == len(b.episode.turns)
        assert a.steps[0].prompt_ids == b.steps[0].prompt_ids  # the same context for the same task
        assert [s.completion_ids for s in a.samples] == [s.completion_ids for s in build_samples(a.steps)]
        assert a.samples and all(len(s.mask) == len(s.completion_ids) for s in a.samples)
    assert c.completion_tokens == sum(len(s.completion_ids) for r in c.results for s in r.steps)


def test_an_episode_past_its_timeout_ends_as_an_environment_error(env, tok, pool, monkeypatch):
    release = threading.Event()
    real = episodes.run_episode

    def run_episode(policy, session, task, *a, **kw):
        if task.idx == 1:
            release.wait(30)  # a tool call that hangs
        return real(policy, session, task, *a, **kw)

    monkeypatch.setattr(episodes, "run_episode", run_episode)  # where the runner looks it up
    runner = make_runner(pool, [env], tok, episode_timeout_s=1.0)
    t0 = time.perf_counter()
    try:
        batch = runner.run([(env.id, 0), (env.id, 1), (env.id, 0)], lambda ps: [[stop_ids(tok)[0]] for _ in ps])
    finally:
        release.set()
    assert time.perf_counter() - t0 < 10
    timed_out = batch.results[1]
    assert timed_out.outcome.env_error and timed_out.outcome.label == "environment_error"
    assert "timed out after 1s" in timed_out.row()["error"] and timed_out.reward is None
    assert [r.outcome.env_error for r in batch.results] == [False, True, False]


def fake_trainer(tok):
    return SimpleNamespace(processing_class=tok, accelerator=SimpleNamespace(num_processes=1))


def test_an_engine_failure_stops_the_step_with_one_message(env, tok, pool):
    def generate(prompts):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runner = make_runner(pool, [env], tok)
    with pytest.raises(EngineError, match="CUDA out of memory"):
        runner.run([(env.id, 0)] * 3, generate)

    import contextlib

    rollout = R.EpisodeRollout(runner, lambda trainer: contextlib.nullcontext(generate))
    rollout.begin([(env.id, 0)] * 2)
    with pytest.raises(AWMError, match="training stopped: the generation engine failed: .*CUDA out of memory"):
        rollout([None, None], fake_trainer(tok))


def test_a_step_where_every_episode_failed_stops_training(env, tok, pool, monkeypatch):
    import contextlib

    from awm_core.runtime.pool import EnvHandle

    def broken(self):
        raise ConnectionError("worker gone")

    monkeypatch.setattr(EnvHandle, "open_session", broken)
    runner = make_runner(pool, [env], tok)
    batch = runner.run([(env.id, 0), (env.id, 1)], lambda ps: [[1] for _ in ps])
    assert all("open_session failed: ConnectionError: worker gone" in r.row()["error"] for r in batch.results)
    rollout = R.EpisodeRollout(runner, lambda trainer: contextlib.nullcontext(lambda ps: [[1] for _ in ps]))
    rollout.begin([(env.id, 0), (env.id, 1)])
    with pytest.raises(AWMError, match=r"every episode of this step \(2\) failed.*worker gone"):
        rollout([None, None], fake_trainer(tok))


def test_failures_inside_episodes_become_environment_errors_and_training_goes_on(tmp_path, monkeypatch):
    """In-process GRPO step: a session that does not open, a verifier that raises and a policy step
    that throws each end their episode as a masked environment error with its reason."""
    import json

    from awm_core.runtime.pool import EnvHandle
    from awm_core.train.config import TrainConfig
    from awm_core.train.trainer import run_training

    good, broken = counter_environment("counters"), counter_environment("counters_down")
    real_open, real_verify, real_generate = EnvHandle.open_session, episodes.verify_episode, R.RecordingPolicy._generate

    def open_session(self):
        if self.id == "counters_down":
            raise ConnectionError("sandbox worker unreachable")
        return real_open(self)

    def verify_episode(pool, environment, task_idx, episode, settings, *a, **kw):
        if task_idx == 1:
            raise RuntimeError("verifier crashed")
        return real_verify(pool, environment, task_idx, episode, settings, *a, **kw)

    lock, calls = threading.Lock(), []

    def generate(self, rendered):
        with lock:
            calls.append(1)
            first = len(calls) == 1
        if first:
            raise ValueError("policy exploded")
        return real_generate(self, rendered)

    monkeypatch.setattr(EnvHandle, "open_session", open_session)
    monkeypatch.setattr(episodes, "verify_episode", verify_episode)
    monkeypatch.setattr(R.RecordingPolicy, "_generate", generate)
    cfg = TrainConfig(model="random:tiny", group_size=2, tasks_per_step=3, max_turns=2, window=1, interface="direct",
                      learning_rate=1e-3, steps=1, max_tokens=8, max_prompt_tokens=1024, sandbox_workers=1, seed=0)
    tasks = [("counters", 0, good.tasks[0].text), ("counters", 1, good.tasks[1].text),
             ("counters_down", 0, broken.tasks[0].text)]
    run_training(cfg, [good, broken], tasks, tmp_path, load_settings())
    rows = [json.loads(x) for x in (tmp_path / "rollouts.rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    errors = [r["error"] for r in rows if r["env_error"]]
    assert all(r["label"] == "environment_error" and r["reward"] == 0.0 for r in rows if r["env_error"])
    assert sum("open_session failed: ConnectionError: sandbox worker unreachable" in e for e in errors) == 2
    assert sum("ValueError: policy exploded" in e for e in errors) == 1
    assert any("verifier failed: RuntimeError: verifier crashed" in e for e in errors)
    assert 0 < len(errors) < 6  # some episodes went through: the step ran
    (metrics,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics["awm/env_error_rate"] == pytest.approx(len(errors) / 6)

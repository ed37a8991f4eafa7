"""Judge rewards in training (``judge = true``): the code-augmented LLM judge labels each episode
on the verifier's evidence, over HTTP against the local fixture LLM server."""
from __future__ import annotations

import json

from awm_core.llm import read_ledger
from awm_core.llm.fixture_server import FixtureServer
from awm_core.settings import load_settings
from awm_core.train.config import TrainConfig
from test_train_grpo import counter_environment


def test_training_rewards_come_from_the_judge(tmp_path, awm_home):
    from awm_core.train.trainer import run_training

    env = counter_environment()
    reply = json.dumps({"classification": "partially_completed", "reasoning": "half of it"})
    (tmp_path / "fixtures" / env.id).mkdir(parents=True)
    (tmp_path / "fixtures" / env.id / "judge.json").write_text(json.dumps(
        {"stage": "judge", "scenario": env.id, "attempts": [{"content": reply, "prompt_tokens": 9,
                                                             "completion_tokens": 4}]}))
    settings = load_settings()
    settings.llm.cache = False
    cfg = TrainConfig(model="random:tiny", group_size=2, tasks_per_step=2, max_turns=3, window=None,
                      interface="direct", learning_rate=1e-4, steps=1, max_tokens=40, max_prompt_tokens=2048,
                      warmstart_steps=80, warmstart_lr=3e-3, sandbox_workers=1, seed=1, judge=True,
                      max_tokens_per_microbatch=4096)
    with FixtureServer(tmp_path / "fixtures") as srv:
        settings.llm.judge = srv.role_settings(model="judge-model")
        run_training(cfg, [env], [(env.id, t.idx, t.text) for t in env.tasks], tmp_path / "run", settings)
        asked = srv.chat_requests()
    episodes = [json.loads(x) for x in (tmp_path / "run" / "rollouts.rank0.jsonl").read_text().splitlines()]
    judged = [e for e in episodes if e["label"] != "format_error"]  # a malformed call ends before any judge
    assert judged, "the warm-started policy should finish some episodes"
    assert all((e["label"], e["reward"], e["judge_reasoning"]) == ("partially_completed", 0.1, "half of it")
               for e in judged)
    assert len(asked) == len(judged) and all(r.stage == "judge" and r.model == "judge-model" for r in asked)
    assert len(read_ledger(tmp_path / "run" / "llm_calls.rank0.jsonl")) == len(judged)

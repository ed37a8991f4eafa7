"""The train flow end to end on the offline demo snapshot, and its gate refusal.

A catalog holds the three demo environments (assembled from the recordings). Training refuses
the snapshot until it has a passing quality report; then the flow runs 2 GRPO steps of a tiny
randomly initialised Qwen3-shaped model (tokenizer trained at launch on the environments' text)
under ``accelerate launch``: episodes run in real sandbox sessions, rewards come from the real
verifiers, metrics, episodes and telemetry land in the catalog, and the final checkpoint reloads.
"""
from __future__ import annotations

import json
import uuid

import pytest

from awm_core.errors import GateRefused
from awm_core.models import utcnow
from awm_core.settings import get_settings
from awm_core.train.config import preset
from awm_core.train.demo import demo_environments


def _report(snapshot: int, passed: bool) -> dict:
    return {"report_id": uuid.uuid4().hex, "snapshot": snapshot, "passed": passed,
            "statistics": {"note": "written by the test"}, "results": [], "created_at": utcnow()}


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """An AWM_HOME whose catalog has the demo environments at one snapshot (no gate report yet)."""
    from storage.catalog import Catalog

    home = tmp_path_factory.mktemp("train-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWM_HOME", str(home))
        mp.setenv("AWM_CONFIG", str(home / "none.toml"))
        get_settings.cache_clear()
        settings = get_settings()
        with Catalog.open(settings) as cat:
            with cat.publish(message="demo environments") as pub:
                pub.add_environments(demo_environments())
            snapshot = pub.snapshot_id
        yield settings, snapshot
    get_settings.cache_clear()


def test_training_refuses_a_snapshot_without_a_passing_gate(demo_home):
    from flows.train import run_train
    from storage.catalog import Catalog

    settings, snapshot = demo_home
    cfg = preset("tiny", snapshot=snapshot)
    with pytest.raises(GateRefused, match=f"snapshot {snapshot} has no passing quality-gate report"):
        run_train(cfg, settings)
    with pytest.raises(GateRefused, match="no catalog snapshot has a passing"):
        run_train(preset("tiny"), settings)
    with Catalog.open(settings) as cat:
        with cat.publish(message="failed gate") as pub:
            pub.add_quality_report(_report(snapshot, False))
    with pytest.raises(GateRefused):
        run_train(cfg, settings)
    assert not list(settings.runs_dir.glob("train-*")) if settings.runs_dir.exists() else True


def test_train_flow_runs_two_grpo_steps_under_accelerate_and_publishes(demo_home, prefect_server, monkeypatch):
    from flows.train import train
    from storage.catalog import Catalog

    settings, snapshot = demo_home
    monkeypatch.setenv("AWM_HOME", str(settings.home))
    with Catalog.open(settings) as cat:
        with cat.publish(message="gate passed") as pub:
            pub.add_quality_report(_report(snapshot, True))

    cfg = preset("tiny", snapshot=snapshot, steps=2, save_steps=1)
    state = train(config=cfg.to_dict(), return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    assert out["steps"] == 2 and out["episodes"] == 2 * cfg.episodes_per_step

    with Catalog.open(settings, read_only=True) as cat:
        steps = cat.rows("SELECT * FROM training_runs WHERE run_id = ? ORDER BY step", params=[out["run_id"]])
        episodes = cat.rows("SELECT * FROM rollouts WHERE run_id = ?", params=[out["run_id"]])
        telemetry = cat.rows("SELECT * FROM task_telemetry WHERE run_id = ?", params=[out["run_id"]])
        train_envs = {r["env_id"] for r in cat.rows(
            "SELECT env_id FROM splits WHERE snapshot = ? AND split = 'train'", params=[snapshot])}
        val_envs = {r["env_id"] for r in cat.rows(
            "SELECT env_id FROM splits WHERE snapshot = ? AND split = 'val'", params=[snapshot])}

    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert s["snapshot"] == snapshot and s["reward_mean"] is not None and s["reward_std"] is not None
        assert 0.0 <= s["completion_rate"] <= 1 and 0.0 <= s["format_error_rate"] <= 1
        assert s["env_error_rate"] == 0.0
        assert s["tokens"] > 0 and s["rollout_s"] > 0 and s["update_s"] is not None
        assert json.loads(s["config_json"])["window"] == 2
    assert steps[-1]["checkpoint"].endswith("final") and steps[0]["checkpoint"].endswith("checkpoint-1")

    # every episode ran in a session of a training-split environment and was scored by its verifier
    assert train_envs and val_envs and not train_envs & val_envs
    assert {e["env_id"] for e in episodes} <= train_envs
    assert all(e["label"] in ("completed", "partially_completed", "agent_error", "format_error") for e in episodes)
    assert all(e["initial_digest"] and e["final_digest"] and e["turns"] >= 1 for e in episodes)
    # GRPO groups: each task of a step ran group_size times
    per_group: dict = {}
    for e in episodes:
        step = e["rollout_id"].split("/")[1]
        per_group[(step, e["env_id"], e["task_idx"])] = per_group.get((step, e["env_id"], e["task_idx"]), 0) + 1
    assert set(per_group.values()) == {cfg.group_size}

    # telemetry agrees with the episodes
    by_task: dict = {}
    for e in episodes:
        by_task.setdefault((e["env_id"], e["task_idx"]), []).append(e["label"] == "completed")
    never = {(t["env_id"], t["task_idx"]) for t in telemetry if t["kind"] == "never_solved"}
    always = {(t["env_id"], t["task_idx"]) for t in telemetry if t["kind"] == "always_solved"}
    assert never == {k for k, v in by_task.items() if not any(v)}
    assert always == {k for k, v in by_task.items() if all(v)}

    # the final checkpoint reloads with its tokenizer and generates
    import torch

    from awm_core.train import models

    final = out["final_checkpoint"]
    model, tok = models.load_model(final), models.load_tokenizer(final)
    assert model.config.vocab_size == len(tok)
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                      add_generation_prompt=True), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["train-reward-curve", "train-summary", "train-steps"])))}
    assert keys == {"train-reward-curve", "train-summary", "train-steps"}

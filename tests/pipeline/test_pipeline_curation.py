"""Curation: task telemetry from evaluation and training drives what the nightly run regenerates,
retires and tops up."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from awm_core.curation import plan_curation, task_telemetry_rows
from awm_core.settings import get_settings


def rollout(env, idx, label="completed", env_error=False, policy="openai", turns=3):
    return {"env_id": env, "task_idx": idx, "label": label, "env_error": env_error, "policy": policy, "turns": turns}


def test_telemetry_rows_count_what_the_run_saw():
    rows = task_telemetry_rows("run-1", [rollout("a", 0), rollout("a", 0, "agent_error"),
                                         rollout("a", 0, "environment_error", True),
                                         rollout("a", 1, "format_error", turns=1)])
    stats = {r["task_idx"]: r for r in rows if r["kind"] == "stats"}
    assert (stats[0]["episodes"], stats[0]["completed"], stats[0]["pass_rate"]) == (3, 1, 0.5)
    assert stats[0]["env_error_rate"] == pytest.approx(1 / 3) and stats[1]["format_error_rate"] == 1.0
    assert {(r["task_idx"], r["kind"]) for r in rows if r["kind"] != "stats"} == {(0, "env_errors"),
                                                                                  (1, "never_solved")}


def _stats(env, idx, policy, episodes, completed, env_errors=0):
    scored = episodes - env_errors
    return {"kind": "stats", "env_id": env, "task_idx": idx, "policy": policy, "episodes": episodes,
            "completed": completed, "pass_rate": completed / scored if scored else None,
            "env_error_rate": env_errors / episodes}


def test_plan_regenerates_retires_and_tops_up(awm_home, monkeypatch):
    monkeypatch.setenv("AWM_GENERATION__LIVE_TASKS", "10")
    monkeypatch.setenv("AWM_GENERATION__TASKS_PER_SCENARIO", "3")
    get_settings.cache_clear()
    tasks = [{"env_id": e, "task_idx": i, "dropped_reason": None} for e in ("a", "b") for i in range(4)]
    tasks[3]["dropped_reason"] = "verifier failed"  # a/3: not live, its telemetry is ignored
    telemetry = [
        _stats("a", 0, "openai", 4, 4), _stats("a", 0, "grpo", 4, 4),  # every policy solves it
        _stats("a", 1, "openai", 4, 4), _stats("a", 1, "grpo", 4, 2),  # one does not: stays
        _stats("a", 2, "openai", 6, 0), _stats("a", 2, "random", 6, 0),  # never solved, reference passes
        _stats("a", 3, "openai", 9, 9),
        _stats("b", 0, "openai", 4, 0, env_errors=3), _stats("b", 1, "openai", 4, 4),  # 3/8 env errors
        _stats("a", 1, "reference", 50, 50),  # a baseline: neither retires nor protects
    ]
    plan = plan_curation(telemetry, tasks, get_settings(), reference_passes={("a", 2)},
                         env_errors={"b": ["ToolError: no such column: due_date"]})
    assert plan.regenerate_reasons == {"b": "environment errors in 3/8 episodes (38% > 20%)"}
    assert "no such column: due_date" in plan.regenerate["b"][1]
    assert plan.retire == {"a": {0: "solved by every policy (grpo, openai) in 8 episodes",
                                 2: "never solved in 6 episodes (openai) while its reference solution passes"}}
    # 7 live tasks, 2 retiring: 5 left of a target of 10, at 3 tasks per scenario.
    assert (plan.live_tasks, plan.top_up_scenarios) == (7, 2)
    assert any(line.startswith("retire a/0") for line in plan.lines())


def test_too_few_episodes_are_not_judged(awm_home):
    plan = plan_curation([_stats("a", 0, "openai", 1, 1), _stats("a", 1, "openai", 2, 0, env_errors=2)],
                         [{"env_id": "a", "task_idx": i} for i in range(2)], get_settings())
    assert plan.empty() and plan.top_up_scenarios == 0


@pytest.mark.slow
def test_a_generate_run_applies_the_plan_from_the_telemetry(awm_home, prefect_server, monkeypatch, capsys):
    """Two demo environments; telemetry says clinic_booking's tools fail agents and recipe_box task 0
    is solved by every policy; a live-task target one above what is there. The next nightly run
    regenerates clinic_booking's code with the errors, retires recipe_box/0, and makes one new
    scenario to top up; `awm curate` then has nothing left to do about them."""
    from flows.cli import main
    from flows.generate import run_generate
    from storage.catalog import Catalog

    first = run_generate(scenarios=["recipe_box", "clinic_booking"], concurrency=2)
    assert sorted(first["published"]) == ["clinic_booking", "recipe_box"]
    settings = get_settings()
    # Newer than the bundles just made (so it counts), older than any rebuilt later (so it won't).
    later = datetime.now(timezone.utc)
    with Catalog.open(settings) as cat:
        live = len([t for t in cat.rows("SELECT * FROM tasks") if not t["dropped_reason"]])
        with cat.publish(message="telemetry from an evaluation and a training run") as pub:
            pub.add_task_telemetry([
                {**_stats("clinic_booking", 0, "openai", 10, 2, env_errors=6), "run_id": "eval-x", "count": 10,
                 "created_at": later},
                {**_stats("recipe_box", 0, "openai", 4, 4), "run_id": "eval-x", "count": 4, "created_at": later},
                {**_stats("recipe_box", 0, "grpo", 4, 4), "run_id": "train-y", "count": 4, "created_at": later}])
            pub.add_rollouts([{"rollout_id": "eval-x/clinic_booking/0/0", "run_id": "eval-x", "env_id": "clinic_booking",
                               "task_idx": 0, "reward": 0.0, "label": "environment_error", "env_error": True,
                               "error": "ToolError: book_appointment: no such column: slot_time"}])
    monkeypatch.setenv("AWM_GENERATION__LIVE_TASKS", str(live + 1))
    get_settings.cache_clear()

    assert main(["curate"]) == 0
    shown = capsys.readouterr().out
    assert "regenerate clinic_booking: environment errors in 6/10 episodes" in shown
    assert "retire recipe_box/0: solved by every policy (grpo, openai) in 8 episodes" in shown
    assert f"target {live + 1}: top up with 1 new scenario(s)" in shown

    summary = run_generate(concurrency=2)
    c = summary["curation"]
    assert c["regenerated"] == ["clinic_booking"] and c["retire"] == {
        "recipe_box": {"0": "solved by every policy (grpo, openai) in 8 episodes"}}
    assert c["top_up_scenarios"] == 1 and len(summary["published"]) == 2, summary
    new = next(e for e in summary["published"] if e != "clinic_booking")
    with Catalog.open(settings, read_only=True) as cat:
        retired = cat.rows("SELECT env_id, task_idx, retired_reason FROM tasks WHERE retired_reason IS NOT NULL")
        code_calls = cat.rows("SELECT count(*) AS n FROM llm_calls WHERE scenario_id = 'clinic_booking' "
                              "AND stage = 'code' AND run_id = ?", params=[summary["run_id"]])
        envs = {r["env_id"] for r in cat.rows("SELECT env_id FROM environments")}
    assert retired == [{"env_id": "recipe_box", "task_idx": 0,
                        "retired_reason": "solved by every policy (grpo, openai) in 8 episodes"}]
    assert code_calls[0]["n"] >= 1  # the code stage ran again (the errors changed its cache key)
    assert envs == {"recipe_box", "clinic_booking", new}

    # The regenerated environment is judged afresh, the retired task is no longer live.
    assert main(["curate"]) == 0
    shown = capsys.readouterr().out
    assert "regenerate" not in shown and "retire" not in shown and "no top-up needed" in shown

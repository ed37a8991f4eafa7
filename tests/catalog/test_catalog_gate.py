"""Quality gate: passes a clean snapshot, fails planted defects, scopes out unvalidated imports."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from awm_core.models import ValidationCheck
from awm_core.settings import load_settings
from flows.gate import evaluate_snapshot, store_report
from storage.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_bundles import clean_env  # noqa: E402


def rollout(i: int, reward: float = 1.0, label: str = "completed") -> dict:
    return {"rollout_id": f"r{i}", "run_id": "eval-1", "env_id": "a_env", "task_idx": 0, "reward": reward,
            "label": label, "env_error": False, "prompt_tokens": 100}


def call(i: int, prompt_tokens: int = 100) -> dict:
    return {"call_id": f"c{i}", "stage": "schema", "scenario_id": "a_env", "prompt_tokens": prompt_tokens,
            "completion_tokens": 50, "cost_usd": 0.001}


@pytest.fixture
def cat(awm_home):
    c = Catalog.open(load_settings())
    yield c
    c.close()


# Scenarios unlike each other (the gate fails near-duplicate scenarios).
ABOUT = {"a_env": "Keep personal notes and find them again by title.",
         "b_env": "Book tables at restaurants and manage the reservations.",
         "broken_env": "Track a fleet of delivery vans, their drivers and routes."}


def defective_env():
    env = clean_env("broken_env", n_tasks=4, description=ABOUT["broken_env"])
    checks = env.validation.checks
    checks += [ValidationCheck(name="verifier_mutation", passed=False, task_idx=1,
                               detail="the verifier said \"complete\" after extra_insert ..."),
               ValidationCheck(name="verifier_equivalence", passed=False, task_idx=2,
                               detail="the verifier said \"incomplete\" after reworded_answer ...")]
    for c in checks:
        if c.task_idx == 1 and c.name == "verifier_solution":
            c.passed = False  # reference solution failed, yet the task was kept
        if c.task_idx == 2 and c.name == "verifier_noop":
            c.passed = False  # verifier accepted a run that did nothing
    env.validation.passed = False
    env.verifiers = [v for v in env.verifiers if v.task_idx != 3]  # task 3 has no verifier
    env.api_spec = None  # no tools
    return env


def test_gate_passes_a_clean_snapshot_and_fails_planted_defects(cat):
    with cat.publish(message="clean") as pub:
        pub.add_environments([clean_env("a_env", description=ABOUT["a_env"]),
                              clean_env("b_env", description=ABOUT["b_env"])])
        # Every label the agent gives (one source: awm_core.agent.rewards) is a known label.
        pub.add_rollouts([rollout(i) for i in range(5)] + [rollout(9, -1.0, "format_error"),
                                                           rollout(10, 0.1, "partially_completed"),
                                                           rollout(11, 0.0, "agent_error"),
                                                           rollout(12, 0.0, "environment_error")])
        pub.add_llm_calls([call(i) for i in range(5)])
    clean = pub.snapshot_id
    report = evaluate_snapshot(cat, clean)
    assert report.passed, report.failures()
    assert report.statistics["gated_envs"] == 2 and report.statistics["env_pass_rate"] == 1.0
    store_report(cat, report)
    assert cat.gate_passed(clean)

    with cat.publish(message="defects") as pub:
        pub.add_environments([defective_env()])
        pub.add_rollouts([rollout(20, reward=5.0), rollout(21, label="sort_of")])
        pub.add_llm_calls([call(20, prompt_tokens=-3)])
    bad = pub.snapshot_id
    report = evaluate_snapshot(cat, bad)
    assert not report.passed
    fails = {(r["table"], r["column"]): r for r in report.failures()}
    assert fails[("gated_tasks", "solution_failed_task")]["examples"] == ["broken_env/1"]
    assert fails[("gated_tasks", "noop_passing_verifier")]["examples"] == ["broken_env/2"]
    assert fails[("gated_tasks", "task_without_verifier")]["examples"] == ["broken_env/3"]
    assert fails[("gated_tasks", "lenient_verifier")]["examples"] == ["broken_env/1"]
    assert fails[("gated_tasks", "over_strict_verifier")]["examples"] == ["broken_env/2"]
    assert fails[("gated_environments", "env_without_tools")]["examples"] == ["broken_env"]
    assert fails[("pass_rates", "env_pass_rate")]["unexpected_count"] == 1  # 2 of 3 envs passed < 0.8
    assert fails[("rollouts", "reward")]["examples"] == [5.0]
    assert fails[("rollouts", "label")]["examples"] == ["sort_of"]
    assert fails[("llm_calls", "prompt_tokens")]["examples"] == [-3]
    assert len(fails) == 10, sorted(fails)  # the tool-less env is reported once, as env_without_tools
    assert "FAILED" in report.markdown() and "broken_env/1" in report.markdown()
    store_report(cat, report)
    assert not cat.gate_passed(bad)
    assert cat.gate_passed(clean) and cat.latest_gated_snapshot() == clean
    stored = cat.rows("SELECT snapshot, passed, statistics FROM quality_reports ORDER BY created_at")
    assert [(r["snapshot"], r["passed"]) for r in stored] == [(clean, True), (bad, False)]

    # The old, clean snapshot still passes when re-gated: time travel, not the latest state.
    assert evaluate_snapshot(cat, clean).passed


def test_dropped_tasks_do_not_count_against_the_gate_but_lower_the_task_rate(cat):
    env = clean_env("a_env", n_tasks=5)
    env.validation.dropped_tasks = {4: "reference solution failed"}
    env.validation.checks.append(ValidationCheck(name="verifier_solution", passed=False, task_idx=4))
    with cat.publish(message="dropped") as pub:
        pub.add_environments([env])
    report = evaluate_snapshot(cat)
    assert report.passed, report.failures()
    assert report.statistics["kept_tasks"] == 4 and report.statistics["task_pass_rate"] == pytest.approx(0.8)


def test_unvalidated_imports_are_reported_not_gated(cat, awm1k_samples):
    from flows.import_awm1k import import_directory

    import_directory(awm1k_samples, settings=cat.settings, catalog=cat)
    with cat.publish(message="generated") as pub:
        pub.add_environments([clean_env("a_env")])
    report = evaluate_snapshot(cat)
    assert report.passed, report.failures()
    assert report.statistics["gated_envs"] == 1
    assert "e_commerce_33" in report.unvalidated and len(report.unvalidated) == 7
    assert "Unvalidated imports" in report.markdown()


@pytest.mark.slow
def test_gate_command_runs_the_flow_and_records_artifacts(cat, prefect_server, capsys):
    from prefect.client.orchestration import get_client

    from flows.cli import main

    with cat.publish(message="clean") as pub:
        pub.add_environments([clean_env("a_env")])
    assert main(["gate"]) == 0
    first = pub.snapshot_id
    assert cat.gate_passed(first)
    with cat.publish(message="defect") as pub:
        pub.add_environments([defective_env()])
    assert main(["gate", "--snapshot", str(pub.snapshot_id)]) == 1
    assert "gate FAILED" in capsys.readouterr().out
    assert not cat.gate_passed(pub.snapshot_id)
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"quality-gate", "quality-gate-expectations"} <= keys
    import time

    from prefect.events.filters import EventFilter, EventNameFilter

    deadline, passed = time.time() + 30, []
    while not passed and time.time() < deadline:  # events reach the server asynchronously
        with get_client(sync_client=True) as client:
            page = client.request("POST", "/events/filter", json={"filter": EventFilter(
                event=EventNameFilter(name=["awm.gate.passed"])).model_dump(mode="json"), "limit": 50}).json()
        passed = [e for e in page.get("events", []) if e["payload"].get("snapshot") == first]
        time.sleep(0.5)
    assert passed, "no awm.gate.passed event for the clean snapshot"


def test_coverage_fails_one_domain_duplicates_and_thin_environments(cat):
    """Five environments of one category, two of them near-duplicate scenarios, one with a single
    tool: each is a failed expectation whose examples say what is wrong."""
    about = ["Keep personal notes and find them again by title.", "Book tables at restaurants.",
             "Track a fleet of delivery vans and routes.", "Plan a wedding: guests, vendors and seating.",
             "Keep personal notes and find them again by their title."]
    envs = [clean_env(f"env_{i}", category="productivity", description=d) for i, d in enumerate(about)]
    envs[2].api_spec.tools = envs[2].api_spec.tools[:1]
    with cat.publish(message="one domain") as pub:
        pub.add_environments(envs)
    report = evaluate_snapshot(cat)
    fails = {(r["table"], r["column"]): r["examples"] for r in report.failures()}
    assert fails.pop(("coverage", "dominant_category")) == [
        "productivity holds 5 of 5 gated environments (100% > max 50%)"]
    similar = fails.pop(("scenario_neighbours", "too_similar"))
    assert sorted(x.split(" (")[0] for x in similar) == ["env_0 ~ env_4", "env_4 ~ env_0"]
    assert fails.pop(("gated_environments", "tools_out_of_range")) == ["env_2 has 1 tools (allowed 2..200)"]
    assert fails == {}
    assert "the largest (productivity) holds 100.0%" in report.markdown()


def test_one_category_is_not_checked_below_the_minimum_number_of_environments(cat):
    with cat.publish(message="two of a kind") as pub:
        pub.add_environments([clean_env("a_env", description=ABOUT["a_env"]),
                              clean_env("b_env", description=ABOUT["b_env"])])
    report = evaluate_snapshot(cat)
    assert report.passed, report.failures()
    assert report.statistics["largest_category_share"] == 1.0 and not report.statistics["category_share_checked"]
    assert "not checked below 5 environments" in report.markdown()

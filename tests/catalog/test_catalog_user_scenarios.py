"""Conversational worlds in the catalog: user scenarios, agent policies and rollout modes as columns,
an older catalog gaining them on open, the gate rule on tasks without a user scenario, and the
AWM-1K export leaving them out (and saying so)."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from awm_core.errors import CatalogError
from awm_core.models import Provenance
from awm_core.settings import load_settings
from flows.gate import evaluate_snapshot
from storage import rows as R
from storage import schema
from storage.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_bundles import POLICY, clean_env  # noqa: E402

# Unlike each other (the gate fails near-duplicate scenarios).
ABOUT = {"a_env": "Keep personal notes and find them again by title.",
         "b_env": "Book tables at restaurants and manage the reservations.",
         "c_env": "Track a fleet of delivery vans, their drivers and routes."}
NEW_COLUMNS = {"tasks": ("user_scenario", "reason_for_call", "known_info"), "environments": ("policy",),
               "rollouts": ("mode",)}


@pytest.fixture
def cat(awm_home):
    c = Catalog.open(load_settings())
    yield c
    c.close()


def env(env_id: str, conversational: bool = True, **kw):
    return clean_env(env_id, description=ABOUT[env_id], conversational=conversational, **kw)


def rollout(i: int, **extra) -> dict:
    return {"rollout_id": f"r{i}", "run_id": "eval-1", "env_id": "a_env", "task_idx": 0, "reward": 1.0,
            "label": "completed", "env_error": False, **extra}


def test_user_scenarios_and_policies_are_queryable(cat):
    with cat.publish(message="conversational") as pub:
        pub.add_environments([env("a_env"), env("b_env", conversational=False, n_tasks=1)])
    rows = cat.rows("SELECT env_id, task_idx, user_scenario->>'$.instructions.known_info' AS known, "
                    "json_extract_string(user_scenario, '$.instructions.reason_for_call') AS reason, "
                    "reason_for_call, known_info, user_scenario->'$.persona' AS persona "
                    "FROM tasks ORDER BY env_id, task_idx")
    assert [(r["env_id"], r["task_idx"], r["known"]) for r in rows] == [
        ("a_env", 0, "The title you want is 'n0'."), ("a_env", 1, "The title you want is 'n1'."),
        ("a_env", 2, "The title you want is 'n2'."), ("b_env", 0, None)]
    assert all(r["reason"] == r["reason_for_call"] and r["known"] == r["known_info"] for r in rows)
    assert rows[0]["reason_for_call"] == "You want a note titled 'n0' added." and rows[0]["persona"] == "null"
    scenario = json.loads(cat.rows("SELECT user_scenario FROM tasks WHERE task_id = 'a_env/1'")[0]["user_scenario"])
    assert scenario == env("a_env").tasks[1].user_scenario
    assert cat.rows("SELECT env_id, policy FROM environments ORDER BY env_id") == [
        {"env_id": "a_env", "policy": POLICY}, {"env_id": "b_env", "policy": None}]
    # The documented example counts them.
    assert cat.rows(schema.TABLES["tasks"].example + " ORDER BY env_id") == [
        {"env_id": "a_env", "kept": 3, "with_user_scenario": 3},
        {"env_id": "b_env", "kept": 1, "with_user_scenario": 0}]


def test_instructions_as_plain_text_leave_the_convenience_columns_empty():
    e = env("a_env", n_tasks=1)
    e.tasks[0].user_scenario = {"persona": "A busy chef.", "instructions": "Book a table for two tonight."}
    [row] = R.environment_rows(e)["tasks"]
    assert row["user_scenario"]["instructions"] == "Book a table for two tonight."
    assert row["reason_for_call"] is None and row["known_info"] is None
    e.tasks[0].user_scenario = {"instructions": {"reason_for_call": "r", "known_info": ["a", "b"]}}
    [row] = R.environment_rows(e)["tasks"]
    assert row["known_info"] == '["a", "b"]'


def test_rollout_mode_accepts_rows_with_and_without_it(cat):
    with cat.publish(message="rollouts") as pub:
        pub.add_rollouts([rollout(0), rollout(1, mode="message"), rollout(2, mode="conversation")])
    assert cat.rows("SELECT rollout_id, mode, coalesce(mode, 'message') AS played FROM rollouts ORDER BY 1") == [
        {"rollout_id": "r0", "mode": None, "played": "message"},
        {"rollout_id": "r1", "mode": "message", "played": "message"},
        {"rollout_id": "r2", "mode": "conversation", "played": "conversation"}]
    with cat.publish(message="envs") as pub:
        pub.add_environments([env("a_env")])
    assert evaluate_snapshot(cat).passed
    with cat.publish(message="odd mode") as pub:
        pub.add_rollouts([rollout(3, mode="chat")])
    report = evaluate_snapshot(cat)
    assert [(r["table"], r["column"], r["examples"]) for r in report.failures()] == [("rollouts", "mode", ["chat"])]


def test_gate_fails_tasks_without_a_user_scenario_naming_the_count(cat, monkeypatch):
    # Not gated: an imported benchmark (tau2 fills scenarios itself; this one has none), an
    # AWM-1K import without a validation report, and tasks that validation dropped.
    bench = env("c_env", conversational=False)
    bench.provenance = Provenance(source="tau2")
    imported = env("c_env", conversational=False)
    imported.id = imported.scenario.id = "awm1k_import"
    imported.provenance, imported.validation = Provenance(source="awm1k"), None
    dropped = env("a_env", n_tasks=5)
    dropped.tasks[4].user_scenario = dropped.tasks[4].user_prompt = None
    dropped.validation.dropped_tasks = {4: "reference solution failed"}
    with cat.publish(message="not gated") as pub:
        pub.add_environments([bench, imported, dropped])
    report = evaluate_snapshot(cat)
    assert report.passed, report.failures()
    assert report.statistics["tasks_without_user_scenario"] == 0 and report.statistics["kept_tasks"] == 4
    assert "User scenarios: 0 of 4 kept tasks have none (allowed 0)." in report.markdown()

    with cat.publish(message="seven without") as pub:
        pub.add_environments([env("b_env", conversational=False, n_tasks=7)])
    report = evaluate_snapshot(cat)
    assert not report.passed
    [failure] = report.failures()
    assert (failure["table"], failure["column"], failure["expectation"]) == (
        "user_scenarios", "tasks_without_user_scenario", "expect_column_values_to_be_null")
    assert failure["examples"] == ["7 kept tasks of gated environments have no user scenario (allowed 0): "
                                   "b_env/0, b_env/1, b_env/2, b_env/3, b_env/4 and 2 more"]
    assert report.statistics["tasks_without_user_scenario"] == 7
    assert "b_env/4 and 2 more" in report.markdown()

    monkeypatch.setenv("AWM_GATE__MAX_TASKS_WITHOUT_USER_SCENARIO", "7")
    allowing = load_settings()
    assert allowing.gate.max_tasks_without_user_scenario == 7
    report = evaluate_snapshot(cat, settings=allowing)
    assert report.passed, report.failures()
    assert "User scenarios: 7 of 11 kept tasks have none (allowed 7)." in report.markdown()
    monkeypatch.setenv("AWM_GATE__MAX_TASKS_WITHOUT_USER_SCENARIO", "6")
    assert evaluate_snapshot(cat, settings=load_settings()).failures()[0]["examples"][0].startswith(
        "7 kept tasks of gated environments have no user scenario (allowed 6): b_env/0,")


def test_an_older_catalog_gains_the_columns_on_open(awm_home, monkeypatch):
    """A catalog created before the columns existed: reading it says what is missing, opening it
    for writing adds them (old rows NULL), and old snapshots still read and gate."""
    settings = load_settings()
    with monkeypatch.context() as old:
        for t, cols in NEW_COLUMNS.items():
            table = schema.TABLES[t]
            old.setitem(schema.TABLES, t, dataclasses.replace(
                table, columns=tuple(c for c in table.columns if c.name not in cols)))
        rows_of = R.environment_rows
        old.setattr(R, "environment_rows", lambda e: {
            t: [{k: v for k, v in r.items() if k in schema.TABLES[t].column_names} for r in rs]
            for t, rs in rows_of(e).items()})
        with Catalog.open(settings) as cat:
            with cat.publish(message="before conversations") as pub:
                pub.add_environments([env("a_env")])
                pub.add_rollouts([rollout(0)])
            before = pub.snapshot_id
            assert "user_scenario" not in cat.columns("tasks")

    with Catalog.open(settings, read_only=True) as cat:  # reading does not change the catalog
        with pytest.raises(CatalogError, match=r"older version and lacks the column rollouts\.mode; it gains it "
                                               r"the next time it is opened for writing"):
            cat.rows("SELECT mode FROM rollouts")

    with Catalog.open(settings) as cat:
        assert cat.snapshots()[-1]["message"] == (
            f"catalog schema v{schema.SCHEMA_VERSION}: add tasks.user_scenario, tasks.reason_for_call, "
            "tasks.known_info, environments.policy, rollouts.mode")
        for t, cols in NEW_COLUMNS.items():
            assert set(cols) <= set(cat.columns(t))
            comments = dict((r["column_name"], r["comment"]) for r in cat.rows(
                "SELECT column_name, comment FROM duckdb_columns() WHERE table_name = ?", params=[t]))
            assert all(comments[c] == schema.TABLES[t].column(c).comment for c in cols)
        assert cat.rows("SELECT DISTINCT user_scenario, known_info FROM tasks") == [
            {"user_scenario": None, "known_info": None}]
        assert cat.rows("SELECT policy FROM environments") == [{"policy": None}]
        assert cat.rows("SELECT mode FROM rollouts") == [{"mode": None}]

        with cat.publish(message="republished with conversations") as pub:
            pub.add_environments([env("a_env")])
            pub.add_rollouts([rollout(1, mode="conversation")])
        assert cat.rows("SELECT count(*) AS n FROM tasks WHERE known_info IS NOT NULL") == [{"n": 3}]
        assert cat.rows("SELECT policy FROM environments") == [{"policy": POLICY}]
        assert cat.rows("SELECT rollout_id, mode FROM rollouts ORDER BY 1") == [
            {"rollout_id": "r0", "mode": None}, {"rollout_id": "r1", "mode": "conversation"}]
        assert evaluate_snapshot(cat).passed

        # The snapshot from before has no such column; time travel says so, and the gate reads it as NULL.
        assert "user_scenario" not in cat.columns("tasks", snapshot=before)
        with pytest.raises(CatalogError, match=rf"snapshot {before} predates the column tasks\.user_scenario"):
            cat.rows("SELECT user_scenario FROM tasks", snapshot=before)
        report = evaluate_snapshot(cat, before)
        assert report.statistics["tasks_without_user_scenario"] == 3
        assert [r["column"] for r in report.failures()] == ["tasks_without_user_scenario"]


def test_awm1k_export_leaves_scenarios_and_policies_out_and_says_so(cat, tmp_path, capsys):
    from awm_core.interop import awm1k
    from flows.cli import main

    with cat.publish(message="mixed") as pub:
        pub.add_environments([env("a_env"), env("b_env", n_tasks=2), env("c_env", conversational=False)])
    out = tmp_path / "out"
    assert main(["export", "awm1k", "--to", str(out)]) == 0
    err = capsys.readouterr().err
    line = "left out: 5 user scenarios and 2 policies (the AWM-1K format has no place for them)"
    assert [x for x in err.splitlines() if "left out:" in x and "user scenario" in x] == [f"note: {line}"]
    text = "".join(p.read_text() for p in out.glob("*.jsonl"))
    assert "known_info" not in text and "reason_for_call" not in text and "Confirm with the user" not in text
    assert json.loads((out / "gen_tasks.jsonl").read_text().splitlines()[0])["tasks"][0] == "Add a note titled 'n0'."

    assert main(["export", "awm1k", "--to", str(tmp_path / "plain"), "--env", "c_env"]) == 0
    assert "user scenario" not in capsys.readouterr().err

    one = env("a_env", n_tasks=1)
    assert awm1k.export_records([one])[1][-1] == (
        "left out: 1 user scenario and 1 policy (the AWM-1K format has no place for them)")
    one.tasks[0].user_scenario = one.tasks[0].user_prompt = None
    assert awm1k.export_records([one])[1][-1] == "left out: 1 policy (the AWM-1K format has no place for it)"

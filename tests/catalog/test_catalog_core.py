"""Catalog: publish, read, time travel, upserts, bad rows, crashes mid-publish, concurrent readers."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from awm_core.errors import CatalogError
from awm_core.settings import load_settings
from storage.catalog import Catalog, made_by

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from catalog_bundles import clean_env  # noqa: E402


@pytest.fixture
def cat(awm_home):
    c = Catalog.open(load_settings())
    yield c
    c.close()


def test_publish_read_and_time_travel(cat):
    s = cat.settings
    with cat.publish(made_by=made_by(s, "flow-1"), message="first") as pub:
        pub.add_environments([clean_env("note_box", n_tasks=3)])
        pub.add_llm_calls([{"call_id": "c1", "stage": "schema", "scenario_id": "note_box", "prompt_tokens": 5,
                            "created_at": "2026-11-26T01:00:00Z"}])
    first = pub.snapshot_id
    assert first == cat.latest_snapshot()
    with cat.publish(made_by=made_by(s, "flow-2"), message="second") as pub2:
        todo = clean_env("todo_list", category="tasks")
        pub2.add_environments([clean_env("note_box", n_tasks=1), todo])
    second = pub2.snapshot_id
    assert second == first + 1

    snaps = {x["snapshot_id"]: x for x in cat.snapshots()}
    assert snaps[first]["message"] == "first"
    assert snaps[first]["made_by"]["flow_run_id"] == "flow-1"
    assert snaps[second]["made_by"]["settings_digest"] == s.digest()

    # The republished environment replaced its rows; the old snapshot still shows the old ones.
    now = cat.rows("SELECT env_id, count(*) AS n FROM tasks GROUP BY env_id ORDER BY env_id")
    assert now == [{"env_id": "note_box", "n": 1}, {"env_id": "todo_list", "n": 3}]
    old = cat.rows("SELECT env_id, count(*) AS n FROM tasks GROUP BY env_id ORDER BY env_id", snapshot=first)
    assert old == [{"env_id": "note_box", "n": 3}]
    assert cat.environment_ids() == ["note_box", "todo_list"]
    assert cat.environment_ids(snapshot=first) == ["note_box"]
    assert len(cat.get_environment("note_box", snapshot=first).tasks) == 3
    assert cat.get_environment("todo_list") == todo
    row = cat.rows("SELECT tool_count, task_count, missing, validation_passed FROM environments WHERE env_id='todo_list'")
    assert row == [{"tool_count": 2, "task_count": 3, "missing": [], "validation_passed": True}]
    assert cat.rows("SELECT count(*) AS n FROM validation_results WHERE env_id='note_box'") == [{"n": 6}]

    with pytest.raises(CatalogError, match="read-only"):
        cat.sql("DELETE FROM tasks")
    with pytest.raises(CatalogError, match="nope"):
        cat.sql("SELECT * FROM nope")
    with pytest.raises(CatalogError, match="snapshot 999 does not exist"):
        cat.sql("SELECT 1", snapshot=999)
    with pytest.raises(CatalogError, match="no environment 'ghost'"):
        cat.get_environment("ghost")


def test_bad_rows_and_failed_publish_leave_nothing(cat):
    before = cat.latest_snapshot()
    with pytest.raises(CatalogError, match=r"rollouts row 0: unknown column\(s\) \['bogus'\]"):
        with cat.publish(message="bad") as pub:
            pub.add_environments([clean_env("a_env")])
            pub.add_rollouts([{"rollout_id": "r", "bogus": 1}])
    with pytest.raises(CatalogError, match="column 'reward' is required"):
        with cat.publish(message="bad") as pub:
            pub.add_rollouts([{"rollout_id": "r", "run_id": "x", "env_id": "a", "task_idx": 0, "label": "completed",
                               "env_error": False}])
    with pytest.raises(CatalogError, match="column 'turns'"):
        with cat.publish(message="bad") as pub:
            pub.add_rollouts([{"rollout_id": "r", "run_id": "x", "env_id": "a", "task_idx": 0, "reward": 1.0,
                               "label": "completed", "env_error": False, "turns": "many"}])
    assert cat.latest_snapshot() == before
    assert cat.environment_ids() == []


def test_logs_are_idempotent_and_upserts_replace(cat):
    call = {"call_id": "c1", "stage": "tasks", "prompt_tokens": 1}
    for _ in range(2):
        with cat.publish(message="ledger") as pub:
            pub.add_llm_calls([call, call])
            pub.add_generation_run({"run_id": "g1", "status": "partial", "params": {"n": 2}})
    with cat.publish(message="run end") as pub:
        pub.add_generation_run({"run_id": "g1", "status": "completed", "envs_published": 2})
    assert cat.rows("SELECT count(*) AS n FROM llm_calls") == [{"n": 1}]
    assert cat.rows("SELECT status, envs_published FROM generation_runs") == [{"status": "completed", "envs_published": 2}]
    with pytest.raises(CatalogError, match="read-only"):
        ro = Catalog.open(cat.settings, read_only=True)
        try:
            with ro.publish(message="x"):
                pass
        finally:
            ro.close()


def test_read_only_open_of_missing_catalog_is_a_clear_error(awm_home):
    with pytest.raises(CatalogError, match="no catalog yet"):
        Catalog.open(load_settings(), read_only=True)


CHILD_PUBLISH = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}, {here!r}]
    from awm_core.settings import load_settings
    from storage.catalog import Catalog
    from catalog_bundles import clean_env
    cat = Catalog.open(load_settings())
    with cat.publish(made_by={{"flow_run_id": "child"}}, message="child") as pub:
        pub.add_environments([clean_env("note_box", n_tasks=1), clean_env("second_env")])
        pub.add_llm_calls([{{"call_id": f"c{{i}}", "stage": "code"}} for i in range(50)])
        pub.add_rollouts([{{"rollout_id": f"r{{i}}", "run_id": "e", "env_id": "note_box", "task_idx": 0,
                           "reward": 1.0, "label": "completed", "env_error": False}} for i in range(50)])
    print("published", pub.snapshot_id)
""")


@pytest.mark.parametrize("crash_after", [1, 5, 12, 10_000])
def test_sigkill_mid_publish_leaves_previous_snapshot_intact(cat, awm_home, crash_after):
    with cat.publish(message="baseline") as pub:
        pub.add_environments([clean_env("note_box", n_tasks=3)])
    base, snaps_before = pub.snapshot_id, cat.snapshots()
    env = {**os.environ, "AWM_CATALOG_CRASH_AFTER_WRITES": str(crash_after)}
    code = CHILD_PUBLISH.format(repo=str(REPO), here=str(HERE))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "published" not in proc.stdout

    fresh = Catalog.open(cat.settings, read_only=True)
    try:
        assert fresh.latest_snapshot() == base
        assert fresh.snapshots() == snaps_before
        assert fresh.environment_ids() == ["note_box"]
        assert len(fresh.get_environment("note_box").tasks) == 3
        assert fresh.rows("SELECT (SELECT count(*) FROM rollouts) AS r, (SELECT count(*) FROM llm_calls) AS c, "
                          "(SELECT count(*) FROM tasks) AS t") == [{"r": 0, "c": 0, "t": 3}]
    finally:
        fresh.close()
    # The lock died with the process: the next publish goes through.
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cat.environment_ids() == ["note_box", "second_env"]
    assert cat.rows("SELECT count(*) AS n FROM rollouts") == [{"n": 50}]


SLOW_WRITER = textwrap.dedent("""
    import sys, time, pathlib
    sys.path[:0] = [{repo!r}, {here!r}]
    from awm_core.settings import load_settings
    from storage.catalog import Catalog
    cat = Catalog.open(load_settings())
    flag = pathlib.Path({flags!r})
    def rows(a, b):
        return [{{"rollout_id": f"r{{i}}", "run_id": "e", "env_id": "x", "task_idx": 0, "reward": 0.5,
                  "label": "partial", "env_error": False}} for i in range(a, b)]
    with cat.publish(message="slow") as pub:
        pub.add_rollouts(rows(0, 500))
        (flag / "started").touch()
        time.sleep(2.0)
        pub.add_rollouts(rows(500, 1000))
        time.sleep(1.0)
    (flag / "done").touch()
""")

READER = textwrap.dedent("""
    import sys, time, pathlib, json
    sys.path[:0] = [{repo!r}, {here!r}]
    from awm_core.settings import load_settings
    from storage.catalog import Catalog
    flag = pathlib.Path({flags!r})
    cat = Catalog.open(load_settings(), read_only=True)
    (flag / f"ready-{{__import__('os').getpid()}}").touch()
    seen, after_done = [], 0
    deadline = time.time() + 60
    while after_done < 3 and time.time() < deadline:
        started, done = (flag / "started").exists(), (flag / "done").exists()
        n = cat.rows("SELECT count(*) AS n FROM rollouts")[0]["n"]
        seen.append([started, done, n])
        after_done += done
        time.sleep(0.1)
    print("SEEN " + json.dumps(seen))
""")


def test_two_readers_during_a_write_see_all_or_nothing(cat, tmp_path):
    import json

    flags = tmp_path / "flags"
    flags.mkdir()
    fmt = dict(repo=str(REPO), here=str(HERE), flags=str(flags))
    readers = [subprocess.Popen([sys.executable, "-c", READER.format(**fmt)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 120  # a loaded machine can take long to import and open the catalog
    while len(list(flags.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        assert all(r.poll() is None for r in readers), [r.communicate()[1][-2000:] for r in readers]
        time.sleep(0.1)
    time.sleep(0.3)  # readers are polling before the write begins
    writer = subprocess.run([sys.executable, "-c", SLOW_WRITER.format(**fmt)], capture_output=True, text=True,
                            timeout=120)
    assert writer.returncode == 0, writer.stderr[-2000:]
    for r in readers:
        out, err = r.communicate(timeout=90)
        assert r.returncode == 0, err[-2000:]
        seen = json.loads(next(line for line in out.splitlines() if line.startswith("SEEN "))[5:])
        assert {n for _, _, n in seen} <= {0, 1000}, seen
        assert any(started and not done and n == 0 for started, done, n in seen), "no read during the write"
        assert seen[-1][2] == 1000


def test_every_table_is_documented_and_its_example_query_runs(cat):
    from storage.schema import TABLES

    comments = cat.rows("SELECT table_name, comment FROM duckdb_tables() WHERE database_name = 'awm'")
    assert {r["table_name"] for r in comments} == set(TABLES)
    assert all(r["comment"] for r in comments)
    cols = cat.rows("SELECT table_name, column_name, comment FROM duckdb_columns() WHERE database_name = 'awm'")
    assert len(cols) == sum(len(t.columns) for t in TABLES.values())
    assert [c for c in cols if not c["comment"]] == []
    with cat.publish(message="one env") as pub:
        pub.add_environments([clean_env("note_box")])
    for t in TABLES.values():
        cat.sql(t.example)  # raises CatalogError naming the problem if the documented query broke


def test_columns_added_to_a_table_definition_are_added_to_an_existing_catalog(cat, monkeypatch):
    import dataclasses

    from storage import schema

    settings = cat.settings
    cat.close()
    t = schema.TABLES["splits"]
    grown = dataclasses.replace(t, columns=t.columns + (schema.C("note", "VARCHAR", "why the split was made"),))
    monkeypatch.setitem(schema.TABLES, "splits", grown)
    with Catalog.open(settings) as again:
        assert again.snapshots()[-1]["message"].endswith("add splits.note")
        with again.publish(message="split") as pub:
            pub.add_splits([{"snapshot": 1, "env_id": "a", "task_idx": 0, "split": "train", "note": "by env"}])
        assert again.rows("SELECT note FROM splits") == [{"note": "by env"}]


def test_a_catalog_nobody_closed_leaves_no_temporary_folder(awm_home):
    import gc

    opened = Catalog.open(load_settings())
    folder = opened._env_dir
    assert os.path.isdir(folder)
    del opened
    gc.collect()
    assert not os.path.exists(folder)

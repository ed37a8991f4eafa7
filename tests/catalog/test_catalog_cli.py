"""awm catalog sql / snapshots / show, and the import flow under a real Prefect server."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest

from awm_core.settings import load_settings
from flows.cli import main
from storage.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_bundles import clean_env  # noqa: E402


@pytest.fixture
def published(awm_home):
    with Catalog.open(load_settings()) as cat:
        with cat.publish(made_by={"flow_run_id": "fr-9", "git_commit": "abc123", "settings_digest": "d1"},
                         message="two envs") as pub:
            pub.add_environments([clean_env("note_box"), clean_env("todo_list", n_tasks=2)])
        first = pub.snapshot_id
        with cat.publish(message="republish") as pub:
            pub.add_environments([clean_env("note_box", n_tasks=1)])
    return first


def test_sql_formats_snapshot_and_errors(published, capsys):
    q = "SELECT env_id, count(*) AS n FROM tasks GROUP BY env_id ORDER BY env_id"
    assert main(["catalog", "sql", q, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"env_id": "note_box", "n": 1}, {"env_id": "todo_list", "n": 2}]
    assert main(["catalog", "sql", q, "--snapshot", str(published), "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["env_id", "n"], ["note_box", "3"], ["todo_list", "2"]]
    assert main(["catalog", "sql", q]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["env_id", "n"] and "(2 rows)" in out

    assert main(["catalog", "sql", "SELEC 1"]) == 1
    assert 'syntax error at or near "SELEC"' in capsys.readouterr().err
    assert main(["catalog", "sql", "DROP TABLE tasks"]) == 1
    assert "read-only" in capsys.readouterr().err
    assert main(["catalog", "sql", "SELECT 1", "--snapshot", "99"]) == 1
    assert "snapshot 99 does not exist" in capsys.readouterr().err


def test_attach_env_database_snapshots_and_show(published, capsys):
    assert main(["catalog", "sql", "SELECT n.title, t.text FROM note_box.notes n JOIN tasks t "
                 "ON t.env_id = 'note_box' ORDER BY 1", "--attach-env", "note_box", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"title": "first", "text": "Add a note titled 'n0'."}]
    assert main(["catalog", "snapshots", "--format", "json"]) == 0
    snaps = json.loads(capsys.readouterr().out)
    mine = [s for s in snaps if s["snapshot"] == published][0]
    assert mine["message"] == "two envs" and mine["made_by"]["git_commit"] == "abc123"
    assert main(["catalog", "show", "todo_list"]) == 0
    out = capsys.readouterr().out
    assert "todo_list: Todo List" in out and "validation: passed" in out and "tasks 2" in out
    assert main(["catalog", "show", "ghost"]) == 1
    assert "no environment 'ghost'" in capsys.readouterr().err


def test_catalog_commands_without_a_catalog_say_so(awm_home, capsys):
    assert main(["catalog", "snapshots"]) == 1
    assert "no catalog yet" in capsys.readouterr().err


@pytest.mark.slow
def test_import_flow_publishes_and_records_an_artifact(awm_home, awm1k_samples, prefect_server):
    from prefect.client.orchestration import get_client

    from flows.import_awm1k import import_awm1k

    result = import_awm1k(str(awm1k_samples))
    assert result["environments"] == 7 and result["problems"] == []
    with Catalog.open(load_settings(), read_only=True) as cat:
        snap = cat.snapshots()[-1]
        assert snap["snapshot_id"] == result["snapshot_id"] and snap["made_by"]["flow_run_id"]
        assert len(cat.environment_ids()) == 7
    with get_client(sync_client=True) as client:
        assert "awm1k-import" in {a.key for a in client.read_artifacts()}

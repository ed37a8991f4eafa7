"""AgentWorldModel-1K import/export: the shared samples, exact round trip, bad records, subsets."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from awm_core.interop import awm1k
from awm_core.settings import load_settings
from flows.cli import main
from storage.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_bundles import clean_env  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_samples_become_bundles_with_missing_parts(awm1k_samples):
    res = awm1k.read_dir(awm1k_samples)
    assert res.problems == []
    envs = {e.id: e for e in res.environments}
    assert set(envs) == {"marketplace_1", "booking_marketplace_1", "booking_and_appointments_1", "e_commerce_33",
                         "content_platform_1", "code_hosting_2", "communication_messaging_1"}
    ec = envs["e_commerce_33"]
    assert ec.missing == ["scenario", "code"]
    assert ec.scenario.category == "e_commerce" and len(ec.tasks) == 10 and len(ec.db_schema.tables) == 19
    assert len(ec.api_spec.tools) == 39 and len(ec.seed_data.statements()) == 133
    # both verifier styles for tasks 0-2; the verdict-giving one first for each task
    assert [(v.task_idx, v.style) for v in ec.verifiers] == [
        (0, "awm1k_code"), (0, "awm1k_sql"), (1, "awm1k_code"), (1, "awm1k_sql"), (2, "awm1k_code"), (2, "awm1k_sql")]
    assert ec.verifier(0).function_name == "verify_task_completion"
    sql_v = [v for v in ec.verifiers if v.style == "awm1k_sql"][0]
    assert sql_v.function_name == "verify_task" and sql_v.success_criteria
    cp = envs["content_platform_1"]
    assert cp.missing == ["scenario", "verifiers"] and cp.code.flavour == "awm1k" and len(cp.api_spec.tools) == 34
    search = ec.api_spec.tool("search_products")
    assert search.extra["method"] == "GET" and search.parameters["max_price"].type == "number"
    assert envs["marketplace_1"].scenario.description.startswith("VolunteerMatch")
    assert envs["marketplace_1"].missing == ["tasks", "db_schema", "seed_data", "api_spec", "code", "verifiers"]


def test_round_trip_through_the_catalog_reproduces_the_records(awm1k_samples, awm_home, tmp_path, capsys):
    assert main(["import", "awm1k", str(awm1k_samples)]) == 0
    out = capsys.readouterr().out
    assert "Imported 7 environment(s) into snapshot" in out and "e_commerce_33" in out
    with Catalog.open(load_settings(), read_only=True) as cat:
        snap = cat.snapshots()[-1]
        assert snap["made_by"]["importer"] == "awm1k" and snap["made_by"]["settings_digest"]
        row = cat.rows("SELECT flavour, source, missing, tool_count FROM environments WHERE env_id='e_commerce_33'")
        assert row == [{"flavour": "awm1k", "source": "awm1k", "missing": ["scenario", "code"], "tool_count": 39}]
        assert cat.rows("SELECT count(*) AS n FROM verifiers") == [{"n": 6}]
    dest = tmp_path / "export"
    assert main(["export", "awm1k", "--to", str(dest)]) == 0
    for name in awm1k.FILES:
        original = read_jsonl(awm1k_samples / f"{name}.jsonl")
        assert read_jsonl(dest / f"{name}.jsonl") == original, name
        # key order and string escaping follow the dataset too: the files are byte-identical
        assert (dest / f"{name}.jsonl").read_bytes() == (awm1k_samples / f"{name}.jsonl").read_bytes(), name


def test_bad_records_are_reported_by_file_and_line_and_the_rest_import(awm1k_samples, tmp_path):
    lines = (awm1k_samples / "gen_tasks.jsonl").read_text(encoding="utf-8").splitlines()
    bad = [lines[0], "{not json", json.dumps({"scenario": "x_1"}), json.dumps({"scenario": "y_1", "tasks": [1, 2]}),
           lines[1], lines[0]]
    (tmp_path / "gen_tasks.jsonl").write_text("\n".join(bad) + "\n", encoding="utf-8")
    db = json.loads((awm1k_samples / "gen_db.jsonl").read_text(encoding="utf-8").splitlines()[0])
    db["db_schema"]["tables"][0]["ddl"] = 42
    (tmp_path / "gen_db.jsonl").write_text(json.dumps(db) + "\n", encoding="utf-8")
    res = awm1k.read_dir(tmp_path)
    got = [str(p) for p in res.problems]
    assert got[0].startswith("gen_tasks.jsonl:2: invalid JSON")
    assert got[1] == "gen_tasks.jsonl:3: missing field 'tasks'"
    assert got[2] == "gen_tasks.jsonl:4: field 'tasks' must be a list of strings"
    assert got[3].startswith("gen_tasks.jsonl:6: duplicate record for e_commerce_33 (first at line 1)")
    assert got[4].startswith("gen_db.jsonl:1: invalid DbSchema: tables.0.ddl")
    assert len(got) == 5
    envs = {e.id: e for e in res.environments}
    assert set(envs) == {"e_commerce_33", "content_platform_1"}
    assert envs["e_commerce_33"].db_schema is None and "db_schema" in envs["e_commerce_33"].missing


def test_subset_import_and_missing_dir(awm1k_samples, tmp_path):
    (tmp_path / "gen_verifier.pure_code.jsonl").write_bytes(
        (awm1k_samples / "gen_verifier.pure_code.jsonl").read_bytes())
    res = awm1k.read_dir(tmp_path)
    [env] = res.environments
    assert env.id == "e_commerce_33" and len(env.verifiers) == 3
    assert env.missing == ["scenario", "tasks", "db_schema", "seed_data", "api_spec", "code"]
    records, _ = awm1k.export_records(res.environments)
    assert records["gen_verifier.pure_code"] == read_jsonl(tmp_path / "gen_verifier.pure_code.jsonl")
    assert all(not records[f] for f in awm1k.FILES if f != "gen_verifier.pure_code")
    with pytest.raises(ValueError, match="no AgentWorldModel-1K files"):
        awm1k.read_dir(tmp_path / "sub") if (tmp_path / "sub").mkdir() is None else None


def test_native_bundle_exports_what_has_an_awm1k_form():
    env = clean_env("note_box")
    records, notes = awm1k.export_records([env])
    assert records["gen_tasks"] == [{"scenario": "note_box", "tasks": [t.text for t in env.tasks]}]
    assert records["gen_db"][0]["db_path"] == "./outputs/databases/note_box.db"
    assert records["gen_sample"][0]["inserts_count"] == 1
    ep = records["gen_spec"][0]["api_spec"]["api_groups"][0]["endpoints"][0]
    assert ep["operation_id"] == "add_note" and ep["request_params"]["title"]["type"] == "string"
    assert records["gen_envs"] == [] and records["gen_verifier"] == []
    assert any("native tool code" in n for n in notes) and any("3 native-style verifier" in n for n in notes)
    again = awm1k.parse_lines({f: [(i + 1, json.dumps(r)) for i, r in enumerate(rs)] for f, rs in records.items() if rs})
    [back] = again.environments
    assert [t.text for t in back.tasks] == [t.text for t in env.tasks]
    assert back.db_schema == env.db_schema and [t.name for t in back.api_spec.tools] == ["add_note", "list_notes"]

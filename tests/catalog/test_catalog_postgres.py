"""DuckLake metadata in a real PostgreSQL that the test starts itself (skipped when absent)."""
from __future__ import annotations

import sys
from pathlib import Path


from awm_core.settings import load_settings
from storage.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_bundles import clean_env  # noqa: E402


def test_postgres_metadata_publish_time_travel_and_readers(postgres, awm_home, tmp_path, monkeypatch):
    monkeypatch.setenv("AWM_CATALOG__METADATA", postgres)
    monkeypatch.setenv("AWM_CATALOG__DATA_PATH", str(tmp_path / "lake-data"))
    settings = load_settings()
    with Catalog.open(settings) as cat:
        assert cat.location.backend == "postgres"
        with cat.publish(made_by={"flow_run_id": "pg-1"}, message="first") as pub:
            pub.add_environments([clean_env("note_box", n_tasks=3)])
            pub.add_rollouts([{"rollout_id": f"r{i}", "run_id": "e", "env_id": "note_box", "task_idx": 0,
                               "reward": 1.0, "label": "completed", "env_error": False} for i in range(2000)])
        first = pub.snapshot_id
        with cat.publish(message="second") as pub:
            pub.add_environments([clean_env("note_box", n_tasks=1)])
    with Catalog.open(settings, read_only=True) as ro:
        assert ro.snapshots()[-2]["made_by"] == {"flow_run_id": "pg-1"}
        assert len(ro.get_environment("note_box").tasks) == 1
        assert len(ro.get_environment("note_box", snapshot=first).tasks) == 3
        assert ro.rows("SELECT count(*) AS n FROM rollouts") == [{"n": 2000}]
    # Table data went to Parquet under the configured data path, not into PostgreSQL.
    assert list((tmp_path / "lake-data").rglob("*.parquet"))

"""DuckLake metadata in a real PostgreSQL that the test starts itself (skipped when absent)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from awm_core.settings import load_settings
from storage.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_bundles import clean_env  # noqa: E402


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed; "
                    "install the postgresql package to run this test")
    prefix: list[str] = []
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root: use the package's service account
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        user = pw.pw_name
        prefix = ["runuser", "-u", user, "--"]
    # Outside pytest's private (0700) temp tree, so the service account can reach it.
    root = Path(tempfile.mkdtemp(prefix="awm-pg-"))
    data = root / "data"
    if user:
        shutil.chown(root, user=user)
    port = free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(initdb, "-D", str(data), "-A", "trust", "-U", "awm", "--no-sync")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {r.stderr[-500:]}")
    r = run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
            "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    if r.returncode != 0:
        pytest.fail(f"pg_ctl start failed: {r.stderr[-500:]} {(root / 'server.log').read_text()[-1000:]}")
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            r = subprocess.run([pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "awm",
                                "awm_catalog"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"createdb failed: {r.stderr}")
        yield f"postgres:dbname=awm_catalog host=127.0.0.1 port={port} user=awm"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


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

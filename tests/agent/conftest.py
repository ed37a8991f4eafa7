"""Shared by the agent tests: one sandbox pool per module (short call timeout) and the notes app loaded in it."""
import pytest

from agent_bundles import notes_environment
from awm_core.runtime import SandboxPool
from awm_core.settings import load_settings


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(load_settings().sandbox, workers=1, call_timeout_s=3.0) as p:
        yield p


@pytest.fixture(scope="module")
def notes(pool):
    env = notes_environment()
    return env, pool.load(env)

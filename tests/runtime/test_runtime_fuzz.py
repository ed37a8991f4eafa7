"""10,000 random and malformed calls against the sample environments: no worker crash,
no corrupted database, read-only tools leave the database untouched."""
from __future__ import annotations

import random
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_envs import awm1k_environment, notes_environment  # noqa: E402

from awm_core.db import snapshot_digest  # noqa: E402
from awm_core.runtime import SandboxPool  # noqa: E402

CALLS = 10_000
INJECTIONS = ["' OR 1=1 --", "1; DROP TABLE notes; --", "x'); DELETE FROM users; --", "\" OR \"\"=\"",
              "%", "_", "\\", "\x00", "ü🙂", "{}", "[]", "null", "../../etc/passwd", "{channel_id}",
              "?a=b&c=d", "a/b/c", "%2e%2e%2f"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(INJECTIONS)
    if kind == 1:
        return "A" * rng.choice([0, 1, 1000, 100_000])
    if kind == 2:
        return rng.choice([0, -1, 1, 2, 10, 2**31, -(2**63), 2**80])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308, 3.0])
    if kind == 4:
        return rng.choice([True, False, None])
    if kind == 5 and depth < 2:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6 and depth < 2:
        return {rng.choice(INJECTIONS): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    if kind == 7:
        return rng.choice([float("nan"), float("inf"), b"bytes", {1, 2}, object()])
    return "".join(rng.choice("abc xyz'\"%;-") for _ in range(rng.randrange(12)))


def random_call(rng: random.Random, tools: list, spec_examples: dict):
    roll = rng.random()
    if roll < 0.08:
        return rng.choice(["", "drop_table", "../x", "list_notes; rm", "A" * 5000, "\x00"]), {}
    tool = rng.choice(tools)
    if roll < 0.15:
        return tool.name, rng.choice(["not json", 42, ["list"], None, b"raw"])
    args = dict(spec_examples.get(tool.name, {}))
    props = list(tool.input_schema.get("properties", {}))
    for _ in range(rng.randrange(3)):
        key = rng.choice(props + ["unexpected"]) if props else "unexpected"
        args[key] = random_value(rng)
    if props and rng.random() < 0.2:
        args.pop(rng.choice(props), None)
    return tool.name, args


READ_ONLY_PREFIXES = ("get_", "list_", "search_")


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, call_timeout_s=20) as p:
        yield p


def _integrity_ok(data: bytes) -> bool:
    conn = sqlite3.connect(":memory:")
    conn.deserialize(data)
    return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_fuzz_10000_calls(pool, awm1k_samples):
    rng = random.Random(20261126)
    handles = [pool.load(notes_environment(env_id="fuzz_notes")), pool.load(awm1k_environment(awm1k_samples))]
    restarts_before = sum(w["restarts"] for w in pool.stats()["workers"])
    kinds: dict[str, int] = {}
    for i, handle in enumerate(handles):
        examples = {t.name: t.example_arguments() for t in handle.environment.api_spec.tools}
        tools = handle.tools()
        readers = [t for t in tools if t.name.startswith(READ_ONLY_PREFIXES)]
        ro, rw = handle.open_session(), handle.open_session()
        initial_digest = snapshot_digest(ro.snapshot())
        per_env = CALLS // len(handles)
        for n in range(per_env):
            if n % 2:
                name, args = random_call(rng, readers, examples)
                r = ro.call(name, args)
            else:
                name, args = random_call(rng, tools, examples)
                r = rw.call(name, args)
            kind = r.error_kind or "ok"
            kinds[kind] = kinds.get(kind, 0) + 1
            assert kind != "environment", (name, str(args)[:300], r.error)
        assert snapshot_digest(ro.snapshot()) == initial_digest
        assert _integrity_ok(rw.snapshot()) and _integrity_ok(ro.snapshot())
        ro.close(), rw.close()
    assert sum(w["restarts"] for w in pool.stats()["workers"]) == restarts_before
    assert sum(kinds.values()) == CALLS
    # the fuzzer reached the tools, not only the validator
    print("outcomes:", kinds)
    assert kinds.get("ok", 0) > 500 and kinds.get("invalid_arguments", 0) > 500 and kinds.get("unknown_tool", 0) > 100

"""Hostile environment code: every case is contained, the pool keeps serving a healthy
environment on the other worker, and the caller gets a clear error result.

Several cases reach the real ``os`` module through ``object.__subclasses__()`` on purpose:
the in-process guards can be bypassed by deliberate Python, so these show the next layer
(audit hook, kernel limits, process boundary) holding.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_envs import hostile_environment, notes_environment  # noqa: E402

from awm_core.models import ToolSpec  # noqa: E402
from awm_core.runtime import EnvLoadError, SandboxPool  # noqa: E402

REAL_OS = "os_ = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__"
OUTSIDE = os.path.join(tempfile.gettempdir(), "awm-hostile-probe.txt")

CASES = {
    "infinite_loop": ("while True:\n    pass", "environment", "wall-clock limit"),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(100_000_000))", "environment", "MemoryError"),
    "fork": (f"{REAL_OS}\nreturn os_['fork']()", "environment", "os.fork"),
    "subprocess_import": ("import subprocess\nreturn subprocess.run(['id'])", "environment", "importing 'subprocess'"),
    "os_system": (f"{REAL_OS}\nreturn os_['system']('touch {OUTSIDE}')", "environment", "os.system"),
    "socket_connect": (f"{REAL_OS}\ns = os_['sys'].modules['socket'].socket()\ns.connect(('1.1.1.1', 80))",
                       "environment", "socket"),
    "read_outside": ("return open('/etc/passwd').read()", "environment", "reading '/etc/passwd'"),
    "write_outside": (f"open('{OUTSIDE}', 'w').write('x')", "environment", "writing"),
    "sql_attach_outside": (f"conn.execute(\"ATTACH '{OUTSIDE}' AS x\")", "tool", "too many attached databases"),
    "os_exit": (f"{REAL_OS}\nos_['_exit'](3)", "environment", "exited with code 3"),
    "sys_exit": (f"{REAL_OS}\nos_['sys'].exit(1)", "environment", "SystemExit"),
    "deep_recursion": ("def f(n):\n    return f(n + 1)\nreturn f(0)", "environment", "RecursionError"),
    "huge_return": ("return 'x' * (20 * 1024 * 1024)", "environment", "over the"),
    "signal_parent": (f"{REAL_OS}\nos_['kill'](os_['getppid'](), 9)", "environment", "os.kill"),
    "ctypes_crash": (f"{REAL_OS}\nos_['sys'].modules['ctypes'].string_at(0)", "environment", "ctypes"),
    "ctypes_import": ("import ctypes\nreturn ctypes.string_at(0)", "environment", "importing 'ctypes'"),
    "thread_bomb": (f"{REAL_OS}\nimport time\nth = os_['sys'].modules['threading']\n"
                    "for _ in range(500):\n    th.Thread(target=time.sleep, args=(30,), daemon=True).start()",
                    "environment", "thread"),
    "unavailable_module": ("import requests\nreturn 1", "environment", "importing 'requests'"),
}


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, call_timeout_s=3, memory_mb=700, max_result_bytes=4 << 20) as p:
        yield p


@pytest.fixture(scope="module")
def healthy(pool):
    """The healthy environment (slot 0) with a session holding a write of its own."""
    env = pool.load(notes_environment(env_id="healthy"))
    s = env.open_session()
    assert s.call("create_note", {"title": "kept across hostile calls"}).ok
    yield s
    s.close()


@pytest.fixture(scope="module")
def hostile(pool, healthy):
    base = notes_environment(env_id="hostile")
    tools = list(base.api_spec.tools)
    code = base.code.source
    for name, (body, _, _) in CASES.items():
        code += f"\n\ndef evil_{name}(conn: sqlite3.Connection) -> object:\n    \"\"\"Hostile.\"\"\"\n"
        code += "\n".join("    " + line for line in body.splitlines()) + "\n"
        tools.append(ToolSpec(name=f"evil_{name}", description="hostile"))
    code += "\n\n_LEAK = []\n\ndef evil_slow_leak(conn: sqlite3.Connection) -> int:\n" \
            "    \"\"\"Keeps 80 MB more per call.\"\"\"\n    _LEAK.append(' ' * 80_000_000)\n    return len(_LEAK)\n"
    code += "\n\ndef evil_tamper_builtins(conn: sqlite3.Connection) -> int:\n    \"\"\"Breaks len.\"\"\"\n" \
            "    __builtins__['len'] = lambda x: -1\n    return len([1, 2])\n"
    tools += [ToolSpec(name="evil_slow_leak"), ToolSpec(name="evil_tamper_builtins")]
    env = base.model_copy(update={"code": base.code.model_copy(update={"source": code}),
                                  "api_spec": base.api_spec.model_copy(update={"tools": tools})})
    handle = pool.load(env)
    assert handle.worker is not healthy.handle.worker
    return handle


def _healthy_still_serves(healthy):
    r = healthy.call("list_notes", {"limit": 10})
    assert r.ok, r
    titles = [n["title"] for n in r.content]
    assert "kept across hostile calls" in titles


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_case_is_contained(case, hostile, healthy):
    _, kind, fragment = CASES[case]
    if os.path.exists(OUTSIDE):
        os.remove(OUTSIDE)
    s = hostile.open_session()
    r = s.call(f"evil_{case}", {})
    assert not r.ok and r.error_kind == kind, r
    assert fragment in r.error, r.error
    assert not os.path.exists(OUTSIDE)
    _healthy_still_serves(healthy)
    # The hostile environment itself comes back: a fresh (or reset) session works.
    s.reset()
    assert s.call("list_notes", {}).ok
    s.close()


def test_slow_leak_across_calls_recycles_the_worker(hostile, healthy):
    s = hostile.open_session()
    results = [s.call("evil_slow_leak", {}) for _ in range(12)]
    failures = [r for r in results if not r.ok]
    assert failures and all(r.error_kind == "environment" for r in failures)
    assert any("memory" in r.error.lower() or "MemoryError" in r.error for r in failures), failures[0]
    _healthy_still_serves(healthy)
    s.reset()
    assert s.call("evil_slow_leak", {}).content == 1  # a fresh worker: the leak is gone
    s.close()


def test_tampering_with_builtins_stays_in_that_module(hostile, healthy):
    with hostile.open_session() as s:
        assert s.call("evil_tamper_builtins", {}).content == -1
        # the same worker's own code and the healthy environment still see the real len()
        assert len(s.call("list_notes", {}).content) == 2
    _healthy_still_serves(healthy)


def test_hostile_import_at_load_time_is_a_load_error(pool):
    env = hostile_environment("import_bomb", "return 1")
    env = env.model_copy(update={"code": env.code.model_copy(update={"source": "import socket\n" + env.code.source})})
    with pytest.raises(EnvLoadError, match="import of 'socket' is not allowed"):
        pool.load(env)


def test_pool_restarts_workers_and_reports_why(pool, hostile):
    before = {w["slot"]: w["restarts"] for w in pool.stats()["workers"]}
    with hostile.open_session() as s:
        assert s.call("evil_os_exit", {}).error_kind == "environment"
        lost = s.call("list_notes", {})
        assert lost.error_kind == "environment" and "reset()" in lost.error
        s.reset()
        assert s.call("list_notes", {}).ok
    after = {w["slot"]: w for w in pool.stats()["workers"]}
    slot = hostile.worker.slot
    assert after[slot]["restarts"] > before[slot] and "exited with code 3" in after[slot]["last_failure"]


def test_each_request_gets_its_whole_cpu_budget():
    """RLIMIT_CPU takes whole seconds of the process's life: the seconds used are rounded up, so a
    worker at 1.95 s with a 1 s budget gets 1 s more, not 0.05 s (a restarted worker busy with its
    imports was killed while loading an environment)."""
    import resource

    from awm_core.runtime.sandbox import cpu_soft_limit

    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # some CPU used, so the seconds have a fraction
        pass
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    assert cpu_soft_limit(1) - used >= 1


def test_cpu_time_limit_backs_up_the_wall_clock(healthy):
    """With the wall clock generous, RLIMIT_CPU ends a spinning worker (SIGXCPU)."""
    with SandboxPool(workers=1, call_timeout_s=30, cpu_s=1) as p:
        h = p.load(hostile_environment("spinner", "while True:\n    pass"))
        with h.open_session() as s:
            r = s.call("evil", {})
            assert r.error_kind == "environment" and "CPU-time limit" in r.error, r
            s.reset()
            assert s.call("list_notes", {}).ok
    _healthy_still_serves(healthy)

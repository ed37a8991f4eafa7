"""`awm server start/status/stop` as a user runs them: a detached Prefect server and process
worker under AWM_HOME; a deployment run is picked up by that worker; stop leaves no process
behind, including the flow run (which Prefect starts in a session of its own) and its child."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.slow

HERE = os.path.dirname(__file__)


def awm(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def server_env(awm_home, monkeypatch):
    port = free_port()
    monkeypatch.setenv("AWM_SERVER__PORT", str(port))
    monkeypatch.setenv("AWM_SERVER__WORK_POOL", "ops-server-test")
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")  # the worker picks the run up quickly
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    yield port
    awm("server", "stop", "--timeout", "5")  # whatever the test left running


def test_start_run_stop_leaves_no_process(server_env, awm_home):
    port = server_env
    url = f"http://127.0.0.1:{port}/api"
    started = awm("server", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"Open the UI at http://127.0.0.1:{port}" in started.stdout
    assert f"export PREFECT_API_URL={url}" in started.stdout
    assert f"export PREFECT_HOME={awm_home / 'prefect'}" in started.stdout
    st = awm("server", "status")
    assert st.returncode == 0 and "(healthy)" in st.stdout and "worker       running" in st.stdout, st.stdout
    assert (awm_home / "server" / "server.pid").exists() and (awm_home / "prefect").is_dir()
    # A second start finds both running and starts nothing new.
    pids = {r: (awm_home / "server" / f"{r}.pid").read_text() for r in ("server", "worker")}
    again = awm("server", "start")
    assert again.returncode == 0 and pids == {r: (awm_home / "server" / f"{r}.pid").read_text() for r in pids}

    from prefect.client.orchestration import get_client
    from prefect.flows import Flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    marker = awm_home / "sleepy.pids"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            assert client.read_work_pool("ops-server-test").type == "process"
        flow = Flow.from_source(source=HERE, entrypoint="ops_sleepy.py:sleepy")
        dep_id = flow.deploy(name="t", work_pool_name="ops-server-test", build=False, push=False,
                             print_next_steps=False, parameters={"marker": str(marker)})
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(dep_id)
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert time.monotonic() < deadline, (awm_home / "server" / "worker.log").read_text()[-3000:]
                time.sleep(0.5)
            assert client.read_flow_run(run.id).state.is_running()
    flow_pid, grandchild_pid = map(int, marker.read_text().split())
    family, roots = set(), {}
    for role in ("server", "worker"):
        root = psutil.Process(json.loads((awm_home / "server" / f"{role}.pid").read_text())["pid"])
        roots[role] = root.pid
        family |= {root.pid, *(p.pid for p in root.children(recursive=True))}
    assert {flow_pid, grandchild_pid} <= family  # the run really is the worker's descendant
    assert os.getpgid(flow_pid) != os.getpgid(roots["worker"])  # and in another session than its worker

    stopped = awm("server", "stop", "--timeout", "10")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "worker: stopped" in stopped.stdout and "server: stopped" in stopped.stdout
    survivors = [pid for pid in family if not gone(pid)]
    assert survivors == [], [psutil.Process(p).cmdline() for p in survivors]
    assert not (awm_home / "server" / "server.pid").exists()
    st = awm("server", "status")
    assert st.returncode == 3 and "not answering" in st.stdout and "stopped" in st.stdout
    assert "was not running" in awm("server", "stop").stdout


def test_start_refuses_a_port_someone_else_serves(server_env, awm_home, prefect_server, monkeypatch):
    # The session server answers on its port: a start on that port must not pretend it is ours.
    port = prefect_server.split(":")[2].split("/")[0]
    monkeypatch.setenv("AWM_SERVER__PORT", port)
    out = awm("server", "start")
    assert out.returncode == 1 and "something else already answers" in out.stderr
    assert not (awm_home / "server" / "server.pid").exists()

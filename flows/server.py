"""Start, stop and inspect the local Prefect server and the project's process worker.

Both run detached in their own sessions, with pid files and logs under ``AWM_HOME/server/``:

- ``prefect server start --host H --port P`` with ``PREFECT_HOME=AWM_HOME/prefect`` and analytics off;
- ``prefect worker start --pool <settings.server.work_pool> --type process`` in the project folder,
  with the same ``AWM_HOME``/``AWM_CONFIG`` the caller has, so flow runs see the same settings.

A process worker starts each flow run in a new session of its own, so stopping the worker's
process group alone could leave a running flow behind. ``stop`` therefore snapshots every
descendant before signalling and finishes off whatever survives the group shutdown.

``start_api_server`` (a bare API server, no worker, for a given home and port) and ``stop_group``
are the one way this project starts and stops a Prefect server: ``start`` uses them, and so do the
test session's server and the benchmarks (through ``temporary_api_server``).

A fresh Prefect home costs its first server start about 20 s (the database migrations, then the
block types registered). ``make_template`` does that once, at install (``python -m flows.server
template``), into a database kept beside the installed packages; ``seed_database`` copies it into
a home that has none, so a newcomer's first ``make demo`` starts like a second one.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from awm_core.errors import ServerError
from awm_core.settings import Settings, get_settings

PROJECT_DIR = Path(__file__).resolve().parents[1]
ROLES = ("server", "worker")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


@dataclass
class ProcessInfo:
    role: str
    pid: int | None
    alive: bool
    log: Path
    started_at: float | None = None


@dataclass
class ServerStatus:
    api_url: str
    ui_url: str
    healthy: bool
    work_pool: str
    processes: dict[str, ProcessInfo] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.healthy and all(p.alive for p in self.processes.values())

    def render(self) -> str:
        lines = [f"Prefect API  {self.api_url}  ({'healthy' if self.healthy else 'not answering'})",
                 f"Prefect UI   {self.ui_url}",
                 f"work pool    {self.work_pool}"]
        for p in self.processes.values():
            state = f"running (pid {p.pid})" if p.alive else ("stopped" if p.pid is None else f"dead (stale pid {p.pid})")
            lines.append(f"{p.role:<12} {state}; log {p.log}")
        return "\n".join(lines)


def state_dir(settings: Settings) -> Path:
    return settings.home_dir / "server"


def api_url(settings: Settings) -> str:
    return f"http://{settings.server.host}:{settings.server.port}/api"


def ui_url(settings: Settings) -> str:
    return f"http://{settings.server.host}:{settings.server.port}"


# Prefect's server records task runs from their state events one event per write by default
# (batch size 1) and persists events 20 at a time. A generate run sends ~86 events per
# environment, and at that rate the server took ~1.3 s of CPU per environment, as much as the
# whole flow; batched, it takes half. The price: the UI shows a task run's latest state up to a
# second late. Set in the environment of every server this project starts, unless already set.
SERVER_TUNING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "50",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
}


def tuned(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the server tuning above where it sets none of its own."""
    return {**SERVER_TUNING, **env}


def prefect_env(settings: Settings) -> dict[str, str]:
    """The environment every Prefect process of this project runs with (server, worker, clients)."""
    from tasks.generation import results_dir  # imports Prefect: only when starting processes

    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(settings.prefect_home),
        "PREFECT_API_URL": api_url(settings),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": settings.server.host,
        "PREFECT_SERVER_API_PORT": str(settings.server.port),
        # Deployment runs keep their cached stage results where `awm generate` keeps them, so a
        # run of either kind resumes the other's unfinished work.
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results_dir(settings)),
        # Flow runs started by the worker must read the same settings as the caller.
        "AWM_HOME": str(settings.home_dir),
        "AWM_CONFIG": str(Path(os.environ.get("AWM_CONFIG", "awm.toml")).resolve()),
    })
    return env


# ------------------------------------------------------------------------------ pid files


def _pid_file(settings: Settings, role: str) -> Path:
    return state_dir(settings) / f"{role}.pid"


def _log_file(settings: Settings, role: str) -> Path:
    return state_dir(settings) / f"{role}.log"


def _write_pid(settings: Settings, role: str, proc: psutil.Process) -> None:
    path = _pid_file(settings, role)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "create_time": proc.create_time()}))
    os.replace(tmp, path)


def _read_process(settings: Settings, role: str) -> tuple[int | None, psutil.Process | None, float | None]:
    """(pid from the file, the live process if it is still the one we started, its start time)."""
    path = _pid_file(settings, role)
    try:
        data = json.loads(path.read_text())
        pid, created = int(data["pid"]), float(data["create_time"])
    except FileNotFoundError:
        return None, None, None
    except (ValueError, KeyError, TypeError):
        raise ServerError(f"pid file {path} is corrupt; remove it after checking no {role} is running") from None
    try:
        proc = psutil.Process(pid)
        # A recycled pid belongs to another process: compare start times before trusting it.
        if abs(proc.create_time() - created) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return pid, None, created
        return pid, proc, created
    except psutil.NoSuchProcess:
        return pid, None, created


# ------------------------------------------------------------------------------ health


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"prefect server exited with code {proc.returncode} while starting; "
                              f"last lines of {log}:\n{_tail(log)}")
        if is_healthy(url):
            return
        time.sleep(0.5)
    raise ServerError(f"prefect server at {url} not healthy after {timeout:.0f}s; last lines of {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------ start


def _launch(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        # A session of its own: the process outlives this command and its group can be stopped as one.
        return subprocess.Popen(argv, env=env, cwd=PROJECT_DIR, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _spawn(settings: Settings, role: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    proc = _launch(argv, env, _log_file(settings, role))
    _write_pid(settings, role, psutil.Process(proc.pid))
    return proc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the database template


def template_path() -> Path:
    """Where the migrated Prefect database of this installation is kept (one per Prefect version;
    read from the package metadata: importing Prefect would fix its settings too early)."""
    from importlib.metadata import version

    return Path(sys.prefix) / "share" / "awm" / f"prefect-{version('prefect')}.db"


def _custom_database() -> bool:
    return any(os.environ.get(k) for k in ("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                                           "PREFECT_API_DATABASE_CONNECTION_URL"))


def seed_database(home: Path) -> bool:
    """Copy the template into ``home`` when it has no database yet (and none is configured
    elsewhere); whether it did. A missing template is no error: the server migrates as before."""
    target = home / "prefect.db"
    template = template_path()
    if target.exists() or _custom_database() or not template.is_file():
        return False
    import shutil
    import tempfile

    home.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".prefect.db.", suffix=".tmp", dir=home)
    os.close(fd)
    tmp = Path(name)
    try:
        shutil.copyfile(template, tmp)
        # A link appears whole or not at all and never over a file: of two first runs at once, one
        # seeds and the other leaves the database alone (its server may already be writing to it).
        os.link(tmp, target)
    except OSError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def make_template(timeout: float = 300.0) -> Path:
    """Start a server on a fresh home (migrations, block types), stop it, and keep its database
    as the template; returns its path. Written whole or not at all."""
    import sqlite3
    import tempfile

    target = template_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="awm-prefect-template-") as tmp:
        home = Path(tmp) / "prefect"
        with temporary_api_server(home, timeout=timeout):
            pass
        partial = target.with_name(target.name + ".tmp")
        src, dst = sqlite3.connect(home / "prefect.db"), sqlite3.connect(partial)
        try:
            src.backup(dst)  # a consistent copy, the write-ahead log folded in
        finally:
            src.close()
            dst.close()
        os.replace(partial, target)
    return target


def start_api_server(home: Path, port: int, host: str = "127.0.0.1", *, env: dict[str, str] | None = None,
                     log: Path | None = None, timeout: float = 120.0,
                     on_spawn: Callable[[subprocess.Popen], None] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a bare Prefect API server (no worker) with ``PREFECT_HOME=home``; wait until it is healthy.

    Returns the process (leader of its own process group, for ``stop_group``) and the API URL.
    ``env`` is the base environment (default ``os.environ``); the log goes to ``log`` (default
    ``home/server.log``). ``on_spawn`` sees the process before the wait, so a caller can record its
    pid while a fresh home is still migrating. A server that dies or stays unhealthy is stopped
    and reported as a ServerError with the end of its log.
    """
    url = f"http://{host}:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    seed_database(home)
    log = log or home / "server.log"
    env = {**tuned(dict(os.environ if env is None else env)), "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = _launch([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env, log)
    if on_spawn is not None:
        on_spawn(proc)
    try:
        _wait_healthy(url, proc, log, timeout)
    except ServerError:
        stop_group(proc)
        raise
    return proc, url


@contextmanager
def temporary_api_server(home: Path, port: int | None = None, timeout: float = 120.0) -> Iterator[str]:
    """A bare API server for the ``with`` block; PREFECT_API_URL and PREFECT_HOME in os.environ point at
    it meanwhile (restored afterwards), so clients and subprocesses started inside use it."""
    proc, url = start_api_server(home, port or free_port(), timeout=timeout)
    old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    try:
        yield url
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_group(proc)


def ensure_work_pool(settings: Settings, url: str | None = None) -> bool:
    """Create the project's process work pool when missing (on the server at ``url``, default
    this project's local server); True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = settings.server.work_pool
    with temporary_settings(updates={PREFECT_API_URL: url or api_url(settings)}):
        with get_client(sync_client=True) as client:
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                try:
                    client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                    return True
                except ObjectAlreadyExists:
                    return False
            if pool.type != "process":
                raise ServerError(f"work pool {name!r} exists with type {pool.type!r}; the local worker needs a "
                                  f"'process' pool (set server.work_pool to another name)")
    return False


def start(settings: Settings | None = None, timeout: float = 120.0, worker: bool = True) -> ServerStatus:
    """Start the server (unless one of ours already runs) and the worker; wait for health."""
    settings = settings or get_settings()
    state_dir(settings).mkdir(parents=True, exist_ok=True)
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    env = prefect_env(settings)
    url = api_url(settings)
    python = sys.executable

    _, server_proc, _ = _read_process(settings, "server")
    if server_proc is None:
        if is_healthy(url):
            raise ServerError(f"something else already answers at {url}; stop it or set server.port "
                              f"(AWM_SERVER__PORT) to a free port")
        try:
            start_api_server(settings.prefect_home, settings.server.port, settings.server.host, env=env,
                             log=_log_file(settings, "server"), timeout=timeout,
                             on_spawn=lambda proc: _write_pid(settings, "server", psutil.Process(proc.pid)))
        except ServerError:
            # Already stopped by start_api_server; this also drops its pid file.
            _stop_role(settings, "server", timeout=10)
            raise
    elif not is_healthy(url):
        # Ours is running but may still be starting (migrations on a fresh home take a while).
        deadline = time.monotonic() + timeout
        while not is_healthy(url):
            if time.monotonic() > deadline or not server_proc.is_running():
                raise ServerError(f"the server (pid {server_proc.pid}) runs but {url} does not answer; "
                                  f"see {_log_file(settings, 'server')} or run `awm server stop`")
            time.sleep(0.5)

    if worker:
        ensure_work_pool(settings)
        _, worker_proc, _ = _read_process(settings, "worker")
        if worker_proc is None:
            _spawn(settings, "worker", [python, "-m", "prefect", "worker", "start", "--pool",
                                        settings.server.work_pool, "--type", "process"], env)
    return status(settings)


# ------------------------------------------------------------------------------ stop


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGINT (Prefect's clean stop), then SIGTERM, then SIGKILL to the group of a process started in a
    session of its own, each after ``timeout`` seconds without it ending."""
    if proc.poll() is not None:
        return
    for sig in STOP_SIGNALS:
        if not _signal_group(proc.pid, sig):
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def _reap(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait for the processes to end; the ones still alive afterwards."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if _really_alive(p)]


def _really_alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_role(settings: Settings, role: str, timeout: float) -> bool:
    """SIGINT, then SIGTERM, then SIGKILL to the role's process group, each after ``timeout``.

    Returns True when something was stopped. Descendants that live in other sessions (flow runs
    started by the worker) get the same sequence once the group is gone.
    """
    _, proc, _ = _read_process(settings, role)
    pid_file = _pid_file(settings, role)
    if proc is None:
        pid_file.unlink(missing_ok=True)
        return False
    family = [proc, *_descendants(proc)]
    pgid = proc.pid  # start_new_session made the process its group's leader
    for sig in STOP_SIGNALS:
        _signal_group(pgid, sig)
        for p in family[1:]:
            try:
                # Members of the group already got the signal; a second SIGINT would make
                # uvicorn skip its graceful shutdown.
                if _really_alive(p) and os.getpgid(p.pid) != pgid:
                    p.send_signal(sig)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        family = _reap(family, timeout)
        if not family:
            break
    if family:
        raise ServerError(f"{role}: processes {[p.pid for p in family]} survived SIGKILL")
    pid_file.unlink(missing_ok=True)
    return True


def stop(settings: Settings | None = None, timeout: float = 15.0) -> dict[str, bool]:
    """Stop the worker first (so it does not pick up runs against a dying API), then the server."""
    settings = settings or get_settings()
    return {role: _stop_role(settings, role, timeout) for role in ("worker", "server")}


# ------------------------------------------------------------------------------ status


def status(settings: Settings | None = None) -> ServerStatus:
    settings = settings or get_settings()
    result = ServerStatus(api_url(settings), ui_url(settings), is_healthy(api_url(settings)), settings.server.work_pool)
    for role in ROLES:
        pid, proc, created = _read_process(settings, role)
        result.processes[role] = ProcessInfo(role, pid, proc is not None, _log_file(settings, role), created)
    return result


def exports(settings: Settings) -> dict[str, Any]:
    """What a shell needs to talk to this server (printed by ``awm server start``)."""
    return {"PREFECT_API_URL": api_url(settings), "PREFECT_HOME": str(settings.prefect_home)}


if __name__ == "__main__":  # python -m flows.server template: make the database template (at install)
    if sys.argv[1:] != ["template"]:
        sys.exit("usage: python -m flows.server template")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    print(f"made the Prefect database template {make_template()}")

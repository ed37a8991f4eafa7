"""Parent side of the sandbox: worker processes, environments, sessions, verifiers.

``SandboxPool`` owns a fixed number of worker *slots*. Each loaded environment is assigned
to one slot (the least busy), so environments are spread over workers and a crash in one
worker only loses that worker's sessions. Every slot has one request/response channel
guarded by a lock, which makes the pool safe to use from many threads; calls to different
workers run in parallel.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from awm_core.errors import AWMError, SqlExecutionError
from awm_core.models import BENCHMARKS, Environment
from awm_core.runtime import kernel, protocol
from awm_core.settings import SandboxSettings
from awm_core.runtime.types import EnvLoadError, SandboxError, WeakSandboxError, ToolInfo, ToolResult, VerifierOutcome

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
_PAGE = os.sysconf("SC_PAGE_SIZE")


# How spec examples are executed, in the words the spec and code prompts use. The order of the
# tools is then irrelevant: a delete example cannot break a get example of the same row.
EXAMPLE_RULE = ("each tool's example call runs alone, on a fresh copy of the seeded database, with every "
                "parameter that has an example: no example sees what another example changed, so each one "
                "must succeed on the seed data exactly as it is")


class WorkerFailure(Exception):
    """The worker died, overran its time, broke the protocol, or was restarted."""


class _Worker:
    """One slot: a worker process that is (re)started on demand."""

    def __init__(self, pool: "SandboxPool", slot: int):
        self.pool = pool
        self.slot = slot
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.instance = 0          # bumps on every (re)start; sessions remember theirs
        self.loaded: set[str] = set()
        self.last_failure = ""
        self.protections: dict[str, bool] = {}
        self.scratch: Path | None = None
        self._w = self._reader = None
        self.restarts = 0
        # (instance, sid) of sessions dropped without close(): closed with the next request.
        # Filled from finalizers, which may run inside any thread (even one holding the
        # lock), so they only append here.
        self.pending_close: list[tuple[int, int]] = []
        # Replies still owed by the worker for requests whose caller went away mid-call
        # (a cancelled coroutine); read and dropped before the next request.
        self._owed = 0
        self._statm: int | None = None     # /proc/PID/statm, kept open: RSS is read after every call
        # One asyncio lock per event loop: coroutines queue on it instead of taking a thread
        # each to wait on ``lock``.
        self._alocks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]" = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        cfg = self.pool.config
        self.scratch = Path(tempfile.mkdtemp(prefix=f"awm-sandbox-{self.slot}-"))
        os.chmod(self.scratch, 0o700)
        log = open(self.scratch / "worker.log", "wb")
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        protocol.widen(req_w, resp_r)
        wcfg = {
            "fd_in": req_r, "fd_out": resp_w, "scratch": str(self.scratch),
            "memory_mb": cfg.memory_mb, "cpu_s": cfg.cpu_s, "open_files": cfg.open_files,
            "file_size_mb": cfg.file_size_mb, "max_threads": cfg.max_threads,
            "max_result_bytes": cfg.max_result_bytes, "netns": cfg.network_namespace,
            "user_namespace": cfg.user_namespace, "landlock": cfg.landlock, "seccomp": cfg.seccomp,
            "uid_base": 200_000 if cfg.separate_uid else None, "parent_pid": os.getpid(),
        }
        # Only what Python needs: no API keys or other secrets of this process.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.scratch),
               "LANG": os.environ.get("LANG", "C.UTF-8"), "PYTHONPATH": _REPO_ROOT,
               "PYTHONDONTWRITEBYTECODE": "1", "MALLOC_ARENA_MAX": "2", "TMPDIR": str(self.scratch)}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-s", "-m", "awm_core.runtime.worker", json.dumps(wcfg)],
                # stdout (generated code's print) goes nowhere; stderr keeps the worker's own
                # failures for the error message when it dies.
                pass_fds=(req_r, resp_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                env=env, cwd=str(self.scratch), start_new_session=True, close_fds=True)
        finally:
            os.close(req_r)
            os.close(resp_w)
            log.close()
        self._w = req_w
        self._reader = protocol.Reader(resp_r, max_header=cfg.max_result_bytes * 2 + (1 << 20))
        self._r = resp_r
        self.instance = next(self.pool._instances)
        self.loaded = set()
        self._owed = 0
        try:
            self._statm = os.open(f"/proc/{self.proc.pid}/statm", os.O_RDONLY)
        except OSError:
            self._statm = None
        try:
            hello, _ = self._reader.read(time.monotonic() + cfg.startup_timeout_s)
        except (protocol.ChannelClosed, protocol.ChannelTimeout):
            reason = self._death_reason()
            self._kill()
            raise SandboxError(f"sandbox worker did not start: {reason}") from None
        self.protections = hello.get("protections", {})
        missing = kernel.missing_layers(self.protections)
        if missing and not cfg.allow_weak_sandbox:
            self._kill()
            raise WeakSandboxError(
                "refusing to run generated code: the sandbox could not apply " + " and ".join(missing)
                + ", so deliberately hostile environment code could reach this machine's files, network or "
                "processes; pass --allow-weak-sandbox (setting sandbox.allow_weak_sandbox) to run it anyway")

    def _death_reason(self) -> str:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if code is None:
            why = "stopped answering"
        elif code < 0:
            sig = signal.Signals(-code).name
            why = {"SIGXCPU": "hit its CPU-time limit", "SIGXFSZ": "hit its file-size limit",
                   "SIGSEGV": "crashed (segmentation fault)", "SIGKILL": "was killed (SIGKILL)",
                   "SIGABRT": "aborted"}.get(sig, f"died from {sig}")
        else:
            why = f"exited with code {code}"
        tail = self._log_tail()
        return f"the sandbox worker {why}" + (f"; its last output: {tail}" if tail else "")

    def _log_tail(self) -> str:
        try:
            data = (self.scratch / "worker.log").read_bytes()[-600:]
        except (OSError, TypeError):
            return ""
        return data.decode("utf-8", "replace").strip().replace("\n", " | ")

    def _kill(self, reason: str = "") -> None:
        if reason:
            self.last_failure = reason
            self.restarts += 1
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for fd in (self._w, getattr(self, "_r", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._statm is not None:
            try:
                os.close(self._statm)
            except OSError:
                pass
        self._w = self._r = self._reader = self._statm = None
        self._owed = 0
        self.proc = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        self.loaded = set()

    def close(self) -> None:
        with self.lock:
            self._kill()

    def rss_bytes(self) -> int:
        if self.proc is None:
            return 0
        try:
            if self._statm is not None:
                return int(os.pread(self._statm, 128, 0).split()[1]) * _PAGE
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return 0

    # ------------------------------------------------------------------ requests
    def request(self, header: dict[str, Any], blobs: list[bytes] = (), *, timeout: float | None = None,
                env: "EnvHandle | None" = None, instance: int | None = None) -> tuple[dict[str, Any], list[bytes], int]:
        """Send one request; returns (response, blobs, worker instance).

        ``env``: make sure that environment is loaded in the current worker first.
        ``instance``: the worker the caller's session lives in; a different one means the
        session was lost in a restart.
        """
        with self.lock:
            if self.pool._closed:
                raise SandboxError("the sandbox pool is closed")
            if instance is not None and instance != self.instance:
                raise WorkerFailure(f"session lost: its sandbox worker was restarted ({self.last_failure or 'it stopped'})")
            if self.proc is None or self.proc.poll() is not None:
                if self.proc is not None:
                    self._kill(self._death_reason())
                if instance is not None:
                    raise WorkerFailure(f"session lost: its sandbox worker was restarted ({self.last_failure})")
                self._start()
            if self.pending_close:
                sids = [sid for inst, sid in self.pending_close if inst == self.instance]
                self.pending_close.clear()
                if sids:
                    self._exchange({"op": "close_many", "sids": sids}, [], self.pool.config.call_timeout_s)
            if env is not None and (env.key not in self.loaded or not env._tools_ready):
                # (a new handle for a key this worker already holds still needs its tool list)
                resp, _, _ = self._exchange(env._load_request(), [env.snapshot],
                                            self.pool.config.call_timeout_s * 3)
                if resp.get("recycle"):
                    self._kill(f"recycled after loading {env.id} failed: {resp.get('errors')}"[:400])
                env._on_loaded(resp)
                self.loaded.add(env.key)
            resp, out, inst = self._exchange(header, blobs, timeout)
            self._after(resp)
            return resp, out, inst

    def _after(self, resp: dict[str, Any]) -> None:
        """Replace the worker after a reply that asks for it, or when its memory is too high
        (lock held)."""
        if resp.get("recycle"):
            self._kill(f"recycled after: {resp.get('error', '')[:300]}")
        else:
            limit = self.pool.config.memory_mb * self.pool.config.recycle_rss_fraction * (1 << 20)
            rss = self.rss_bytes()
            if rss > limit:
                self._kill(f"recycled: its memory use reached {rss >> 20} MB "
                           f"(limit {self.pool.config.memory_mb} MB)")

    def _fast_ready(self, instance: int | None, env: "EnvHandle | None") -> bool:
        """Whether a request can go straight to the worker: it runs, owes nothing, has no
        sessions to close first and holds the environment (lock held)."""
        return (not self.pool._closed and self.proc is not None and self._owed == 0 and not self.pending_close
                and (instance is None or instance == self.instance) and self.proc.poll() is None
                and (env is None or (env.key in self.loaded and env._tools_ready)))

    async def arequest(self, header: dict[str, Any], *, timeout: float | None = None,
                       env: "EnvHandle | None" = None, instance: int | None = None) -> tuple[dict[str, Any], list[bytes], int]:
        """``request`` for a coroutine, without a thread: the request is written to the worker's
        pipe and the reply awaited through the event loop (its reader callback). Requests that
        need more first (a worker start, an environment load, pending closes) take the
        blocking path in a thread. A caller cancelled mid-call leaves the reply owed: it is
        read and dropped before the next request, so the channel stays in step."""
        loop = asyncio.get_running_loop()
        alock = self._alocks.get(loop)
        if alock is None:
            alock = self._alocks.setdefault(loop, asyncio.Lock())
        async with alock:
            if not self.lock.acquire(blocking=False):  # a thread has the worker: wait in one
                await loop.run_in_executor(None, self.lock.acquire)
            try:
                fast = self._fast_ready(instance, env)
                if fast:
                    return await self._aexchange(loop, header, timeout)
            finally:
                self.lock.release()
            return await loop.run_in_executor(
                None, lambda: self.request(header, timeout=timeout, env=env, instance=instance))

    async def _aexchange(self, loop, header, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            protocol.write_all(self._w, protocol.encode(header))
        except protocol.ChannelClosed:
            return self._exchange_failed(protocol.ChannelClosed("channel closed while writing"), timeout)
        self._owed += 1
        ready = loop.create_future()
        fd = self._r

        def on_readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, on_readable)
        try:
            try:
                await asyncio.wait_for(ready, None if deadline is None else max(0.0, deadline - time.monotonic()))
            finally:
                loop.remove_reader(fd)
            resp, out = self._reader.read(deadline)
        except (asyncio.TimeoutError, protocol.ChannelTimeout):
            return self._exchange_failed(protocol.ChannelTimeout(), timeout)
        except protocol.ChannelClosed as exc:
            return self._exchange_failed(exc, timeout)
        self._owed -= 1
        self._after(resp)
        return resp, out, self.instance

    def _drain_owed(self) -> None:
        """Read and drop the replies of abandoned requests (lock held)."""
        while self._owed and self._reader is not None:
            self._reader.read(time.monotonic() + self.pool.config.call_timeout_s)
            self._owed -= 1

    def _exchange(self, header, blobs, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._drain_owed()
            protocol.write_all(self._w, protocol.encode(header, list(blobs)))
            resp, out = self._reader.read(deadline)
        except (protocol.ChannelTimeout, protocol.ChannelClosed) as exc:
            self._exchange_failed(exc, timeout)
        return resp, out, self.instance

    def _exchange_failed(self, exc: Exception, timeout: float | None):
        """Kill the worker after a channel failure and raise ``WorkerFailure`` (lock held)."""
        if isinstance(exc, protocol.ChannelTimeout):
            msg = (f"the call exceeded the {timeout:g}s wall-clock limit; the sandbox worker was killed and replaced"
                   if timeout is not None else "the sandbox worker stopped answering; it was killed and replaced")
            self._kill(msg)
            raise WorkerFailure(msg) from None
        alive = False
        if self.proc is not None:
            try:  # the pipe closes a moment before the process is reaped
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                alive = True
        msg = f"the sandbox worker broke the protocol ({exc})" if alive else self._death_reason()
        self._kill(msg)
        raise WorkerFailure(msg) from None


class SandboxPool:
    """Worker processes that run environment code; see the module docstring.

    ``SandboxPool(settings.sandbox)`` or ``SandboxPool(workers=2, memory_mb=..., ...)``;
    use it as a context manager (or call ``close()``) so the workers stop.
    """

    def __init__(self, settings: Any = None, **overrides: Any):
        cfg = SandboxSettings()
        if settings is not None:
            data = settings.model_dump() if hasattr(settings, "model_dump") else dict(settings)
            for k, v in data.items():
                if hasattr(cfg, k):
                    setattr(cfg, k, v)
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown SandboxPool option {k!r}")
            setattr(cfg, k, v)
        if cfg.workers < 1:
            raise ValueError("SandboxPool needs at least one worker")
        self.config = cfg
        self._instances = itertools.count(1)
        self._sids = itertools.count(1)
        self._workers = [_Worker(self, i) for i in range(cfg.workers)]
        self._lock = threading.Lock()
        self._handles: dict[str, EnvHandle] = {}
        self._slot_of: dict[str, int] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_workers, list(self._workers))

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    def protections(self) -> dict[str, Any]:
        """What confines generated code here, as a worker reports it (one is started if none
        runs yet; raises ``WeakSandboxError`` where the required layers are missing)."""
        worker = next((w for w in self._workers if w.protections), self._workers[0])
        if not worker.protections:
            worker.request({"op": "ping"}, timeout=self.config.startup_timeout_s)
        return {**worker.protections, "allow_weak_sandbox": self.config.allow_weak_sandbox}

    def stats(self) -> dict[str, Any]:
        """Live facts per worker: pid, RSS, restarts, protections in force."""
        return {"workers": [{"slot": w.slot, "pid": w.proc.pid if w.proc else None, "rss_mb": w.rss_bytes() / 2**20,
                             "restarts": w.restarts, "last_failure": w.last_failure,
                             "protections": w.protections, "environments": sorted(w.loaded)}
                            for w in self._workers]}

    def release_closed(self) -> int:
        """Free now, in the workers, the sessions closed without waiting (``close_later``),
        which otherwise go with the worker's next request; the number of workers asked."""
        asked = 0
        for w in self._workers:
            if w.pending_close and w.proc is not None and w.proc.poll() is None and not self._closed:
                try:
                    w.request({"op": "close_many", "sids": []}, timeout=self.config.call_timeout_s)
                    asked += 1
                except (WorkerFailure, SandboxError):
                    pass  # a dead worker holds no sessions
        return asked

    def _slot_for(self, env_id_key: str) -> _Worker:
        with self._lock:
            slot = self._slot_of.get(env_id_key)
            if slot is None:
                counts = [0] * len(self._workers)
                for s in self._slot_of.values():
                    counts[s] += 1
                slot = counts.index(min(counts))
                self._slot_of[env_id_key] = slot
            return self._workers[slot]

    # ------------------------------------------------------------------ environments
    def load(self, environment: Environment) -> "EnvHandle":
        """Build the initial database, import the code in a worker, derive tool schemas.

        Raises ``SqlExecutionError`` for a schema/seed that does not execute and
        ``EnvLoadError`` (a ``StageError`` of stage ``code``) listing every problem found
        in the code: import errors, spec tools missing from the code, bad signatures.
        """
        key = f"{environment.id}-{environment.digest()[:12]}"
        with self._lock:
            if key in self._handles:
                return self._handles[key]
        # A bfcl or tau2 environment's state is the benchmark's own objects, built from its code bundle: no database.
        code_only = environment.flavour in BENCHMARKS
        needs = ("code",) if code_only else ("db_schema", "code")
        missing = [p for p in needs if getattr(environment, p) is None]
        if missing:
            raise EnvLoadError(environment.id, [f"the environment has no {p}" for p in missing])
        worker = self._slot_for(key)
        if code_only:
            initial = b""
        else:
            resp, blobs, _ = self._request_or_raise(worker, {
                "op": "build_db", "schema": environment.db_schema.model_dump(mode="json"),
                "seed": environment.seed_data.model_dump(mode="json") if environment.seed_data else None})
            if not resp.get("ok"):
                raise SqlExecutionError(resp.get("stage", "schema"),
                                        resp.get("errors") or ["building the database failed"])
            initial = blobs[0]
        handle = EnvHandle(self, environment, key, worker, initial)
        try:
            worker.request({"op": "ping"}, env=handle, timeout=self.config.call_timeout_s)
        except WorkerFailure as exc:
            raise SandboxError(str(exc)) from None
        with self._lock:
            return self._handles.setdefault(key, handle)

    def unload(self, environment: Environment) -> None:
        """Drop a loaded environment and its sessions from its worker (frees the module)."""
        key = f"{environment.id}-{environment.digest()[:12]}"
        with self._lock:
            handle = self._handles.pop(key, None)
        if handle is None:
            return
        worker = handle.worker
        if key in worker.loaded:
            try:
                worker.request({"op": "unload", "key": key}, timeout=self.config.call_timeout_s)
            except WorkerFailure:
                pass
            worker.loaded.discard(key)

    def _request_or_raise(self, worker: _Worker, header, blobs=(), timeout=None):
        try:
            return worker.request(header, blobs, timeout=timeout or self.config.call_timeout_s * 3)
        except WorkerFailure as exc:
            raise SandboxError(str(exc)) from None

    def verify(self, environment: Environment, task_idx: int, *, initial_db: bytes, final_db: bytes,
               final_answer: str | None = None, trace: Any = None) -> VerifierOutcome:
        """Run the task's verifier in the environment's worker; never raises for verifier faults.

        ``trace`` is what a benchmark's verifier scores. ``bfcl`` (BFCL's checker re-runs the agent's
        calls): per user turn, per reply, the calls as BFCL writes them (``bfcl_env.call_string``).
        ``tau2`` (τ²'s evaluator replays the conversation): ``{"messages": [...], "termination": ...}``
        from ``awm_core.interop.tau2_trajectory``.
        """
        v = environment.verifier(task_idx)
        if v is None:
            return VerifierOutcome(None, {}, f"environment {environment.id} has no verifier for task {task_idx}", "verifier")
        header = {"op": "verify", "style": v.style, "function_name": v.function_name, "code": v.code,
                  "final_answer": final_answer}
        handle = None
        if v.style in BENCHMARKS:
            # The benchmark's checker lives in the environment's bundle: the environment must be loaded there.
            try:
                handle = self.load(environment)
            except AWMError as exc:
                return VerifierOutcome(None, {}, str(exc), "environment")
            header.update(key=handle.key, trace=trace or [])
            worker = handle.worker
        else:
            worker = self._slot_for(f"{environment.id}-{environment.digest()[:12]}")
        try:
            resp, _, _ = worker.request(header, [initial_db or b"", final_db or b""], env=handle,
                                        timeout=self.config.call_timeout_s)
        except WorkerFailure as exc:
            return VerifierOutcome(None, {}, str(exc), "environment")
        if not resp.get("ok"):
            return VerifierOutcome(None, {}, resp.get("error"), resp.get("error_kind") or "verifier")
        return VerifierOutcome(resp.get("verdict"), resp.get("evidence") or {}, None, None)

    def check_tools(self, environment: Environment) -> list["ToolCheck"]:
        """Call every spec tool with its example arguments as ``EXAMPLE_RULE`` says (the spec
        and code prompts quote it, so what the model is told is what runs)."""
        handle = self.load(environment)
        specs = environment.api_spec.tools if environment.api_spec else []
        checks = []
        names = [t.name for t in specs] or [t.name for t in handle.tools()]
        examples = {t.name: t.example_arguments() for t in specs}
        for name in names:
            args = examples.get(name, {})
            with handle.open_session() as s:
                checks.append(ToolCheck(name, args, s.call(name, args)))
        return checks


def _close_workers(workers: list[_Worker]) -> None:
    for w in workers:
        w.close()


@dataclass
class ToolCheck:
    tool: str
    arguments: dict[str, Any]
    result: ToolResult

    @property
    def ok(self) -> bool:
        return self.result.ok

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "ok": self.ok, "arguments": self.arguments,
                "error": self.result.error, "error_kind": self.result.error_kind}


class EnvHandle:
    """A loaded environment: its tools and a factory for sessions."""

    def __init__(self, pool: SandboxPool, environment: Environment, key: str, worker: _Worker, snapshot: bytes):
        self.pool = pool
        self.environment = environment
        self.id = environment.id
        self.key = key
        self.worker = worker
        self.snapshot = snapshot          # the initial database, as built once
        self._tools: dict[str, ToolInfo] = {}
        self._user_tools: dict[str, ToolInfo] = {}
        self._validators: dict[str, Any] = {}
        self._tools_ready = False
        # tool -> how the worker reaches its code (AWM-1K: "bound", "handler" or "asgi"; see the worker)
        self.call_paths: dict[str, str] = {}

    def _load_request(self) -> protocol.LoadRequest:
        env = self.environment
        spec = None
        if env.api_spec is not None and env.flavour == "native":
            spec = {t.name: {k: p.model_dump(include={"type", "description"}) for k, p in t.parameters.items()}
                    for t in env.api_spec.tools}
        return {"op": "load", "key": self.key, "env_id": env.id, "flavour": env.flavour,
                "source": env.code.source, "spec": spec,
                "asgi": bool(getattr(self.pool.config, "awm1k_asgi", False))}

    def _on_loaded(self, resp: dict[str, Any]) -> None:
        if not resp.get("ok"):
            raise EnvLoadError(self.id, resp.get("errors") or [resp.get("error", "loading failed")])
        if resp.get("problems"):
            raise EnvLoadError(self.id, resp["problems"])
        if not self._tools_ready:
            self._set_tools(resp["tools"])
            self._user_tools = {t["name"]: ToolInfo(t["name"], t.get("description", ""), t["input_schema"])
                                for t in resp.get("user_tools") or []}
            self.call_paths = resp.get("call_paths") or {}
            self._tools_ready = True

    def _set_tools(self, infos: list[dict[str, Any]]) -> None:
        for info in infos:
            t = ToolInfo(info["name"], info.get("description", ""), info["input_schema"])
            self._tools[t.name] = t
            self._validators[t.name] = _validator(t.input_schema)

    def tools(self) -> list[ToolInfo]:
        return list(self._tools.values())

    def tool(self, name: str) -> ToolInfo:
        return self._tools[name]

    def user_tools(self) -> list[ToolInfo]:
        """The tools the *user* has (τ²'s telecom: the customer's own phone); empty for most environments."""
        return list(self._user_tools.values())

    def open_session(self) -> "Session":
        return Session(self)

    async def aopen_session(self) -> "Session":
        """``open_session`` for a coroutine (no thread once the environment is loaded)."""
        s = Session.__new__(Session)
        s.handle, s.closed, s.lost, s._finalizer = self, False, None, None
        sid = next(self.pool._sids)
        try:
            resp, _, inst = await self.worker.arequest({"op": "open", "key": self.key, "sid": sid}, env=self,
                                                       timeout=self.pool.config.call_timeout_s)
        except WorkerFailure as exc:
            raise SandboxError(f"cannot open a session: {exc}") from None
        s._opened(sid, inst, resp)
        return s

    def validate(self, tool: str, args: Any) -> ToolResult | None:
        """A failure result for an unknown tool or arguments that do not fit its schema."""
        if tool not in self._tools:
            names = ", ".join(sorted(self._tools))
            return ToolResult.failure("unknown_tool", f"unknown tool {str(tool)[:200]!r}; available tools: {names}")
        if not isinstance(args, dict):
            return ToolResult.failure("invalid_arguments",
                                      f"arguments must be a JSON object, got {type(args).__name__}")
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return ToolResult.failure("invalid_arguments", f"arguments are not plain JSON: {exc}")
        validator = self._validators.get(tool)
        if validator is None:
            return None
        errors = list(validator.iter_errors(args))
        if not errors:
            return None
        return ToolResult.failure("invalid_arguments", "; ".join(_describe(e, self._tools[tool]) for e in errors[:5]))


_VALIDATORS: dict[str, Any] = {}
_VALIDATORS_MAX = 4096


def _validator(schema: dict[str, Any]) -> Any:
    """A checked validator for ``schema`` (None when the schema itself is invalid), shared by content.

    Checking a schema against the metaschema costs about half a millisecond; environments of one
    family (BFCL's entries, a regenerated environment) repeat the same tool schemas.
    """
    key = json.dumps(schema, sort_keys=True, default=str)
    if key not in _VALIDATORS:
        if len(_VALIDATORS) >= _VALIDATORS_MAX:
            _VALIDATORS.clear()
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
            _VALIDATORS[key] = jsonschema.Draft202012Validator(schema)
        except jsonschema.SchemaError:
            _VALIDATORS[key] = None  # the server still validates its own inputs
    return _VALIDATORS[key]


def _describe(err: jsonschema.ValidationError, tool: ToolInfo) -> str:
    props = tool.input_schema.get("properties", {})
    if err.validator == "required" and not err.path:
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return f"missing required argument {missing!r}"
    if err.validator == "additionalProperties" and not err.path:
        extra = sorted(set(err.instance) - set(props))
        return f"unknown argument(s) {', '.join(repr(e[:100]) for e in extra)[:300]} (accepted: {', '.join(props) or 'none'})"
    where = ".".join(str(p) for p in err.path)
    msg = err.message if len(err.message) <= 300 else err.message[:150] + " ... " + err.message[-120:]
    return f"argument {where!r}: {msg}"


class Session:
    """One agent's private database in a worker; ``call`` never raises for tool faults."""

    def __init__(self, handle: EnvHandle):
        self.handle = handle
        self.closed = False
        self.lost: str | None = None
        self._open()

    def _open(self) -> None:
        sid = next(self.handle.pool._sids)
        try:
            resp, _, inst = self.handle.worker.request({"op": "open", "key": self.handle.key, "sid": sid},
                                                       env=self.handle, timeout=self.handle.pool.config.call_timeout_s)
        except WorkerFailure as exc:
            raise SandboxError(f"cannot open a session: {exc}") from None
        self._opened(sid, inst, resp)

    def _opened(self, sid: int, inst: int, resp: dict[str, Any]) -> None:
        if not resp.get("ok"):
            raise SandboxError(f"cannot open a session: {resp.get('error')}")
        self.sid, self.instance, self.lost = sid, inst, None
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, self.handle.worker.pending_close.append, (inst, sid))

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, tool: str, args: dict[str, Any] | None,
                 requestor: str = "assistant") -> tuple[dict[str, Any] | None, ToolResult | None]:
        """The worker request of a call, or the result that answers it without the worker."""
        if self.closed:
            raise SandboxError("the session is closed")
        args = {} if args is None else args
        if requestor == "user":
            bad = None if tool in self.handle._user_tools else ToolResult.failure(
                "unknown_tool", f"unknown user tool {str(tool)[:200]!r}; the user's tools: "
                                f"{', '.join(sorted(self.handle._user_tools)) or 'none'}")
        else:
            bad = self.handle.validate(tool, args)
        if bad is not None:
            return None, bad
        if self.lost:
            return None, ToolResult.failure("environment", self.lost)
        request: protocol.CallRequest = {"op": "call", "sid": self.sid, "tool": tool, "args": args}
        if requestor == "user":
            request["requestor"] = "user"
        return request, None

    def _lost(self, exc: WorkerFailure) -> ToolResult:
        self.lost = f"{exc}; reset() or open a new session to continue"
        return ToolResult.failure("environment", str(exc))

    @staticmethod
    def _result(resp: dict[str, Any], as_text: bool = False) -> ToolResult:
        if resp.get("ok"):
            raw = resp["content_json"]
            return ToolResult(True, json.loads(raw) if not as_text or raw.startswith('"') else raw, None, None)
        return ToolResult(False, None, resp.get("error"), resp.get("error_kind") or "environment")

    def call(self, tool: str, args: dict[str, Any] | None = None, *, requestor: str = "assistant") -> ToolResult:
        """Run one tool call; ``requestor="user"`` runs one of the user's tools (``EnvHandle.user_tools``)."""
        request, answer = self._request(tool, args, requestor)
        if answer is not None:
            return answer
        try:
            resp, _, _ = self.handle.worker.request(request, timeout=self.handle.pool.config.call_timeout_s,
                                                    instance=self.instance)
        except WorkerFailure as exc:
            return self._lost(exc)
        return self._result(resp)

    async def acall(self, tool: str, args: dict[str, Any] | None = None, *, as_text: bool = False) -> ToolResult:
        """``call`` for a coroutine: the request goes to the worker's pipe and the reply is
        awaited on the event loop, with no thread per call. ``as_text``: a successful result's
        ``content`` is what ``ToolResult.text()`` would give (the worker's JSON as it sent it,
        or the string a tool returned), without decoding and encoding it again."""
        request, answer = self._request(tool, args)
        if answer is not None:
            return answer
        try:
            resp, _, _ = await self.handle.worker.arequest(request, timeout=self.handle.pool.config.call_timeout_s,
                                                           instance=self.instance)
        except WorkerFailure as exc:
            return self._lost(exc)
        return self._result(resp, as_text)

    def prepare(self, initial_state: dict[str, Any] | None) -> None:
        """Back to the initial state, then into a task's own (τ²'s ``initial_state``); raises ``SandboxError``."""
        if self.closed:
            raise SandboxError("the session is closed")
        if self.lost:
            self._open()
        try:
            resp, _, _ = self.handle.worker.request({"op": "prepare", "sid": self.sid, "initial_state": initial_state},
                                                    timeout=self.handle.pool.config.call_timeout_s,
                                                    instance=self.instance)
        except WorkerFailure as exc:
            self.lost = str(exc)
            raise SandboxError(str(exc)) from None
        if not resp.get("ok"):
            raise SandboxError(resp.get("error") or "the task's initial state could not be applied")

    def reset(self) -> None:
        """Back to the environment's initial database (a new worker session if it was lost)."""
        if self.closed:
            raise SandboxError("the session is closed")
        if self.lost:
            self._open()
            return
        try:
            resp, _, _ = self.handle.worker.request({"op": "reset", "sid": self.sid},
                                                    timeout=self.handle.pool.config.call_timeout_s,
                                                    instance=self.instance)
        except WorkerFailure:
            self._open()
            return
        if not resp.get("ok"):
            self._open()

    def snapshot(self) -> bytes:
        """The session's database now, as SQLite bytes."""
        if self.closed:
            raise SandboxError("the session is closed")
        if self.lost:
            raise SandboxError(self.lost)
        try:
            resp, blobs, _ = self.handle.worker.request({"op": "snapshot", "sid": self.sid},
                                                        timeout=self.handle.pool.config.call_timeout_s,
                                                        instance=self.instance)
        except WorkerFailure as exc:
            self.lost = str(exc)
            raise SandboxError(str(exc)) from None
        if not resp.get("ok") or not blobs:
            raise SandboxError(resp.get("error") or "the worker returned no snapshot")
        return blobs[0]

    def close_later(self) -> None:
        """Close without waiting for the worker (safe from finalizers and any thread)."""
        if not self.closed:
            self.closed = True
            self._finalizer()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._finalizer.detach()
        if not self.lost and not self.handle.pool._closed:
            try:
                self.handle.worker.request({"op": "close", "sid": self.sid}, timeout=5, instance=self.instance)
            except (WorkerFailure, SandboxError):
                pass

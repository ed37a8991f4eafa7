"""The parent's side of one sandbox worker process: starting it under the kernel layers, one
request/response exchange at a time over its pipes (from threads, or awaited on an event loop),
closing the sessions dropped meanwhile, and replacing it when it dies, overruns or grows too big.
``SandboxPool`` (``awm_core.runtime.pool``) owns the slots.
"""
from __future__ import annotations

import asyncio
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from awm_core.runtime import kernel, protocol
from awm_core.runtime.types import SandboxError, WeakSandboxError

if TYPE_CHECKING:
    from awm_core.runtime.pool import EnvHandle, SandboxPool

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
_PAGE = os.sysconf("SC_PAGE_SIZE")


class WorkerFailure(Exception):
    """The worker died, overran its time, broke the protocol, or was restarted."""


class WorkerProcess:
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



"""Stage execution checks in worker processes, so generation uses every core.

A stage's ``execute`` (tool checks, the verifier's no-op check, the reference solution's
replay and the verifier-soundness episodes, the user-scenario conversations) is CPU work in
trusted code: building wrong episodes, database digests, encoding requests to the sandbox
and decoding its replies. Run in the generate flow's own process it shares one GIL with
Prefect's task engine and the LLM layer, and at a few hundred environments that process is
the bottleneck while the other cores idle. ``CheckProcesses`` runs it in a pool of spawned
Python processes instead, each with its own ``SandboxPool``: the generated code still runs
only in the sandbox workers, now the children of a check process.

A check process is started on first use and kept for the run; one that dies (killed, out of
memory) fails the checks it was running with an ``AWMError`` (the stage attempt then fails
and Prefect retries it) and is replaced for the next.

    checks = CheckProcesses(settings.sandbox, processes=2)
    run_stage(module, client, ctx, attempt=1, previous_errors=[], pool=checks)
    checks.close()
"""
from __future__ import annotations

import multiprocessing
import threading
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from awm_core.errors import AWMError, StageError

# The check process's own sandbox pool (set by _start_process, closed when the process exits).
_POOL: Any = None


def _start_process(sandbox_json: str) -> None:
    from multiprocessing.util import Finalize

    from awm_core.runtime import SandboxPool
    from awm_core.settings import SandboxSettings

    global _POOL
    _POOL = SandboxPool(SandboxSettings.model_validate_json(sandbox_json))
    # Runs when the executor shuts the process down, so its sandbox workers go with it.
    Finalize(None, _POOL.close, exitpriority=10)


def _execute(stage: str, value: Any, ctx: Any) -> tuple[str, Any]:
    """One stage's execute in this check process: ("checks", [...]), or ("stage_error", errors)
    for a rejected artifact, or ("error", (class name, message)) for anything else (exceptions
    are not sent whole: not every one survives pickling)."""
    from awm_core.stages import STAGES

    try:
        return "checks", STAGES[stage].execute(value, ctx, _POOL) or []
    except StageError as exc:
        return "stage_error", exc.errors
    except Exception as exc:  # noqa: BLE001 - carried to the caller by name and message
        return "error", (type(exc).__name__, str(exc))


class CheckProcesses:
    """``processes`` check processes, each with a ``SandboxPool`` of ``sandbox`` settings.
    Thread-safe: every environment's thread hands its stage checks to the same object.

    An environment's checks always go to the same process (chosen by its scenario id): its
    sandbox worker then holds the environment's code loaded and its seeded database built
    from the first check on, instead of every process loading and building every environment."""

    def __init__(self, sandbox: Any, processes: int):
        if processes < 1:
            raise ValueError(f"check processes must be at least 1, got {processes}")
        self.processes = processes
        self._sandbox_json = sandbox.model_dump_json()
        self._lock = threading.Lock()
        self._executors: list[ProcessPoolExecutor | None] = [None] * processes
        self._closed = False

    def _pool(self, slot: int) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise AWMError("the check processes are closed")
            if self._executors[slot] is None:
                # Spawned, not forked: the flow process runs threads (Prefect's event loop, the
                # task runner) whose locks a fork would copy mid-use.
                self._executors[slot] = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_process, initargs=(self._sandbox_json,))
            return self._executors[slot]

    def slot(self, scenario_id: str) -> int:
        """The check process an environment's checks go to (stable across runs and processes)."""
        return zlib.crc32(scenario_id.encode()) % self.processes

    def execute_stage(self, stage: str, value: Any, ctx: Any) -> list:
        """``STAGES[stage].execute(value, ctx, pool)`` in a check process; raises the ``StageError``
        it raised there."""
        slot = self.slot(ctx.scenario_id)
        executor = self._pool(slot)
        try:
            kind, payload = executor.submit(_execute, stage, value, ctx).result()
        except BrokenProcessPool as exc:
            with self._lock:  # the next check starts a fresh process
                if self._executors[slot] is executor:
                    self._executors[slot] = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise AWMError(f"a check process died while running the {stage} stage's checks: {exc}") from None
        if kind == "stage_error":
            raise StageError(stage, payload)
        if kind == "error":
            name, message = payload
            raise AWMError(f"{stage} stage checks failed in a check process: {name}: {message}")
        return payload

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executors, self._executors = self._executors, [None] * self.processes
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "CheckProcesses":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

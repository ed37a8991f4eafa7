"""Where a process's CPU goes, by component: each component's entry points are wrapped, and
the CPU a thread uses (its own CPU clock, ``time.thread_time``) while inside one is charged to
the innermost component it is in. Exact where a sampler is not: a thread that blocks (an LLM
call's latency, a sandbox reply) charges nothing while it waits, and the CPU it used just before
is charged where it was used, not where it was found waiting.

Only entry points are wrapped (a few thousand crossings per environment), so the meter costs
little. CPU outside every component (Prefect's task engine, its event and log threads, the
flow's own code between calls) is what the total leaves over.

    with CpuMeter.for_generate() as meter:
        ...                     # run the generate flow
    meter.seconds               # {"mutation checks": 12.3, "LLM layer": 4.1, ...}
"""
from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from typing import Any


class CpuMeter:
    """Charge thread CPU to the components whose functions the thread is inside (see module doc)."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._undo: list[tuple[Any, str, Any]] = []

    @classmethod
    def for_generate(cls) -> "CpuMeter":
        """A meter over the generate flow's components."""
        import awm_core.soundness as soundness
        import awm_core.validation as validation
        import flows.generate as generate
        import tasks.generation as generation
        from awm_core.llm.client import LLMClient
        from awm_core.runtime.worker_process import WorkerProcess
        from awm_core.stages import STAGES

        m = cls()
        m.wrap(LLMClient, "chat", "LLM layer (request, reply parsing, ledger)")
        m.wrap(LLMClient, "structured", "LLM layer (request, reply parsing, ledger)")
        for module in {id(s): s for s in STAGES.values()}.values():
            m.wrap(module, "run", "stage work (prompts, parsing, static checks)")
        for name in ("solution_checks", "noop_check", "tool_checks", "load_errors"):
            m.wrap(validation, name, "execution checks (in this process)")
        for name in ("mutation_checks", "equivalence_checks", "soundness_checks"):
            m.wrap(soundness, name, "mutation checks (in this process)")
        m.wrap(WorkerProcess, "request", "sandbox requests (encode, pipe, decode)")
        m.wrap(generation, "call_stage", "Prefect: stage task runs")
        m.wrap(generation, "collect_validation", "validation report (with its task run)")
        m.wrap(generation, "_build_environment", "flow and task code")
        m.wrap(generate, "_publish", "catalog rows (publish)")
        m.wrap(generate, "_artifacts", "Prefect: run artifacts")
        return m

    def wrap(self, owner: Any, name: str, component: str) -> None:
        """Charge CPU spent inside ``owner.name`` (a function or method) to ``component``."""
        original = getattr(owner, name)
        enter, leave = self._enter, self._leave

        @functools.wraps(original)
        def charged(*args: Any, **kwargs: Any) -> Any:
            enter(component)
            try:
                return original(*args, **kwargs)
            finally:
                leave()

        setattr(owner, name, charged)
        self._undo.append((owner, name, original))

    def __enter__(self) -> "CpuMeter":
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def _enter(self, component: str) -> None:
        local = self._local
        now = time.thread_time()
        stack = getattr(local, "stack", None)
        if stack is None:
            stack = local.stack = []
        elif stack:
            self._charge(stack[-1], now - local.mark)
        stack.append(component)
        local.mark = now

    def _leave(self) -> None:
        local = self._local
        now = time.thread_time()
        self._charge(local.stack.pop(), now - local.mark)
        local.mark = now

    def _charge(self, component: str, seconds: float) -> None:
        with self._lock:
            self.seconds[component] += seconds


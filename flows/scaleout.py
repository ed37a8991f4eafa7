"""Run-scoped resources on Dask worker processes.

The generate flow's stage tasks find the run's LLM client, budget and sandbox pool in a
registry of the process they run in (``tasks.generation.register``). With Prefect's
``DaskTaskRunner`` on worker *processes* (local or on other machines) that registry is empty
there, so the flow installs a Dask ``WorkerPlugin`` (Dask's own mechanism, also applied to
workers that join later) which builds the same resources on each worker from the run's
settings and registers them under the run key; removing the plugin at the end of the run
closes them.

What is shared and what is not: every worker appends to the run's ledger file (one line per
call, O_APPEND), so AWM_HOME must be on storage all workers see (one machine, or a shared
mount); each worker process has its own sandbox pool. The budget: with ``llm.budget_dsn`` set,
every worker (and the flow's own process) reserves and settles each call against the run's one
row in PostgreSQL (``awm_core.llm.shared_budget``), so the cap holds for the run as a whole;
without it each worker process has its own ``Budget`` with the run's cap, and N worker processes
can spend up to N times ``llm.budget_usd``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

try:  # prefect-dask (and so distributed) is an optional extra
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - without Dask the plugin is never used
    _WorkerPlugin = object

PLUGIN_PREFIX = "awm-run-resources-"


class RunResourcesPlugin(_WorkerPlugin):
    """A ``distributed.WorkerPlugin`` building one run's resources in each worker process."""

    def __init__(self, run_key: str, settings: Any, run_id: str, run_dir: str):
        self.run_key, self.settings, self.run_id, self.run_dir = run_key, settings, run_id, run_dir
        self.name = PLUGIN_PREFIX + run_key
        self._pool = None
        self._budget = None

    def setup(self, worker: Any = None) -> None:
        from awm_core.llm import LLMClient
        from awm_core.llm.shared_budget import run_budget
        from awm_core.runtime import SandboxPool
        from tasks import generation as G

        if self.run_key in G._RESOURCES:  # a thread worker inside the flow's own process
            return
        budget = self._budget = run_budget(self.settings, self.run_id)
        run_dir = Path(self.run_dir)
        client = LLMClient.for_role(self.settings, "generator", budget=budget, ledger=run_dir / "llm_calls.jsonl",
                                    run_id=self.run_id)
        self._pool = SandboxPool(self.settings.sandbox)
        G.register(self.run_key, G.RunResources(settings=self.settings, client=client, pool=self._pool,
                                                run_id=self.run_id, run_dir=run_dir))

    def teardown(self, worker: Any = None) -> None:
        from tasks import generation as G

        if self._pool is not None:
            G.unregister(self.run_key)
            self._pool.close()
            self._pool = None
            close = getattr(self._budget, "close", None)
            if close is not None:  # a shared budget's connection to PostgreSQL
                close()
            self._budget = None


def _dask_client() -> Any | None:
    """The Dask client of the running flow's task runner, when it is a DaskTaskRunner."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None) if ctx else None
    if runner is None or type(runner).__name__ != "DaskTaskRunner":
        return None
    return runner.client


@contextlib.contextmanager
def run_resources_on_dask_workers(run_key: str, settings: Any, run_id: str, run_dir: Path) -> Iterator[None]:
    """Within a flow: when its task runner is Dask, give every worker the run's resources."""
    client = _dask_client()
    if client is None:
        yield
        return
    plugin = RunResourcesPlugin(run_key, settings, run_id, str(run_dir))
    client.register_plugin(plugin, name=plugin.name)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # workers already gone: nothing left to close
            client.unregister_worker_plugin(plugin.name)


def task_runner_for(settings: Any, concurrency: int | None = None) -> Any:
    """The task runner ``generation.task_runner`` names, ``concurrency`` wide (default
    ``generation.concurrency``): threads, or Dask (``generation.dask_address``, else a local
    cluster of that many worker processes with one thread each)."""
    from awm_core.errors import SettingsError

    gen = settings.generation
    width = concurrency or gen.concurrency
    if gen.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=width)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise SettingsError("generation.task_runner is 'dask' but prefect-dask is not installed "
                            "(pip install prefect-dask, or the project's dev extra)") from None
    if gen.dask_address:
        return DaskTaskRunner(address=gen.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": width, "threads_per_worker": 1, "dashboard_address": None})

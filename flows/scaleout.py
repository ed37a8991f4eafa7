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
import threading
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
    cluster of ``generation.dask_processes`` worker processes sharing that many threads; by
    default one process with one thread per scenario)."""
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
    # A process per core with many threads each: a scenario mostly waits on the LLM, and every
    # process holds a copy of the run's resources (a sandbox pool, the imported stages).
    processes = min(gen.dask_processes or width, width)
    return DaskTaskRunner(cluster_kwargs={"n_workers": processes, "threads_per_worker": -(-width // processes),
                                          "dashboard_address": None})


# --------------------------------------------------------------------------- evaluation over a Dask cluster

_EVAL_POOLS: dict[str, Any] = {}
_EVAL_POOLS_LOCK = threading.Lock()


def _worker_pool(settings: Any) -> Any:
    """This worker process's sandbox pool for evaluation, built on first use and kept for later runs
    (its workers stay warm); closed when the process exits."""
    import atexit
    import json

    from awm_core.runtime import SandboxPool

    key = json.dumps(settings.sandbox.model_dump(mode="json"), sort_keys=True, default=str)
    with _EVAL_POOLS_LOCK:
        pool = _EVAL_POOLS.get(key)
        if pool is None:
            pool = _EVAL_POOLS[key] = SandboxPool(settings.sandbox)
            atexit.register(pool.close)
        return pool


def evaluate_environment_on_worker(config: Any, settings: Any, run_id: str, snapshot: int, environment_json: str,
                                   task_idxs: list[int], split_of: dict[tuple[str, int], str]) -> tuple[Any, str]:
    """One environment's episodes in a Dask worker process, on that process's own sandbox pool.

    Rows stream to the run's ``rollouts.jsonl`` as on one machine (so AWM_HOME must be storage every
    worker sees); the rows come back to the flow, which publishes every worker's rows as one snapshot.
    Returns the result and the worker's address.
    """
    from awm_core.agent import LLMJudge
    from awm_core.agent.evaluation import EvalRun
    from awm_core.models import Environment

    env = Environment.from_json(environment_json)
    judge = None
    if config.judge:
        judge = LLMJudge.from_settings(settings, ledger=settings.runs_dir / run_id / "llm_calls.jsonl")
    run = EvalRun(config, settings, {env.id: env}, split_of, pool=_worker_pool(settings), run_id=run_id,
                  snapshot=snapshot, judge=judge)
    try:
        result = run.run_environment(env.id, task_idxs)
    finally:
        run.close()
    try:
        from distributed import get_worker

        where = get_worker().address
    except (ImportError, ValueError):
        where = "local"
    return result, where


def dask_eval_runner(address: str) -> Any:
    """An evaluation runner (``run_evaluation(runner=...)``) spreading environments over the Dask
    cluster at ``address``: one Dask task per environment, episodes on the worker's own pool.

    A worker that dies takes its running environments with it; Dask reschedules them on the others
    (``distributed.scheduler.allowed-failures``), and since only returned rows are published, an
    environment that was partly run on the dead worker is published once, from its rerun.
    """
    def runner(run: Any, plan: dict[str, list[int]]) -> list[Any]:
        from distributed import Client, as_completed

        from awm_core.errors import AWMError

        try:
            # as_completed finds its client as the default one, so this client is the default while it lives.
            client = Client(address)
        except OSError as exc:
            raise AWMError(f"cannot reach the Dask scheduler at {address} (--dask-address / "
                           f"generation.dask_address): {exc}") from None
        with client:
            futures = {}
            for env_id, idxs in plan.items():
                split_of = {k: v for k, v in run.split_of.items() if k[0] == env_id}
                futures[client.submit(evaluate_environment_on_worker, run.config, run.settings, run.run_id,
                                      run.snapshot, run.environments[env_id].to_json(), idxs, split_of,
                                      key=f"evaluate-{run.run_id}-{env_id}", pure=False)] = env_id
            results: dict[str, Any] = {}
            for future in as_completed(futures):
                env_id = futures[future]
                try:
                    (rows, calls, failures), where = future.result()
                except Exception as exc:  # Dask gave up on it (its workers kept dying)
                    rows, calls, failures = [], [], [f"{env_id}: not evaluated: {type(exc).__name__}: {exc}"]
                    where = None
                if where:
                    run.workers.add(where)
                for row in rows:
                    run.progress.add(row)
                for _ in failures:
                    run.progress.add(None)
                results[env_id] = (rows, calls, failures)
        return [results[e] for e in plan]

    return runner

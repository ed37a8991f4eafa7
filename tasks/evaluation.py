"""Prefect task of the evaluate flow: all episodes of one environment.

A task run costs about 10 ms and an episode with a scripted policy a few ms, so episodes are
grouped one task per environment; inside it they run on the run's shared thread pool.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from awm_core.agent.evaluation import EnvironmentResult, EvalRun
from tasks.registry import RunRegistry

_RUNS: RunRegistry[EvalRun] = RunRegistry("evaluation runs")


@task(task_run_name="episodes[{env_id}]", cache_policy=NO_CACHE)
def run_environment_episodes(run_key: str, env_id: str, task_idxs: list[int]) -> EnvironmentResult:
    return _RUNS[run_key].run_environment(env_id, task_idxs)


def prefect_runner(run: EvalRun, plan: dict[str, list[int]]) -> list[EnvironmentResult]:
    """Every planned environment as a task run of the current flow run (rows come back in plan order)."""
    _RUNS.register(run.run_id, run)
    try:
        futures = [run_environment_episodes.submit(run.run_id, env_id, idxs) for env_id, idxs in plan.items()]
        return [f.result() for f in futures]
    finally:
        _RUNS.unregister(run.run_id)

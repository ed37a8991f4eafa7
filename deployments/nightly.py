"""The ``generate`` flow as the nightly deployment runs it.

A deployment loads its flow object from the entrypoint, so the task runner has to be chosen
when this module is imported (in the flow run's process, with the worker's settings):
``generation.task_runner`` (``threads`` or ``dask``), ``generation.concurrency`` wide, or an
existing cluster at ``generation.dask_address``. The flow keeps its name, so the deployment is
still ``generate/nightly``.
"""
from __future__ import annotations

from awm_core.settings import get_settings
from flows.generate import generate as _generate
from flows.scaleout import task_runner_for

generate = _generate.with_options(task_runner=task_runner_for(get_settings()))

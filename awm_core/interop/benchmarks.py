"""Imported benchmarks by name: which catalog environments a benchmark split means, and which of
its tasks an agent can be trained on. ``bfcl[:categories]`` and ``tau2[:domains[:split]]``."""
from __future__ import annotations

from awm_core.errors import AWMError
from awm_core.interop import bfcl, tau2
from awm_core.models import Environment

NAMES = ("bfcl", "tau2")


def is_benchmark(spec: str | None) -> bool:
    return bool(spec) and spec.partition(":")[0] in NAMES


def benchmark_categories(spec: str) -> set[str]:
    """Scenario categories of the environments a benchmark split names."""
    name = spec.partition(":")[0]
    if name == "bfcl":
        return bfcl.benchmark_categories(spec)
    if name == "tau2":
        return tau2.benchmark_categories(spec)
    raise AWMError(f"unknown benchmark {name!r}; the benchmarks are: {', '.join(NAMES)}")


def trainable_tasks(environment: Environment) -> list[int]:
    """The tasks whose reference (ground truth, gold actions) passed the benchmark's own checker on import,
    or every task when the import did not replay them: the ones an agent can pass."""
    report = environment.validation
    if report is None:
        return [t.idx for t in environment.tasks]
    if environment.flavour == "bfcl":
        return [t.idx for t in environment.tasks] if report.passed else []
    failed = {c.task_idx for c in report.checks if not c.passed}
    return [t.idx for t in environment.tasks if t.idx not in failed]

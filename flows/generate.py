"""The nightly ``generate`` flow: scenarios → seven stages per scenario → execution
validation → one catalog snapshot, with a summary artifact in the Prefect UI.

Fan-out is Prefect's task runner (threads by default, ``concurrency`` workers); every stage
is a cached, retried task (``tasks.generation``), so a rerun after a crash redoes only the
stages that had not finished, and publishing is an upsert keyed by environment id, so the
catalog never holds the same environment twice.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from awm_core.configs import GenerateConfig
from awm_core.errors import AWMError
from awm_core.models import Scenario, slugify
from awm_core.report import data_uri, markdown_table, stacked_bars_png
from awm_core.settings import Settings, get_settings
from awm_core.stages import scenario as scenario_stage
from flows.artifacts import Report, publish_report
from flows.curate import read_plan
from flows.events import GENERATE_PUBLISHED, emit_snapshot_event
from flows.scaleout import run_resources_on_dask_workers, task_runner_for
from tasks import generation as G

STATUS_FILE = "state.json"


# --------------------------------------------------------------------------- settings and run folder


def effective_settings(base: Settings | None = None, *, generator_model: str | None = None,
                       fixtures_dir: str | Path | None = None, offline_latency_s: float | None = None,
                       budget_usd: float | None = None) -> Settings:
    s = (base or get_settings()).model_copy(deep=True)
    if generator_model:
        s.llm.generator.model = generator_model
    if fixtures_dir is not None:
        s.llm.fixtures_dir = Path(fixtures_dir)
    if offline_latency_s is not None:
        s.llm.offline_latency_s = offline_latency_s
    if budget_usd is not None:
        s.llm.budget_usd = budget_usd
    if s.llm.generator.backend == "offline":
        # Recorded replies are already on disk; caching them again costs a file write per call.
        # Finished stages are reused through Prefect's cache either way.
        s.llm.cache = False
    return s


def _write_state(run_dir: Path, **fields: Any) -> None:
    path = run_dir / STATUS_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphaned_runs(settings: Settings, current: str) -> list[tuple[str, dict[str, Any]]]:
    """Earlier runs whose process died before publishing: their ledgers still belong in llm_calls."""
    out = []
    if not settings.runs_dir.exists():
        return out
    for d in sorted(settings.runs_dir.iterdir()):
        state_path = d / STATUS_FILE
        if d.name == current or not state_path.exists():
            continue
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if state.get("status") == "running" and not _pid_alive(state.get("pid")):
            out.append((d.name, state))
    return out


def ledger_records(run_dir: Path) -> list[Any]:
    """The run's ledger with each rejected reply's errors in ``error``."""
    from awm_core.llm import read_ledger

    records = read_ledger(run_dir / "llm_calls.jsonl")
    rejected: dict[str, list[str]] = {}
    rej_path = run_dir / "rejections.jsonl"
    if rej_path.exists():
        for line in rej_path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
            rejected[item["call_id"]] = item["errors"]
    for r in records:
        if r.error is None and r.call_id in rejected:
            r.error = "reply rejected: " + "; ".join(rejected[r.call_id])[:2000]
    return records


# --------------------------------------------------------------------------- scenarios


def resolve_named(names: list[str], seed_list: str | None) -> list[Scenario]:
    """Scenarios given by name or id: looked up in the seed list (so they carry a description)."""
    seeds = {slugify(c.name): c for c in scenario_stage.load_seeds(seed_list)}
    out, unknown = [], []
    for n in names:
        c = seeds.get(slugify(n))
        if c is None:
            unknown.append(n)
        else:
            out.append(Scenario(id=slugify(c.name), name=c.name, description=c.description, category=c.category,
                                extra={"source": "seed"}))
    if unknown:
        raise AWMError(f"scenarios not in the seed list: {', '.join(unknown)} "
                       f"(known ids include: {', '.join(list(seeds)[:8])}, ...)")
    return out


def existing_scenarios(settings: Settings) -> list[Scenario]:
    """Scenarios already in the catalog: new ones must not duplicate them."""
    from storage.catalog import Catalog

    try:
        cat = Catalog.open(settings, read_only=True)
    except AWMError:
        return []
    try:
        rows = cat.rows("SELECT env_id, name, description, category FROM scenarios")
    except AWMError:
        rows = []
    finally:
        cat.close()
    return [Scenario(id=r["env_id"], name=r["name"], description=r["description"] or "",
                     category=r["category"] or "general") for r in rows]


# --------------------------------------------------------------------------- the flow


@flow(name="generate", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
@GenerateConfig.as_parameters
def generate(config: GenerateConfig) -> dict[str, Any]:
    """Synthesise, validate and publish environments: ``config.scenarios`` of them (a count expanded
    from the seed list, or seed-list names to make exactly those)."""
    from prefect.runtime import flow_run

    from awm_core.llm import LLMClient
    from awm_core.llm.shared_budget import run_budget

    logger = get_run_logger()
    started_at = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    settings = effective_settings(generator_model=config.generator_model, fixtures_dir=config.fixtures_dir,
                                  offline_latency_s=config.offline_latency_s, budget_usd=config.budget_usd)
    gen = settings.generation
    n = gen.scenarios if config.scenarios is None else config.scenarios
    curation = read_plan(settings) if (gen.curate if config.curate is None else config.curate) else None
    if curation is not None and config.scenarios is None and gen.live_tasks is not None:
        n = curation.plan.top_up_scenarios  # the live-task target decides how many new scenarios
    k = config.tasks_per_scenario or gen.tasks_per_scenario
    seed_list = config.seed_list or (str(gen.seed_list) if gen.seed_list else None)
    flow_run_id = str(flow_run.id) if flow_run.id else None
    run_id = f"gen-{started_at:%Y%m%dT%H%M%S}-{(flow_run_id or uuid.uuid4().hex)[:8]}"
    run_dir = settings.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    # The values the run used, defaults resolved: what the catalog's generation_runs.params records.
    params = {"scenarios": n, "tasks_per_scenario": k, "generator_model": settings.llm.generator.model,
              "concurrency": config.concurrency, "budget_usd": settings.llm.budget_usd, "seed_list": seed_list,
              "fixtures_dir": str(settings.llm.fixtures_dir) if settings.llm.generator.backend == "offline" else None,
              "skip_existing": config.skip_existing}
    run = RunInfo(settings, run_id, flow_run_id, started_at, params)
    _write_state(run_dir, status="running", pid=os.getpid(), started_at=started_at.isoformat(),
                 flow_run_id=flow_run_id, params=params)

    budget = run_budget(settings, run_id)
    client = LLMClient.for_role(settings, "generator", budget=budget, ledger=run_dir / "llm_calls.jsonl", run_id=run_id)
    say = (lambda line: print(line, flush=True)) if config.progress else (lambda line: logger.info(line))
    pool = _check_pool(settings, config.concurrency)
    run_key = run_id
    G.register(run_key, G.RunResources(settings=settings, client=client, pool=pool, run_id=run_id, run_dir=run_dir,
                                       embed=_embedder(settings), progress=say))
    model = settings.llm.generator.model
    outcomes: list[G.EnvOutcome] = []
    scenario_info: dict[str, Any] = {"dropped": [], "candidates": 0, "records": []}
    status, message = "completed", ""
    timings: dict[str, float] = {}
    t_build = 0.0
    asked = len(n) if isinstance(n, list) else max(0, int(n or 0))
    chosen: list[Scenario] = []
    try:
        existing = existing_scenarios(settings) if config.skip_existing else []
        if isinstance(n, list):
            chosen = resolve_named(n, seed_list)
            dup = [s.id for s in chosen if s.id in {e.id for e in existing}]
            if dup:
                say(f"  skipping scenarios already in the catalog: {', '.join(dup)}")
                scenario_info["dropped"] = [{"name": d, "reason": "already in the catalog"} for d in dup]
            chosen = [s for s in chosen if s.id not in dup]
        elif int(n) > 0:
            say(f"scenarios: expanding the seed list to {n} scenarios")
            sel = G.select_scenarios_task(
                seed_list, int(n), existing, gen.dedup_threshold, gen.category_cap, model,
                scenario_stage.PROMPT_VERSION, run_key)
            chosen, scenario_info = sel["scenarios"], sel
        else:
            chosen = []
        repairs = curation.plan.regenerate if curation else {}
        if curation is not None and not curation.plan.empty():
            for line in curation.plan.lines():
                say(f"curation: {line}")
            chosen = [s for s in chosen if s.id not in repairs] + list(curation.regenerate.values())
        say(f"generating {len(chosen)} environment(s): {', '.join(s.id for s in chosen)}")
        t_build = time.perf_counter()
        # On Dask worker processes the run's resources are built per worker (flows/scaleout.py).
        with run_resources_on_dask_workers(run_key, settings, run_id, run_dir):
            futures = [G.build_environment_task.with_options(task_run_name=f"build[{s.id}]")
                       .submit(s, k, gen.target_tools, model, gen.min_valid_tasks, run_key,
                               {"code": repairs[s.id]} if s.id in repairs else None)
                       for s in chosen]
            for s, fut in zip(chosen, futures):
                try:
                    outcomes.append(fut.result())
                except Exception as exc:  # a bug or sandbox failure in one scenario must not lose the others
                    logger.error("building %s failed: %s", s.id, exc)
                    outcomes.append(G.EnvOutcome(s.id, "dropped", _build_failure(exc)[:500]))
    except G.StageFailed as exc:  # only the run-wide scenario stage gets here
        status = "budget_exceeded" if exc.budget else "failed"
        scenario_info["attempts"] = exc.attempts
        message = f"{exc.stage} stage: {exc.errors[-1] if exc.errors else exc}"[:500]
    finally:
        timings["build_s"] = round(time.perf_counter() - t_build, 2) if t_build else 0.0
        G.unregister(run_key)
        pool.close()
        if hasattr(budget, "close"):  # a shared budget's connection to PostgreSQL
            budget.close()

    if any(o.status == "budget_exceeded" for o in outcomes):
        status = "budget_exceeded"
        message = message or next(o.reason for o in outcomes if o.status == "budget_exceeded")
    published = [o for o in outcomes if o.status == "published"]
    if status == "completed" and len(published) < len(outcomes):
        status = "partial" if published else "failed"
    records = ledger_records(run_dir)
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in records)
    cost = sum(r.cost_usd for r in records)
    drop_reasons = {o.scenario_id: f"{o.status}: {o.reason}" for o in outcomes if o.status != "published"}
    regenerated = len([s for s in chosen if s.id in (curation.plan.regenerate if curation else {})])
    drop_reasons.update({d["name"]: f"scenario stage: {d['reason']}" for d in scenario_info.get("dropped", [])})
    summary = {
        "run_id": run_id, "flow_run_id": flow_run_id, "status": status, "message": message,
        "published": [o.scenario_id for o in published],
        "dropped": {o.scenario_id: o.reason for o in outcomes if o.status != "published"},
        "scenario_drops": scenario_info.get("dropped", []),
        "repairs": _repairs(outcomes, scenario_info.get("attempts", 1)), "llm_calls": len(records), "tokens": tokens, "cost_usd": round(cost, 6),
        "seconds": round(time.perf_counter() - t0, 2), "snapshot": None,
        "tasks": {o.scenario_id: (len(o.environment.tasks) if o.environment and o.status == "published" else 0)
                  for o in outcomes},
        "dropped_tasks": {o.scenario_id: o.report.dropped_tasks for o in outcomes if o.report and o.report.dropped_tasks},
        "verifier_soundness": verifier_soundness(outcomes),
        # Tasks published with a user scenario (playable as a conversation), and why an environment has none.
        "user_scenarios": {o.scenario_id: sum(1 for t in o.environment.tasks if t.user_scenario) for o in published},
        "notes": {o.scenario_id: o.notes for o in outcomes if o.notes},
        "accounting": accounting(asked, regenerated, outcomes, scenario_info, message),
    }
    summary["timings"] = timings
    retired = curation.retired if curation else []
    summary["curation"] = {**curation.plan.to_dict(),
                           "regenerated": [o.scenario_id for o in published if o.scenario_id in repairs]} \
        if curation else None
    t_pub = time.perf_counter()
    if config.publish:
        summary["snapshot"] = _publish(run, summary, published, records, drop_reasons, retired)
        _write_state(run_dir, status="published", snapshot=summary["snapshot"])
    else:
        _write_state(run_dir, status="finished")
    timings["publish_s"] = round(time.perf_counter() - t_pub, 2)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _artifacts(summary, outcomes, records)
    if summary["snapshot"] is not None and published:  # chains the gate deployment (deployments/prefect.yaml)
        emit_snapshot_event(GENERATE_PUBLISHED, summary["snapshot"], run_id=run_id, status=status,
                            published=len(published))
    if status == "budget_exceeded":
        logger.warning("run stopped: %s; %d validated environment(s) published", message, len(published))
    return summary


def accounting(asked: int, regenerated: int, outcomes: list[G.EnvOutcome], scenario_info: dict[str, Any],
               message: str = "") -> dict[str, Any]:
    """Where every environment asked for went: published, dropped (with a reason each), skipped
    (already in the catalog) or never made (the scenario stage found fewer new scenarios, or
    failed); ``asked + regenerated`` is the sum of the four."""
    published = sum(o.status == "published" for o in outcomes)
    skipped = sum(d.get("reason") == "already in the catalog" for d in scenario_info.get("dropped", []))
    made = len(outcomes) - regenerated
    short = max(0, asked - skipped - made)
    why = ""
    if short:
        why = (message or f"the scenario stage kept {made} new scenario(s) of {scenario_info.get('candidates', 0)} "
                          f"candidate(s); {len(scenario_info.get('dropped', [])) - skipped} were duplicates, "
                          "not stateful or over the category cap")
    return {"asked": asked, "regenerated": regenerated, "published": published,
            "dropped": len(outcomes) - published, "skipped": skipped, "not_made": short, "not_made_reason": why}


def verifier_soundness(outcomes: list[G.EnvOutcome]) -> dict[str, dict[str, int]]:
    """Per environment, verifiers regenerated and tasks dropped for being lenient (a wrong
    episode said "complete") and for being too strict (an equivalent episode, or the reference
    solution, rejected): the two ways a reward can be wrong, side by side."""
    out = {}
    for o in outcomes:
        dropped = o.report.dropped_tasks.values() if o.report else []
        row = {"lenient_regenerated": len(o.regenerated["lenient"]),
               "lenient_dropped": sum(why.startswith("verifier_mutation") for why in dropped),
               "too_strict_regenerated": len(o.regenerated["too_strict"]),
               "too_strict_dropped": sum(why.startswith(("verifier_equivalence", "verifier_solution")) for why in dropped)}
        if any(row.values()):
            out[o.scenario_id] = row
    return out


def _build_failure(exc: BaseException) -> str:
    """Why a scenario's build task failed, as its drop reason."""
    if type(exc).__name__ == "KilledWorker":
        # Dask reschedules a task whose worker process died on another worker, up to the
        # scheduler's distributed.scheduler.allowed-failures times (default 3); past that it
        # gives up with KilledWorker. Say so in words: the scenario was not built (not broken),
        # and a rerun builds it, reusing the stages that had finished.
        return ("lost: the Dask worker process running it died, more times than the scheduler's "
                "distributed.scheduler.allowed-failures (default 3) lets Dask retry it elsewhere; rerun to "
                f"build it (its finished stages are reused from the cache). Dask: {exc}")
    return f"internal error: {type(exc).__name__}: {exc}"


def _check_pool(settings: Settings, concurrency: int | None) -> Any:
    """Where the stages' sandbox checks run: check processes beside this one (so the flow's
    process keeps to orchestration and the LLM layer; each runs one check at a time, so one
    sandbox worker each), or this process's own sandbox pool (``generation.check_processes = 0``,
    and on Dask, whose worker processes are the fan-out)."""
    from awm_core.runtime import SandboxPool
    from awm_core.stages.check_processes import CheckProcesses

    n = settings.generation.check_process_count(concurrency)
    if n and settings.generation.task_runner == "threads":
        return CheckProcesses(settings.sandbox.model_copy(update={"workers": 1}), n)
    return SandboxPool(settings.sandbox)


def _embedder(settings: Settings):
    holder: dict[str, Any] = {}

    def embed(texts: list[str]):
        if "e" not in holder:  # loading the model costs seconds: only when the scenario stage needs it
            from awm_core.llm.embed import Embedder

            holder["e"] = Embedder.for_settings(settings)
        return holder["e"].embed(texts)

    return embed


def _repairs(outcomes: list[G.EnvOutcome], scenario_attempts: int = 1) -> dict[str, int]:
    """Extra attempts per stage kind, the run-wide scenario stage included."""
    out: dict[str, int] = {"scenario": scenario_attempts - 1} if scenario_attempts > 1 else {}
    for o in outcomes:
        for k, v in o.repairs.items():
            out[k] = out.get(k, 0) + v
    return out


@dataclass
class RunInfo:
    """Who a generate run is: what its catalog rows are stamped with."""

    settings: Settings
    run_id: str
    flow_run_id: str | None
    started_at: datetime
    params: dict[str, Any]


def _publish(run: RunInfo, summary: dict[str, Any], published: list[G.EnvOutcome], records: list[Any],
             drop_reasons: dict[str, str], retired: list[Any] = ()) -> int | None:
    """One snapshot: the published environments, the bundles whose tasks curation retired, the
    run's LLM calls (and those of runs that died before publishing theirs), and the run's
    generation_runs row."""
    from storage.catalog import Catalog, made_by

    settings, run_id, flow_run_id = run.settings, run.run_id, run.flow_run_id
    orphans = orphaned_runs(settings, run_id)
    cat = Catalog.open(settings)
    try:
        with cat.publish(made_by=made_by(settings, flow_run_id, run_id=run_id),
                         message=f"generate run {run_id}: {len(published)} environment(s), status {summary['status']}") as pub:
            pub.add_environments([o.environment for o in published] + list(retired))
            pub.add_llm_calls(records)
            for orphan_id, state in orphans:
                orphan_records = ledger_records(settings.runs_dir / orphan_id)
                pub.add_llm_calls(orphan_records)
                pub.add_generation_run({
                    "run_id": orphan_id, "flow_run_id": state.get("flow_run_id"), "status": "failed",
                    "started_at": state.get("started_at"), "finished_at": None, "params": state.get("params"),
                    "envs_published": 0, "envs_dropped": 0, "drop_reasons": {},
                    "tokens": sum(r.prompt_tokens + r.completion_tokens for r in orphan_records),
                    "cost_usd": sum(r.cost_usd for r in orphan_records),
                    "message": f"the run's process died before publishing; its LLM calls were published by {run_id}"})
            pub.add_generation_run({
                "run_id": run_id, "flow_run_id": flow_run_id, "status": summary["status"],
                "started_at": run.started_at, "finished_at": datetime.now(timezone.utc), "params": run.params,
                "envs_published": len(published), "envs_dropped": len(drop_reasons), "drop_reasons": drop_reasons,
                "tokens": sum(r.prompt_tokens + r.completion_tokens for r in records),
                "cost_usd": sum(r.cost_usd for r in records), "message": summary["message"] or _one_line(summary)})
        for orphan_id, _ in orphans:
            _write_state(settings.runs_dir / orphan_id, status="crashed", published_by=run_id)
        return pub.snapshot_id
    finally:
        cat.close()


def _one_line(summary: dict[str, Any]) -> str:
    return (f"{len(summary['published'])} published, {len(summary['dropped'])} dropped, "
            f"{summary['llm_calls']} LLM calls, ${summary['cost_usd']:.4f}")


# --------------------------------------------------------------------------- artifacts


def summary_markdown(summary: dict[str, Any], outcomes: list[G.EnvOutcome], image_src: str | None = None) -> str:
    lines = [f"# Generate run `{summary['run_id']}`", "",
             f"**Status:** {summary['status']}" + (f" ({summary['message']})" if summary["message"] else ""),
             f"**Snapshot:** {summary['snapshot']}  ", f"**Time:** {summary['seconds']} s  ",
             f"**LLM calls:** {summary['llm_calls']}, {summary['tokens']:,} tokens, ${summary['cost_usd']:.4f}", "",
             *markdown_table([("environment", "l"), ("status", "l"), ("tasks", "r"), ("repairs", "l"),
                              ("tokens", "r"), ("cost ($)", "r"), ("seconds", "r"), ("reason", "l")],
                             [[r["environment"], r["status"], r["tasks"],
                               ", ".join(f"{k} +{v}" for k, v in sorted(o.repairs.items())) or "-",
                               f"{r['tokens']:,}", f"{r['cost_usd']:.4f}", f"{o.seconds:.1f}", r["reason"][:120] or "-"]
                              for o, r in zip(outcomes, environment_rows(outcomes))])]
    if summary["scenario_drops"]:
        lines += ["", "**Scenario candidates dropped:** " + "; ".join(
            f"{d['name']} ({d['reason']})" for d in summary["scenario_drops"])]
    if summary["dropped_tasks"]:
        lines += ["", "**Tasks dropped:**"] + [f"- {sid}/{idx}: {why[:200]}" for sid, d in summary["dropped_tasks"].items()
                                               for idx, why in d.items()]
    if summary.get("verifier_soundness"):
        lines += ["", "**Verifier soundness** (lenient: said \"complete\" for a wrong episode; too strict: rejected an "
                      "equivalent one):", "",
                  *markdown_table([("environment", "l"), ("lenient: regenerated", "r"), ("lenient: dropped", "r"),
                                   ("too strict: regenerated", "r"), ("too strict: dropped", "r")],
                                  [[sid, r["lenient_regenerated"], r["lenient_dropped"], r["too_strict_regenerated"],
                                    r["too_strict_dropped"]] for sid, r in summary["verifier_soundness"].items()])]
    if summary.get("curation") and (summary["curation"]["regenerate"] or summary["curation"]["retire"]
                                    or summary["curation"]["top_up_scenarios"]):
        c = summary["curation"]
        lines += ["", "**Curation:** "
                  + "; ".join([f"regenerated {e} ({why})" for e, why in c["regenerate"].items()]
                              + [f"retired {e}/{i} ({why})" for e, t in c["retire"].items() for i, why in t.items()]
                              + ([f"topped up with {c['top_up_scenarios']} scenario(s) toward "
                                  f"{c['target_live_tasks']} live tasks"] if c["top_up_scenarios"] else []))]
    lines += ["", "**Repairs per stage:** " + (", ".join(f"{k}: {v}" for k, v in sorted(summary["repairs"].items()))
                                               or "none")]
    if image_src:
        lines += ["", f"![attempts per stage]({image_src})"]
    return "\n".join(lines)


def environment_rows(outcomes: list[G.EnvOutcome]) -> list[dict[str, Any]]:
    """One row per scenario of the run: status, published tasks, repairs, tokens, cost, time."""
    return [{"environment": o.scenario_id, "status": o.status, "reason": o.reason[:200],
             "tasks": len(o.environment.tasks) if o.environment and o.status == "published" else 0,
             "repairs": json.dumps(o.repairs), "seconds": round(o.seconds, 2),
             "tokens": sum(p.prompt_tokens + p.completion_tokens for p in o.stages.values()),
             "cost_usd": round(sum(p.cost_usd for p in o.stages.values()), 6)} for o in outcomes]


def attempts_png(outcomes: list[G.EnvOutcome]) -> bytes:
    """Attempts per stage kind: first tries and repairs, stacked."""
    # The scenario stage runs once per run, not per environment: its repairs are in the summary.
    kinds = ["tasks", "schema", "seed_data", "spec", "code", "verifier", "solution"]
    first = {k: 0 for k in kinds}
    extra = {k: 0 for k in kinds}
    for o in outcomes:
        for name, p in o.stages.items():
            k = name.split(".")[0]
            if k in first:
                first[k] += 1
                extra[k] += max(0, p.attempts - 1)
    return stacked_bars_png(kinds, {"first attempts": [first[k] for k in kinds], "repairs": [extra[k] for k in kinds]},
                            ylabel="attempts", size=(6, 2.6))


def stage_rows(records: list[Any]) -> list[dict[str, Any]]:
    """Per stage kind: LLM calls, how many failed (transport or rejected reply), pass rate."""
    by: dict[str, list[Any]] = {}
    for r in records:
        by.setdefault((r.stage or "?").split(".")[0], []).append(r)
    rows = []
    for stage, recs in sorted(by.items()):
        failed = sum(1 for r in recs if r.error)
        rows.append({"stage": stage, "llm_calls": len(recs), "failed_calls": failed,
                     "pass_rate": round(1 - failed / len(recs), 3), "cached": sum(1 for r in recs if r.cached)})
    return rows


def failure_rows(records: list[Any], limit: int = 500) -> list[dict[str, Any]]:
    """Every failed LLM call with its reason, for the UI (the catalog's llm_calls has them all)."""
    return [{"scenario": r.scenario_id, "stage": r.stage, "attempt": r.attempt, "error": (r.error or "")[:300]}
            for r in records if r.error][:limit]


def _artifacts(summary: dict[str, Any], outcomes: list[G.EnvOutcome], records: list[Any] = ()) -> None:
    chart = attempts_png(outcomes)
    publish_report(Report(
        key="generate-summary", markdown=summary_markdown(summary, outcomes, data_uri(chart)),
        description=f"generate run {summary['run_id']}",
        tables={"generate-environments": (environment_rows(outcomes), "one row per scenario"),
                "generate-stages": (stage_rows(records),
                                    "LLM calls per stage: failed calls (errors, rejected replies) and pass rate"),
                "generate-failures": (failure_rows(records), "every failed or rejected LLM call with its reason")}),
        get_run_logger())


def run_generate(config: GenerateConfig | None = None, *, task_runner=None, **fields: Any) -> dict[str, Any]:
    """Run the flow with ``config`` (or its ``fields``) on ``config.concurrency`` worker threads,
    or on any Prefect task runner (e.g. a ``prefect_dask.DaskTaskRunner``)."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    config = config or GenerateConfig(**fields)
    settings = get_settings()
    c = config.concurrency or settings.generation.concurrency
    runner = task_runner or task_runner_for(settings, c)  # generation.task_runner: threads or dask
    # Cached stage results live under AWM_HOME, next to the catalog they feed.
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(G.results_dir(settings))}):
        return generate.with_options(task_runner=runner)(**config.model_copy(update={"concurrency": c}).parameters())

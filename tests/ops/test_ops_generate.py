"""The generate flow as operations sees it, against a real Prefect server:

- 30% injected LLM faults (timeouts, 429, 500, malformed and truncated JSON) from the local
  fixture server, through the http backend: the run survives and publishes only environments
  that passed validation;
- the finished run's page in a real headless Chromium shows its artifacts (screenshots kept);
- fan-out on Prefect's Dask task runner with a local two-worker Dask cluster;
- a Dask cluster started outside the flow (``dask scheduler`` / ``dask worker`` processes) named
  by ``generation.dask_address``, and one of its workers SIGKILLed mid-run.

The SIGKILL-and-resume and the budget-cap cases are covered by tests/pipeline/test_pipeline_flow.py
(they run the same flow against the same server fixture); they are not repeated here.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SCENARIOS = ["recipe_box", "clinic_booking", "team_expenses"]
# Kept after the run for a person (or CI) to look at; the folder is git-ignored.
SCREENSHOTS = Path(os.environ.get("AWM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ops"


def _use_home(home: Path, **env: str) -> dict[str, str | None]:
    from awm_core.settings import get_settings

    changes = {"AWM_HOME": str(home), "AWM_CONFIG": str(home / "none.toml"), "OPENAI_API_KEY": None,
               "OPENAI_BASE_URL": None, **env}
    old = {k: os.environ.get(k) for k in changes}
    for k, v in changes.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()
    return old


def _restore(old: dict[str, str | None]) -> None:
    from awm_core.settings import get_settings

    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()


def _catalog_rows(query: str):
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        return cat.rows(query)


@pytest.fixture(scope="module")
def faulty_run(prefect_server, tmp_path_factory):
    """One generate run of the three demo scenarios with 30% of chat requests faulted."""
    from awm_core.llm.fixture_server import FixtureServer
    from awm_core.settings import DEFAULT_FIXTURES

    home = tmp_path_factory.mktemp("ops-faults")
    with FixtureServer(DEFAULT_FIXTURES, fault_rate=0.3, seed=11, timeout_sleep_s=3.0) as srv:
        old = _use_home(home, AWM_LLM__GENERATOR__BACKEND="http", AWM_LLM__GENERATOR__BASE_URL=srv.base_url,
                        AWM_LLM__GENERATOR__API_KEY="fixture-server", AWM_LLM__GENERATOR__TIMEOUT_S="1",
                        AWM_LLM__BACKOFF_BASE_S="0.05", AWM_LLM__MAX_HTTP_RETRIES="4")
        try:
            from flows.generate import run_generate

            summary = run_generate(scenarios=SCENARIOS, concurrency=3)
            with_envs = {e.id: e for e in _environments(summary["snapshot"])}
            rows = _catalog_rows(f"SELECT stage, scenario_id, attempt, error FROM llm_calls "
                                 f"WHERE run_id = '{summary['run_id']}'")
            yield {"summary": summary, "requests": srv.chat_requests(), "envs": with_envs, "calls": rows}
        finally:
            _restore(old)


def _environments(snapshot):
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        return list(cat.environments(snapshot=snapshot))


def _events(name: str, snapshot: int, timeout: float = 60, run_id: str | None = None) -> list[dict]:
    """Events of one snapshot number; the session's Prefect server is shared by tests whose
    catalogs each have a snapshot with that number, so ``run_id`` picks this run's events."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            resp = client._client.post("/events/filter", json={
                "filter": {"event": {"name": [name]}, "resource": {"id": [f"awm.catalog.snapshot.{snapshot}"]}},
                "limit": 50})
            events = [e for e in resp.json()["events"]
                      if run_id is None or e.get("payload", {}).get("run_id") == run_id]
            if events or time.monotonic() > deadline:
                return events
            time.sleep(1)


def test_generate_survives_30_percent_llm_faults_and_publishes_only_valid_environments(faulty_run):
    requests, summary, envs = faulty_run["requests"], faulty_run["summary"], faulty_run["envs"]
    faults = Counter(r.fault for r in requests if r.fault)
    # Every kind was injected, at about the configured rate.
    assert set(faults) == {"timeout", "429", "500", "malformed", "truncated"}, faults
    assert 0.2 < sum(faults.values()) / len(requests) < 0.4, (faults, len(requests))
    # The run finished and published; what it published passed validation in full.
    assert summary["status"] in ("completed", "partial") and summary["snapshot"] is not None
    assert summary["published"], summary
    assert set(envs) == set(summary["published"])
    for env in envs.values():
        assert env.validation.passed, env.id
        assert all(c.passed for c in env.validation.checks if c.task_idx is None or c.task_idx not in
                   env.validation.dropped_tasks), env.id
        assert len(env.tasks) >= 5 and len(env.verifiers) == len(env.tasks) == len(env.solutions)
    # Dropped ones are reported with a reason, never published half-made.
    for sid, reason in summary["dropped"].items():
        assert sid not in envs and reason
    # Transport faults were retried by the client and malformed/truncated replies repaired by
    # Prefect retries: both leave failed attempts in the published ledger.
    errors = [c["error"] for c in faulty_run["calls"] if c["error"]]
    assert any("HTTP 429" in e or "HTTP 500" in e for e in errors), errors[:5]
    assert any("timed out" in e.lower() or "timeout" in e.lower() for e in errors), errors[:5]
    assert any("not valid JSON" in e or "cut off" in e or "rejected" in e for e in errors), errors[:5]


def test_fault_run_artifacts_list_failures_with_reasons_and_stage_pass_rates(faulty_run, prefect_server):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = faulty_run["summary"]["flow_run_id"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    by_key = {a.key: a for a in arts}
    assert {"generate-summary", "generate-environments", "generate-stages", "generate-failures"} <= set(by_key)

    def data(key):
        return by_key[key].data if isinstance(by_key[key].data, list) else json.loads(by_key[key].data)

    failures = data("generate-failures")
    assert failures and all(f["error"] and f["stage"] for f in failures)
    assert any("429" in f["error"] for f in failures) and any("rejected" in f["error"] for f in failures)
    stages = {r["stage"]: r for r in data("generate-stages")}
    assert {"tasks", "schema", "seed_data", "spec", "code", "verifier", "solution"} <= set(stages)
    assert any(r["pass_rate"] < 1 for r in stages.values())
    assert sum(r["failed_calls"] for r in stages.values()) == len([c for c in faulty_run["calls"] if c["error"]])


def test_generate_run_emits_the_event_that_chains_the_gate(faulty_run, prefect_server):
    snapshot = faulty_run["summary"]["snapshot"]
    events = _events("awm.generate.published", snapshot, run_id=faulty_run["summary"]["run_id"])
    assert events, "no awm.generate.published event for the run's snapshot"
    payload = events[0]["payload"]
    assert payload["snapshot"] == snapshot and payload["run_id"] == faulty_run["summary"]["run_id"]
    related = {r["prefect.resource.id"] for r in events[0]["related"]}
    assert f"prefect.flow-run.{faulty_run['summary']['flow_run_id']}" in related


def test_a_passed_gate_emits_the_event_for_train_after_gate(faulty_run, prefect_server):
    from flows.gate import gate

    snapshot = faulty_run["summary"]["snapshot"]
    state = gate(snapshot, return_state=True)
    assert state.is_completed(), state.message
    events = _events("awm.gate.passed", snapshot)
    assert events and events[0]["payload"]["snapshot"] == snapshot and events[0]["payload"]["report_id"]


def _flow_run_name(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).name


def test_finished_run_page_shows_its_artifacts_in_headless_chromium(faulty_run, prefect_server):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from ops_browser import Browser, chromium_path

    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    ui = prefect_server.removesuffix("/api")
    run_id = faulty_run["summary"]["flow_run_id"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with Browser(exe) as b:
        b.goto(f"{ui}/runs/flow-run/{run_id}")
        # The header (run name, state, flow) and the tabs: the page has its data.
        b.wait_for_text(_flow_run_name(run_id), "Completed", "Flow\ngenerate", "Artifacts")
        assert b.click_text("Artifacts")
        # The artifact list renders one card at a time: wait for every card, not the first.
        text = b.wait_for_text("generate-environments", "generate-summary", "one row per scenario", "generate-stages",
                               "generate-failures", timeout=60)
        assert "generate-summary" in text and "one row per scenario" in text
        assert "generate-stages" in text and "generate-failures" in text  # this run had faults
        b.screenshot(SCREENSHOTS / "flow-run-artifacts.png")
        # The summary artifact itself: the per-environment table and the attempts chart render.
        assert b.click_text("generate-summary")
        text = b.wait_for_text("Repairs per stage", timeout=60)
        for sid in faulty_run["summary"]["published"]:
            assert sid in text
        sizes = b.evaluate("[...document.images].filter(i => i.src.startsWith('data:image/png'))"
                           ".map(i => i.naturalWidth)")
        assert sizes and all(w > 100 for w in sizes), sizes
        shot = b.screenshot(SCREENSHOTS / "generate-summary.png")
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_generate_fans_out_on_a_local_dask_cluster_of_worker_processes(prefect_server, tmp_path):
    pytest.importorskip("prefect_dask")
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    old = _use_home(tmp_path / "home")
    # The kwargs a DaskTaskRunner(cluster_kwargs=...) would pass; the cluster is made here so
    # the test can ask each worker process what it executed.
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    try:
        from flows.generate import run_generate

        runner = DaskTaskRunner(address=cluster.scheduler_address)
        # One Dask task per scenario (each builds its environment's stages in order).
        summary = run_generate(scenarios=["clinic_booking", "team_expenses"], task_runner=runner)
        with Client(cluster) as client:
            executed = client.run(lambda dask_worker: (os.getpid(), dask_worker.state.executed_count))
            plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        # Both worker processes (not this one) built an environment each.
        assert len(executed) == 2 and all(pid != os.getpid() and n >= 1 for pid, n in executed.values()), executed
        # The run's resources were installed on the workers and removed at the end of the run.
        assert not any(p.startswith("awm-run-resources-") for ps in plugins.values() for p in ps), plugins
        assert summary["status"] == "completed" and sorted(summary["published"]) == ["clinic_booking", "team_expenses"]
        envs = {e.id: e for e in _environments(summary["snapshot"])}
        assert set(envs) == {"clinic_booking", "team_expenses"} and all(e.validation.passed for e in envs.values())
        # Every call the workers made is in the run's ledger and in the catalog.
        n = _catalog_rows(f"SELECT count(*) AS n FROM llm_calls WHERE run_id = '{summary['run_id']}'")[0]["n"]
        assert n == summary["llm_calls"] > 40
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        import time

        want = {"build[clinic_booking]", "build[team_expenses]", "schema[team_expenses]", "verifier.0[team_expenses]",
                "validate[clinic_booking]"}
        deadline, names = time.monotonic() + 60, set()
        while not want <= names and time.monotonic() < deadline:  # the server records task runs in batches
            with get_client(sync_client=True) as client:
                trs = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[summary["flow_run_id"]])), limit=200)
            names = {t.name for t in trs}
            time.sleep(0.5)
        assert want <= names, sorted(names)
    finally:
        cluster.close()
        _restore(old)


def test_dask_worker_processes_share_one_budget_through_postgres(prefect_server, postgres, pg_database, tmp_path):
    """Per-process budgets would give each of the two workers the whole cap; with llm.budget_dsn
    the flow's process and both workers reserve against the run's one row."""
    pytest.importorskip("prefect_dask")
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from awm_core.llm import read_ledger
    from awm_core.llm.shared_budget import SharedBudget

    dsn, cap = pg_database("genbudget"), 0.17
    old = _use_home(tmp_path / "home", AWM_LLM__BUDGET_DSN=dsn)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    try:
        from awm_core.settings import get_settings
        from flows.generate import run_generate

        summary = run_generate(scenarios=["clinic_booking", "team_expenses"], budget_usd=cap,
                               task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        records = read_ledger(get_settings().runs_dir / summary["run_id"] / "llm_calls.jsonl")
        shared = SharedBudget(dsn, summary["run_id"], cap)
        try:
            spent, reserved = shared.spent_usd, shared.reserved_usd
        finally:
            shared.close()
        costs = [r.cost_usd for r in records]
        print(f"cap {cap}, spent {spent:.4f} over {len(costs)} calls, most expensive {max(costs):.4f}")
        assert spent == pytest.approx(sum(costs)) and reserved == pytest.approx(0.0)
        assert cap <= spent <= cap + 2 * max(costs)
        assert summary["status"] == "budget_exceeded"
        assert any(r.error and r.error.startswith("budget exceeded") for r in records)
    finally:
        cluster.close()
        _restore(old)


# --------------------------------------------------------------------------- a Dask cluster started outside the flow


@contextlib.contextmanager
def _external_dask_cluster(folder: Path, env: dict[str, str], workers: tuple[str, ...] = ("w1", "w2"),
                           scheduler_env: dict[str, str] | None = None):
    """A ``dask scheduler`` and one ``dask worker`` process per name, each in its own process
    group, started the way an operator would (the CLI, a scheduler file); yields the scheduler's
    address and the worker processes by name. Every process is stopped at the end."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from distributed import Client

    dask = str(Path(sys.executable).with_name("dask"))
    sched_file = folder / "scheduler.json"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen:
        with open(folder / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen([dask, *args], env={**env, **(extra or {})}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        return procs[name]

    try:
        sched = start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file",
                      str(sched_file), "--no-dashboard", extra=scheduler_env)
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            if sched.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dask scheduler did not start: {(folder / 'scheduler.log').read_text()[-2000:]}")
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        # --no-nanny: the worker is the process itself, so a SIGKILL loses it for good (a nanny
        # would start a fresh worker in its place).
        for name in workers:
            start(name, "worker", "--scheduler-file", str(sched_file), "--nworkers", "1", "--nthreads", "1",
                  "--no-dashboard", "--no-nanny", "--name", name, "--local-directory", str(folder / name))
        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(len(workers), timeout=60)
        yield address, {name: procs[name] for name in workers}
    finally:
        for p in reversed(list(procs.values())):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _cluster_env(prefect_server: str) -> dict[str, str]:
    """The environment of the worker processes: the test's AWM_* settings, the project importable,
    the session's Prefect server."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PREFECT_API_URL"] = prefect_server
    return env


def _use_cluster(old: dict[str, str | None], address: str) -> None:
    """The flow's settings name the external scheduler (``generation.dask_address``)."""
    for k, v in _use_home(Path(os.environ["AWM_HOME"]), AWM_GENERATION__TASK_RUNNER="dask",
                          AWM_GENERATION__DASK_ADDRESS=address).items():
        old.setdefault(k, v)


def _what_workers_ran(address: str) -> dict[str, tuple[int, int]]:
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        ran = client.run(lambda dask_worker: (dask_worker.name, os.getpid(), dask_worker.state.executed_count,
                                              sorted(dask_worker.plugins)))
    return {name: (pid, n, plugins) for name, pid, n, plugins in ran.values()}


def _assert_published_once(summary: dict) -> None:
    assert summary["status"] == "completed", summary
    assert sorted(summary["published"]) == sorted(SCENARIOS), summary
    envs = _catalog_rows("SELECT count(*) AS n, count(DISTINCT env_id) AS ids FROM environments")[0]
    assert envs == {"n": 3, "ids": 3}, envs
    dup = _catalog_rows("SELECT env_id, task_idx, count(*) AS n FROM tasks GROUP BY ALL HAVING count(*) > 1")
    assert dup == [], dup
    assert _catalog_rows("SELECT count(DISTINCT env_id) AS n FROM tasks")[0]["n"] == 3
    n = _catalog_rows(f"SELECT count(*) AS n FROM llm_calls WHERE run_id = '{summary['run_id']}'")[0]["n"]
    assert n == summary["llm_calls"] > 60


def test_generate_runs_on_an_external_dask_cluster_named_by_its_address(prefect_server, tmp_path, postgres,
                                                                         pg_database, s3_server):
    """The multi-machine setup on loopback. generation.dask_address: the flow uses a scheduler and
    workers started outside it (the CLI), builds the run's resources on them through the worker
    plugin, and the work runs there; the catalog's metadata is on PostgreSQL and its Parquet on an
    S3-compatible server; the evaluation fans out over the same workers; a second process with
    nothing shared but the servers reads it all back with `awm catalog sql`."""
    pytest.importorskip("prefect_dask")
    import json
    import subprocess
    import sys

    catalog_env = {**s3_server.env("nightly"), "AWM_CATALOG__METADATA": "postgres:" + pg_database("fanout")}
    old = _use_home(tmp_path / "home", **catalog_env)
    try:
        with _external_dask_cluster(tmp_path, _cluster_env(prefect_server)) as (address, procs):
            _use_cluster(old, address)
            from flows.generate import run_generate

            summary = run_generate(scenarios=SCENARIOS, concurrency=2)
            ran = _what_workers_ran(address)
            # Evaluation fans out over the same cluster (generation.dask_address): one Dask task per
            # environment, each worker on its own sandbox pool; every row lands in one snapshot.
            from awm_core.agent.evaluation import EvalConfig
            from awm_core.settings import get_settings
            from flows.evaluate import run_evaluation

            result = run_evaluation(EvalConfig(policy="reference", split="all", episodes_per_task=2))
            after = _what_workers_ran(address)
        print("workers:", ran, "llm calls:", summary["llm_calls"], "after eval:", after)
        assert set(ran) == {"w1", "w2"}
        assert {pid for pid, _, _ in ran.values()} == {p.pid for p in procs.values()}
        assert all(n >= 1 for _, n, _ in ran.values()), ran  # both external workers built environments
        assert not any(p.startswith("awm-run-resources-") for *_, ps in ran.values() for p in ps), ran
        _assert_published_once(summary)

        assert all(after[w][1] > ran[w][1] for w in ran), (ran, after)  # both workers ran environments
        assert len(result.rows) == 60 and {r["reward"] for r in result.rows} == {1.0}
        rows = _catalog_rows(f"SELECT count(*) AS n, count(DISTINCT rollout_id) AS ids, count(DISTINCT snapshot) AS "
                             f"snaps FROM rollouts WHERE run_id = '{result.run_id}'")[0]
        assert rows == {"n": 60, "ids": 60, "snaps": 1}, rows
        from storage.catalog import Catalog

        with Catalog.open(get_settings(), read_only=True) as cat:
            made = {x["snapshot_id"]: x for x in cat.snapshots()}[result.published_snapshot]["made_by"]
        assert len(made["dask_workers"]) == 2, made

        reader = tmp_path / "reader-home"  # another machine: only the servers are shared
        reader.mkdir()
        out = subprocess.run([sys.executable, "-m", "flows.cli", "catalog", "sql", "--format", "json",
                              "SELECT (SELECT count(*) FROM environments) AS envs, count(*) AS rollouts, "
                              "count(DISTINCT rollout_id) AS ids FROM rollouts"],
                             env={**os.environ, "AWM_HOME": str(reader), "PYTHONPATH": str(REPO)}, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout) == [{"envs": 3, "rollouts": 60, "ids": 60}]
        keys = s3_server.keys("nightly/")
        assert any(k.endswith(".parquet") for k in keys), keys
    finally:
        _restore(old)


@pytest.mark.parametrize("allowed_failures", [None, 0], ids=["rescheduled", "dask-gives-up"])
def test_generate_survives_a_dask_worker_killed_mid_run(prefect_server, tmp_path, allowed_failures):
    """SIGKILL one of two external workers while it builds an environment. With Dask's default
    ``distributed.scheduler.allowed-failures`` (3) the scheduler reschedules the tasks it held on
    the other worker and every scenario is published exactly once; with 0 Dask gives up on those
    tasks at once, and the flow publishes the others and names each lost scenario and why."""
    pytest.importorskip("prefect_dask")
    import signal
    import threading
    import time

    from distributed import Client

    old = _use_home(tmp_path / "home")
    killed: dict[str, object] = {}
    try:
        sched_env = None if allowed_failures is None else {
            "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(allowed_failures)}
        with _external_dask_cluster(tmp_path, _cluster_env(prefect_server), scheduler_env=sched_env) as (address, procs):
            _use_cluster(old, address)
            from flows.generate import run_generate

            def kill_w1_mid_task() -> None:
                try:
                    with Client(address, set_as_default=False) as client:
                        deadline = time.monotonic() + 60
                        while time.monotonic() < deadline:
                            names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
                            busy = {names.get(a): keys for a, keys in client.processing().items() if keys}
                            if busy.get("w1"):
                                time.sleep(2.0)  # its environment's stages are under way
                                killed["tasks"] = [str(k) for k in client.processing().get(
                                    next(a for a, n in names.items() if n == "w1"), [])]
                                os.killpg(procs["w1"].pid, signal.SIGKILL)
                                killed["at"] = time.monotonic()
                                return
                            time.sleep(0.1)
                except Exception as exc:  # reported by the assertions below
                    killed["error"] = repr(exc)

            killer = threading.Thread(target=kill_w1_mid_task, daemon=True)
            t0 = time.monotonic()
            killer.start()
            summary = run_generate(scenarios=SCENARIOS, concurrency=2, offline_latency_s=0.2)
            elapsed = time.monotonic() - t0
            killer.join(timeout=5)
            ran = _what_workers_ran(address)
            assert procs["w1"].wait(timeout=10) == -signal.SIGKILL
        print(f"killed w1 {killed.get('at', 0) - t0:.1f} s into a {elapsed:.1f} s run while it ran "
              f"{killed.get('tasks')}; survivors: {ran}")
        assert "at" in killed and killed.get("tasks"), killed
        assert set(ran) == {"w2"}, ran
        calls = _catalog_rows(f"SELECT scenario_id, count(*) AS n FROM llm_calls WHERE run_id = '{summary['run_id']}' "
                              f"GROUP BY ALL ORDER BY 1")
        print("summary:", {k: summary[k] for k in ("status", "published", "dropped", "llm_calls")}, "calls:", calls)
        if allowed_failures is None:
            _assert_published_once(summary)
            return
        # Dask gave up on every task the dead worker held (running or queued there).
        lost = set(SCENARIOS) - set(summary["published"])
        assert len(lost) == len(killed["tasks"]) and set(summary["dropped"]) == lost, summary
        for sid in lost:
            assert "Dask worker" in summary["dropped"][sid] and "allowed-failures" in summary["dropped"][sid], summary
        assert summary["status"] == "partial"
        got = _catalog_rows("SELECT count(*) AS n, count(DISTINCT env_id) AS ids FROM environments")[0]
        assert got == {"n": 3 - len(lost), "ids": 3 - len(lost)}, got
    finally:
        _restore(old)



def test_an_unreachable_dask_scheduler_is_one_clear_error():
    pytest.importorskip("distributed")
    import dask

    from awm_core.errors import AWMError
    from conftest import free_port
    from flows.scaleout import dask_eval_runner

    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(AWMError, match=f"cannot reach the Dask scheduler at {address}"):
            dask_eval_runner(address)(None, {})

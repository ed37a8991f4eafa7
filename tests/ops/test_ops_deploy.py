"""Deployments registered against a real Prefect server: schedule, parameters, work pool, pull
step, the gate chain and the optional train-after-gate automation; `prefect deployment run`
with --param creates runs with those parameters; the yaml also deploys with plain Prefect."""
from __future__ import annotations

import json
import subprocess
import sys
from uuid import UUID

import pytest

from awm_core.agent.evaluation import EvalConfig
from conftest import REPO

pytestmark = pytest.mark.slow

POOL = "ops-deploy-test"


@pytest.fixture(scope="module")
def client(prefect_server):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        yield c


def _settings(**server):
    from awm_core.settings import load_settings

    return load_settings(server={"work_pool": POOL, **server}, generation={"scenarios": 4, "tasks_per_scenario": 6})


def _cleanup(client, registered) -> None:
    for r in registered:
        client.delete_resource_owned_automations(f"prefect.deployment.{r.deployment_id}")
        client.delete_deployment(UUID(r.deployment_id))


def _by_name(registered):
    return {r.full_name: r for r in registered}


def _owned_automations(client, deployment_id: str):
    from flows.deploy import automations_for

    return automations_for(deployment_id)


def test_plan_rejects_a_bad_cron_with_a_clear_message(awm_home):
    from flows.deploy import DeployError, load_spec, plan

    with pytest.raises(DeployError, match="invalid nightly schedule cron='61 2 \\* \\* \\*'"):
        plan(_settings(), load_spec(), cron="61 2 * * *")


def test_plan_checks_nightly_parameters_against_the_flow_config(awm_home):
    from flows.deploy import DeployError, load_spec, plan

    with pytest.raises(DeployError, match="budget_usd must be > 0"):
        plan(_settings(), load_spec(), generate_params={"budget_usd": -1})
    with pytest.raises(DeployError, match="budgt_usd is not a parameter"):
        plan(_settings(), load_spec(), generate_params={"budgt_usd": 2})
    nightly = next(e for e in plan(_settings(), load_spec(), generate_params={"scenarios": ["recipe_box"]})
                   if e["name"] == "nightly")
    assert nightly["parameters"]["scenarios"] == ["recipe_box"]


def test_spec_errors_name_the_problem(tmp_path):
    from flows.deploy import DeployError, load_spec, parse_param

    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n")
    with pytest.raises(DeployError, match=r"deployments\[0\] lacks entrypoint"):
        load_spec(bad)
    assert parse_param("scenarios=2") == ("scenarios", 2)
    assert parse_param('env_ids=["a","b"]') == ("env_ids", ["a", "b"])
    assert parse_param("split=val") == ("split", "val")
    with pytest.raises(DeployError, match="not key=value"):
        parse_param("scenarios")


def test_deploy_without_a_server_says_how_to_start_one(awm_home):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from conftest import free_port
    from flows.deploy import DeployError, register

    url = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with pytest.raises(DeployError, match=f"no Prefect server answers at {url}.*awm server start"):
            register(_settings())


def test_deployments_register_with_schedule_parameters_and_chain(prefect_server, awm_home, client):
    from flows.deploy import PROJECT_DIR, register

    settings = _settings(nightly_cron="30 3 * * 1-5", timezone="Europe/Berlin")
    registered, skipped = register(settings, generate_params={"budget_usd": 2.5})
    try:
        assert skipped == []
        by_name = _by_name(registered)
        assert set(by_name) == {"generate/nightly", "quality-gate/after-generate", "evaluate/manual", "train/manual",
                                "import-awm1k/manual", "import-bfcl/manual",
                                "import-tau2/manual"}
        deps = {name: client.read_deployment(UUID(r.deployment_id)) for name, r in by_name.items()}
        nightly = deps["generate/nightly"]
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == \
               [("30 3 * * 1-5", "Europe/Berlin", True)]
        assert nightly.parameters == {"scenarios": 4, "tasks_per_scenario": 6, "budget_usd": 2.5}
        for name, d in deps.items():
            assert d.work_pool_name == POOL, name
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                     {"directory": str(PROJECT_DIR)}}], name
            if name != "generate/nightly":
                assert d.schedules == [], name
        # The gate runs on the snapshot named by the generate flow's event.
        gate_autos = _owned_automations(client, by_name["quality-gate/after-generate"].deployment_id)
        assert len(gate_autos) == 1 and gate_autos[0].enabled
        assert gate_autos[0].trigger.expect == {"awm.generate.published"}
        assert "event.payload.snapshot" in str(gate_autos[0].actions[0].parameters)
        # Off by default: no automation starts training.
        assert _owned_automations(client, by_name["train/manual"].deployment_id) == []
        # A plain `prefect deployment run` with --param makes a run with those parameters.
        out = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "generate/nightly",
                              "--param", "scenarios=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        runs = client.read_flow_runs()
        run = next(r for r in runs if r.deployment_id == nightly.id and r.parameters.get("scenarios") == 2)
        assert run.parameters == {"scenarios": 2, "tasks_per_scenario": 6, "budget_usd": 2.5}
        # The evaluate flow's parameters are its typed config's fields, with their help text and
        # allowed values in the deployment's parameter schema (the UI's run form).
        fields = deps["evaluate/manual"].parameter_openapi_schema["properties"]
        assert set(fields) == set(EvalConfig.model_fields)
        assert "replay reference solutions" in fields["policy"]["description"]
        assert fields["concurrency"]["minimum"] == 1 and "openai-text" in json.dumps(fields["policy"])
        for name, params in [("evaluate/manual", {"split": "train", "policy": "random"}),
                             ("train/manual", {"snapshot": 7}), ("import-awm1k/manual", {"path": "/data/awm1k"}),
                             ("quality-gate/after-generate", {"snapshot": 3})]:
            fr = client.create_flow_run_from_deployment(deps[name].id, parameters=params)
            assert all(fr.parameters[k] == v for k, v in params.items()), name
            client.delete_flow_run(fr.id)
        client.delete_flow_run(run.id)
    finally:
        _cleanup(client, registered)


def test_train_after_gate_automation_exists_only_when_enabled(prefect_server, awm_home, client):
    from flows.deploy import register

    on, _ = register(_settings(train_after_gate=True), only=["train"])
    try:
        train = _by_name(on)["train/manual"]
        autos = _owned_automations(client, train.deployment_id)
        assert len(autos) == 1 and autos[0].enabled
        assert autos[0].trigger.expect == {"awm.gate.passed"}
        assert "event.payload.snapshot" in str(autos[0].actions[0].parameters)
        # Switching the setting off and deploying again removes it.
        off, _ = register(_settings(train_after_gate=False), only=["train"])
        assert _by_name(off)["train/manual"].deployment_id == train.deployment_id
        assert _owned_automations(client, train.deployment_id) == []
    finally:
        _cleanup(client, on)


def test_plain_prefect_deploy_reads_the_same_yaml(prefect_server, awm_home, client):
    """`prefect deploy --all` with the yaml (the documented plain-Prefect path) registers the same
    deployments; the train trigger stays disabled as written."""
    from flows.deploy import Registered
    from flows.server import ensure_work_pool

    ensure_work_pool(_settings(work_pool="awm-local"), prefect_server)
    out = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                          "deployments/prefect.yaml"], cwd=REPO, capture_output=True, text=True, timeout=300)
    deps = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()
            if d.work_pool_name == "awm-local"}
    try:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert {"generate/nightly", "quality-gate/after-generate", "evaluate/manual", "train/manual",
                "import-awm1k/manual", "import-bfcl/manual"} <= set(deps)
        assert deps["generate/nightly"].schedules[0].schedule.cron == "0 2 * * *"
        train_autos = _owned_automations(client, str(deps["train/manual"].id))
        assert [a.enabled for a in train_autos] == [False]
    finally:
        _cleanup(client, [Registered("", "", str(d.id), "") for d in deps.values()])


def _emit(event: str, snapshot: int) -> None:
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    emit_event(event=event, resource={"prefect.resource.id": f"awm.catalog.snapshot.{snapshot}"},
               payload={"snapshot": snapshot})
    EventsWorker.drain_all()  # events leave on a background worker: send them now


def _wait_for_run(client, deployment_id: str, timeout: float = 90):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in client.read_flow_runs() if str(r.deployment_id) == deployment_id]
        if runs:
            return runs
        time.sleep(1)
    return []


def test_events_start_the_chained_deployments_with_the_snapshot(prefect_server, awm_home, client):
    """What the flows emit (flows/events.py) makes the automations create runs: generate's publish
    starts the gate on that snapshot, a passed gate starts training on it (when enabled)."""
    from flows.deploy import register
    from flows.events import GATE_PASSED, GENERATE_PUBLISHED

    registered, _ = register(_settings(train_after_gate=True), only=["gate", "train"])
    try:
        by_name = _by_name(registered)
        _emit(GENERATE_PUBLISHED, 41)
        gate_runs = _wait_for_run(client, by_name["quality-gate/after-generate"].deployment_id)
        assert [r.parameters for r in gate_runs] == [{"snapshot": 41}]
        _emit(GATE_PASSED, 41)
        train_runs = _wait_for_run(client, by_name["train/manual"].deployment_id)
        assert [r.parameters for r in train_runs] == [{"snapshot": 41}]
        for r in gate_runs + train_runs:
            client.delete_flow_run(r.id)
    finally:
        _cleanup(client, registered)


def test_nightly_entrypoint_picks_the_task_runner_from_settings(awm_home, monkeypatch):
    """deployments/nightly.py chooses the runner when the flow-run process imports it."""
    import importlib

    from awm_core.settings import get_settings

    monkeypatch.setenv("AWM_GENERATION__CONCURRENCY", "3")
    get_settings.cache_clear()
    import deployments.nightly as nightly

    nightly = importlib.reload(nightly)
    assert nightly.generate.name == "generate"
    assert type(nightly.generate.task_runner).__name__ == "ThreadPoolTaskRunner"
    assert nightly.generate.task_runner._max_workers == 3
    pytest.importorskip("prefect_dask")
    monkeypatch.setenv("AWM_GENERATION__TASK_RUNNER", "dask")
    get_settings.cache_clear()
    runner = importlib.reload(nightly).generate.task_runner
    assert type(runner).__name__ == "DaskTaskRunner"
    assert runner.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "dashboard_address": None}
    monkeypatch.setenv("AWM_GENERATION__DASK_PROCESSES", "2")  # 3 scenarios at once over 2 processes
    get_settings.cache_clear()
    runner = importlib.reload(nightly).generate.task_runner
    assert runner.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 2, "dashboard_address": None}
    monkeypatch.delenv("AWM_GENERATION__DASK_PROCESSES")
    monkeypatch.setenv("AWM_GENERATION__DASK_ADDRESS", "tcp://scheduler:8786")
    get_settings.cache_clear()
    assert importlib.reload(nightly).generate.task_runner.address == "tcp://scheduler:8786"
    monkeypatch.delenv("AWM_GENERATION__TASK_RUNNER")
    monkeypatch.delenv("AWM_GENERATION__DASK_ADDRESS")
    get_settings.cache_clear()
    importlib.reload(nightly)

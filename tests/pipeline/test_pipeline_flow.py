"""The generate flow on the offline recordings, against a real Prefect server.

One module-scoped scenario does the expensive work once: a generate run in a subprocess is
SIGKILLed mid-way, then the same run is started again in-process and must finish it, redoing
only unfinished stages. The published snapshot is then checked as the flow test (3
environments, every task validated, the planned repair paths in llm_calls), and a third run
must hit the cache for every stage and leave no duplicate in the catalog.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from flows.server import stop_group

pytestmark = pytest.mark.slow

FULL_RUN_CALLS = 85  # 1 scenario call + 3 x (26 stage calls + 2 planned repairs)
PLANNED_REPAIRS = {("recipe_box", "schema"), ("recipe_box", "code"), ("clinic_booking", "seed_data"),
                   ("clinic_booking", "verifier.3"), ("team_expenses", "spec"), ("team_expenses", "solution.4")}

CHILD = """
import sys
from flows.generate import run_generate
run_generate(scenarios=3, concurrency=3, skip_existing=False)
"""


def use_home(home: Path) -> None:
    from awm_core.settings import get_settings

    os.environ["AWM_HOME"] = str(home)
    os.environ.pop("OPENAI_API_KEY", None)
    os.environ.pop("OPENAI_BASE_URL", None)
    os.environ["AWM_CONFIG"] = str(home / "none.toml")
    get_settings.cache_clear()


def ledger_lines(home: Path) -> dict[str, int]:
    runs = home / "runs"
    if not runs.exists():
        return {}
    return {d.name: len((d / "llm_calls.jsonl").read_text().splitlines())
            for d in runs.iterdir() if (d / "llm_calls.jsonl").exists()}


def catalog_rows(query: str):
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        return cat.rows(query)


@pytest.fixture(scope="module")
def resumed(prefect_server, tmp_path_factory):
    old_env = dict(os.environ)
    home = tmp_path_factory.mktemp("gen-home")
    use_home(home)
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWM_LLM__OFFLINE_LATENCY_S": "0.05"}
    log = open(home / "child.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(ledger_lines(home).values()) >= 30:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{(home / 'child.log').read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_group(proc)
        log.close()
    killed = ledger_lines(home)
    assert len(killed) == 1 and FULL_RUN_CALLS > sum(killed.values()) >= 30
    from flows.generate import run_generate

    summary = run_generate(scenarios=3, concurrency=3, skip_existing=False)
    yield {"home": home, "killed": killed, "summary": summary}
    os.environ.clear()
    os.environ.update(old_env)
    from awm_core.settings import get_settings

    get_settings.cache_clear()


def test_resume_after_sigkill_redoes_only_unfinished_work(resumed):
    ((killed_run, killed_calls),) = resumed["killed"].items()  # the fixture asserts exactly one killed run
    summary = resumed["summary"]
    new_calls = ledger_lines(resumed["home"])[summary["run_id"]]
    # Stages finished before the kill came from the cache; at most the in-flight ones (one
    # per worker thread) were asked again.
    assert new_calls < FULL_RUN_CALLS
    assert killed_calls + new_calls >= FULL_RUN_CALLS
    assert new_calls <= FULL_RUN_CALLS - killed_calls + 3 * 3
    runs = {r["run_id"]: r for r in catalog_rows("SELECT run_id, status, message FROM generation_runs")}
    assert runs[summary["run_id"]]["status"] == "completed"
    assert runs[killed_run]["status"] == "failed" and "died" in runs[killed_run]["message"]
    # The killed run's calls were published too (every attempt is in llm_calls).
    n = catalog_rows(f"SELECT count(*) AS n FROM llm_calls WHERE run_id = '{killed_run}'")[0]["n"]
    assert n == killed_calls


def test_flow_publishes_three_fully_validated_environments_with_repairs(resumed):
    summary = resumed["summary"]
    assert summary["status"] == "completed" and sorted(summary["published"]) == ["clinic_booking", "recipe_box",
                                                                                   "team_expenses"]
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        envs = {e.id: e for e in cat.environments(snapshot=summary["snapshot"])}
    assert set(envs) == {"recipe_box", "clinic_booking", "team_expenses"}
    for env in envs.values():
        assert env.validation.passed and not env.validation.dropped_tasks
        assert len(env.tasks) == 10 and len(env.verifiers) == 10 and len(env.solutions) == 10
        names = {(c.name, c.task_idx) for c in env.validation.checks if c.passed}
        assert all(("verifier_solution", i) in names and ("verifier_noop", i) in names
                   and ("replay_determinism", i) in names for i in range(10))
        assert env.provenance.run_id and env.provenance.stages["schema"].prompt_tokens > 0
        # Every task is playable as a conversation: a user scenario each, the agent's policy, and the
        # scripted user with the reference solution verified complete.
        assert all(t.user_scenario and t.user_prompt for t in env.tasks) and env.policy
        assert all(("user_scenario", i) in names for i in range(10))
    assert summary["user_scenarios"] == {"clinic_booking": 10, "recipe_box": 10, "team_expenses": 10}
    rows = catalog_rows("SELECT scenario_id, stage, attempt, error FROM llm_calls")
    second = {(r["scenario_id"], r["stage"]) for r in rows if r["attempt"] == 2}
    assert PLANNED_REPAIRS <= second
    rejected = {(r["scenario_id"], r["stage"]) for r in rows if r["attempt"] == 1 and r["error"]}
    assert PLANNED_REPAIRS <= rejected
    assert envs["clinic_booking"].provenance.stages["verifier.3"].attempts == 2
    assert "no-op" in envs["clinic_booking"].provenance.stages["verifier.3"].errors[0]
    assert envs["team_expenses"].provenance.stages["solution.4"].attempts == 2
    assert summary["accounting"]["asked"] == 3 and summary["accounting"]["published"] == 3
    assert summary["accounting"]["not_made"] == 0
    scen_drops = {d["name"]: d["reason"] for d in summary["scenario_drops"]}
    assert scen_drops["Live Weather Feed"] == "not stateful" and "near-duplicate" in scen_drops["Recipe Keeper"]
    # The summary artifacts are on the server, for the UI.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["generate-summary", "generate-environments"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[summary["flow_run_id"]])))
    by_key = {a.key: a for a in arts}
    md = by_key["generate-summary"].data
    assert "| recipe_box | published | 10 | code +1, schema +1 |" in md and "data:image/png;base64," in md
    assert len(by_key["generate-environments"].data) > 0


def test_rerun_hits_the_cache_and_publishes_no_duplicates(resumed):
    from flows.generate import run_generate

    summary = run_generate(scenarios=3, concurrency=3, skip_existing=False)
    assert summary["status"] == "completed" and summary["llm_calls"] == 0
    counts = catalog_rows("SELECT env_id, count(*) AS n FROM environments GROUP BY env_id")
    assert sorted((r["env_id"], r["n"]) for r in counts) == [("clinic_booking", 1), ("recipe_box", 1),
                                                              ("team_expenses", 1)]
    # Without --include-existing the nightly run skips what the catalog already has.
    skipped = run_generate(scenarios=["recipe_box"], concurrency=1)
    assert skipped["published"] == [] and skipped["scenario_drops"][0]["reason"] == "already in the catalog"
    assert skipped["accounting"] == {"asked": 1, "regenerated": 0, "published": 0, "dropped": 0, "skipped": 1,
                                     "not_made": 0, "not_made_reason": ""}


def test_budget_cap_stops_cleanly_and_publishes_what_was_validated(prefect_server, awm_home):
    from flows.generate import run_generate

    summary = run_generate(scenarios=["clinic_booking", "recipe_box"], concurrency=1, budget_usd=0.17)
    assert summary["status"] == "budget_exceeded" and "budget" in summary["message"]
    assert summary["published"] == ["clinic_booking"]
    assert summary["dropped"]["recipe_box"].startswith("LLM budget exhausted")
    assert summary["accounting"] == {"asked": 2, "regenerated": 0, "published": 1, "dropped": 1, "skipped": 0,
                                     "not_made": 0, "not_made_reason": ""}
    run = catalog_rows(f"SELECT status, envs_published FROM generation_runs WHERE run_id = '{summary['run_id']}'")
    assert run == [{"status": "budget_exceeded", "envs_published": 1}]


UNSAT_REPLY = '''```python
def verify(initial_db, final_db, final_answer):
    return {"verdict": "incomplete", "evidence": {"planted": "never satisfied"}}
```'''


def test_unsatisfiable_verifier_is_regenerated_or_its_task_dropped(prefect_server, awm_home, tmp_path, monkeypatch):
    """verifier.4 starts unsatisfiable (passes the no-op check): the solution fails against it,
    so the verifier is regenerated and the task kept. verifier.5 stays unsatisfiable: task 5
    is dropped and recorded, the environment is still published."""
    import shutil

    from awm_core.settings import DEFAULT_FIXTURES, get_settings
    from flows.generate import run_generate

    fixtures = tmp_path / "fixtures"
    shutil.copytree(DEFAULT_FIXTURES / "team_expenses", fixtures / "team_expenses")

    def rewrite(name, contents):
        path = fixtures / "team_expenses" / f"{name}.json"
        data = json.loads(path.read_text())
        good = data["attempts"][-1]
        data["attempts"] = [dict(good, content=c) if c is not None else good for c in contents]
        path.write_text(json.dumps(data))

    rewrite("verifier.4", [UNSAT_REPLY, None])
    rewrite("verifier.5", [UNSAT_REPLY])
    rewrite("solution.4", [None])  # only the good solution: the verifier is what is wrong
    monkeypatch.setenv("AWM_GENERATION__STAGE_RETRIES", "1")
    get_settings.cache_clear()
    summary = run_generate(scenarios=["team_expenses"], concurrency=1, fixtures_dir=str(fixtures))
    assert summary["published"] == ["team_expenses"]
    assert list(summary["dropped_tasks"]["team_expenses"]) == [5]
    assert "verifier" in summary["dropped_tasks"]["team_expenses"][5] or "solution" in summary["dropped_tasks"]["team_expenses"][5]
    rows = catalog_rows("SELECT stage, attempt, error FROM llm_calls WHERE stage IN ('verifier.4', 'solution.4', "
                        "'verifier.5', 'solution.5') ORDER BY stage, attempt")
    attempts = {}
    for r in rows:
        attempts.setdefault(r["stage"], []).append((r["attempt"], r["error"] is None))
    # solution.4: attempts 1-2 rejected by the planted verifier; verifier.4 regenerated as
    # attempt 2 (the recorded good one); solution.4 attempt 3 then passes.
    assert attempts["verifier.4"] == [(1, True), (2, True)]
    assert attempts["solution.4"] == [(1, False), (2, False), (3, True)]
    assert [a for a, _ in attempts["verifier.5"]] == [1, 2] and not any(ok for _, ok in attempts["solution.5"])
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        env = cat.get_environment("team_expenses")
    assert [t.idx for t in env.tasks] == [0, 1, 2, 3, 4, 6, 7, 8, 9] and env.validation.dropped_tasks.keys() == {5}
    assert "never satisfied" in env.validation.dropped_tasks[5] or "incomplete" in env.validation.dropped_tasks[5]


def test_a_repaired_scenario_stage_counts_in_the_repairs(prefect_server, awm_home, tmp_path, capsys):
    """The run-wide scenario stage is retried like the others, and the summary says so."""
    import shutil

    from awm_core.settings import DEFAULT_FIXTURES, get_settings
    from flows.commands.generate import print_summary
    from flows.generate import run_generate

    fixtures = tmp_path / "fixtures"
    shutil.copytree(DEFAULT_FIXTURES, fixtures)
    path = fixtures / "_" / "scenario.json"
    data = json.loads(path.read_text())
    data["attempts"] = [dict(data["attempts"][0], content="this is not JSON"), data["attempts"][0]]
    path.write_text(json.dumps(data))
    get_settings.cache_clear()
    summary = run_generate(scenarios=1, concurrency=1, fixtures_dir=str(fixtures), publish=False)
    assert summary["repairs"].get("scenario") == 1, summary["repairs"]
    print_summary(summary)
    assert "scenario 1" in capsys.readouterr().out


def _without_damage_check(content: str) -> str:
    """A recorded verifier without its check that no table outside its task changed (the
    ``if set(changes) - {...}:`` block over ``db_changes``): it still checks the task's own rows."""
    lines = content.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("if set(changes) - {"))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and len(lines[end]) - len(lines[end].lstrip()) > indent:
        end += 1
    body = "".join(lines[:start] + lines[end:])
    assert body != content and "set(changes)" not in body
    return body


def test_a_lenient_verifier_is_regenerated_with_the_mutation_or_its_task_dropped(prefect_server, awm_home, tmp_path,
                                                                                   monkeypatch):
    """verifier.2 first misses damage outside its tables (the extra_destructive mutation fools
    it): it is regenerated, told which mutation, and the task kept. verifier.4 stays lenient:
    task 4 is dropped, its reason naming the mutation."""
    import shutil

    from awm_core.settings import DEFAULT_FIXTURES, get_settings
    from flows.generate import run_generate

    fixtures = tmp_path / "fixtures"
    shutil.copytree(DEFAULT_FIXTURES / "team_expenses", fixtures / "team_expenses")
    for name, keep_good in (("verifier.2", True), ("verifier.4", False)):
        path = fixtures / "team_expenses" / f"{name}.json"
        data = json.loads(path.read_text())
        good = data["attempts"][-1]
        lenient = dict(good, content=_without_damage_check(good["content"]))
        data["attempts"] = [lenient, good] if keep_good else [lenient]
        path.write_text(json.dumps(data))
    monkeypatch.setenv("AWM_GENERATION__STAGE_RETRIES", "1")
    get_settings.cache_clear()
    summary = run_generate(scenarios=["team_expenses"], concurrency=1, fixtures_dir=str(fixtures))
    assert summary["published"] == ["team_expenses"]
    assert list(summary["dropped_tasks"]["team_expenses"]) == [4]
    rows = catalog_rows("SELECT stage, attempt FROM llm_calls WHERE stage IN ('verifier.2', 'solution.2') "
                        "ORDER BY stage, attempt")
    assert [(r["stage"], r["attempt"]) for r in rows] == [("solution.2", 1), ("solution.2", 2), ("verifier.2", 1),
                                                          ("verifier.2", 2)]
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        env = cat.get_environment("team_expenses")
    assert 2 in {t.idx for t in env.tasks} and 4 not in {t.idx for t in env.tasks}
    reason = env.validation.dropped_tasks[4]
    assert reason.startswith("verifier_mutation: the verifier said \"complete\" after extra_destructive"), reason
    kept = [c for c in env.validation.checks if c.task_idx == 2 and c.name == "verifier_mutation"]
    assert kept and all(c.passed for c in kept)

"""One LLM budget for a whole run across processes: the spend ledger in PostgreSQL (llm.budget_dsn)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from awm_core.errors import BudgetExceeded, LLMError
from awm_core.llm import LLMClient
from awm_core.llm.offline import write_fixture
from awm_core.llm.records import Budget
from awm_core.llm.shared_budget import SharedBudget, connect_kwargs, describe, run_budget
from awm_core.settings import load_settings
from flows.server import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "budget_worker.py"
PRICE = (1000 * 0.4 + 2000 * 1.6) / 1e6  # one recorded reply at the awm-offline prices


def test_workers_in_two_processes_share_one_cap(postgres, pg_database, awm_home, tmp_path):
    dsn = pg_database("budget")
    fixtures = tmp_path / "fixtures"
    for name in ("w1", "w2"):
        write_fixture(fixtures, name, "tasks", [{"content": "x" * 40, "prompt_tokens": 1000, "completion_tokens": 2000}])
    per_worker, cap = 20, 20 * PRICE  # the two workers want twice what the cap allows
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWM_LLM__BUDGET_DSN": dsn, "AWM_LLM__BUDGET_USD": repr(cap),
           "AWM_LLM__FIXTURES_DIR": str(fixtures), "AWM_LLM__CACHE": "false", "AWM_LLM__OFFLINE_LATENCY_S": "0.05",
           # a reservation close to the real cost (the prompt estimate runs low: a reply may cost more)
           "AWM_LLM__GENERATOR__MAX_TOKENS": "2000"}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(WORKER), name, "run-1", str(per_worker), str(go)], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("w1", "w2")]
    try:
        go.touch()
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    print("calls per worker:", [r["made"] for r in results])

    ledger = SharedBudget(dsn, "run-1", cap)
    try:
        spent, reserved = ledger.spent_usd, ledger.reserved_usd
    finally:
        ledger.close()
    assert spent == pytest.approx(sum(r["cost"] for r in results))
    assert cap <= spent + 1e-12 and spent <= cap + 2 * PRICE  # the bound: cap + workers x one call
    assert reserved == pytest.approx(0.0)
    assert all(r["made"] > 0 and r["stopped"] and r["refused_after"] for r in results), results
    assert 19 <= sum(r["made"] for r in results) <= 22  # about half of the 40 calls wanted
    assert "shared by all its workers" in results[0]["message"]


def test_a_failed_call_gives_its_reservation_back(postgres, pg_database, awm_home, tmp_path):
    settings = load_settings()
    settings.llm.fixtures_dir = tmp_path / "no-fixtures"  # every offline call fails: no recording
    budget = SharedBudget(pg_database("refund"), "run-2", cap_usd=1.0)
    try:
        client = LLMClient.for_role(settings, "generator", budget=budget)
        with pytest.raises(LLMError):
            client.chat([{"role": "user", "content": "hi"}], stage="tasks", scenario_id="s", attempt=1)
        assert (budget.spent_usd, budget.reserved_usd) == (0.0, 0.0)
    finally:
        budget.close()


def test_unreachable_budget_database_refuses_the_call_and_hides_the_password(awm_home):
    dsn = f"dbname=awm host=127.0.0.1 port={free_port()} user=awm password=hunter2-secret"
    budget = SharedBudget(dsn, "run-3", cap_usd=1.0, connect_timeout_s=2)
    try:
        with pytest.raises(LLMError, match=r"shared LLM budget at 127\.0\.0\.1:\d+/awm \(llm.budget_dsn\) cannot be "
                                            r"used: .*no LLM call is made without it") as err:
            budget.reserve(0.01)
        assert "hunter2" not in str(err.value) and not isinstance(err.value, BudgetExceeded)
    finally:
        budget.close()


def test_dsn_forms_and_the_default_per_process_budget(awm_home, monkeypatch):
    assert connect_kwargs("dbname=a host=h port=6543 user=u password=p") == \
        {"database": "a", "host": "h", "port": 6543, "user": "u", "password": "p"}
    assert describe("postgresql://u:p@db.internal:6543/spend") == "db.internal:6543/spend"
    with pytest.raises(LLMError, match="cannot read 'sslmode'"):
        connect_kwargs("dbname=a sslmode=require")
    assert isinstance(run_budget(load_settings(), "r"), Budget)
    monkeypatch.setenv("AWM_LLM__BUDGET_DSN", "postgresql://u:p@db.internal/spend")
    settings = load_settings()
    assert isinstance(run_budget(settings, "r"), SharedBudget)
    assert "u:p@" not in json.dumps(settings.masked())


def test_a_settle_that_cannot_reach_the_ledger_keeps_the_reply(awm_home, tmp_path):
    class LostAfterReserve(Budget):
        def settle(self, hold, cost_usd, called=True):
            raise LLMError("the shared LLM budget at db:5432/x (llm.budget_dsn) cannot be used: gone")

    fixtures = tmp_path / "fixtures"
    write_fixture(fixtures, "s", "tasks", [{"content": "ok", "prompt_tokens": 1000, "completion_tokens": 2000}])
    settings = load_settings()
    settings.llm.fixtures_dir, settings.llm.cache = fixtures, False
    ledger = tmp_path / "calls.jsonl"
    client = LLMClient.for_role(settings, "generator", budget=LostAfterReserve(cap_usd=1.0), ledger=ledger)
    out = client.chat([{"role": "user", "content": "hi"}], stage="tasks", scenario_id="s", attempt=1)
    assert out.content == "ok" and out.record.cost_usd == pytest.approx(PRICE)
    from awm_core.llm import read_ledger

    assert read_ledger(ledger) == [out.record]

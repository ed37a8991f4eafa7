"""LLMClient: structured output, accounting, ledger, cache, budget, offline backend, and the
http backend through the real openai client against the local fixture server."""
from __future__ import annotations

import json

import pytest

from awm_core.errors import BudgetExceeded, LLMError
from awm_core.llm import Budget, LLMClient, StructuredOutputError, read_ledger
from awm_core.llm.fixture_server import FixtureServer
from awm_core.llm.offline import write_fixture
from awm_core.models import DbSchema
from awm_core.settings import load_settings

SCHEMA = {"tables": [{"name": "recipes", "ddl": "CREATE TABLE recipes (id INTEGER PRIMARY KEY, title TEXT)",
                      "indexes": ["CREATE INDEX ix_title ON recipes(title)"]}]}
MESSAGES = [{"role": "system", "content": "You design SQLite schemas."},
            {"role": "user", "content": "Schema for a recipe box, as JSON."}]


@pytest.fixture
def fixtures(tmp_path):
    d = tmp_path / "fixtures"
    write_fixture(d, "recipe_box", "schema", [
        {"content": "```json\n" + json.dumps(SCHEMA, indent=1) + "\n```", "prompt_tokens": 1000,
         "completion_tokens": 2000},
    ])
    return d


@pytest.fixture
def settings(awm_home, fixtures):
    s = load_settings()
    s.llm.fixtures_dir = fixtures
    s.llm.backoff_base_s = 0.01
    s.llm.max_http_retries = 2
    return s


@pytest.fixture
def server(fixtures):
    with FixtureServer(fixtures, timeout_sleep_s=5) as srv:
        yield srv


@pytest.fixture
def http_settings(settings, server):
    settings.llm.generator = server.role_settings(timeout_s=1.0)
    return settings


def call(client, **kw):
    args = dict(stage="schema", scenario_id="recipe_box", attempt=1)
    args.update(kw)
    return client.structured(MESSAGES, DbSchema, **args)


# ---------------------------------------------------------------- structured output (offline backend)


def test_llm_structured_round_trip_and_accounting(settings, tmp_path):
    ledger = tmp_path / "run" / "llm_calls.jsonl"
    client = LLMClient.for_role(settings, "generator", ledger=ledger, run_id="r1")
    out = call(client)
    assert out.value == DbSchema.from_data(SCHEMA)
    rec = out.record
    assert (rec.role, rec.stage, rec.scenario_id, rec.attempt, rec.run_id) == ("generator", "schema", "recipe_box", 1, "r1")
    assert (rec.prompt_tokens, rec.completion_tokens, rec.cached, rec.error) == (1000, 2000, False, None)
    price = settings.llm.prices["awm-offline"]
    assert rec.cost_usd == pytest.approx((1000 * price.prompt_per_mtok + 2000 * price.completion_per_mtok) / 1e6)
    assert read_ledger(ledger) == [rec]


def test_llm_invalid_reply_names_the_field_for_repair(settings, fixtures, tmp_path):
    bad = {"tables": [{"name": "recipes", "indexes": "not a list"}]}
    write_fixture(fixtures, "recipe_box", "schema", [json.dumps(bad)])
    ledger = tmp_path / "calls.jsonl"
    client = LLMClient.for_role(settings, "generator", ledger=ledger)
    with pytest.raises(StructuredOutputError) as info:
        call(client)
    err = info.value
    assert "DbSchema" in err.message
    assert any(p.startswith("tables.0.ddl:") for p in err.problems), err.problems
    assert any(p.startswith("tables.0.indexes:") for p in err.problems), err.problems
    assert "tables.0.ddl" in err.record.error
    assert err.content == json.dumps(bad)
    [logged] = read_ledger(ledger)
    assert logged.call_id == err.record.call_id and "tables.0.ddl" in logged.error


def test_llm_json_syntax_error_says_where(settings, fixtures):
    write_fixture(fixtures, "recipe_box", "schema", ['{"tables": [\n  {"name": "recipes" "ddl": "x"}\n]}'])
    with pytest.raises(StructuredOutputError) as info:
        call(LLMClient.for_role(settings, "generator"))
    msg = info.value.message
    assert "not valid JSON" in msg and "line 2, column 22" in msg
    assert '{"name": "recipes" "ddl": "x"}' in msg  # the snippet the model gets to see


def test_llm_truncated_reply_is_rejected_not_repaired(settings, fixtures):
    # Even a reply whose text happens to parse must not be used once it was cut at the token limit.
    write_fixture(fixtures, "recipe_box", "schema", [
        {"content": json.dumps(SCHEMA), "finish_reason": "length", "completion_tokens": 16000}])
    with pytest.raises(StructuredOutputError) as info:
        call(LLMClient.for_role(settings, "generator"))
    assert "finish_reason=length" in info.value.message


def test_llm_offline_attempt_selection_and_missing_fixture(settings, fixtures, tmp_path):
    write_fixture(fixtures, "_", "scenario", ["first", {"content": "second", "completion_tokens": 7}])
    ledger = tmp_path / "calls.jsonl"
    client = LLMClient.for_role(settings, "generator", ledger=ledger)
    got = [client.chat(MESSAGES, stage="scenario", scenario_id=None, attempt=n) for n in (1, 2, 5)]
    assert [r.content for r in got] == ["first", "second", "second"]
    assert got[0].record.completion_tokens == 2  # estimated from "first" when the recording has no count
    assert got[0].record.prompt_tokens > 0
    assert got[1].record.completion_tokens == 7
    assert got[0].record.scenario_id == "_"

    with pytest.raises(LLMError) as info:
        client.chat(MESSAGES, stage="tasks", scenario_id="recipe_box", attempt=1)
    assert str(fixtures / "recipe_box" / "tasks.json") in str(info.value)
    assert info.value.record.error and "tasks.json" in info.value.record.error
    assert len(read_ledger(ledger)) == 4


def test_llm_offline_cache_follows_fixture_edits(settings, fixtures):
    client = LLMClient.for_role(settings, "generator")
    write_fixture(fixtures, "_", "scenario", ["one"])
    assert client.chat(MESSAGES, stage="scenario", scenario_id=None, attempt=1).content == "one"
    again = client.chat(MESSAGES, stage="scenario", scenario_id=None, attempt=1)
    assert again.record.cached and again.content == "one"
    write_fixture(fixtures, "_", "scenario", ["two"])
    edited = client.chat(MESSAGES, stage="scenario", scenario_id=None, attempt=1)
    assert (edited.content, edited.record.cached) == ("two", False)


# ---------------------------------------------------------------- http backend via the fixture server


def test_llm_http_round_trip_sends_keys_as_headers(http_settings, server):
    out = call(LLMClient.for_role(http_settings, "generator"), attempt=3)
    assert out.value == DbSchema.from_data(SCHEMA)
    assert (out.record.prompt_tokens, out.record.completion_tokens) == (1000, 2000)
    [seen] = server.chat_requests()
    assert (seen.stage, seen.scenario, seen.attempt, seen.model, seen.status) == (
        "schema", "recipe_box", 3, "awm-offline", 200)


def test_llm_http_429_then_success_is_retried(http_settings, server, tmp_path):
    server.script("429", "ok")
    ledger = tmp_path / "calls.jsonl"
    out = call(LLMClient.for_role(http_settings, "generator", ledger=ledger))
    assert out.value.tables[0].name == "recipes"
    assert [r.status for r in server.chat_requests()] == [429, 200]
    failed, ok = read_ledger(ledger)
    assert "HTTP 429" in failed.error and "retrying" in failed.error and failed.cost_usd == 0
    assert ok.error is None and ok.call_id == out.record.call_id


def test_llm_http_500s_exhausted_raise_with_record(http_settings, server, tmp_path):
    server.script("500", "500", "500")
    ledger = tmp_path / "calls.jsonl"
    with pytest.raises(LLMError) as info:
        call(LLMClient.for_role(http_settings, "generator", ledger=ledger))
    assert "HTTP 500" in info.value.record.error and "gave up after 3 tries" in info.value.record.error
    records = read_ledger(ledger)
    assert len(records) == 3 and all("HTTP 500" in r.error for r in records)
    assert records[-1].call_id == info.value.record.call_id


def test_llm_http_timeout_is_retried(http_settings, server, tmp_path):
    http_settings.llm.generator.timeout_s = 0.5
    server.script("timeout", "ok")
    ledger = tmp_path / "calls.jsonl"
    out = call(LLMClient.for_role(http_settings, "generator", ledger=ledger))
    assert out.record.error is None
    first, _ = read_ledger(ledger)
    assert "timed out after 0.5s" in first.error


def test_llm_http_truncated_and_malformed_faults_are_errors(http_settings, server):
    client = LLMClient.for_role(http_settings, "generator")
    server.script("truncated", "malformed")
    with pytest.raises(StructuredOutputError) as truncated:
        call(client, attempt=1)
    assert "finish_reason=length" in truncated.value.message
    with pytest.raises(StructuredOutputError) as malformed:
        call(client, attempt=2)
    assert "not valid JSON" in malformed.value.message


def test_llm_http_tool_calls_are_returned(http_settings, fixtures, server):
    write_fixture(fixtures, "recipe_box", "rollout.0", [{"content": "", "tool_calls": [
        {"function": {"name": "create_recipe", "arguments": {"title": "Soup"}}}]}])
    tools = [{"type": "function", "function": {"name": "create_recipe", "description": "Add a recipe",
              "parameters": {"type": "object", "properties": {"title": {"type": "string"}}}}}]
    res = LLMClient.for_role(http_settings, "generator").chat(
        MESSAGES, stage="rollout.0", scenario_id="recipe_box", attempt=1, tools=tools)
    assert res.finish_reason == "tool_calls"
    [tc] = res.tool_calls
    assert tc["function"]["name"] == "create_recipe" and json.loads(tc["function"]["arguments"]) == {"title": "Soup"}
    assert tc["type"] == "function" and tc["id"]


def test_llm_cache_hit_costs_nothing_and_skips_the_server(http_settings, server):
    budget = Budget(cap_usd=10.0)
    client = LLMClient.for_role(http_settings, "generator", budget=budget)
    first = call(client)
    spent = budget.spent_usd
    second = call(LLMClient.for_role(http_settings, "generator", budget=budget))  # a rerun: new client
    assert (first.record.cached, second.record.cached) == (False, True)
    assert first.record.cost_usd > 0 and second.record.cost_usd == 0
    assert second.value == first.value
    assert len(server.chat_requests()) == 1
    assert budget.spent_usd == spent
    call(client, attempt=2)  # a different key reaches the server
    assert len(server.chat_requests()) == 2


def test_llm_budget_cap_stops_the_run_before_the_call(http_settings, fixtures, server, tmp_path):
    http_settings.llm.cache = False
    # 1M prompt tokens at the awm-offline price ($0.40/Mtok) = $0.40 per call.
    write_fixture(fixtures, "recipe_box", "schema",
                  [{"content": json.dumps(SCHEMA), "prompt_tokens": 1_000_000, "completion_tokens": 0}])
    budget = Budget(cap_usd=1.0)
    ledger = tmp_path / "calls.jsonl"
    client = LLMClient.for_role(http_settings, "generator", budget=budget, ledger=ledger)
    for attempt in (1, 2, 3):  # 0.0 -> 0.4 -> 0.8 -> 1.2: the third still starts below the cap
        call(client, attempt=attempt)
    with pytest.raises(BudgetExceeded) as info:
        call(client, attempt=4)
    assert "$1.2000 of the $1.0000 cap" in str(info.value)
    assert len(server.chat_requests()) == 3
    records = read_ledger(ledger)
    assert [r.error is None for r in records] == [True, True, True, False]
    assert "budget exceeded" in records[-1].error and records[-1].cost_usd == 0
    assert budget.spent_usd == pytest.approx(1.2)


def test_llm_ledger_holds_every_call(http_settings, server, tmp_path):
    ledger = tmp_path / "calls.jsonl"
    client = LLMClient.for_role(http_settings, "generator", ledger=ledger, run_id="run-7")
    returned = [call(client).record]                       # success
    returned.append(call(client).record)                   # cache hit
    server.script("malformed")
    with pytest.raises(StructuredOutputError) as parse_failure:
        call(client, attempt=2)
    returned.append(parse_failure.value.record)
    server.script("500", "500", "500")
    with pytest.raises(LLMError) as transport:
        call(client, attempt=3)
    returned.append(transport.value.record)
    records = read_ledger(ledger)
    assert len(records) == 6  # 4 calls + 2 retried transport tries
    ids = [r.call_id for r in records]
    assert all(r.call_id in ids for r in returned)
    assert [r.cached for r in records][:2] == [False, True]
    assert all(r.run_id == "run-7" for r in records)


def test_llm_record_dir_replays_offline(http_settings, server, tmp_path):
    http_settings.llm.record_dir = tmp_path / "recorded"
    live = call(LLMClient.for_role(http_settings, "generator"), attempt=2)
    replay = load_settings()
    replay.llm.fixtures_dir = tmp_path / "recorded"
    replay.llm.cache = False
    again = call(LLMClient.for_role(replay, "generator"), attempt=2)
    assert again.value == live.value
    assert (again.record.prompt_tokens, again.record.completion_tokens) == (1000, 2000)


def test_llm_read_ledger_skips_a_torn_last_line(settings, tmp_path):
    ledger = tmp_path / "calls.jsonl"
    client = LLMClient.for_role(settings, "generator", ledger=ledger)
    rec = call(client).record
    with open(ledger, "a") as fh:
        fh.write('{"call_id": "abc", "role": "gen')  # what a SIGKILL mid-write leaves
    assert read_ledger(ledger) == [rec]


def test_llm_seeded_fault_rate_is_reproducible(fixtures):
    def draws(seed):
        with FixtureServer(fixtures, fault_rate=0.5, faults="429,500,malformed", seed=seed) as srv:
            return [srv._next_fault() for _ in range(40)]

    a, b = draws(3), draws(3)
    assert a == b
    assert {f for f in a} == {None, "429", "500", "malformed"}


def test_llm_concurrent_calls_share_budget_and_ledger(settings, fixtures, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    settings.llm.cache = False
    for i in range(4):
        write_fixture(fixtures, f"s{i}", "tasks", [{"content": "x" * 400, "prompt_tokens": 1000 + i}])
    budget = Budget(cap_usd=100.0)
    ledger = tmp_path / "calls.jsonl"
    client = LLMClient.for_role(settings, "generator", budget=budget, ledger=ledger)
    jobs = [(f"s{i % 4}", 1 + i // 4) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: client.chat(MESSAGES, stage="tasks", scenario_id=j[0], attempt=j[1]), jobs))
    records = read_ledger(ledger)
    assert len(records) == 40 and len({r.call_id for r in records}) == 40
    assert budget.spent_usd == pytest.approx(sum(r.record.cost_usd for r in results))
    assert sorted(r.prompt_tokens for r in records) == sorted(1000 + int(s[1:]) for s, _ in jobs)


def test_llm_http_backend_without_endpoint_is_a_clear_error(settings):
    settings.llm.judge.backend = "http"
    settings.llm.judge.base_url = None
    settings.llm.judge.api_key = None
    with pytest.raises(LLMError, match="AWM_LLM__JUDGE__BASE_URL"):
        LLMClient.for_role(settings, "judge").chat(MESSAGES, stage="judge", scenario_id="x", attempt=1)

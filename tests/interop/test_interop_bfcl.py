"""BFCL multi-turn as environments of the bfcl flavour, scored by BFCL's own checker.

The bfcl-eval wheel is downloaded without its dependencies (they clash with this project's; the
package is only read, and its backend code runs in the sandbox workers). Tests skip with the
reason when no package index is reachable.
"""
from __future__ import annotations

import json

import pytest

from awm_core.agent import ReferencePolicy, run_episode, verify_episode
from awm_core.agent.base import PolicyReply
from awm_core.interop import bfcl
from awm_core.models import ReferenceSolution, ToolCall
from awm_core.runtime import SandboxPool
from awm_core.settings import get_settings

from tests.conftest import BFCL_VERSION as VERSION


@pytest.fixture(scope="session")
def package(bfcl_wheel):
    return bfcl.locate(bfcl_wheel)


@pytest.fixture(scope="session")
def entries(package):
    """Every entry of the four categories, read once."""
    return bfcl.read_package(package)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(get_settings().sandbox) as p:
        yield p


def _entry(entries, entry_id: str):
    return next(e for e in entries.environments if e.scenario.extra["bfcl"]["id"] == entry_id)


def _score(pool, env, solution: ReferenceSolution):
    handle = pool.load(env)
    with handle.open_session() as session:
        episode = run_episode(ReferencePolicy(solution), session, env.task(0), handle.tools(), window=None)
    return episode, verify_episode(pool, env, 0, episode, get_settings())


def test_every_category_replays_its_ground_truth_through_the_runtime(entries, pool):
    """BFCL's checker passes every entry whose ground truth an agent can make: 200/200 base,
    miss_param and long_context; 199/200 miss_func (entry 49's ground truth calls ``tail`` two turns
    before BFCL shows it to the model)."""
    read = entries
    assert read.problems == [] and read.counts == {c: 200 for c in bfcl.CATEGORIES}
    passed = {c: 0 for c in bfcl.CATEGORIES}
    failed = []
    for env in read.environments:
        result = bfcl.replay_ground_truth(pool, env, get_settings())
        pool.unload(env)
        if result.passed:
            passed[env.scenario.extra["bfcl"]["category"]] += 1
        else:
            failed.append((env.id, result.detail))
    assert passed == {"base": 200, "miss_func": 199, "miss_param": 200, "long_context": 200}, failed
    assert [f[0] for f in failed] == ["bfcl_multi_turn_miss_func_49"] and "unknown tool 'tail'" in failed[0][1]


def test_a_wrong_file_name_or_amount_fails_and_extra_reads_pass(entries, pool):
    env = _entry(entries, "multi_turn_base_0")
    good = env.solution(0)
    assert good.calls[2].tool == "mv" and good.calls[2].arguments == {"source": "final_report.pdf", "destination": "temp"}
    _, outcome = _score(pool, env, good)
    assert outcome.verdict == "complete"

    # Another file name: the file system's state after turn 0 differs from the ground truth's.
    wrong = good.model_copy(deep=True)
    wrong.calls[2].arguments["source"] = "previous_report.pdf"
    _, outcome = _score(pool, env, wrong)
    assert outcome.verdict == "incomplete" and outcome.label == "agent_error"
    assert outcome.verifier_evidence["error_type"] == "multi_turn:instance_state_mismatch"

    # Extra read-only calls (pwd, ls) in every turn: BFCL's checker still passes.
    calls, ends = [], []
    for start, end in zip([0, *good.turn_ends], good.turn_ends):
        calls += [ToolCall(tool="pwd"), *good.calls[start:end], ToolCall(tool="ls", arguments={"a": True})]
        ends.append(len(calls))
    _, outcome = _score(pool, env, ReferenceSolution(task_idx=0, calls=calls, turn_ends=ends))
    assert outcome.verdict == "complete", outcome.verifier_evidence

    # A wrong amount: a trading entry whose ground truth places an order.
    trade = next(e for e in entries.environments
                 if any(c.tool == "place_order" for c in e.solution(0).calls))
    sol = trade.solution(0).model_copy(deep=True)
    order = next(c for c in sol.calls if c.tool == "place_order")
    order.arguments["amount"] = order.arguments["amount"] + 1
    _, outcome = _score(pool, trade, sol)
    assert outcome.verdict == "incomplete", (trade.id, order)


def test_the_meta_interface_is_scored_on_the_tools_it_ran(entries, pool):
    """BFCL's checker reads the environment calls (call_tool's inner tool), not the meta-tool names."""
    env = _entry(entries, "multi_turn_base_0")
    handle = pool.load(env)
    with handle.open_session() as session:
        episode = run_episode(ReferencePolicy(env.solution(0)), session, env.task(0), handle.tools(),
                              interface="meta", window=None)
    assert {c.name for t in episode.turns for c in t.calls} == {"list_tools", "call_tool"}
    outcome = verify_episode(pool, env, 0, episode, get_settings())
    assert outcome.verdict == "complete", outcome.verifier_evidence


class _Recorder:
    """Replays a solution and records the tool names it was offered before each reply."""

    def __init__(self, solution):
        self.inner = ReferencePolicy(solution)
        self.offered: list[set[str]] = []
        self.seen: list[list[dict]] = []

    def act(self, messages, tools) -> PolicyReply:
        self.offered.append({t["function"]["name"] for t in tools})
        self.seen.append(messages)
        return self.inner.act(messages, tools)


def test_miss_func_shows_a_held_out_function_only_from_its_turn(entries, pool):
    env = _entry(entries, "multi_turn_miss_func_0")
    task = env.task(0)
    hidden_turn = next(i for i, t in enumerate(task.follow_ups, 1) if t.tools_added)
    held = set(task.follow_ups[hidden_turn - 1].tools_added)
    assert task.follow_ups[hidden_turn - 1].text.startswith("I have updated some more functions")
    policy = _Recorder(env.solution(0))
    handle = pool.load(env)
    with handle.open_session() as session:
        episode = run_episode(policy, session, task, handle.tools(), window=1)
    starts = episode.user_turn_starts
    assert len(starts) == task.user_turns and episode.termination == "final_answer"
    for reply, offered in enumerate(policy.offered):
        turn = max(i for i, s in enumerate(starts) if s <= reply)
        assert (held <= offered) == (turn >= hidden_turn), (reply, turn)
        # With a window of one turn the user message being answered stays in view.
        users = [m["content"] for m in policy.seen[reply] if m["role"] == "user"]
        current = task.text if turn == 0 else task.follow_ups[turn - 1].text
        assert current in users
    assert verify_episode(pool, env, 0, episode, get_settings()).verdict == "complete"


def test_an_episode_cut_short_is_force_terminated(entries, pool):
    env = _entry(entries, "multi_turn_base_1")
    handle = pool.load(env)
    with handle.open_session() as session:
        episode = run_episode(ReferencePolicy(env.solution(0)), session, env.task(0), handle.tools(), max_turns=1)
    assert episode.termination == "max_turns"
    outcome = verify_episode(pool, env, 0, episode, get_settings())
    assert outcome.verdict == "incomplete"
    assert outcome.verifier_evidence["error_type"] == "multi_turn:force_terminated"


def test_locate_and_categories_say_what_is_wrong(tmp_path, bfcl_wheel):
    with pytest.raises(bfcl.BfclError, match="no BFCL package at"):
        bfcl.locate(tmp_path / "missing.whl")
    (tmp_path / "x.whl").write_text("not a zip")
    with pytest.raises(bfcl.BfclError, match="not a wheel"):
        bfcl.locate(tmp_path / "x.whl")
    with pytest.raises(bfcl.BfclError, match="unknown BFCL multi-turn category nope"):
        bfcl.parse_categories("base,nope")
    assert bfcl.locate(bfcl_wheel).version == VERSION


@pytest.mark.slow
def test_cli_import_eval_and_train_on_bfcl(awm_home, bfcl_wheel, prefect_server, capsys):
    from flows.cli import main
    from storage.catalog import Catalog

    assert main(["import", "bfcl", "--wheel", str(bfcl_wheel), "--categories", "base,miss_param",
                 "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "| base | 3 | 3/3 |" in out and "| miss_param | 3 | 3/3 |" in out
    with Catalog.open(get_settings(), read_only=True) as cat:
        assert len(cat.environment_ids()) == 6
        rows = cat.rows("SELECT category, count(*) AS n FROM scenarios GROUP BY 1 ORDER BY 1")
    assert rows == [{"category": "bfcl_base", "n": 3}, {"category": "bfcl_miss_param", "n": 3}]

    # The gate leaves the benchmark out: BFCL's entries share backends and would fail its similarity rule.
    from flows.gate import derive, load_frames

    with Catalog.open(get_settings(), read_only=True) as cat:
        _, stats, _ = derive(load_frames(cat, cat.environment_snapshot()), get_settings())
    assert stats["benchmark_envs"] == 6 and stats["gated_envs"] == 0

    assert main(["eval", "--benchmark", "bfcl:base", "--policy", "reference", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["overall"]["episodes"] == 3
    assert summary["bfcl"]["columns"] == {"Multi Turn Base": {"passed": 3, "episodes": 3, "accuracy": 1.0}}
    # Curation never counts, regenerates or retires benchmark entries.
    assert main(["curate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["live_tasks"] == 0
    assert main(["eval", "--benchmark", "bfcl:nope"]) != 0
    assert "unknown BFCL multi-turn category nope" in capsys.readouterr().err

    assert main(["train", "--split", "bfcl:miss_param", "--set", "steps=1", "--set", "tasks_per_step=1",
                 "--set", "group_size=2", "--set", "max_turns=2"]) == 0
    assert "finished: 1 steps" in capsys.readouterr().out

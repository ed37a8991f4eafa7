"""awm validate / generate / demo command lines."""
from __future__ import annotations

import json

import pytest

from awm_core.models import ApiSpec, DbSchema, EnvCode, Environment, Scenario, SeedData, Task, Verifier
from flows.cli import build_parser, main

from test_pipeline_stages import CODE, SCHEMA, SEED, SPEC, TASK_TEXTS
from test_pipeline_validation import NOOP_PASSING, VERIFIER


def test_validate_awm1k_samples_reports_real_defects(awm1k_samples, awm_home, capsys):
    assert main(["validate", str(awm1k_samples)]) == 1
    out = capsys.readouterr().out
    assert ("| environment | schema | seed | tools ok | verifiers compile | verifiers run | no-op rejected | "
            "mutations rejected | equivalents accepted | passed | defects | not checkable |") in out
    not_checkable, defects = out.split("\nNot checkable (", 1)[1].split("\nDefects (", 1)
    # Defects present in the published dataset records: a SQL-mode verifier with unbalanced
    # brackets, and tools whose own spec examples crash their FastAPI handlers.
    assert "- e_commerce_33/2 [verifier_compile] awm1k_sql verifier of task 2 does not compile" in defects
    assert "- content_platform_1 [tool_example:get_channel_by_id]" in defects
    assert "- marketplace_1: schema, seed, tools and verifier runs: no database schema" in not_checkable
    # The dataset ships no reference solutions: nothing to derive wrong episodes from; its SQL-mode
    # verifiers only run (they have no verdict), so only the 3 pure-code ones can reject a no-op.
    assert "| e_commerce_33 | ok | ok | - | 5/6 | 2/2 | 3/3 | - | - | 12 | 1 | 3 |" in out
    assert ("- e_commerce_33: mutations of the awm1k_code verifiers of tasks 0, 1, 2: there is no reference solution "
            "to derive wrong episodes from") in not_checkable
    assert "e_commerce_33" not in defects.split("\n- content_platform_1", 1)[1]


def test_validate_json_lists_every_check(awm1k_samples, awm_home, capsys):
    main(["validate", str(awm1k_samples), "--json"])
    data = json.loads(capsys.readouterr().out)
    envs = {e["env_id"]: e for e in data["environments"]}
    ecom = envs["e_commerce_33"]
    assert not ecom["passed"] and {c["name"] for c in ecom["checks"]} >= {"schema", "seed", "verifier_compile",
                                                                          "verifier_noop"}
    assert envs["content_platform_1"]["checks"][0]["name"] == "schema"
    # Mutations that cannot run are not checks (neither passed nor failed): they are listed with why.
    assert not [c for c in ecom["checks"] if c["name"] == "verifier_mutation"]
    assert ecom["counts"] == {"passed": 12, "defects": 1, "not_checkable": 3}
    assert any(line.startswith("mutations of the awm1k_code verifiers of tasks 0, 1, 2") for line in ecom["not_checkable"])


def test_validate_catalog_finds_a_verifier_that_passes_a_noop(awm_home, capsys):
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    sc = Scenario.new("Note Pad", "Personal notes", "productivity")
    code_src = CODE.split("```python\n", 1)[1].rsplit("```", 1)[0]
    env = Environment(
        id=sc.id, scenario=sc, tasks=[Task(scenario_id=sc.id, idx=i, text=TASK_TEXTS[i]) for i in range(2)],
        db_schema=DbSchema.from_data(SCHEMA), seed_data=SeedData.from_data(SEED), api_spec=ApiSpec.from_data(SPEC),
        code=EnvCode(source=code_src),
        verifiers=[Verifier(task_idx=0, code=VERIFIER.split("\n", 1)[1].rsplit("```", 1)[0]),
                   Verifier(task_idx=1, code=NOOP_PASSING.split("\n", 1)[1].rsplit("```", 1)[0])])
    with Catalog.open(get_settings()) as cat, cat.publish(message="test") as pub:
        pub.add_environments([env])
    assert main(["validate"]) == 1
    out = capsys.readouterr().out
    assert "| note_pad | ok | ok | 3/3 | 2/2 | - | 1/2 | - | - | 8 | 1 | 1 |" in out
    assert "note_pad/1 [verifier_noop]" in out and "no-op episode" in out


def test_generate_and_demo_arguments():
    args = build_parser().parse_args(["generate", "-s", "recipe_box", "-s", "team_expenses", "-c", "2",
                                      "--budget-usd", "1.5", "--include-existing"])
    assert args.scenario == ["recipe_box", "team_expenses"] and args.concurrency == 2 and args.budget_usd == 1.5
    assert args.include_existing and args.func.__module__ == "flows.commands.generate"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "-n", "3", "-s", "recipe_box"])  # one or the other
    assert build_parser().parse_args(["demo"]).func.__module__ == "flows.commands.demo"


def test_named_scenarios_must_be_in_the_seed_list():
    from awm_core.errors import AWMError
    from flows.generate import resolve_named

    got = resolve_named(["Recipe Box", "team_expenses"], None)
    assert [s.id for s in got] == ["recipe_box", "team_expenses"] and got[0].description
    with pytest.raises(AWMError, match="not in the seed list: Moon Base"):
        resolve_named(["Moon Base"], None)


def test_an_option_prefix_is_refused_not_taken_for_another_option(capsys):
    parser = build_parser()
    assert parser.parse_args(["eval", "--model", "m"]).model == "m"
    assert parser.parse_args(["eval", "--mode", "conversation"]).mode == "conversation"
    with pytest.raises(SystemExit):  # would be taken as --model m
        parser.parse_args(["eval", "--mod", "m"])
    assert "awm eval: error:" in capsys.readouterr().err
    for argv, option in ((["generate", "--budget", "1"], "--budget 1"), (["catalog", "sql", "--snap", "1", "x"], "--snap")):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert f"unrecognized arguments: {option}" in capsys.readouterr().err

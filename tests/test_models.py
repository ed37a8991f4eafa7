"""Artifact models: JSON round trips, readable field errors, stable ids."""
import pytest

from awm_core.errors import ArtifactError
from awm_core.models import (
    ApiSpec, DbSchema, EnvCode, Environment, ParamSpec, ReferenceSolution, Scenario, SeedData,
    TableSchema, TableSeed, Task, ToolCall, ToolSpec, Verifier, parse_task_id, slugify, task_id,
)


def make_env() -> Environment:
    sc = Scenario.new("Tiny Notes", "A notes app.", category="productivity")
    return Environment(
        id=sc.id,
        scenario=sc,
        tasks=[Task(scenario_id=sc.id, idx=0, text="Create a note titled 'x'.")],
        db_schema=DbSchema(tables=[TableSchema(name="notes", ddl="CREATE TABLE notes (id INTEGER PRIMARY KEY, title TEXT)")]),
        seed_data=SeedData(tables=[TableSeed(table_name="notes", insert_statements=["INSERT INTO notes VALUES (1, 'a')"])]),
        api_spec=ApiSpec(tools=[ToolSpec(name="create_note", parameters={"title": ParamSpec(type="string", example="x")})]),
        code=EnvCode(source="def create_note(conn, title: str) -> dict:\n    return {}\n"),
        verifiers=[Verifier(task_idx=0, code="def verify(i, f, a):\n    return {'verdict': 'complete'}\n")],
        solutions=[ReferenceSolution(task_idx=0, calls=[ToolCall(tool="create_note", arguments={"title": "x"})])],
    )


def test_environment_round_trip_is_lossless():
    env = make_env()
    again = Environment.from_json(env.to_json())
    assert again == env
    assert again.digest() == env.digest()
    assert again.tasks[0].id == "tiny_notes/0"


def test_malformed_json_names_the_field():
    env = make_env().model_dump(mode="json")
    env["api_spec"]["tools"][0]["parameters"]["title"]["type"] = 5
    del env["tasks"][0]["text"]
    with pytest.raises(ArtifactError) as exc:
        Environment.from_data(env)
    msg = str(exc.value)
    assert "api_spec.tools.0.parameters.title.type" in msg
    assert "tasks.0.text" in msg


def test_unknown_field_is_rejected_by_name():
    with pytest.raises(ArtifactError, match="colour"):
        Scenario.from_data({"id": "a", "name": "A", "description": "d", "colour": "red"})


def test_not_json_at_all():
    with pytest.raises(ArtifactError, match="Environment"):
        Environment.from_json("{not json")


def test_slugs_are_stable_and_strict():
    assert slugify("Twitter / X  Clone!") == "twitter_x_clone"
    assert slugify("e_commerce_33") == "e_commerce_33"
    assert task_id("shop", 3) == "shop/3"
    assert parse_task_id("shop/3") == ("shop", 3)
    with pytest.raises(ArtifactError):
        parse_task_id("shop-3")
    with pytest.raises(ArtifactError):
        slugify("!!!")
    with pytest.raises(ArtifactError, match="slug"):
        Scenario.from_data({"id": "Not A Slug", "name": "n", "description": "d"})


def test_duplicate_tool_names_rejected():
    with pytest.raises(ArtifactError, match="duplicate tool names"):
        ApiSpec.from_data({"tools": [{"name": "a"}, {"name": "a"}]})


def test_tool_json_schema_and_examples():
    spec = ToolSpec(name="t", parameters={
        "q": ParamSpec(type="string", example="hi"),
        "limit": ParamSpec(type="integer", required=False, example=5),
    })
    schema = spec.json_schema()
    assert schema["required"] == ["q"]
    assert schema["properties"]["limit"] == {"type": "integer"}
    assert schema["additionalProperties"] is False
    assert spec.example_arguments() == {"q": "hi", "limit": 5}

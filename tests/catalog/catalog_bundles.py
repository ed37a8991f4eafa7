"""Small, clean Environment bundles for catalog and gate tests (built from awm_core models)."""
from __future__ import annotations

from awm_core.models import (
    ApiSpec, DbSchema, EnvCode, Environment, ParamSpec, Provenance, ReferenceSolution, Scenario, SeedData,
    TableSchema, TableSeed, Task, ToolCall, ToolSpec, ValidationCheck, ValidationReport, Verifier,
)

CODE = '''
def add_note(conn, title: str) -> dict:
    """Add a note.

    Args:
        title: the note title
    """
    cur = conn.execute("INSERT INTO notes (title) VALUES (?)", (title,))
    return {"id": cur.lastrowid}


def list_notes(conn) -> list:
    """List notes."""
    return [dict(id=r[0], title=r[1]) for r in conn.execute("SELECT id, title FROM notes")]
'''

VERIFY = '''
def verify(initial_db, final_db, final_answer):
    n0 = initial_db.execute("SELECT count(*) FROM notes").fetchone()[0]
    n1 = final_db.execute("SELECT count(*) FROM notes").fetchone()[0]
    return {"verdict": "complete" if n1 == n0 + 1 else "incomplete", "evidence": {"before": n0, "after": n1}}
'''


POLICY = "You help users keep notes. Confirm with the user before adding a note; never delete one."


def user_scenario(env_id: str, i: int) -> dict:
    """A tau2-style user scenario for task ``i`` (what the user simulator plays)."""
    return {"persona": None, "instructions": {
        "domain": env_id, "reason_for_call": f"You want a note titled 'n{i}' added.",
        "known_info": f"The title you want is 'n{i}'.", "unknown_info": "How many notes there are already.",
        "task_instructions": "Ask for the note, confirm when asked, and end the conversation once it is added."}}


def clean_env(env_id: str = "note_box", n_tasks: int = 3, category: str = "productivity",
              description: str = "Keep notes.", conversational: bool = True) -> Environment:
    """A bundle that passes the quality gate; ``conversational`` gives its tasks user scenarios
    and the environment an agent policy (what synthesized environments carry)."""
    tasks = [Task(scenario_id=env_id, idx=i, text=f"Add a note titled 'n{i}'.",
                  user_scenario=user_scenario(env_id, i) if conversational else None,
                  user_prompt=f"You are a user of {env_id}. Play your part." if conversational else None)
             for i in range(n_tasks)]
    checks = [ValidationCheck(name="schema", passed=True), ValidationCheck(name="seed", passed=True),
              ValidationCheck(name="tool_example", passed=True, tool="add_note"),
              ValidationCheck(name="tool_example", passed=True, tool="list_notes")]
    for i in range(n_tasks):
        checks.append(ValidationCheck(name="verifier_solution", passed=True, task_idx=i))
        checks.append(ValidationCheck(name="verifier_noop", passed=True, task_idx=i,
                                      detail="no-op run judged incomplete"))
    return Environment(
        id=env_id,
        scenario=Scenario(id=env_id, name=env_id.replace("_", " ").title(), description=description,
                          category=category),
        tasks=tasks,
        db_schema=DbSchema(tables=[TableSchema(name="notes", ddl="CREATE TABLE notes (id INTEGER PRIMARY KEY, title TEXT NOT NULL)")]),
        seed_data=SeedData(tables=[TableSeed(table_name="notes", insert_statements=["INSERT INTO notes (title) VALUES ('first')"])]),
        api_spec=ApiSpec(tools=[
            ToolSpec(name="add_note", description="Add a note.", parameters={"title": ParamSpec(type="string", example="x")}, tables=["notes"]),
            ToolSpec(name="list_notes", description="List notes.", tables=["notes"]),
        ]),
        code=EnvCode(flavour="native", source=CODE),
        verifiers=[Verifier(task_idx=i, code=VERIFY) for i in range(n_tasks)],
        solutions=[ReferenceSolution(task_idx=i, calls=[ToolCall(tool="add_note", arguments={"title": f"n{i}"})])
                   for i in range(n_tasks)],
        provenance=Provenance(source="generated", generator_model="awm-offline", prompt_version="v1", run_id="run-1"),
        validation=ValidationReport(passed=True, checks=checks),
        policy=POLICY if conversational else None,
    )

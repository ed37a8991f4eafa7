"""Stage parsers: valid replies accepted, each class of bad reply rejected with an error that
the next attempt's prompt carries."""
from __future__ import annotations

import json

import pytest

from awm_core.errors import StageError
from awm_core.runtime import EXAMPLE_RULE
from awm_core.models import ApiSpec, DbSchema, ReferenceSolution, Scenario, SeedData, Task, ToolCall, Verifier
from awm_core.stages import STAGES, Stage, code, scenario, schema, seed_data, solution, spec, tasks, verifier
from awm_core.stages.base import SEED_ROWS_PER_TABLE, StageContext, extract_json, extract_python, render_spec, summarise_errors

SCHEMA = {"tables": [
    {"name": "users", "ddl": "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)", "indexes": []},
    {"name": "notes", "ddl": "CREATE TABLE notes (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id), "
                            "title TEXT NOT NULL UNIQUE, body TEXT)",
     "indexes": ["CREATE INDEX ix_notes_user ON notes(user_id)"]},
]}
SEED = {"tables": [
    {"table_name": "users", "reasoning": "the signed-in user", "insert_statements": [
        "INSERT INTO users (id, name) VALUES (1, 'Ana')", "INSERT INTO users (id, name) VALUES (2, 'Bo')"]},
    {"table_name": "notes", "reasoning": "notes to find", "insert_statements": [
        "INSERT INTO notes (id, user_id, title, body) VALUES (1, 1, 'Groceries', 'milk')",
        "INSERT INTO notes (id, user_id, title, body) VALUES (2, 2, 'Other', 'x')"]},
]}
SPEC = {"tools": [
    {"name": "list_notes", "description": "List the user's notes.", "parameters": {},
     "returns": {"type": "array"}, "tables": ["notes"], "group": "notes"},
    {"name": "create_note", "description": "Create a note.", "parameters": {
        "title": {"type": "string", "description": "title", "required": True, "example": "Trip"},
        "body": {"type": "string", "description": "text", "required": False, "example": "pack"}},
     "returns": {"id": "integer"}, "tables": ["notes"], "group": "notes"},
    {"name": "delete_note", "description": "Delete a note.", "parameters": {
        "note_id": {"type": "integer", "description": "id", "required": True, "example": 1}},
     "returns": {"deleted": "boolean"}, "tables": ["notes"], "group": "notes"},
]}
CODE = '''```python
import sqlite3


def list_notes(conn: sqlite3.Connection) -> list:
    """List the user's notes."""
    return [{"id": r[0], "title": r[1]} for r in conn.execute("SELECT id, title FROM notes WHERE user_id = 1 ORDER BY id")]


def create_note(conn: sqlite3.Connection, title: str, body: str | None = None) -> dict:
    """Create a note.

    Args:
        title: title
        body: text
    """
    cur = conn.execute("INSERT INTO notes (user_id, title, body) VALUES (1, ?, ?)", (title, body))
    return {"id": cur.lastrowid}


def delete_note(conn: sqlite3.Connection, note_id: int) -> dict:
    """Delete a note.

    Args:
        note_id: id
    """
    if conn.execute("DELETE FROM notes WHERE id = ? AND user_id = 1", (note_id,)).rowcount == 0:
        raise ToolError(f"no note {note_id}")
    return {"deleted": True}
```'''
VERIFIER = '''```python
def verify(initial_db, final_db, final_answer):
    ch = db_changes(initial_db, final_db)
    new = ch.get("notes", {}).get("inserted", [])
    ok = (set(ch) == {"notes"} and [r["title"] for r in new] == ["Trip"] and not ch["notes"]["updated"]
          and not ch["notes"]["deleted"])
    return {"verdict": "complete" if ok else "incomplete", "evidence": {"changes": ch}}
```'''

TASK_TEXTS = [f"Create a note titled 'Trip {i}' with the body 'pack bags and passports'." for i in range(10)]


@pytest.fixture
def ctx() -> StageContext:
    sc = Scenario.new("Note Pad", "Personal notes", "productivity")
    return StageContext(
        scenario=sc, tasks=[Task(scenario_id=sc.id, idx=i, text=t) for i, t in enumerate(TASK_TEXTS)],
        db_schema=DbSchema.from_data(SCHEMA), seed_data=SeedData.from_data(SEED), api_spec=ApiSpec.from_data(SPEC),
        task_idx=0, tasks_per_scenario=10, target_tools=12)


def rejected(fn, *args) -> list[str]:
    with pytest.raises(StageError) as exc:
        fn(*args)
    assert exc.value.errors, "a rejection must carry at least one repair instruction"
    return exc.value.errors


def carried(module, ctx, errors):
    """The next attempt's prompt contains every error (as summarised)."""
    msgs = module.build_messages(ctx, errors)
    text = msgs[-1]["content"]
    assert "previous attempt was rejected" in text
    for e in summarise_errors(errors):
        assert e in text
    return text


# ----------------------------------------------------------------------------- reply extraction

def test_extract_json_accepts_one_fence_and_rejects_truncation():
    assert extract_json('```json\n{"a": 1}\n```', "x") == {"a": 1}
    errs = rejected(extract_json, '{"a": [1, 2', "x")
    assert "not valid JSON" in errs[0] and "cut off" in errs[0]
    assert "exactly one" in rejected(extract_json, "```json\n{}\n```\n```json\n{}\n```", "x")[0]


def test_extract_python_needs_one_closed_python_block():
    assert extract_python("```python\nx = 1\n```", "code") == "x = 1\n"
    assert "never closes" in rejected(extract_python, "```python\nx = 1\n", "code")[0]
    assert "exactly one" in rejected(extract_python, "```python\nx=1\n```\n```python\ny=2\n```", "code")[0]
    assert "'sql'" in rejected(extract_python, "```sql\nSELECT 1\n```", "code")[0]


def test_summarise_errors_dedups_and_truncates_deterministically():
    errs = ["a  b", "a b", "x" * 2000] + [f"e{i}" for i in range(100)]
    out = summarise_errors(errs)
    assert out[0] == "a b" and out.count("a b") == 1
    assert len(out[1]) <= 600 and out[1].endswith("...")
    assert out[-1].startswith("... and") and summarise_errors(errs) == out


# ----------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("k, questions, changes", [
    (5, "2 tasks", "3 tasks"), (10, "4 tasks", "6 tasks"), (2, "1 task", "1 task"), (1, "0 tasks", "1 task")])
def test_tasks_prompt_asks_for_a_mix_that_scales_with_k(ctx, k, questions, changes):
    text = tasks.build_messages(ctx.with_(tasks_per_scenario=k), [])[-1]["content"]
    assert f"exactly {k} user tasks" in text
    assert f"{questions} asking a question" in text and f"{changes} changing data" in text
    assert "about 4" not in text and "about 6" not in text


def test_task_mix_adds_up_and_has_both_kinds_from_two_tasks():
    for k in range(1, 40):
        q, c = tasks.task_mix(k)
        assert q + c == k and abs(q - 0.4 * k) <= 1
        assert k < 2 or (q >= 1 and c >= 1)


def test_tasks_accepts_ten_and_drops_surplus(ctx):
    got = tasks.parse(json.dumps({"tasks": TASK_TEXTS + ["Create one more note titled 'Extra' please."]}), ctx)
    assert [t.idx for t in got] == list(range(10)) and got[0].scenario_id == "note_pad"


@pytest.mark.parametrize("reply, expect", [
    (json.dumps(TASK_TEXTS), "bare JSON array"),
    (json.dumps({"tasks": TASK_TEXTS[:4]}), "expected exactly 10 tasks"),
    (json.dumps({"tasks": TASK_TEXTS[:9] + ["Log in to my account with my password please now."]}), "authentication"),
    (json.dumps({"tasks": TASK_TEXTS[:9] + [TASK_TEXTS[0]]}), "repeats an earlier task"),
    (json.dumps({"tasks": TASK_TEXTS[:9] + ["Do it."]}), "too short"),
])
def test_tasks_rejects(ctx, reply, expect):
    errs = rejected(tasks.parse, reply, ctx)
    assert any(expect in e for e in errs), errs
    carried(tasks, ctx, errs)


# ----------------------------------------------------------------------------- schema

def test_schema_accepts_valid(ctx):
    assert [t.name for t in schema.parse(json.dumps(SCHEMA), ctx).tables] == ["users", "notes"]


def _schema_with(ddl=None, name="notes", indexes=None):
    data = json.loads(json.dumps(SCHEMA))
    if ddl is not None:
        data["tables"][1]["ddl"] = ddl
    data["tables"][1]["name"] = name
    if indexes is not None:
        data["tables"][1]["indexes"] = indexes
    return json.dumps(data)


@pytest.mark.parametrize("reply, expect", [
    (_schema_with("CREATE TABLE notes (id INTEGER PRIMARY KEY user_id INTEGER)"), "syntax error"),
    (_schema_with("CREATE TABLE notes (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES user(id))"),
     "references table 'user', which does not exist"),
    (_schema_with("CREATE TABLE notes (id INTEGER PRIMARY KEY, user_id INTEGER REFERENCES users(uid))"),
     "users has no column uid"),
    (_schema_with(name="note"), "the ddl creates 'notes' but the entry is named 'note'"),
    (_schema_with(indexes=["CREATE INDEX ix ON notes(nope)"]), "no such column: nope"),
    (json.dumps({"tables": []}), "field tables"),
])
def test_schema_rejects(ctx, reply, expect):
    errs = rejected(schema.parse, reply, ctx)
    assert any(expect in e for e in errs), errs
    carried(schema, ctx, errs)


# ----------------------------------------------------------------------------- seed data

def test_seed_accepts_valid(ctx):
    assert len(seed_data.parse(json.dumps(SEED), ctx).statements()) == 4


def _seed_with(stmt, table="notes"):
    data = json.loads(json.dumps(SEED))
    data["tables"].append({"table_name": table, "reasoning": "", "insert_statements": [stmt]})
    return json.dumps(data)


@pytest.mark.parametrize("reply, expect", [
    (_seed_with("INSERT INTO notes (id, user_id, title) VALUES (9, 77, 'Orphan')"), "FOREIGN KEY"),
    (_seed_with("INSERT INTO notes (id, user_id, title) VALUES (9, 1, NULL)"), "NOT NULL"),
    (_seed_with("INSERT INTO notes (id, user_id, title) VALUES (9, 1, 'Groceries')"), "UNIQUE"),
    (_seed_with("INSERT INTO tags (id) VALUES (1)", table="tags"), "the schema does not define"),
    (_seed_with("INSERT INTO notes (id, user_id, title, body) VALUES (9, 1, 'T', datetime('now'))"), "changes between runs"),
    (_seed_with("UPDATE notes SET body = 'x'"), "not an INSERT"),
    (json.dumps({"tables": [{"table_name": "users", "insert_statements": ["INSERT INTO users (id, name) VALUES (2, 'Bo')"]}]}),
     "no row with id 1"),
])
def test_seed_rejects(ctx, reply, expect):
    errs = rejected(seed_data.parse, reply, ctx)
    assert any(expect in e for e in errs), errs
    carried(seed_data, ctx, errs)


def test_seed_reports_every_failing_statement(ctx):
    data = json.loads(json.dumps(SEED))
    data["tables"][1]["insert_statements"] += ["INSERT INTO notes (id, user_id, title) VALUES (8, 99, 'a')",
                                               "INSERT INTO notes (id, user_id, title) VALUES (9, 1, NULL)"]
    assert len(rejected(seed_data.parse, json.dumps(data), ctx)) == 2


# ----------------------------------------------------------------------------- spec

def test_spec_accepts_valid(ctx):
    assert [t.name for t in spec.parse(json.dumps(SPEC), ctx).tools] == ["list_notes", "create_note", "delete_note"]


def _spec_edit(fn):
    data = json.loads(json.dumps(SPEC))
    fn(data)
    return json.dumps(data)


@pytest.mark.parametrize("reply, expect", [
    (_spec_edit(lambda d: d["tools"][1]["parameters"]["title"].pop("type")), "parameter 'title' has no \"type\""),
    (_spec_edit(lambda d: d["tools"].append(dict(d["tools"][0]))), "duplicate tool name 'list_notes'"),
    (_spec_edit(lambda d: d["tools"][0].update(tables=["memos"])), "tables ['memos'] do not exist"),
    (_spec_edit(lambda d: d["tools"][2]["parameters"]["note_id"].pop("example")), "required parameter without an \"example\""),
    (_spec_edit(lambda d: d["tools"][2]["parameters"]["note_id"].update(example="1")), "is not of type integer"),
    (_spec_edit(lambda d: d["tools"][2]["parameters"]["note_id"].update(type="int")), "type 'int' is not one of"),
    (_spec_edit(lambda d: d["tools"][1]["parameters"].update(tags={"type": "array", "required": False})), "needs \"items\""),
    (_spec_edit(lambda d: d["tools"][1]["parameters"].update(user_id={"type": "integer", "example": 1})), "implicit"),
    (_spec_edit(lambda d: d["tools"][0].update(name="List-Notes")), "not a snake_case"),
])
def test_spec_rejects(ctx, reply, expect):
    errs = rejected(spec.parse, reply, ctx)
    assert any(expect in e for e in errs), errs
    carried(spec, ctx, errs)


def test_spec_prompt_shows_the_seeded_rows_and_how_examples_run(ctx):
    text = spec.build_messages(ctx, [])[-1]["content"]
    assert "notes (2 rows): id | user_id | title | body" in text and '1 | 1 | "Groceries" | "milk"' in text
    assert f"at most {SEED_ROWS_PER_TABLE} rows per table" in text and "exist in the seed data" in text
    assert EXAMPLE_RULE in text
    many = json.loads(json.dumps(SEED))
    many["tables"][1]["insert_statements"] += [
        f"INSERT INTO notes (id, user_id, title, body) VALUES ({i}, 1, 'Note {i}', 'b')" for i in range(3, 21)]
    text = spec.build_messages(ctx.with_(seed_data=SeedData.from_data(many)), [])[-1]["content"]
    assert f"notes (first {SEED_ROWS_PER_TABLE} of 20 rows)" in text
    assert f'"Note {SEED_ROWS_PER_TABLE}"' in text and f'"Note {SEED_ROWS_PER_TABLE + 1}"' not in text


def test_spec_examples_validate_against_the_seed_data(ctx):
    errs = rejected(spec.parse, _spec_edit(lambda d: d["tools"][2]["parameters"]["note_id"].update(example=99)), ctx)
    assert errs == ["tool delete_note, parameter note_id: example 99 is not in the seed data (no row of notes has "
                    "id 99; seeded ids of notes: 1, 2); examples run on the seeded database, so use an id that "
                    "exists there"]
    carried(spec, ctx, errs)

    def create_with_own_id(d):
        d["tools"][1]["parameters"]["id"] = {"type": "integer", "description": "new id", "required": False, "example": 9}
    assert spec.parse(_spec_edit(create_with_own_id), ctx)  # a new row's own id need not exist yet

    def unnamed(d):
        d["tools"][2]["parameters"]["ref_id"] = {"type": "integer", "description": "x", "required": False, "example": 99}
    assert spec.parse(_spec_edit(unnamed), ctx)  # no table is called ref*: nothing to check against


def test_spec_reports_missing_type_and_duplicate_together(ctx):
    def both(d):
        d["tools"][1]["parameters"]["title"].pop("type")
        d["tools"].append(dict(d["tools"][0]))
    errs = rejected(spec.parse, _spec_edit(both), ctx)
    assert any("duplicate" in e for e in errs) and any("no \"type\"" in e for e in errs)


# ----------------------------------------------------------------------------- code

def test_code_prompt_states_the_rule_examples_run_by(ctx):
    msgs = code.build_messages(ctx, [])
    assert EXAMPLE_RULE in msgs[0]["content"] and EXAMPLE_RULE in msgs[-1]["content"]


def test_code_accepts_valid(ctx):
    assert "def create_note" in code.parse(CODE, ctx).source


@pytest.mark.parametrize("edit, expect", [
    (lambda s: s.replace("def delete_note(", "def remove_note("), "no top-level function `def delete_note"),
    (lambda s: s.replace("import sqlite3", "import sqlite3\nimport os"), "import of 'os' is not allowed"),
    (lambda s: s.replace("return {\"id\": cur.lastrowid}", "import datetime\n    datetime.datetime.now()\n    return {}"),
     "reads the clock"),
    (lambda s: s.replace("body: str | None = None", "body: str"), "optional parameter body needs a default"),
    (lambda s: s.replace("note_id: int)", "note_id: int, force: bool)"), "parameters ['force'] are not in the spec"),
    (lambda s: s.replace("(conn: sqlite3.Connection) -> list", "(db: sqlite3.Connection) -> list"), "first parameter must be `conn`"),
    (lambda s: s.replace("return {\"deleted\": True}", "return {\"deleted\": True"), "SyntaxError"),
    (lambda s: s.replace("def list_notes(", "def helper(conn):\n    return 1\n\n\ndef list_notes("), "not a spec tool"),
])
def test_code_rejects(ctx, edit, expect):
    errs = rejected(code.parse, edit(CODE), ctx)
    assert any(expect in e for e in errs), errs
    carried(code, ctx.with_(db_schema=ctx.db_schema), errs)


# ----------------------------------------------------------------------------- verifier

def test_verifier_accepts_valid(ctx):
    v = verifier.parse(VERIFIER, ctx)
    assert v.task_idx == 0 and v.function_name == "verify" and v.style == "native"


@pytest.mark.parametrize("reply, expect", [
    (VERIFIER.replace("def verify(initial_db, final_db, final_answer)", "def check(initial_db, final_db, final_answer)"),
     "no top-level `def verify"),
    (VERIFIER.replace("initial_db, final_db, final_answer)", "initial_db, final_db)"), "must take exactly"),
    (VERIFIER.replace("def verify", "import subprocess\n\ndef verify"), "import of 'subprocess'"),
    (VERIFIER.replace("ok = (set(ch)", "ok = = (set(ch)"), "SyntaxError"),
])
def test_verifier_rejects(ctx, reply, expect):
    errs = rejected(verifier.parse, reply, ctx)
    assert any(expect in e for e in errs), errs
    text = carried(verifier, ctx.with_(code=code.parse(CODE, ctx)), errs)
    assert TASK_TEXTS[0] in text and "INSERT INTO notes" in text  # the task and the seed rows travel too


def test_verifier_prompt_shows_the_tools_and_the_parsed_values_rule(ctx):
    text = verifier.build_messages(ctx.with_(code=code.parse(CODE, ctx)), [])[-1]["content"]
    assert "- delete_note(note_id: integer e.g. 1) -> " in text and render_spec(ctx) in text
    assert "def delete_note(conn: sqlite3.Connection, note_id: int) -> dict:" in text
    assert verifier.PARSED_VALUES_RULE in text and "never substrings" in text
    # The helpers the sandbox puts in the verifier's namespace are named, with what they return.
    assert all(f"{name}(" in text for name in verifier.HELPERS) and "do not import or define them" in text


def test_verifier_prompt_cuts_long_code_but_never_the_tools_of_the_task(ctx):
    c = ctx.with_(code=code.parse(CODE, ctx), tasks=[Task(scenario_id="note_pad", idx=0, text="Delete the note 'Other'.")])
    # The task names the notes table: every tool that writes it is kept, however small the cap.
    cut = verifier.render_tool_code(c, cap=50)
    assert "def delete_note(" in cut and "def create_note(" in cut and "def list_notes(" not in cut
    assert cut.splitlines()[-1] == ("# (code cut at 50 characters; left out: list_notes -- "
                                    "their spec lines above say what they do)")
    # A task naming no table: the tools its reference solution calls are kept.
    vague = c.with_(tasks=[Task(scenario_id="note_pad", idx=0, text="Tidy up.")], solutions=[
        ReferenceSolution(task_idx=0, calls=[ToolCall(tool="list_notes")])])
    cut = verifier.render_tool_code(vague, cap=50)
    assert cut.startswith("def list_notes(") and "def delete_note(" not in cut and "def create_note(" not in cut
    assert verifier.render_tool_code(c) == c.code.source.strip()  # the whole module when it fits


@pytest.mark.parametrize("source", [
    extract_python(CODE, "code"),
    # Line breaks the parser counts (\r\n, \r) and characters str.splitlines would also break at.
    "X = 1\r\ndef f():\r\n    return '\x0c\u2028é'  # é\rdef g(): pass\n\nY: int = 'ü'\ndef h(): return 'ä'",
])
def test_tool_code_is_cut_into_the_same_pieces_as_the_parser_gives(source):
    import ast

    tree = ast.parse(source)
    got = verifier.top_level_code(source)
    assert got.functions == {n.name: ast.get_source_segment(source, n) for n in tree.body
                             if isinstance(n, ast.FunctionDef)}
    assert got.constants == [ast.get_source_segment(source, n) for n in tree.body
                             if isinstance(n, (ast.Assign, ast.AnnAssign))]


# ----------------------------------------------------------------------------- solution

def test_solution_accepts_valid(ctx):
    sol = solution.parse(json.dumps({"calls": [{"tool": "create_note", "arguments": {"title": "Trip"}}],
                                     "final_answer": None}), ctx)
    assert sol.task_idx == 0 and sol.calls[0].tool == "create_note"


@pytest.mark.parametrize("calls, expect", [
    ([{"tool": "make_note", "arguments": {"title": "x"}}], "unknown tool 'make_note'"),
    ([{"tool": "create_note", "arguments": {}}], "'title' is a required property"),
    ([{"tool": "delete_note", "arguments": {"note_id": "1"}}], "note_id: '1' is not of type 'integer'"),
    ([{"tool": "create_note", "arguments": {"title": "x", "colour": "red"}}], "Additional properties"),
])
def test_solution_rejects(ctx, calls, expect):
    errs = rejected(solution.parse, json.dumps({"calls": calls, "final_answer": None}), ctx)
    assert any(expect in e for e in errs), errs
    carried(solution, ctx.with_(verifiers=[Verifier(task_idx=0, code="def verify(a,b,c): pass")]), errs)


# ----------------------------------------------------------------------------- scenario

def test_scenario_parse_and_select_drops_duplicates_stateless_and_full_categories():
    reply = {"scenarios": [
        {"name": "Recipe Box", "description": "Save recipes and plan meals", "category": "food", "stateful": True},
        {"name": "Clinic Booking", "description": "Book doctor appointments", "category": "health", "stateful": True},
        {"name": "Weather Feed", "description": "Live weather", "category": "weather", "stateful": False},
        {"name": "Recipe Keeper", "description": "Save recipes and plan meals.", "category": "food", "stateful": True},
        {"name": "Bakery Orders", "description": "Cake orders with pickup dates", "category": "food", "stateful": True},
    ]}
    cands = scenario.parse(json.dumps(reply))
    assert [c.source for c in cands] == ["generated"] * 5

    def embed(texts):  # deterministic bag-of-words vectors: enough to tell near-copies apart
        import numpy as np
        vocab = sorted({w for t in texts for w in t.lower().replace(".", "").replace(":", "").split()})
        m = np.array([[t.lower().replace(".", "").replace(":", "").split().count(w) for w in vocab] for t in texts], float)
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    sel = scenario.select(cands, 3, embed, threshold=0.6, category_cap=1)
    assert [s.id for s in sel.scenarios] == ["recipe_box", "clinic_booking"]
    reasons = {d["name"]: d["reason"] for d in sel.dropped}
    assert reasons["Weather Feed"] == "not stateful"
    assert "near-duplicate of Recipe Box" in reasons["Recipe Keeper"]
    assert "category food is full" in reasons["Bakery Orders"]
    again = scenario.select(cands, 3, embed, threshold=0.6, category_cap=5, already=sel.scenarios)
    assert "clinic_booking" not in [s.id for s in again.scenarios]


def test_scenario_rejects_bad_reply_and_seed_list_loads():
    errs = rejected(scenario.parse, json.dumps({"scenarios": [{"name": "X app", "description": "d"}]}))
    assert "lacks category, stateful" in errs[0]
    seeds = scenario.load_seeds()
    assert len(seeds) >= 100 and len({s.category for s in seeds}) >= 10
    msgs = scenario.build_messages(seeds, 5, errs)
    assert errs[0] in msgs[-1]["content"] and seeds[0].name in msgs[-1]["content"]


@pytest.mark.parametrize("needed, asked", [(1, 2), (3, 4), (8, 10), (20, 25)])
def test_scenario_prompt_asks_for_what_is_needed_plus_a_margin(needed, asked):
    assert scenario.candidates_to_ask(needed) == asked
    text = scenario.build_messages(scenario.load_seeds(), needed, [])[-1]["content"]
    assert f"Propose {asked} applications of this kind: {needed} needed plus {asked - needed} spare" in text


def test_every_stage_has_a_prompt_version_and_reply_format():
    assert "scenario" not in STAGES and all(isinstance(m, Stage) for m in STAGES.values())
    for name, module in {"scenario": scenario, **STAGES}.items():
        assert module.NAME == name and module.PROMPT_VERSION.startswith(name)
        assert "```python" in module.USER or "JSON only" in module.USER

"""A toy environment family for showing that training learns: pick the tool and the argument.

``paint_shop(colours, items)`` is a native environment with one tool per colour
(``paint_red(item)``, ...) and one task per (item, colour) pair: "Paint the door red." The
verifier accepts exactly one coat of the asked colour on the asked item and nothing else, so a
task is solved by one well-formed call with the right tool and the right argument, then a final
answer. Episodes are two turns and a few dozen tokens: a tiny model on a CPU runs a GRPO step in
seconds, and the reward separates the three things a policy can get wrong (format, tool,
argument).
"""
from __future__ import annotations

from typing import Sequence

from awm_core.train.config import TrainConfig
from awm_core.models import (
    ApiSpec, DbSchema, EnvCode, Environment, ParamSpec, ReferenceSolution, Scenario, SeedData, TableSchema, TableSeed,
    Task, ToolCall, ToolSpec, Verifier,
)

COLOURS = ("red", "blue", "green")
ITEMS = ("door", "fence", "shed")
# The learning check: one task, "Paint the door red.", in an environment with two paint tools.
# Which tool and item to call does not depend on reading the task, so a tiny model can learn it
# from the reward in a CPU-minute; learning to read the task (a mapping over several tasks) takes
# a tiny model ~200 supervised steps to find even with exact labels (docs/train.md, "Learning").
LEARNING_COLOURS = ("red", "blue")
LEARNING_ITEMS = ("door",)
LEARNING_TASKS = (0,)

# The warm start is long enough that well-formed calls succeed more often than malformed ones
# fail (shorter, and GRPO finds the reward's nearest improvement instead: answering without any
# tool call, 0 instead of -1, after which every group ties and learning stops) and short enough
# to leave about a third of the episodes failing. Two updates per batch make PPO's clip bind.
LEARNING_PRESET = TrainConfig(
    model="random:tiny", group_size=16, tasks_per_step=2, max_turns=2, window=None, interface="direct",
    learning_rate=1e-3, updates_per_batch=2, warmup_steps=4, steps=120, max_tokens=40, max_prompt_tokens=1024,
    max_tokens_per_microbatch=8192, warmstart_steps=70, warmstart_lr=3e-3, sandbox_workers=1, seed=0,
    temperature=1.0)


def learning_family() -> tuple[Environment, list[tuple[str, int, str]]]:
    """The learning check's environment and its training (and evaluation) tasks."""
    env = paint_shop(LEARNING_COLOURS, LEARNING_ITEMS)
    return env, [t for t in tasks_of(env) if t[1] in LEARNING_TASKS]


_TOOL = '''

def paint_{colour}(conn: sqlite3.Connection, item: str) -> dict:
    """Paint an item {colour}.

    Args:
        item: The item to paint.
    """
    if conn.execute("SELECT 1 FROM items WHERE name = ?", (item,)).fetchone() is None:
        raise ToolError(f"there is no item {{item}}")
    conn.execute("INSERT INTO coats (item, colour) VALUES (?, ?)", (item, "{colour}"))
    return {{"item": item, "colour": "{colour}"}}
'''

_VERIFY = '''
def verify(initial_db, final_db, final_answer):
    coats = final_db.execute("SELECT item, colour FROM coats ORDER BY id").fetchall()
    ok = [tuple(c) for c in coats] == [("{item}", "{colour}")]
    return {{"verdict": "complete" if ok else "incomplete", "evidence": {{"coats": [list(c) for c in coats]}}}}
'''


def paint_shop(colours: Sequence[str] = COLOURS, items: Sequence[str] = ITEMS, *, env_id: str = "paint_shop"
               ) -> Environment:
    """One environment whose tasks are every (item, colour) pair, items first."""
    pairs = [(item, colour) for item in items for colour in colours]
    source = "import sqlite3\n" + "".join(_TOOL.format(colour=c) for c in colours)
    item_param = {"item": ParamSpec(type="string", description="The item to paint.", example=items[0],
                                    required=True)}
    return Environment(
        id=env_id,
        scenario=Scenario(id=env_id, name=env_id.replace("_", " "), description="A paint shop: one tool per colour.",
                          category="toy"),
        tasks=[Task(scenario_id=env_id, idx=i, text=f"Paint the {item} {colour}.") for i, (item, colour) in
               enumerate(pairs)],
        db_schema=DbSchema(tables=[
            TableSchema(name="items", ddl="CREATE TABLE items (name TEXT PRIMARY KEY)"),
            TableSchema(name="coats", ddl="CREATE TABLE coats (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                                          "item TEXT NOT NULL REFERENCES items(name), colour TEXT NOT NULL)"),
        ]),
        seed_data=SeedData(tables=[TableSeed(table_name="items", insert_statements=[
            f"INSERT INTO items VALUES ('{item}')" for item in items])]),
        api_spec=ApiSpec(tools=[ToolSpec(name=f"paint_{c}", description=f"Paint an item {c}", parameters=item_param)
                                for c in colours]),
        code=EnvCode(flavour="native", source=source),
        verifiers=[Verifier(task_idx=i, code=_VERIFY.format(item=item, colour=colour))
                   for i, (item, colour) in enumerate(pairs)],
        solutions=[ReferenceSolution(task_idx=i, calls=[ToolCall(tool=f"paint_{colour}", arguments={"item": item})],
                                     final_answer="Done.") for i, (item, colour) in enumerate(pairs)],
    )


_COUNTER_CODE = '''
import sqlite3


def get_counter(conn: sqlite3.Connection, name: str) -> dict:
    """Read a counter.

    Args:
        name: Name of the counter.
    """
    row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ToolError(f"no counter {name}")
    return {"name": name, "value": row[0]}


def add(conn: sqlite3.Connection, name: str, amount: int) -> dict:
    """Add an amount to a counter.

    Args:
        name: Name of the counter.
        amount: How much to add.
    """
    if not conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (amount, name)).rowcount:
        raise ToolError(f"no counter {name}")
    return get_counter(conn, name)
'''

_COUNTER_VERIFY = '''
def verify(initial_db, final_db, final_answer):
    rows = dict(final_db.execute("SELECT name, value FROM counters").fetchall())
    return {{"verdict": "complete" if rows == {expected!r} else "incomplete", "evidence": rows}}
'''


COUNTER_PLANS = [
    ("Add 2 to the counter named apples.", [ToolCall(tool="get_counter", arguments={"name": "apples"}),
                                            ToolCall(tool="add", arguments={"name": "apples", "amount": 2})],
     {"apples": 7, "pears": 1}),
    ("Add 3 to the counter named pears.", [ToolCall(tool="get_counter", arguments={"name": "pears"}),
                                           ToolCall(tool="add", arguments={"name": "pears", "amount": 3})],
     {"apples": 5, "pears": 4}),
]


def counters(plans: Sequence[tuple[str, list[ToolCall], dict[str, int]]] = COUNTER_PLANS, *,
             env_id: str = "counters") -> Environment:
    """Two named counters (apples 5, pears 1) with ``get_counter`` and ``add``; one task per plan
    ``(text, reference calls, expected final values)``, verified against the expected values."""
    p = lambda t, d, ex: ParamSpec(type=t, description=d, example=ex, required=True)  # noqa: E731
    return Environment(
        id=env_id,
        scenario=Scenario(id=env_id, name="counters", description="Named counters.", category="tools"),
        tasks=[Task(scenario_id=env_id, idx=i, text=text) for i, (text, _, _) in enumerate(plans)],
        db_schema=DbSchema(tables=[TableSchema(
            name="counters", ddl="CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")]),
        seed_data=SeedData(tables=[TableSeed(table_name="counters", insert_statements=[
            "INSERT INTO counters VALUES ('apples', 5)", "INSERT INTO counters VALUES ('pears', 1)"])]),
        api_spec=ApiSpec(tools=[
            ToolSpec(name="get_counter", description="Read a counter",
                     parameters={"name": p("string", "name", "apples")}),
            ToolSpec(name="add", description="Add an amount to a counter",
                     parameters={"name": p("string", "name", "apples"), "amount": p("integer", "amount", 1)}),
        ]),
        code=EnvCode(flavour="native", source=_COUNTER_CODE),
        verifiers=[Verifier(task_idx=i, code=_COUNTER_VERIFY.format(expected=exp)) for i, (_, _, exp) in enumerate(plans)],
        solutions=[ReferenceSolution(task_idx=i, calls=calls, final_answer="Done.")
                   for i, (_, calls, _) in enumerate(plans)],
    )


def tasks_of(env: Environment) -> list[tuple[str, int, str]]:
    """``(env_id, task_idx, text)`` for every task, the shape training takes."""
    return [(env.id, t.idx, t.text) for t in env.tasks]


__all__ = ["COLOURS", "ITEMS", "LEARNING_COLOURS", "LEARNING_ITEMS", "LEARNING_PRESET", "LEARNING_TASKS",
           "COUNTER_PLANS", "counters", "learning_family", "paint_shop", "tasks_of"]

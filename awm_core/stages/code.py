"""Stage 6: the native tool module implementing the spec over the schema.

Reply: one fenced ```python block. Checked statically (compiles, allowed imports only, no
clock or randomness, one function per spec tool with matching parameters) and then in the
sandbox: every tool called with its spec example arguments succeeds, each alone on a fresh copy of
the seeded database (``awm_core.runtime.EXAMPLE_RULE``, which the prompt quotes).
"""
from __future__ import annotations

import ast
import sys

from awm_core.errors import StageError
from awm_core.models import EnvCode
from awm_core.runtime import EXAMPLE_RULE
from awm_core.stages.base import (
    ALLOWED_IMPORTS, CURRENT_USER_ID, StageContext, extract_python, messages, render_scenario, render_schema,
    render_spec_json, run_stage,
)

NAME = "code"
PROMPT_VERSION = "code-v3"
JSON_MODE = False
PER_TASK = False

SYSTEM = """
You are a senior Python engineer. You implement an application's tools as plain Python functions over an
SQLite connection. The module is loaded in a sandbox and every tool is called with its example arguments
({example_rule}); any exception other than a deliberate ToolError rejects the answer.
"""

USER = """
Application: {scenario}

Database schema (SQLite, already created and seeded; PRAGMA foreign_keys=ON):
{schema}

Tool spec (JSON):
{spec}

Write ONE Python module that implements every tool of the spec:
- Each tool is a top-level function with the tool's name:
  `def tool_name(conn: sqlite3.Connection, <one parameter per spec parameter, same names, type hints matching the
  spec types (str, int, float, bool, list[...], dict)>) -> dict | list:`. Optional parameters default to None.
- Docstring: first line is the tool's description, then a Google-style `Args:` section with one line per
  parameter (not conn).
- The signed-in user is always user id {user_id}; scope personal data to it.
- Use `conn.execute(sql, params)` with ? placeholders; never build SQL with string formatting of values.
  Set `conn.row_factory = sqlite3.Row` inside a tool if you want rows by name, or build dicts yourself.
- Return JSON-serialisable values (dicts, lists, str, int, float, bool, None) shaped as the spec's "returns".
- For the agent's mistakes (unknown id, invalid state, duplicate, bad value) `raise ToolError("clear message")`.
  ToolError is provided by the runtime: do not define or import it.
- Deterministic: never read the clock (no datetime.now/today, time.time) and no randomness. For "now" read the
  app_clock table if the schema has one, or take the timestamp as a parameter. New ids come from INTEGER
  PRIMARY KEY (cursor.lastrowid).
- Imports allowed: {imports}. No module-level state; helpers start with "_".
- Every tool must succeed on its own example arguments: {example_rule}. Create tools must not fail on
  their examples (check unique columns the example touches).

Answer with the module in exactly one ```python fenced block and nothing else.
"""


def build_messages(ctx: StageContext, previous_errors: list[str]) -> list[dict]:
    ctx.need("scenario", "db_schema", "api_spec")
    user = USER.format(scenario=render_scenario(ctx), schema=render_schema(ctx),
                       spec=render_spec_json(ctx), user_id=CURRENT_USER_ID,
                       imports=", ".join(ALLOWED_IMPORTS), example_rule=EXAMPLE_RULE)
    return messages(SYSTEM.format(example_rule=EXAMPLE_RULE), user, previous_errors)


_BANNED_CALLS = {("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today"),
                 ("time", "time"), ("time", "monotonic")}


def import_errors(tree: ast.AST, allowed: tuple[str, ...] = ALLOWED_IMPORTS) -> list[str]:
    errors = []
    for node in ast.walk(tree):
        mods: list[str] = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [node.module or ""]
            if node.module == "awm_core.errors" and [a.name for a in node.names] == ["ToolError"]:
                continue
            if node.module == "__future__":
                continue  # a compiler directive every sandbox flavour admits, not a module the code uses
        for m in mods:
            if m.split(".")[0] not in allowed:
                errors.append(f"line {node.lineno}: import of {m!r} is not allowed; allowed modules: {', '.join(allowed)}")
    return errors


def determinism_errors(tree: ast.AST) -> list[str]:
    errors = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if (owner_name, node.func.attr) in _BANNED_CALLS:
                errors.append(f"line {node.lineno}: {owner_name}.{node.func.attr}() reads the clock, so replays differ; "
                              "use the app_clock table or a parameter")
    return errors


def compile_module(source: str, stage: str) -> ast.Module:
    try:
        tree = ast.parse(source)
        compile(tree, "<tools>", "exec")
    except SyntaxError as exc:
        line = (exc.text or "").strip()
        raise StageError(stage, [f"line {exc.lineno}: SyntaxError: {exc.msg}" + (f" in `{line[:120]}`" if line else "")]) from None
    return tree


def signature_errors(tree: ast.Module, ctx: StageContext) -> list[str]:
    errors = []
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    spec_names = {t.name for t in ctx.api_spec.tools}
    for name, fn in funcs.items():
        if isinstance(fn, ast.AsyncFunctionDef):
            errors.append(f"tool {name}: must be a plain def, not async def")
        if name not in spec_names and not name.startswith("_"):
            errors.append(f"function {name!r} is not a spec tool; rename helpers to start with '_'")
    for tool in ctx.api_spec.tools:
        fn = funcs.get(tool.name)
        if fn is None:
            errors.append(f"tool {tool.name}: no top-level function `def {tool.name}(conn, ...)` in the module")
            continue
        args = fn.args
        positional = [a.arg for a in args.posonlyargs + args.args]
        if not positional or positional[0] != "conn":
            errors.append(f"tool {tool.name}: the first parameter must be `conn` (the sqlite3 connection)")
        params = positional[1:] + [a.arg for a in args.kwonlyargs]
        n_defaults = len(args.defaults)
        with_default = set(positional[len(positional) - n_defaults:]) if n_defaults else set()
        with_default |= {a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None}
        missing = [p for p in tool.parameters if p not in params]
        extra = [p for p in params if p not in tool.parameters and p not in with_default]
        if missing:
            errors.append(f"tool {tool.name}: spec parameters {missing} are missing from the function signature")
        if extra:
            errors.append(f"tool {tool.name}: parameters {extra} are not in the spec; remove them")
        for pname, p in tool.parameters.items():
            if not p.required and pname in params and pname not in with_default:
                errors.append(f"tool {tool.name}: optional parameter {pname} needs a default (= None)")
        if not ast.get_docstring(fn):
            errors.append(f"tool {tool.name}: missing docstring (first line = description, then an Args: section)")
    return errors


def parse(text: str, ctx: StageContext) -> EnvCode:
    source = extract_python(text, NAME)
    tree = compile_module(source, NAME)
    errors = import_errors(tree) + determinism_errors(tree) + signature_errors(tree, ctx)
    if errors:
        raise StageError(NAME, errors)
    return EnvCode(flavour="native", source=source)


def execute(code: EnvCode, ctx: StageContext, pool) -> list:
    """The sandbox checks; returns them (all passed) for the environment's validation report."""
    from awm_core.validation import failed_details, tool_checks

    checks = tool_checks(pool, ctx.environment(code=code))
    errors = failed_details(checks)
    if errors:
        raise StageError(NAME, errors)
    return checks


def run(client, ctx: StageContext, *, attempt: int, previous_errors: list[str], pool=None):
    return run_stage(sys.modules[__name__], client, ctx, attempt=attempt, previous_errors=previous_errors, pool=pool)

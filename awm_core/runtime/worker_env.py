"""What a sandbox worker holds: an environment (its tools, its initial database) and the
sessions opened on it, for the native flavour (a module of functions taking a ``sqlite3``
connection). The AWM-1K flavour (a FastAPI app) is ``awm1k_env``; BFCL and tau2 entries are
``bfcl_env`` and ``tau2_env``. Imported only inside the worker process.
"""
from __future__ import annotations

import inspect
import sqlite3
import sys
import types
from typing import Any

from awm_core.errors import ToolError
from awm_core.runtime import sandbox
from awm_core.runtime.schema import function_schema

ENV_LIMIT_ERRORS = (MemoryError, RecursionError)


def exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:4000]


def new_connection(data: bytes, *, foreign_keys: bool, readonly: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.deserialize(data)
    # ATTACH and VACUUM INTO would let SQL write files anywhere; no attachments at all.
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    elif foreign_keys:
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def module_name(key: str) -> str:
    # Unique per environment *version* (the key carries the content digest): two repair
    # attempts of one environment must not share a module in sys.modules.
    return "awm_env_" + key.replace("-", "_")


class WorkerSession:
    __slots__ = ("env", "conn", "engine")

    def __init__(self, env: "WorkerEnv"):
        self.env = env
        self.conn = new_connection(env.snapshot, foreign_keys=env.flavour == "native")
        self.engine = None

    def reset(self) -> None:
        if self.conn.in_transaction:
            self.conn.rollback()
        self.conn.deserialize(self.env.snapshot)

    def serialize(self) -> bytes:
        return self.conn.serialize()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        self.conn.close()


class WorkerEnv:
    flavour = "native"

    def __init__(self, key: str, snapshot: bytes):
        self.key = key
        self.snapshot = snapshot
        self.tools: dict[str, Any] = {}
        self.infos: list[dict[str, Any]] = []

    def open_session(self) -> WorkerSession:
        return WorkerSession(self)

    def call_paths(self) -> dict[str, str]:
        """tool -> how a call reaches its code (the AWM-1K flavour has several ways)."""
        return {}


class NativeEnv(WorkerEnv):
    def __init__(self, key: str, snapshot: bytes, source: str, spec: dict[str, dict] | None, env_id: str,
                 guard: sandbox.Guard):
        super().__init__(key, snapshot)
        self.problems: list[str] = []
        mod = types.ModuleType(module_name(key))
        mod.__dict__["__builtins__"] = sandbox.make_builtins(sandbox.NATIVE_IMPORTS, guard=guard)
        mod.__dict__["ToolError"] = ToolError
        sys.modules[mod.__name__] = mod
        exec(compile(source, f"<environment {env_id}>", "exec"), mod.__dict__)
        if spec is None:  # no spec: every public function defined in the module is a tool
            names = [n for n, v in vars(mod).items() if not n.startswith("_") and inspect.isfunction(v)
                     and v.__module__ == mod.__name__]
            spec = {n: {} for n in names}
        for name, params in spec.items():
            fn = mod.__dict__.get(name)
            if fn is None:
                self.problems.append(f"tool {name}: named in the API spec but not defined in the code")
                continue
            if not callable(fn):
                self.problems.append(f"tool {name}: defined but not a function")
                continue
            desc, schema, problems = function_schema(fn, params)
            self.problems += problems
            self.tools[name] = fn
            self.infos.append({"name": name, "description": desc, "input_schema": schema})

    def call(self, session: WorkerSession, tool: str, args: dict[str, Any]) -> Any:
        conn = session.conn
        try:
            out = self.tools[tool](conn, **args)
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        # One tool call is one transaction: what the tool did is kept unless it raised.
        if conn.in_transaction:
            conn.commit()
        return out



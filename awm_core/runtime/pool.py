"""Parent side of the sandbox: worker processes (each a ``worker_process.WorkerProcess``), environments,
sessions, verifiers.

``SandboxPool`` owns a fixed number of worker *slots*. Each loaded environment is assigned
to one slot (the least busy), so environments are spread over workers and a crash in one
worker only loses that worker's sessions. Every slot has one request/response channel
guarded by a lock, which makes the pool safe to use from many threads; calls to different
workers run in parallel.
"""
from __future__ import annotations

import itertools
import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import jsonschema

from awm_core.errors import AWMError, SqlExecutionError
from awm_core.models import BENCHMARKS, Environment
from awm_core.runtime import protocol
from awm_core.settings import SandboxSettings
from awm_core.runtime.types import EnvLoadError, SandboxError, ToolInfo, ToolResult, VerifierOutcome
from awm_core.runtime.worker_process import WorkerFailure, WorkerProcess



# How spec examples are executed, in the words the spec and code prompts use. The order of the
# tools is then irrelevant: a delete example cannot break a get example of the same row.
EXAMPLE_RULE = ("each tool's example call runs alone, on a fresh copy of the seeded database, with every "
                "parameter that has an example: no example sees what another example changed, so each one "
                "must succeed on the seed data exactly as it is")


class SandboxPool:
    """Worker processes that run environment code; see the module docstring.

    ``SandboxPool(settings.sandbox)`` or ``SandboxPool(workers=2, memory_mb=..., ...)``;
    use it as a context manager (or call ``close()``) so the workers stop.
    """

    def __init__(self, settings: Any = None, **overrides: Any):
        cfg = SandboxSettings()
        if settings is not None:
            data = settings.model_dump() if hasattr(settings, "model_dump") else dict(settings)
            for k, v in data.items():
                if hasattr(cfg, k):
                    setattr(cfg, k, v)
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown SandboxPool option {k!r}")
            setattr(cfg, k, v)
        if cfg.workers < 1:
            raise ValueError("SandboxPool needs at least one worker")
        self.config = cfg
        self._instances = itertools.count(1)
        self._sids = itertools.count(1)
        self._workers = [WorkerProcess(self, i) for i in range(cfg.workers)]
        self._lock = threading.Lock()
        self._handles: dict[str, EnvHandle] = {}
        self._slot_of: dict[str, int] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_workers, list(self._workers))

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    def protections(self) -> dict[str, Any]:
        """What confines generated code here, as a worker reports it (one is started if none
        runs yet; raises ``WeakSandboxError`` where the required layers are missing)."""
        worker = next((w for w in self._workers if w.protections), self._workers[0])
        if not worker.protections:
            worker.request({"op": "ping"}, timeout=self.config.startup_timeout_s)
        return {**worker.protections, "allow_weak_sandbox": self.config.allow_weak_sandbox}

    def stats(self) -> dict[str, Any]:
        """Live facts per worker: pid, RSS, restarts, protections in force."""
        return {"workers": [{"slot": w.slot, "pid": w.proc.pid if w.proc else None, "rss_mb": w.rss_bytes() / 2**20,
                             "restarts": w.restarts, "last_failure": w.last_failure,
                             "protections": w.protections, "environments": sorted(w.loaded)}
                            for w in self._workers]}

    def release_closed(self) -> int:
        """Free now, in the workers, the sessions closed without waiting (``close_later``),
        which otherwise go with the worker's next request; the number of workers asked."""
        asked = 0
        for w in self._workers:
            if w.pending_close and w.proc is not None and w.proc.poll() is None and not self._closed:
                try:
                    w.request({"op": "close_many", "sids": []}, timeout=self.config.call_timeout_s)
                    asked += 1
                except (WorkerFailure, SandboxError):
                    pass  # a dead worker holds no sessions
        return asked

    def _slot_for(self, env_id_key: str) -> WorkerProcess:
        with self._lock:
            slot = self._slot_of.get(env_id_key)
            if slot is None:
                counts = [0] * len(self._workers)
                for s in self._slot_of.values():
                    counts[s] += 1
                slot = counts.index(min(counts))
                self._slot_of[env_id_key] = slot
            return self._workers[slot]

    # ------------------------------------------------------------------ environments
    def load(self, environment: Environment) -> "EnvHandle":
        """Build the initial database, import the code in a worker, derive tool schemas.

        Raises ``SqlExecutionError`` for a schema/seed that does not execute and
        ``EnvLoadError`` (a ``StageError`` of stage ``code``) listing every problem found
        in the code: import errors, spec tools missing from the code, bad signatures.
        """
        key = f"{environment.id}-{environment.digest()[:12]}"
        with self._lock:
            if key in self._handles:
                return self._handles[key]
        # A bfcl or tau2 environment's state is the benchmark's own objects, built from its code bundle: no database.
        code_only = environment.flavour in BENCHMARKS
        needs = ("code",) if code_only else ("db_schema", "code")
        missing = [p for p in needs if getattr(environment, p) is None]
        if missing:
            raise EnvLoadError(environment.id, [f"the environment has no {p}" for p in missing])
        worker = self._slot_for(key)
        if code_only:
            initial = b""
        else:
            resp, blobs, _ = self._request_or_raise(worker, {
                "op": "build_db", "schema": environment.db_schema.model_dump(mode="json"),
                "seed": environment.seed_data.model_dump(mode="json") if environment.seed_data else None})
            if not resp.get("ok"):
                raise SqlExecutionError(resp.get("stage", "schema"),
                                        resp.get("errors") or ["building the database failed"])
            initial = blobs[0]
        handle = EnvHandle(self, environment, key, worker, initial)
        try:
            worker.request({"op": "ping"}, env=handle, timeout=self.config.call_timeout_s)
        except WorkerFailure as exc:
            raise SandboxError(str(exc)) from None
        with self._lock:
            return self._handles.setdefault(key, handle)

    def unload(self, environment: Environment) -> None:
        """Drop a loaded environment and its sessions from its worker (frees the module)."""
        key = f"{environment.id}-{environment.digest()[:12]}"
        with self._lock:
            handle = self._handles.pop(key, None)
        if handle is None:
            return
        worker = handle.worker
        if key in worker.loaded:
            try:
                worker.request({"op": "unload", "key": key}, timeout=self.config.call_timeout_s)
            except WorkerFailure:
                pass
            worker.loaded.discard(key)

    def _request_or_raise(self, worker: WorkerProcess, header, blobs=(), timeout=None):
        try:
            return worker.request(header, blobs, timeout=timeout or self.config.call_timeout_s * 3)
        except WorkerFailure as exc:
            raise SandboxError(str(exc)) from None

    def verify(self, environment: Environment, task_idx: int, *, initial_db: bytes, final_db: bytes,
               final_answer: str | None = None, trace: Any = None) -> VerifierOutcome:
        """Run the task's verifier in the environment's worker; never raises for verifier faults.

        ``trace`` is what a benchmark's verifier scores. ``bfcl`` (BFCL's checker re-runs the agent's
        calls): per user turn, per reply, the calls as BFCL writes them (``bfcl_env.call_string``).
        ``tau2`` (τ²'s evaluator replays the conversation): ``{"messages": [...], "termination": ...}``
        from ``awm_core.interop.tau2_trajectory``.
        """
        v = environment.verifier(task_idx)
        if v is None:
            return VerifierOutcome(None, {}, f"environment {environment.id} has no verifier for task {task_idx}", "verifier")
        header = {"op": "verify", "style": v.style, "function_name": v.function_name, "code": v.code,
                  "final_answer": final_answer}
        handle = None
        if v.style in BENCHMARKS:
            # The benchmark's checker lives in the environment's bundle: the environment must be loaded there.
            try:
                handle = self.load(environment)
            except AWMError as exc:
                return VerifierOutcome(None, {}, str(exc), "environment")
            header.update(key=handle.key, trace=trace or [])
            worker = handle.worker
        else:
            worker = self._slot_for(f"{environment.id}-{environment.digest()[:12]}")
        try:
            resp, _, _ = worker.request(header, [initial_db or b"", final_db or b""], env=handle,
                                        timeout=self.config.call_timeout_s)
        except WorkerFailure as exc:
            return VerifierOutcome(None, {}, str(exc), "environment")
        if not resp.get("ok"):
            return VerifierOutcome(None, {}, resp.get("error"), resp.get("error_kind") or "verifier")
        return VerifierOutcome(resp.get("verdict"), resp.get("evidence") or {}, None, None)

    def check_tools(self, environment: Environment) -> list["ToolCheck"]:
        """Call every spec tool with its example arguments as ``EXAMPLE_RULE`` says (the spec
        and code prompts quote it, so what the model is told is what runs)."""
        handle = self.load(environment)
        specs = environment.api_spec.tools if environment.api_spec else []
        checks = []
        names = [t.name for t in specs] or [t.name for t in handle.tools()]
        examples = {t.name: t.example_arguments() for t in specs}
        for name in names:
            args = examples.get(name, {})
            with handle.open_session() as s:
                checks.append(ToolCheck(name, args, s.call(name, args)))
        return checks


def _close_workers(workers: list[WorkerProcess]) -> None:
    for w in workers:
        w.close()


@dataclass
class ToolCheck:
    tool: str
    arguments: dict[str, Any]
    result: ToolResult

    @property
    def ok(self) -> bool:
        return self.result.ok

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "ok": self.ok, "arguments": self.arguments,
                "error": self.result.error, "error_kind": self.result.error_kind}


class EnvHandle:
    """A loaded environment: its tools and a factory for sessions."""

    def __init__(self, pool: SandboxPool, environment: Environment, key: str, worker: WorkerProcess, snapshot: bytes):
        self.pool = pool
        self.environment = environment
        self.id = environment.id
        self.key = key
        self.worker = worker
        self.snapshot = snapshot          # the initial database, as built once
        self._tools: dict[str, ToolInfo] = {}
        self._user_tools: dict[str, ToolInfo] = {}
        self._validators: dict[str, Any] = {}
        self._tools_ready = False
        # tool -> how the worker reaches its code (AWM-1K: "bound", "handler" or "asgi"; see the worker)
        self.call_paths: dict[str, str] = {}

    def _load_request(self) -> protocol.LoadRequest:
        env = self.environment
        spec = None
        if env.api_spec is not None and env.flavour == "native":
            spec = {t.name: {k: p.model_dump(include={"type", "description"}) for k, p in t.parameters.items()}
                    for t in env.api_spec.tools}
        return {"op": "load", "key": self.key, "env_id": env.id, "flavour": env.flavour,
                "source": env.code.source, "spec": spec,
                "asgi": bool(getattr(self.pool.config, "awm1k_asgi", False))}

    def _on_loaded(self, resp: dict[str, Any]) -> None:
        if not resp.get("ok"):
            raise EnvLoadError(self.id, resp.get("errors") or [resp.get("error", "loading failed")])
        if resp.get("problems"):
            raise EnvLoadError(self.id, resp["problems"])
        if not self._tools_ready:
            self._set_tools(resp["tools"])
            self._user_tools = {t["name"]: ToolInfo(t["name"], t.get("description", ""), t["input_schema"])
                                for t in resp.get("user_tools") or []}
            self.call_paths = resp.get("call_paths") or {}
            self._tools_ready = True

    def _set_tools(self, infos: list[dict[str, Any]]) -> None:
        for info in infos:
            t = ToolInfo(info["name"], info.get("description", ""), info["input_schema"])
            self._tools[t.name] = t
            self._validators[t.name] = _validator(t.input_schema)

    def tools(self) -> list[ToolInfo]:
        return list(self._tools.values())

    def tool(self, name: str) -> ToolInfo:
        return self._tools[name]

    def user_tools(self) -> list[ToolInfo]:
        """The tools the *user* has (τ²'s telecom: the customer's own phone); empty for most environments."""
        return list(self._user_tools.values())

    def open_session(self) -> "Session":
        return Session(self)

    async def aopen_session(self) -> "Session":
        """``open_session`` for a coroutine (no thread once the environment is loaded)."""
        s = Session.__new__(Session)
        s.handle, s.closed, s.lost, s._finalizer = self, False, None, None
        sid = next(self.pool._sids)
        try:
            resp, _, inst = await self.worker.arequest({"op": "open", "key": self.key, "sid": sid}, env=self,
                                                       timeout=self.pool.config.call_timeout_s)
        except WorkerFailure as exc:
            raise SandboxError(f"cannot open a session: {exc}") from None
        s._opened(sid, inst, resp)
        return s

    def validate(self, tool: str, args: Any) -> ToolResult | None:
        """A failure result for an unknown tool or arguments that do not fit its schema."""
        if tool not in self._tools:
            names = ", ".join(sorted(self._tools))
            return ToolResult.failure("unknown_tool", f"unknown tool {str(tool)[:200]!r}; available tools: {names}")
        if not isinstance(args, dict):
            return ToolResult.failure("invalid_arguments",
                                      f"arguments must be a JSON object, got {type(args).__name__}")
        try:
            json.dumps(args, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return ToolResult.failure("invalid_arguments", f"arguments are not plain JSON: {exc}")
        validator = self._validators.get(tool)
        if validator is None:
            return None
        errors = list(validator.iter_errors(args))
        if not errors:
            return None
        return ToolResult.failure("invalid_arguments", "; ".join(_describe(e, self._tools[tool]) for e in errors[:5]))


_VALIDATORS: dict[str, Any] = {}
_VALIDATORS_MAX = 4096


def _validator(schema: dict[str, Any]) -> Any:
    """A checked validator for ``schema`` (None when the schema itself is invalid), shared by content.

    Checking a schema against the metaschema costs about half a millisecond; environments of one
    family (BFCL's entries, a regenerated environment) repeat the same tool schemas.
    """
    key = json.dumps(schema, sort_keys=True, default=str)
    if key not in _VALIDATORS:
        if len(_VALIDATORS) >= _VALIDATORS_MAX:
            _VALIDATORS.clear()
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
            _VALIDATORS[key] = jsonschema.Draft202012Validator(schema)
        except jsonschema.SchemaError:
            _VALIDATORS[key] = None  # the server still validates its own inputs
    return _VALIDATORS[key]


def _describe(err: jsonschema.ValidationError, tool: ToolInfo) -> str:
    props = tool.input_schema.get("properties", {})
    if err.validator == "required" and not err.path:
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return f"missing required argument {missing!r}"
    if err.validator == "additionalProperties" and not err.path:
        extra = sorted(set(err.instance) - set(props))
        return f"unknown argument(s) {', '.join(repr(e[:100]) for e in extra)[:300]} (accepted: {', '.join(props) or 'none'})"
    where = ".".join(str(p) for p in err.path)
    msg = err.message if len(err.message) <= 300 else err.message[:150] + " ... " + err.message[-120:]
    return f"argument {where!r}: {msg}"


class Session:
    """One agent's private database in a worker; ``call`` never raises for tool faults."""

    def __init__(self, handle: EnvHandle):
        self.handle = handle
        self.closed = False
        self.lost: str | None = None
        self._open()

    def _open(self) -> None:
        sid = next(self.handle.pool._sids)
        try:
            resp, _, inst = self.handle.worker.request({"op": "open", "key": self.handle.key, "sid": sid},
                                                       env=self.handle, timeout=self.handle.pool.config.call_timeout_s)
        except WorkerFailure as exc:
            raise SandboxError(f"cannot open a session: {exc}") from None
        self._opened(sid, inst, resp)

    def _opened(self, sid: int, inst: int, resp: dict[str, Any]) -> None:
        if not resp.get("ok"):
            raise SandboxError(f"cannot open a session: {resp.get('error')}")
        self.sid, self.instance, self.lost = sid, inst, None
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, self.handle.worker.pending_close.append, (inst, sid))

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, tool: str, args: dict[str, Any] | None,
                 requestor: str = "assistant") -> tuple[dict[str, Any] | None, ToolResult | None]:
        """The worker request of a call, or the result that answers it without the worker."""
        if self.closed:
            raise SandboxError("the session is closed")
        args = {} if args is None else args
        if requestor == "user":
            bad = None if tool in self.handle._user_tools else ToolResult.failure(
                "unknown_tool", f"unknown user tool {str(tool)[:200]!r}; the user's tools: "
                                f"{', '.join(sorted(self.handle._user_tools)) or 'none'}")
        else:
            bad = self.handle.validate(tool, args)
        if bad is not None:
            return None, bad
        if self.lost:
            return None, ToolResult.failure("environment", self.lost)
        request: protocol.CallRequest = {"op": "call", "sid": self.sid, "tool": tool, "args": args}
        if requestor == "user":
            request["requestor"] = "user"
        return request, None

    def _lost(self, exc: WorkerFailure) -> ToolResult:
        self.lost = f"{exc}; reset() or open a new session to continue"
        return ToolResult.failure("environment", str(exc))

    @staticmethod
    def _result(resp: dict[str, Any], as_text: bool = False) -> ToolResult:
        if resp.get("ok"):
            raw = resp["content_json"]
            return ToolResult(True, json.loads(raw) if not as_text or raw.startswith('"') else raw, None, None)
        return ToolResult(False, None, resp.get("error"), resp.get("error_kind") or "environment")

    def call(self, tool: str, args: dict[str, Any] | None = None, *, requestor: str = "assistant") -> ToolResult:
        """Run one tool call; ``requestor="user"`` runs one of the user's tools (``EnvHandle.user_tools``)."""
        request, answer = self._request(tool, args, requestor)
        if answer is not None:
            return answer
        try:
            resp, _, _ = self.handle.worker.request(request, timeout=self.handle.pool.config.call_timeout_s,
                                                    instance=self.instance)
        except WorkerFailure as exc:
            return self._lost(exc)
        return self._result(resp)

    async def acall(self, tool: str, args: dict[str, Any] | None = None, *, as_text: bool = False) -> ToolResult:
        """``call`` for a coroutine: the request goes to the worker's pipe and the reply is
        awaited on the event loop, with no thread per call. ``as_text``: a successful result's
        ``content`` is what ``ToolResult.text()`` would give (the worker's JSON as it sent it,
        or the string a tool returned), without decoding and encoding it again."""
        request, answer = self._request(tool, args)
        if answer is not None:
            return answer
        try:
            resp, _, _ = await self.handle.worker.arequest(request, timeout=self.handle.pool.config.call_timeout_s,
                                                           instance=self.instance)
        except WorkerFailure as exc:
            return self._lost(exc)
        return self._result(resp, as_text)

    def prepare(self, initial_state: dict[str, Any] | None) -> None:
        """Back to the initial state, then into a task's own (τ²'s ``initial_state``); raises ``SandboxError``."""
        if self.closed:
            raise SandboxError("the session is closed")
        if self.lost:
            self._open()
        try:
            resp, _, _ = self.handle.worker.request({"op": "prepare", "sid": self.sid, "initial_state": initial_state},
                                                    timeout=self.handle.pool.config.call_timeout_s,
                                                    instance=self.instance)
        except WorkerFailure as exc:
            self.lost = str(exc)
            raise SandboxError(str(exc)) from None
        if not resp.get("ok"):
            raise SandboxError(resp.get("error") or "the task's initial state could not be applied")

    def reset(self) -> None:
        """Back to the environment's initial database (a new worker session if it was lost)."""
        if self.closed:
            raise SandboxError("the session is closed")
        if self.lost:
            self._open()
            return
        try:
            resp, _, _ = self.handle.worker.request({"op": "reset", "sid": self.sid},
                                                    timeout=self.handle.pool.config.call_timeout_s,
                                                    instance=self.instance)
        except WorkerFailure:
            self._open()
            return
        if not resp.get("ok"):
            self._open()

    def snapshot(self) -> bytes:
        """The session's database now, as SQLite bytes."""
        if self.closed:
            raise SandboxError("the session is closed")
        if self.lost:
            raise SandboxError(self.lost)
        try:
            resp, blobs, _ = self.handle.worker.request({"op": "snapshot", "sid": self.sid},
                                                        timeout=self.handle.pool.config.call_timeout_s,
                                                        instance=self.instance)
        except WorkerFailure as exc:
            self.lost = str(exc)
            raise SandboxError(str(exc)) from None
        if not resp.get("ok") or not blobs:
            raise SandboxError(resp.get("error") or "the worker returned no snapshot")
        return blobs[0]

    def close_later(self) -> None:
        """Close without waiting for the worker (safe from finalizers and any thread)."""
        if not self.closed:
            self.closed = True
            self._finalizer()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._finalizer.detach()
        if not self.lost and not self.handle.pool._closed:
            try:
                self.handle.worker.request({"op": "close", "sid": self.sid}, timeout=5, instance=self.instance)
            except (WorkerFailure, SandboxError):
                pass

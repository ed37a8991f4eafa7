"""One spending cap for every process of a run, kept in PostgreSQL (``llm.budget_dsn``).

``Budget`` counts in one process, so N Dask worker processes would each spend up to the cap.
``SharedBudget`` keeps the run's spend in one row of ``awm_budget.run_spend`` in a PostgreSQL
database all workers reach (its own schema: this is no catalog table; the catalog's metadata
database may host it, or any other). Each call is two atomic statements:

- before the call, ``reserve``: ``UPDATE ... SET reserved = reserved + estimate WHERE run_id = ...
  AND spent + reserved < cap RETURNING ...``; no row back means the cap is reached and
  ``BudgetExceeded`` is raised without calling the model;
- after it, ``settle``: the estimate is released and the actual cost added to ``spent``.

The estimate is the prompt's estimated tokens plus the request's ``max_tokens`` of completion,
priced like the call, so a reply cannot cost more than was reserved unless the prompt estimate
(about 4 characters a token) runs low. Guarantee: a call starts only while ``spent + reserved``
is under the cap, so each worker has at most one call in flight past the cap and the run's
recorded spend stays under ``cap + workers x the most expensive call``. A process killed mid-call
leaves its reservation counted (spend can only be over-, never under-counted).

PostgreSQL unreachable: the call is refused with an ``LLMError`` naming the server (never its
password); failing open would let the run spend past the cap unseen. Lost only when settling,
the client keeps the reply and the reservation stays counted.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Callable, Coroutine

from awm_core.errors import BudgetExceeded, LLMError
from awm_core.llm.records import Budget, Hold

SCHEMA = "awm_budget"
DDL = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.run_spend (
        run_id text PRIMARY KEY,
        cap_usd double precision,
        spent_usd double precision NOT NULL DEFAULT 0,
        reserved_usd double precision NOT NULL DEFAULT 0,
        calls bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now())""",
)
RESERVE = (f"UPDATE {SCHEMA}.run_spend SET reserved_usd = reserved_usd + $2, updated_at = now() "
           "WHERE run_id = $1 AND spent_usd + reserved_usd < $3 RETURNING spent_usd")
SETTLE = (f"UPDATE {SCHEMA}.run_spend SET reserved_usd = greatest(reserved_usd - $2, 0), "
          "spent_usd = spent_usd + $3, calls = calls + $4, updated_at = now() WHERE run_id = $1 RETURNING spent_usd")


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg arguments from a URL (postgresql://user@host:port/db) or a libpq keyword string
    (``dbname=... host=... port=... user=... password=...``, the catalog's own form)."""
    if "://" in dsn:
        return {"dsn": dsn}
    names = {"dbname": "database", "host": "host", "port": "port", "user": "user", "password": "password"}
    out: dict[str, Any] = {}
    for part in dsn.split():
        key, sep, value = part.partition("=")
        if not sep or key not in names:
            raise LLMError(f"llm.budget_dsn: cannot read {key!r} (use postgresql://user@host:port/db, or "
                           "dbname=... host=... port=... user=... password=...)")
        out[names[key]] = int(value) if key == "port" else value
    return out


def describe(dsn: str) -> str:
    """The server and database of a DSN, without user or password, for error messages."""
    kw = connect_kwargs(dsn)
    if "dsn" in kw:
        from urllib.parse import urlsplit

        parts = urlsplit(kw["dsn"])
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 5432)}/{kw.get('database', '')}"


class SharedBudget:
    """The run's cap, shared through PostgreSQL; the same interface as ``Budget`` for the client.

    Safe to use from many threads: the statements run on one connection owned by a private
    event loop thread, so callers need no event loop of their own (Prefect's or a notebook's)."""

    def __init__(self, dsn: str, run_id: str, cap_usd: float | None, connect_timeout_s: float = 10.0):
        if cap_usd is not None and cap_usd < 0:
            raise ValueError(f"budget cap must be >= 0, got {cap_usd}")
        self.cap_usd = cap_usd
        self.run_id = run_id
        self._dsn = dsn
        self._where = describe(dsn)
        self._timeout = connect_timeout_s
        self._con = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the client's interface
    def reserve(self, estimate_usd: float) -> Hold:
        """Reserve a call's estimated cost, or raise ``BudgetExceeded`` when the cap is reached."""
        cap = float("inf") if self.cap_usd is None else self.cap_usd
        row = self._run(lambda con: con.fetchrow(RESERVE, self.run_id, float(estimate_usd), cap))
        if row is None:
            raise BudgetExceeded(self.message())
        return Hold(float(estimate_usd))

    def settle(self, hold: Hold, cost_usd: float, called: bool = True) -> float:
        """Release the reservation and record what the call cost; returns the run's spend."""
        row = self._run(lambda con: con.fetchrow(SETTLE, self.run_id, hold.estimate_usd, float(cost_usd),
                                                 1 if called else 0))
        return float(row["spent_usd"]) if row else 0.0

    @property
    def spent_usd(self) -> float:
        return self._totals()[0]

    @property
    def reserved_usd(self) -> float:
        return self._totals()[1]

    @property
    def remaining_usd(self) -> float | None:
        return None if self.cap_usd is None else max(0.0, self.cap_usd - self.spent_usd)

    def exhausted(self) -> bool:
        spent, reserved = self._totals()
        return self.cap_usd is not None and spent + reserved >= self.cap_usd

    def check(self) -> None:
        if self.exhausted():
            raise BudgetExceeded(self.message())

    def message(self) -> str:
        spent, reserved = self._totals()
        return (f"LLM budget exhausted: the run {self.run_id} has spent ${spent:.4f} (${reserved:.4f} more in "
                f"flight) of the ${self.cap_usd:.4f} cap shared by all its workers ({self._where}); no further "
                "calls are made (raise llm.budget_usd, e.g. AWM_LLM__BUDGET_USD, to go on)")

    def close(self) -> None:
        with self._lock:
            if self._loop is not None:
                if self._con is not None:
                    with contextlib.suppress(Exception):  # already gone: nothing left to close
                        asyncio.run_coroutine_threadsafe(self._con.close(), self._loop).result(timeout=10)
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._con = self._loop = None

    def __repr__(self) -> str:
        return f"SharedBudget(run_id={self.run_id!r}, cap_usd={self.cap_usd}, at={self._where})"

    # ------------------------------------------------------------------ internals
    def _totals(self) -> tuple[float, float]:
        row = self._run(lambda con: con.fetchrow(
            f"SELECT spent_usd, reserved_usd FROM {SCHEMA}.run_spend WHERE run_id = $1", self.run_id))
        return (float(row["spent_usd"]), float(row["reserved_usd"])) if row else (0.0, 0.0)

    def _run(self, statement: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
        """Run one statement; a connection lost since the last call gets one fresh try.

        Should the connection die after PostgreSQL applied an UPDATE but before its reply came
        back, the retry applies it twice: that counts more spend or reservation, never less."""
        with self._lock:
            for _ in range(2):
                try:
                    if self._con is None or self._con.is_closed():
                        self._await(self._open())
                    return self._await(statement(self._con))
                except Exception as exc:  # noqa: BLE001 - every failure here means "cannot account"
                    failure = exc
                    self._drop()
            raise LLMError(f"the shared LLM budget at {self._where} (llm.budget_dsn) cannot be used: "
                           f"{type(failure).__name__}: {_first_line(failure)}; no LLM call is made without it")

    def _drop(self) -> None:
        if self._con is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._con.terminate)
        self._con = None

    def _await(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="awm-shared-budget", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=self._timeout + 30)

    async def _open(self) -> None:
        import asyncpg

        con = await asyncpg.connect(**connect_kwargs(self._dsn), timeout=self._timeout)
        for stmt in DDL:
            try:
                await con.execute(stmt)
            except asyncpg.UniqueViolationError:
                pass  # another worker created it at the same moment (CREATE ... IF NOT EXISTS races)
        await con.execute(f"INSERT INTO {SCHEMA}.run_spend (run_id, cap_usd) VALUES ($1, $2) "
                          "ON CONFLICT (run_id) DO NOTHING", self.run_id, self.cap_usd)
        self._con = con


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "no detail"


def run_budget(settings: Any, run_id: str) -> Budget | SharedBudget:
    """The budget of a run: shared through ``llm.budget_dsn`` when set, else this process's own."""
    dsn = settings.llm.budget_dsn
    if dsn is None:
        return Budget(cap_usd=settings.llm.budget_usd)
    return SharedBudget(dsn.get_secret_value(), run_id, settings.llm.budget_usd)

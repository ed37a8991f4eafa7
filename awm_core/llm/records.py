"""Accounting of LLM calls: one ``CallRecord`` per call, a shared ``Budget`` and the ledger file."""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from awm_core.errors import BudgetExceeded
from awm_core.models import utcnow
from awm_core.settings import Price

log = logging.getLogger(__name__)


class CallRecord(BaseModel):
    """What one LLM call cost and how it went; the catalog's ``llm_calls`` table stores these."""

    call_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    run_id: str | None = None
    role: str
    stage: str
    scenario_id: str
    attempt: int
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0
    cached: bool = False
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


def call_cost(prices: dict[str, Price], model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """Estimated cost in USD from the per-million-token price table (0 for an unpriced model)."""
    price = prices.get(model)
    if price is None:
        _warn_unpriced(model)
        return 0.0
    return (prompt_tokens * price.prompt_per_mtok + completion_tokens * price.completion_per_mtok) / 1_000_000


_unpriced_warned: set[str] = set()


def _warn_unpriced(model: str) -> None:
    # An unpriced model is never charged, so the budget cap cannot protect it: say so once.
    if model not in _unpriced_warned:
        _unpriced_warned.add(model)
        log.warning("model %r has no entry in llm.prices; its calls count as $0 against the budget", model)


@dataclass
class Hold:
    """What a budget reserved for one call; the client settles it once the call is over."""

    estimate_usd: float


class Budget:
    """Spend tracker shared by every client of one run in one process; safe from many threads.

    ``check()`` refuses further calls once ``spent >= cap``. Calls already in flight finish, so
    with N concurrent calls the spend can pass the cap by at most N calls' cost. Each process
    has its own: for one cap across the processes and machines of a run, see ``SharedBudget``.
    """

    def __init__(self, cap_usd: float | None, spent_usd: float = 0.0):
        if cap_usd is not None and cap_usd < 0:
            raise ValueError(f"budget cap must be >= 0, got {cap_usd}")
        self.cap_usd = cap_usd
        self._spent = float(spent_usd)
        self._lock = threading.Lock()

    @property
    def spent_usd(self) -> float:
        with self._lock:
            return self._spent

    @property
    def remaining_usd(self) -> float | None:
        return None if self.cap_usd is None else max(0.0, self.cap_usd - self.spent_usd)

    def charge(self, cost_usd: float) -> None:
        with self._lock:
            self._spent += cost_usd

    def exhausted(self) -> bool:
        return self.cap_usd is not None and self.spent_usd >= self.cap_usd

    def reserve(self, estimate_usd: float) -> Hold:
        """Before a call: refuse it when the cap is reached (in one process nothing is set aside)."""
        self.check()
        return Hold(estimate_usd)

    def settle(self, hold: Hold, cost_usd: float, called: bool = True) -> float:
        """After a call: add what it cost; returns the spend so far."""
        self.charge(cost_usd)
        return self.spent_usd

    def check(self) -> None:
        if self.exhausted():
            raise BudgetExceeded(self.message())

    def message(self) -> str:
        return (
            f"LLM budget exhausted: spent ${self.spent_usd:.4f} of the ${self.cap_usd:.4f} cap; "
            "no further calls are made (raise llm.budget_usd, e.g. AWM_LLM__BUDGET_USD, to go on)"
        )

    def __repr__(self) -> str:
        return f"Budget(cap_usd={self.cap_usd}, spent_usd={self.spent_usd:.6f})"


class Ledger:
    """Append-only JSON-lines file of call records.

    Each line is flushed and fsynced before the call returns, so a killed process loses at most
    the line being written; ``read_ledger`` skips such a torn last line.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: CallRecord) -> None:
        line = record.model_dump_json() + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())


def ledger_path(runs_dir: Path, run_id: str) -> Path:
    """Where a run's ledger lives: ``AWM_HOME/runs/<run_id>/llm_calls.jsonl``."""
    return Path(runs_dir) / run_id / "llm_calls.jsonl"


def read_ledger(path: str | os.PathLike) -> list[CallRecord]:
    """All records of a ledger file; an unreadable line is an error unless it is a torn last line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(CallRecord.model_validate(json.loads(line)))
        except ValueError:
            if i == len(lines) - 1:
                log.warning("%s: skipping a torn last line (the writer was killed mid-write)", path)
                break
            raise ValueError(f"{path}:{i + 1}: not a call record: {line[:120]!r}") from None
    return records

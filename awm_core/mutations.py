"""Plausible wrong episodes derived from a reference solution, to test verifiers with.

A verifier that passes the reference solution and rejects a no-op can still be lenient: it
may not look at every change the task asks for, at which row was changed, at damage done
elsewhere, or at the exact number in an answer. Each builder here makes one kind of wrong
episode; ``awm_core.validation.mutation_checks`` replays or verifies them in the sandbox.

- ``drop_call``: the solution without one of its state-changing calls;
- ``swap_argument``: one id argument of a state-changing call pointing at another row of the
  same table;
- ``extra_destructive``: the final database with a row deleted from a table the solution did
  not touch (damage done directly to the bytes: no tool need allow it);
- ``wrong_answer``: the answer with its numbers changed, or embedded in longer numbers (a
  verifier that tests ``"4" in answer`` accepts "14").

Pure functions over SQLite bytes and plain values: nothing here runs generated code.
"""
from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from awm_core.db import open_snapshot
from awm_core.models import ReferenceSolution, ToolCall

MUTATIONS = ("drop_call", "swap_argument", "extra_destructive", "wrong_answer")


@dataclass(frozen=True)
class Swap:
    call_idx: int
    argument: str
    old: int
    new: int
    table: str


def without_call(solution: ReferenceSolution, idx: int) -> list[tuple[int, ToolCall]]:
    """The calls with their original indices (so ``$ref`` to other calls still resolve)."""
    return [(i, c) for i, c in enumerate(solution.calls) if i != idx]


def with_swap(solution: ReferenceSolution, swap: Swap) -> list[tuple[int, ToolCall]]:
    calls = []
    for i, c in enumerate(solution.calls):
        if i == swap.call_idx:
            c = c.model_copy(update={"arguments": {**c.arguments, swap.argument: swap.new}})
        calls.append((i, c))
    return calls


# --------------------------------------------------------------------------- swap_argument


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def _integer_key(conn: sqlite3.Connection, table: str) -> str | None:
    """The table's single-column integer primary key, if it has one."""
    pk = [r for r in conn.execute(f'PRAGMA table_info("{table}")') if r[5]]
    if len(pk) != 1 or "INT" not in (pk[0][2] or "").upper():
        return None
    return pk[0][1]


def word_stem(word: str) -> str:
    """Singular of a table-name word: entries → entry, addresses → address, notes → note."""
    word = word.lower()
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _name_score(table: str, argument: str, tool: str) -> int:
    """How well a table's name matches an id argument: ``order_id`` → ``orders``; a bare
    ``id`` is read from the tool's name (``update_order(id=...)``)."""
    words = argument[:-3].split("_") if argument.endswith("_id") else tool.split("_")
    stems = {word_stem(w) for w in words if w}
    table_stem = word_stem(table.split("_")[-1])
    if word_stem(table) in stems or "_".join(word_stem(w) for w in words) == word_stem(table):
        return 2
    return 1 if table_stem in stems else 0


def id_arguments(arguments: dict[str, Any]) -> list[tuple[str, int]]:
    """Top-level integer arguments named ``id`` or ``*_id`` (``$ref`` values are left alone)."""
    return [(k, v) for k, v in arguments.items()
            if (k == "id" or k.endswith("_id")) and isinstance(v, int) and not isinstance(v, bool)]


def named_table(conn: sqlite3.Connection, tool: str, argument: str) -> tuple[str, str] | None:
    """(table, key column) an id argument names, by name alone (``reservation_id`` →
    ``reservations``; a bare ``id`` by the tool's name): the single best-scoring table with an
    integer key, None when no name fits or two fit equally well."""
    scored = [(_name_score(t, argument, tool), t, k) for t in _tables(conn) if (k := _integer_key(conn, t))]
    best = max((s for s, _, _ in scored), default=0)
    hits = [(t, k) for s, t, k in scored if s == best]
    return hits[0] if best > 0 and len(hits) == 1 else None


def swap_for(initial_db: bytes, tool: str, argument: str, value: int) -> tuple[str, int] | None:
    """(table, another key) for an id argument whose value is a key of some table: the table
    whose name fits the argument best, and its nearest other key. None without a candidate."""
    conn = open_snapshot(initial_db, readonly=True)
    try:
        found = []
        for table in _tables(conn):
            key = _integer_key(conn, table)
            if key and conn.execute(f'SELECT 1 FROM "{table}" WHERE "{key}" = ?', (value,)).fetchone():
                found.append((_name_score(table, argument, tool), table, key))
        if not found:
            return None
        score, table, key = max(found, key=lambda f: f[0])
        if score == 0 and len(found) > 1:
            return None  # the value is a key of several tables and the name says none of them
        other = conn.execute(f'SELECT min("{key}") FROM "{table}" WHERE "{key}" > ?', (value,)).fetchone()[0]
        if other is None:
            other = conn.execute(f'SELECT max("{key}") FROM "{table}" WHERE "{key}" < ?', (value,)).fetchone()[0]
        return (table, other) if other is not None else None
    finally:
        conn.close()


# --------------------------------------------------------------------------- extra_destructive


def _table_rows(conn: sqlite3.Connection, table: str) -> list[tuple]:
    return sorted(conn.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr)


def changed_tables(initial_db: bytes, final_db: bytes) -> set[str]:
    a, b = open_snapshot(initial_db, readonly=True), open_snapshot(final_db, readonly=True)
    try:
        return {t for t in _tables(b) if t not in _tables(a) or _table_rows(a, t) != _table_rows(b, t)}
    finally:
        a.close()
        b.close()


def delete_unrelated_row(final_db: bytes, untouchable: set[str], *, prefer: str = "") -> tuple[bytes, str] | None:
    """``final_db`` with the first row of a non-empty table outside ``untouchable`` deleted,
    and a description of it. Tables whose names appear in ``prefer`` (the verifier's source)
    come first: damage where the verifier already looks is the clearest miss. Foreign keys are
    off for the delete: the point is a damaged state, not one the schema would allow."""
    conn = open_snapshot(final_db)
    try:
        conn.execute("PRAGMA foreign_keys = OFF")
        tables = sorted((t for t in _tables(conn) if t not in untouchable),
                        key=lambda t: (not re.search(rf"\b{re.escape(t)}\b", prefer), t))
        for table in tables:
            try:
                row = conn.execute(f'SELECT rowid, * FROM "{table}" ORDER BY rowid LIMIT 1').fetchone()
            except sqlite3.OperationalError:  # a WITHOUT ROWID table
                continue
            if row is None:
                continue
            conn.execute(f'DELETE FROM "{table}" WHERE rowid = ?', (row[0],))
            conn.commit()
            shown = ", ".join(map(repr, row[1:5])) + (", ..." if len(row) > 5 else "")
            return conn.serialize(), f"deleted the first row of {table} ({shown})"
        return None
    finally:
        conn.close()


# --------------------------------------------------------------------------- wrong_answer

# What counts as one number in an answer; the verifier prompt gives the same pattern, so a
# verifier that parses values the way it is told reads numbers exactly as these mutants change them.
NUMBER_PATTERN = r"\d(?:[\d,]*\d)?(?:\.\d+)?"
_NUMBER = re.compile(NUMBER_PATTERN)


def _bump(number: str, avoid: set[str]) -> str:
    """The number with the last digit of its integer part changed (``35`` → ``36``), to a
    value that is none of ``avoid`` (the answer's own numbers: "Dec 3" must not become the
    "4" that was asked for)."""
    whole, dot, frac = number.partition(".")
    i = max(j for j, ch in enumerate(whole) if ch.isdigit())
    for step in range(1, 10):
        out = whole[:i] + str((int(whole[i]) + step) % 10) + whole[i + 1:] + dot + frac
        if out not in avoid:
            return out
    return "9" + number


def without_numbers(answer: str) -> str:
    return _NUMBER.sub("", answer)


def wrong_answers(answer: str) -> list[tuple[str, str]]:
    """(label, wrong answer) pairs: every number changed; every number inside a longer one.

    Every number at once, because changing one of several (the total, or a part of it) may
    leave the asked value in place. Empty when the answer has no number to change."""
    numbers = set(_NUMBER.findall(answer))
    if not numbers:
        return []
    return [("numbers changed", _NUMBER.sub(lambda m: _bump(m.group(), numbers), answer)),
            ("numbers embedded in longer numbers", _NUMBER.sub(lambda m: f"1{m.group()}1", answer))]

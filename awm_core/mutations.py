"""Plausible wrong episodes derived from a reference solution, to test verifiers with, and the
equivalent episodes a verifier must still accept.

A verifier that passes the reference solution and rejects a no-op can still be lenient: it
may not look at every change the task asks for, at the values a change writes, at which row was
changed, at changes made elsewhere, or at the exact value in an answer. Each builder here makes
one kind of wrong episode; ``awm_core.soundness.mutation_checks`` replays or verifies them in the
sandbox:

- ``drop_call``: the solution without one of its state-changing calls;
- ``swap_argument``: one id argument of a state-changing call pointing at another row of the
  same table;
- ``change_value``: one non-id argument the task names (a value it states) replaced by another
  valid one (another enum member, number, date or time, the boolean flipped, another seeded
  string); an argument whose value the task does not state is judged free and left alone;
- ``extra_destructive``: the final database with a row deleted from a table the solution did
  not touch (damage done directly to the bytes: no tool need allow it);
- ``extra_insert``: the final database plus a copy (new key) of a row, in a table the solution
  changes and in another one;
- ``extra_update``: the final database with one column of a row the task did not ask to change
  altered: another column of a row the solution updates, and a row of another table;
- ``wrong_answer``: the answer with its numbers changed, or embedded in longer numbers (a
  verifier that tests ``"4" in answer`` accepts "14");
- ``hedged_answer``: the right value plus a wrong candidate of the same kind (another name or
  status from the same column, another count), and the asked number only inside a date.

Too strict is checked the other way (``awm_core.soundness.equivalence_checks``): read-only
calls around the solution, its independent state-changing calls reordered, the answer reworded
(``reworded_answers``).

Pure functions over SQLite bytes and plain values: nothing here runs generated code.
"""
from __future__ import annotations

import datetime
import difflib
import json
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from awm_core.answers import NUMBER_PATTERN, answer_numbers, date_time_spans, number_matches
from awm_core.changes import db_changes, key_columns, user_tables
from awm_core.db import open_snapshot
from awm_core.models import ReferenceSolution, ToolCall, ToolSpec, is_ref, refs_in

MUTATIONS = ("drop_call", "swap_argument", "change_value", "extra_destructive", "extra_insert", "extra_update",
             "wrong_answer", "hedged_answer")


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


def with_argument(solution: ReferenceSolution, change: "Swap | ValueChange") -> list[tuple[int, ToolCall]]:
    """The calls with their original indices, one argument of one call set to ``change.new``."""
    calls = []
    for i, c in enumerate(solution.calls):
        if i == change.call_idx:
            c = c.model_copy(update={"arguments": {**c.arguments, change.argument: change.new}})
        calls.append((i, c))
    return calls


# --------------------------------------------------------------------------- swap_argument


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
    scored = [(_name_score(t, argument, tool), t, k) for t in user_tables(conn) if (k := _integer_key(conn, t))]
    best = max((s for s, _, _ in scored), default=0)
    hits = [(t, k) for s, t, k in scored if s == best]
    return hits[0] if best > 0 and len(hits) == 1 else None


def swap_for(initial_db: bytes, tool: str, argument: str, value: int) -> tuple[str, int] | None:
    """(table, another key) for an id argument whose value is a key of some table: the table
    whose name fits the argument best, and its nearest other key. None without a candidate."""
    conn = open_snapshot(initial_db, readonly=True)
    try:
        found = []
        for table in user_tables(conn):
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


# --------------------------------------------------------------------------- change_value

# Words of a parameter name that say nothing about what a boolean means.
_FILLER = {"is", "has", "should", "do", "does", "can", "allow", "enable", "flag", "set", "mark", "as", "the", "use",
           "include", "with", "to"}
_NUMBER_WORDS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                             "nine", "ten", "eleven", "twelve"))}
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_ISO_DATE_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}):(\d{2})(:\d{2})?$")
_CLOCK_TIME = re.compile(r"^(\d{2}):(\d{2})(:\d{2})?$")
_ISO_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December")


@dataclass(frozen=True)
class ValueChange:
    call_idx: int
    argument: str
    old: Any
    new: Any
    kind: str  # what the new value is: "another enum member", "the boolean flipped", ...


def _normal(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


def _task_numbers(task: str) -> set[float]:
    """Numbers the task states, outside its dates and times, and small ones written as words."""
    found = {float(m.group().replace(",", "")) for m in number_matches(task)}
    return found | {float(n) for w, n in _NUMBER_WORDS.items() if f" {w} " in _normal(task)}


def _date_forms(iso: str) -> list[str]:
    y, m, d = (int(x) for x in iso.split("-"))
    month = _MONTH_NAMES[m - 1].lower()
    return [iso, f"{month} {d}", f"{month[:3]} {d}", f"{d} {month}", f"{d} {month[:3]}", f"{m}/{d}/{y}"]


def _time_forms(hour: int, minute: int) -> list[str]:
    h12, half = hour % 12 or 12, "am" if hour < 12 else "pm"
    forms = [f"{hour:02d}:{minute:02d}", f"{hour}:{minute:02d}", f"{h12}:{minute:02d} {half}", f"{h12}:{minute:02d}{half}"]
    if minute == 0:
        forms += [f"{h12} {half}", f"{h12}{half}", f"{h12} o clock"]
    if (hour, minute) == (12, 0):
        forms.append("noon")
    return forms


def _same_word(a: str, b: str) -> bool:
    """One word in two spellings or inflections: "reject"/"rejected", "favorite"/"favourite"."""
    a, b = word_stem(a), word_stem(b)
    if a == b:
        return True
    return min(len(a), len(b)) >= 5 and difflib.SequenceMatcher(None, a, b).ratio() >= 0.8


def _words_in(words: list[str], task: str) -> bool:
    said = _normal(task).split()
    return bool(words) and all(any(_same_word(w, t) for t in said) for w in words)


def named_in_task(task: str, argument: str, value: Any) -> bool:
    """Whether the task states this argument's value, so that another value is a wrong episode.
    A value the task does not state (an optional note, a title the solution made up, a date
    worked out from "tomorrow") is free: another one may be just as right."""
    text = _normal(task)
    if isinstance(value, bool):
        return _words_in([w for w in argument.lower().split("_") if w and w not in _FILLER], task)
    if isinstance(value, (int, float)):
        return float(value) in _task_numbers(task)
    if not isinstance(value, str) or not value.strip():
        return False
    if m := _ISO_DATE_TIME.match(value):
        date_named = any(_normal(f) in text for f in _date_forms(m.group(1)))
        return date_named or any(_normal(f) in text for f in _time_forms(int(m.group(2)), int(m.group(3))))
    if _ISO_DATE.match(value):
        return any(_normal(f) in text for f in _date_forms(value))
    if m := _CLOCK_TIME.match(value):
        return any(_normal(f) in text for f in _time_forms(int(m.group(1)), int(m.group(2))))
    if m := _ISO_MONTH.match(value):
        month = _MONTH_NAMES[int(m.group(2)) - 1].lower() if 1 <= int(m.group(2)) <= 12 else "-"
        return any(_normal(f) in text for f in (value, f"{month} {m.group(1)}", f"{month[:3]} {m.group(1)}"))
    words = _normal(value.replace("_", " ")).split()
    if len(words) == 1 or re.fullmatch(r"[a-z0-9]+(?:_[a-z0-9]+)+", value):
        # A status or kind: "rejected" is stated by "Reject ...", bank_transfer by "bank transfer".
        return _words_in(words, task)
    # Free text is stated when quoted ("with the comment 'Very thorough'") or written as it is
    # ("Thai Green Curry"); words that merely describe the thing ("the conference pass" for a
    # description "Conference pass") leave the wording free.
    quoted = [_normal(q) for groups in re.findall(r"'([^']+)'|\"([^\"]+)\"|‘([^’]+)’|“([^”]+)”", task)
              for q in groups if q]
    return _normal(value) in quoted or bool(re.search(rf"(?<!\w){re.escape(value.strip())}(?!\w)", task))


def _check_members(conn: sqlite3.Connection, argument: str, value: Any) -> list[str]:
    """Members of a ``CHECK (<argument> IN (...))`` constraint on a column of that name that
    lists ``value`` (tables may each have their own ``status`` list)."""
    for (sql,) in conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL"):
        for m in re.finditer(rf"\bCHECK\s*\(\s*[\"`\[]?{re.escape(argument)}[\"`\]]?\s+IN\s*\(([^)]*)\)", sql, re.I):
            members = [x.replace("''", "'") for x in re.findall(r"'((?:[^']|'')*)'", m.group(1))]
            if value in members:
                return members
    return []


def _seeded_values(conn: sqlite3.Connection, argument: str) -> list[Any]:
    """Distinct values of columns named like the argument, over every table."""
    out: list[Any] = []
    for table in user_tables(conn):
        for col in (r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')):
            if col.lower() == argument.lower():
                out += [r[0] for r in conn.execute(
                    f'SELECT DISTINCT "{col}" FROM "{table}" WHERE "{col}" IS NOT NULL ORDER BY 1 LIMIT 200')]
    return out


# Every other member of a short list is tried: a verifier that forbids some statuses instead of
# demanding the one the task names accepts the others.
MAX_ENUM_MEMBERS = 4


def other_values(conn: sqlite3.Connection, argument: str, value: Any, param: Any = None) -> list[tuple[Any, str]]:
    """[(another valid value, what it is)] for an argument: each other member (up to
    ``MAX_ENUM_MEMBERS``) where the spec or a CHECK constraint lists them, else the next value."""
    enum = list(getattr(param, "enum", None) or []) or _check_members(conn, argument, value)
    if enum and value in enum:
        return [(e, "another enum member") for e in enum if e != value][:MAX_ENUM_MEMBERS]
    found = _next_value(conn, argument, value)
    return [found] if found else []


def _next_value(conn: sqlite3.Connection, argument: str, value: Any) -> tuple[Any, str] | None:
    """(another valid value, what it is) for a value no list names: the next number, day, month
    or hour; the boolean flipped; another seeded string of a column of the same name."""
    if isinstance(value, bool):
        return not value, "the boolean flipped"
    if isinstance(value, int):
        return value + 1, "another number"
    if isinstance(value, float):
        return value + 1.0, "another number"
    if not isinstance(value, str):
        return None
    if m := _ISO_DATE_TIME.match(value):
        day = (datetime.date.fromisoformat(m.group(1)) + datetime.timedelta(days=1)).isoformat()
        return value.replace(m.group(1), day, 1), "another date"
    if _ISO_DATE.match(value):
        return (datetime.date.fromisoformat(value) + datetime.timedelta(days=1)).isoformat(), "another date"
    if m := _ISO_MONTH.match(value):
        y, mo = int(m.group(1)), int(m.group(2))
        return (f"{y + mo // 12:04d}-{mo % 12 + 1:02d}", "another month") if 1 <= mo <= 12 else None
    if m := _CLOCK_TIME.match(value):
        return f"{(int(m.group(1)) + 1) % 24:02d}:{m.group(2)}{m.group(3) or ''}", "another time"
    others = [v for v in _seeded_values(conn, argument) if isinstance(v, str) and v.strip().lower() != value.strip().lower()]
    return (others[0], "another seeded value") if others else None


def value_changes(initial_db: bytes, solution: ReferenceSolution, changing: list[int], tools: dict[str, ToolSpec],
                  task: str) -> tuple[list[ValueChange], list[str]]:
    """(changes to try, arguments judged free) over the top-level non-id arguments of the
    state-changing calls. Id arguments are ``swap_argument``'s; ``$ref`` values are results."""
    conn = open_snapshot(initial_db, readonly=True)
    changes: list[ValueChange] = []
    free: list[str] = []
    try:
        for i in changing:
            call = solution.calls[i]
            spec = tools.get(call.tool)
            for name, value in call.arguments.items():
                if name == "id" or name.endswith("_id") or is_ref(value) or isinstance(value, (list, dict)) \
                        or value is None:
                    continue
                if not named_in_task(task, name, value):
                    free.append(f"{call.tool}.{name}={_shown(value)}")
                    continue
                for new, kind in other_values(conn, name, value, spec.parameters.get(name) if spec else None):
                    changes.append(ValueChange(i, name, value, new, kind))
    finally:
        conn.close()
    return changes, free


def _shown(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."


# --------------------------------------------------------------------------- extra_destructive, extra_insert, extra_update


def snapshot_changes(initial_db: bytes, final_db: bytes) -> dict[str, dict[str, list]]:
    """``awm_core.changes.db_changes`` of two snapshots."""
    a, b = open_snapshot(initial_db, readonly=True), open_snapshot(final_db, readonly=True)
    try:
        return db_changes(a, b)
    finally:
        a.close()
        b.close()


def _prefer(tables: list[str], prefer: str) -> list[str]:
    """Tables whose names appear in ``prefer`` (the verifier's source) first: a change where
    the verifier already looks is the clearest miss."""
    return sorted(tables, key=lambda t: (not re.search(rf"\b{re.escape(t)}\b", prefer), t))


def _damaged(final_db: bytes, change) -> tuple[bytes, str] | None:
    """``change(conn)`` applied to a writable copy of ``final_db`` with foreign keys and CHECK
    constraints off (the point is a wrong state, not one the schema would allow); its
    description, or None when it found nothing to change."""
    conn = open_snapshot(final_db)
    try:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("PRAGMA ignore_check_constraints = ON")
        what = change(conn)
        if what is None:
            return None
        conn.commit()
        return conn.serialize(), what
    finally:
        conn.close()


def _row_text(row: dict) -> str:
    items = list(row.items())
    return ", ".join(f"{k}={v!r}" for k, v in items[:4]) + (", ..." if len(items) > 4 else "")


def delete_unrelated_row(final_db: bytes, untouchable: set[str], *, prefer: str = "") -> tuple[bytes, str] | None:
    """``final_db`` with the first row of a non-empty table outside ``untouchable`` deleted,
    and a description of it."""
    def delete(conn):
        for table in _prefer([t for t in user_tables(conn) if t not in untouchable], prefer):
            try:
                row = conn.execute(f'SELECT rowid, * FROM "{table}" ORDER BY rowid LIMIT 1').fetchone()
            except sqlite3.OperationalError:  # a WITHOUT ROWID table
                continue
            if row is None:
                continue
            conn.execute(f'DELETE FROM "{table}" WHERE rowid = ?', (row[0],))
            shown = ", ".join(map(repr, row[1:5])) + (", ..." if len(row) > 5 else "")
            return f"deleted the first row of {table} ({shown})"
        return None
    return _damaged(final_db, delete)


def _unique_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    cols: set[str] = set()
    for idx in conn.execute(f'PRAGMA index_list("{table}")'):
        if idx[2]:  # unique
            cols |= {r[2] for r in conn.execute(f'PRAGMA index_info("{idx[1]}")')}
    return cols


def _copy_row(conn: sqlite3.Connection, table: str, row: dict) -> str | None:
    """Insert a copy of ``row`` with a new key (and new values in unique columns); the row as
    inserted, or None when the table refuses every copy."""
    keys = set(key_columns(conn, table))
    unique = _unique_columns(conn, table) | keys
    copy = dict(row)
    for col in unique:
        value = copy.get(col)
        if isinstance(value, int) and not isinstance(value, bool):
            top = conn.execute(f'SELECT max("{col}") FROM "{table}"').fetchone()[0] or 0
            copy[col] = top + 1
        elif isinstance(value, str):
            copy[col] = value + " (2)"
        elif value is None and col in keys:
            copy.pop(col)
    cols = list(copy)
    try:
        conn.execute(f'INSERT INTO "{table}" ({", ".join(f"{chr(34)}{c}{chr(34)}" for c in cols)}) '
                     f'VALUES ({", ".join("?" for _ in cols)})', [copy[c] for c in cols])
    except sqlite3.Error:
        return None
    return _row_text(copy)


def insert_copy(final_db: bytes, tables: list[str], rows_first: dict[str, list[dict]] | None = None,
                *, prefer: str = "", elsewhere: bool = False) -> tuple[bytes, str] | None:
    """``final_db`` plus a copy of one row (new key): of ``rows_first[table]`` when given (the
    rows the solution inserted or updated), else of the table's first row; the first of
    ``tables`` that takes one. ``elsewhere``: the copy points at another row of what its first
    reference column names (a stray parcel for a look-alike customer, a stop copied onto another
    route), which a verifier that only counts rows under the task's own parent misses."""
    def insert(conn):
        for table in _prefer(tables, prefer):
            candidates = list((rows_first or {}).get(table, []))
            cur = conn.execute(f'SELECT * FROM "{table}" LIMIT 3')
            names = [d[0] for d in cur.description]
            candidates += [dict(zip(names, r)) for r in cur]
            for row in candidates:
                where = ""
                if elsewhere:
                    ref = next((c for c, v in row.items() if c.endswith("_id") and isinstance(v, int)
                                and c not in key_columns(conn, table)), None)
                    new = _altered(conn, table, ref, row[ref]) if ref else None
                    if new is None:
                        continue
                    row, where = {**row, ref: new}, f" for another {ref}"
                shown = _copy_row(conn, table, row)
                if shown is not None:
                    return f"inserted into {table} a copy of an existing row{where} with a new key ({shown})"
        return None
    return _damaged(final_db, insert)


def _altered(conn: sqlite3.Connection, table: str, column: str, value: Any) -> Any:
    """Another value for a column: another one the column holds, else the next number or an
    edited text; None when the value is NULL or a blob."""
    other = conn.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL AND "{column}" != ? '
                         f'GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1', (value,)).fetchone()
    if other is not None and type(other[0]) is type(value):
        return other[0]
    if isinstance(value, bool) or value is None or isinstance(value, bytes):
        return None
    if isinstance(value, (int, float)):
        return value + 1
    return value + " (edited)"


def alter_column(final_db: bytes, table: str, key: dict, skip: set[str]) -> tuple[bytes, str] | None:
    """``final_db`` with one column (outside ``skip`` and the key) of the row ``key`` set to
    another value."""
    def alter(conn):
        where = " AND ".join(f'"{k}" = ?' for k in key)
        cur = conn.execute(f'SELECT * FROM "{table}" WHERE {where}', list(key.values()))
        names = [d[0] for d in cur.description]
        row = cur.fetchone()
        if row is None:
            return None
        for col, value in zip(names, row):
            if col in skip or col in key:
                continue
            new = _altered(conn, table, col, value)
            if new is None:
                continue
            try:
                conn.execute(f'UPDATE "{table}" SET "{col}" = ? WHERE {where}', [new, *key.values()])
            except sqlite3.Error:
                continue
            return f"set {table}.{col} of the row {_row_text(key)} from {value!r} to {new!r}"
        return None
    return _damaged(final_db, alter)


def row_keys(conn: sqlite3.Connection, table: str, limit: int = 3) -> list[dict]:
    """Keys of the first rows of a table (the rowid for a table without a declared key)."""
    keys = key_columns(conn, table) or ["rowid"]
    cols = ", ".join(f'"{k}"' if k != "rowid" else "rowid" for k in keys)
    return [dict(zip(keys, r)) for r in conn.execute(f'SELECT {cols} FROM "{table}" LIMIT {int(limit)}')]


def alter_unrelated_row(final_db: bytes, untouchable: set[str], *, prefer: str = "") -> tuple[bytes, str] | None:
    """``final_db`` with one column of a row of a table outside ``untouchable`` altered."""
    conn = open_snapshot(final_db, readonly=True)
    try:
        targets = [(t, k) for t in _prefer([t for t in user_tables(conn) if t not in untouchable], prefer)
                   for k in row_keys(conn, t)]
    finally:
        conn.close()
    for table, key in targets:
        done = alter_column(final_db, table, key, set())
        if done is not None:
            return done
    return None


# --------------------------------------------------------------------------- wrong_answer, hedged_answer


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


def _sub_numbers(answer: str, new) -> str:
    """``answer`` with each number outside dates and times replaced by ``new(match)``."""
    out, last = [], 0
    for m in number_matches(answer):
        out += [answer[last:m.start()], new(m)]
        last = m.end()
    return "".join(out) + answer[last:]


def without_numbers(answer: str) -> str:
    return _sub_numbers(answer, lambda m: "")


def wrong_answers(answer: str) -> list[tuple[str, str]]:
    """(label, wrong answer) pairs: every number changed; every number inside a longer one.

    Every number at once, because changing one of several (the total, or a part of it) may
    leave the asked value in place. Numbers inside dates and times are left alone (see
    ``awm_core.answers``). Empty when the answer has no number to change."""
    numbers = {m.group() for m in number_matches(answer)}
    if not numbers:
        return []
    return [("numbers changed", _sub_numbers(answer, lambda m: _bump(m.group(), numbers))),
            ("numbers embedded in longer numbers", _sub_numbers(answer, lambda m: f"1{m.group()}1"))]


def without_number(answer: str, match: re.Match) -> str:
    """The answer without one of its numbers (a match of ``number_matches``)."""
    return answer[:match.start()] + answer[match.end():]


def column_values(dbs: list[bytes], value: float, context: str = "", *, limit: int = 200) -> tuple[str, str, list] | None:
    """(table, column, its other values) for a non-key numeric column holding ``value`` whose
    table or column name the ``context`` (the task and the answer) speaks of: where the asked
    number comes from, and the wrong candidates of the same kind. A count or a total held by no
    such column has none (a column that merely happens to hold the number is not its kind)."""
    words = {word_stem(w) for w in re.findall(r"[a-z]+", context.lower())}
    found = []
    for data in dbs:
        conn = open_snapshot(data, readonly=True)
        try:
            for table in user_tables(conn):
                keys = set(key_columns(conn, table))
                for col in (r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')):
                    if col in keys or col == "id" or col.endswith("_id"):
                        continue
                    named = {word_stem(w) for w in f"{table}_{col}".lower().split("_") if w} & words
                    if not named:
                        continue
                    numeric = f'typeof("{col}") IN (\'integer\', \'real\')'
                    if conn.execute(f'SELECT 1 FROM "{table}" WHERE {numeric} AND abs("{col}" - ?) < 0.005 LIMIT 1',
                                    (value,)).fetchone():
                        others = [r[0] for r in conn.execute(
                            f'SELECT DISTINCT "{col}" FROM "{table}" WHERE {numeric} AND abs("{col}" - ?) >= 0.005 '
                            f'ORDER BY 1 LIMIT {int(limit)}', (value,))]
                        if others:
                            found.append((len(named), table, col, others))
        finally:
            conn.close()
    if not found:
        return None
    _, table, col, others = max(found, key=lambda f: f[0])
    return table, col, others


def hedged_number(answer: str, match: re.Match, dbs: list[bytes], task: str = "") -> list[tuple[str, str]]:
    """(label, wrong answer) for the asked number ``match``: the answer plus another value of the
    column it comes from as a second guess (when a column holds it); the number only inside a
    date, ISO and spelled out (a verifier that reads the "03" of "2025-05-03" as 3 accepts them;
    only for a whole number from 1 to 31)."""
    out = []
    value = float(match.group().replace(",", ""))
    said = set(answer_numbers(answer))
    found = column_values(dbs, value, f"{task} {answer}")
    if found:
        table, column, others = found
        other = next((o for o in others if float(o) not in said), None)
        if other is not None:
            out.append((f"another {column} of {table} as a second guess", f"{answer.rstrip()} (or possibly {other})"))
    if match.group().isdigit() and 1 <= int(match.group()) <= 31:
        bare, n = without_number(answer, match).rstrip(" ."), int(match.group())
        out += [("the number only inside an ISO date", f"{bare} (as of 2025-05-{n:02d})."),
                ("the number only inside a written date", f"{bare} (as of May {n}).")]
    return out


@dataclass(frozen=True)
class AnswerValue:
    """A database value the answer states: a name, a status, a title."""
    text: str
    table: str
    column: str
    others: tuple[str, ...]  # other values of the same column, none of them in the answer or the task


def answer_values(answer: str, task: str, dbs: list[bytes], *, limit: int = 3) -> list[AnswerValue]:
    """Text values of the databases the answer states as whole words and the task does not
    (so they are what was found out, not what was asked about), longest first, each with the
    other values its column holds: the candidates a hedged answer adds."""
    said, asked = _normal(answer), _normal(task)
    seen: dict[str, AnswerValue] = {}
    for data in dbs:
        conn = open_snapshot(data, readonly=True)
        try:
            for table in user_tables(conn):
                for col, ctype in ((r[1], (r[2] or "").upper()) for r in conn.execute(f'PRAGMA table_info("{table}")')):
                    if any(t in ctype for t in ("INT", "REAL", "NUM", "BLOB")):
                        continue
                    values = [r[0] for r in conn.execute(
                        f'SELECT DISTINCT "{col}" FROM "{table}" WHERE typeof("{col}") = \'text\' LIMIT 500')]
                    for v in values:
                        key = _normal(v)
                        if len(key.strip()) < 3 or not re.search(r"[a-z]", key) or key in asked or key not in said \
                                or key.strip() in seen or date_time_spans(v):
                            continue
                        others = tuple(o for o in values if _normal(o) not in said and _normal(o) not in asked
                                       and len(_normal(o).strip()) >= 3 and _normal(o) != key)
                        if others:
                            seen[key.strip()] = AnswerValue(v, table, col, others)
        finally:
            conn.close()
    return sorted(seen.values(), key=lambda v: -len(v.text))[:limit]


def without_value(answer: str, value: str) -> str:
    return re.sub(rf"(?i)\b{re.escape(value.strip())}\b", "", answer)


def hedged_value(answer: str, value: AnswerValue) -> str:
    return f"{answer.rstrip()} (or possibly {value.others[0]})"


# --------------------------------------------------------------------------- equivalences


READ_VERBS = ("get", "list", "search", "find", "view", "show", "lookup", "read", "check", "fetch", "query", "browse")


def read_tools(tools: list[ToolSpec], used: set[str]) -> list[ToolSpec]:
    """Tools a careful agent calls to look things up before and after acting: named for
    reading, with every required parameter exampled; the solution's own first."""
    def readable(t: ToolSpec) -> bool:
        return t.name.split("_")[0].lower() in READ_VERBS and all(
            p.example is not None for p in t.parameters.values() if p.required)
    return sorted((t for t in tools if readable(t)), key=lambda t: (t.name not in used, t.name))


def reorderings(solution: ReferenceSolution, changing: list[int]) -> list[list[int]]:
    """Orders of the calls that the ``$ref`` dependencies allow with state-changing calls out of
    their own order: each pair of consecutive state-changing calls swapped (with what lies
    between them), then all of them latest first. Independent calls are as likely to be made
    in either order by an agent; which orders really end in the same state is for the replay."""
    n = len(solution.calls)
    deps = {i: {int(r.split(".")[0]) for r in _refs(c.arguments)} for i, c in enumerate(solution.calls)}

    def allowed(order: list[int]) -> bool:
        seen: set[int] = set()
        for i in order:
            if not deps[i] <= seen:
                return False
            seen.add(i)
        return True
    out = []
    for a, b in zip(changing, changing[1:]):
        order = list(range(n))
        order.remove(b)
        order.insert(order.index(a), b)
        if allowed(order):
            out.append(order)
    placed: list[int] = []
    left = list(range(n))
    while left:
        ready = [i for i in left if deps[i] <= set(placed)]
        pick = max(ready, key=lambda i: (i in changing, i))
        placed.append(pick)
        left.remove(pick)
    if placed not in out and placed != list(range(n)):
        out.append(placed)
    return out


def _refs(arguments: dict) -> list[str]:
    return [r for r in refs_in(arguments) if r.split(".")[0].isdigit()]


def same_up_to_new_keys(initial_db: bytes, a: bytes, b: bytes) -> bool:
    """Whether two final databases made from ``initial_db`` hold the same changes, where rows
    inserted may have got other keys (independent inserts made in another order)."""
    ca, cb = snapshot_changes(initial_db, a), snapshot_changes(initial_db, b)
    if ca.keys() != cb.keys():
        return False
    conn = open_snapshot(initial_db, readonly=True)
    try:
        for table in ca:
            keys = set(key_columns(conn, table)) if table in user_tables(conn) else set()
            x, y = ca[table], cb[table]
            if _canon(x["deleted"]) != _canon(y["deleted"]) or _canon(x["updated"]) != _canon(y["updated"]):
                return False
            if _canon([{k: v for k, v in r.items() if k not in keys} for r in x["inserted"]]) != \
                    _canon([{k: v for k, v in r.items() if k not in keys} for r in y["inserted"]]):
                return False
        return True
    finally:
        conn.close()


def _canon(rows: list) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=repr) for r in rows)


def _spelled_date(iso: str) -> str:
    y, m, d = (int(x) for x in iso.split("-"))
    return f"{_MONTH_NAMES[m - 1]} {d}, {y}"


def _twelve_hour(hour: int, minute: int) -> str:
    return f"{hour % 12 or 12}:{minute:02d} {'AM' if hour < 12 else 'PM'}"


def reworded_answers(answer: str) -> list[tuple[str, str]]:
    """(label, reworded answer) pairs a correct verifier must accept as the same answer: a
    sentence around it; thousands separators added or dropped; money written with its unit
    as a word; ISO dates and 24-hour times written out. Only the rewordings that change the
    text are given."""
    out = [("a sentence around the answer",
            f"Sure, I checked that for you. {answer.strip()} Let me know if there is anything else.")]

    def separators(m: re.Match) -> str:
        text = m.group()
        whole, dot, frac = text.replace(",", "").partition(".")
        if "," in text:
            return whole + dot + frac
        return (f"{int(whole):,}" if len(whole) > 3 else whole) + dot + frac
    out.append(("thousands separators written the other way", _sub_numbers(answer, separators)))
    out.append(("money with its unit as a word",
                re.sub(r"\$\s?(" + NUMBER_PATTERN + r")", lambda m: f"{m.group(1)} dollars", answer)))

    def dates(m: re.Match) -> str:
        date, hour, minute = m.group(1), m.group(2), m.group(3)
        text = _spelled_date(date)
        return f"{text} at {_twelve_hour(int(hour), int(minute))}" if hour else text
    written = re.sub(r"\b(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}):(\d{2})(?::00)?)?\b", dates, answer)
    written = re.sub(r"(?<![\d:])([01]\d|2[0-3]):([0-5]\d)(?![\d:])", lambda m: _twelve_hour(int(m.group(1)), int(m.group(2))),
                     written)
    out.append(("dates and times written out", written))
    return [(label, text) for label, text in out if text != answer]

"""Reading values out of an agent's final answer: numbers, dates and times.

Verifier code gets ``answer_numbers``, ``answer_dates`` and ``answer_times`` in its namespace
(the sandbox worker puts them there), and the wrong-answer mutations and reworded-answer
equivalences (``awm_core.mutations``) are built with the same patterns. So a verifier that reads
the answer through these accepts "$1,234.50", "1234.5 dollars" and "December 10, 2026" where the
value is right, and rejects "14" or "2024" for 4 and the "03" of "2025-05-03" for 3.

    answer_numbers("On 2025-05-03 you spent $1,234.50 on 3 items")  ->  [1234.5, 3.0]
    answer_dates("Booked for Dec 10, 2026 (and 2026-12-11)")         ->  ["2026-12-10", "2026-12-11"]
    answer_dates("on May 3", default_year=2025)                      ->  ["2025-05-03"]
    answer_times("at 3:30 PM, not 09:00")                            ->  ["15:30", "09:00"]
"""
from __future__ import annotations

import re

MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
_MONTH = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?" \
         r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_ISO = r"\d{4}-\d{2}-\d{2}"
_CLOCK = r"\d{1,2}:\d{2}(?::\d{2})?(?:\s*[ap]\.?m\.?)?|\b\d{1,2}\s*[ap]\.?m\.?(?![a-z])"

# Dates and times in the forms an answer writes them, ISO and spelled out. Numbers are read only
# outside these, so a day of the month or an hour is never taken for a count or an amount.
DATE_TIME_PATTERN = (rf"\b{_ISO}(?:[T ]\d{{1,2}}:\d{{2}}(?::\d{{2}})?)?"
                     rf"|\b{_MONTH}\s+{_DAY}\b(?:,?\s+\d{{4}})?"
                     rf"|\b{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+\d{{4}})?"
                     rf"|\b\d{{1,2}}/\d{{1,2}}/\d{{4}}\b"
                     rf"|\b(?:{_CLOCK})")
NUMBER_PATTERN = r"\d(?:[\d,]*\d)?(?:\.\d+)?"

_DATE_TIME = re.compile(DATE_TIME_PATTERN, re.I)
_NUMBER = re.compile(NUMBER_PATTERN)


def date_time_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _DATE_TIME.finditer(text or "")]


def number_matches(text: str) -> list[re.Match]:
    """The numbers of ``text`` outside its dates and times, as matches (spans into ``text``)."""
    text = text or ""
    taken = date_time_spans(text)
    return [m for m in _NUMBER.finditer(text) if not any(a <= m.start() < b for a, b in taken)]


def answer_numbers(text: str | None) -> list[float]:
    """Every number in the answer outside dates and times, thousands separators dropped."""
    return [float(m.group().replace(",", "")) for m in number_matches(text or "")]


def _month(word: str) -> int:
    word = word.lower().rstrip(".")
    return next(i for i, name in enumerate(MONTHS, 1) if name.startswith(word[:3]))


_ISO_DATE = re.compile(rf"\b({_ISO})")
_SPELLED = re.compile(rf"\b(?P<m>{_MONTH})\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(?P<y>\d{{4}}))?"
                      rf"|\b(?P<d2>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<m2>{_MONTH})(?:,?\s+(?P<y2>\d{{4}}))?", re.I)
_SLASHED = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")


def answer_dates(text: str | None, default_year: int | None = None) -> list[str]:
    """Every date in the answer as ``YYYY-MM-DD``, in order of appearance: ISO dates, spelled-out
    dates ("Dec 10, 2026", "10 December") and US-style ``12/10/2026``. A date written without a
    year takes ``default_year``; without one it is given as ``MM-DD``."""
    found: list[tuple[int, str]] = []
    text = text or ""
    for m in _ISO_DATE.finditer(text):
        found.append((m.start(), m.group(1)))
    for m in _SPELLED.finditer(text):
        month, day = _month(m.group("m") or m.group("m2")), int(m.group("d") or m.group("d2"))
        year = m.group("y") or m.group("y2") or default_year
        if 1 <= day <= 31:
            found.append((m.start(), f"{int(year):04d}-{month:02d}-{day:02d}" if year else f"{month:02d}-{day:02d}"))
    for m in _SLASHED.finditer(text):
        month, day, year = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if 1 <= month <= 12 and 1 <= day <= 31:
            found.append((m.start(), f"{year:04d}-{month:02d}-{day:02d}"))
    return [d for _, d in sorted(found)]


_TIME = re.compile(r"(?<![\d:])(\d{1,2})(?::(\d{2}))?(?::\d{2})?(?:\s*([ap])\.?m\.?(?![a-z]))?", re.I)


def answer_times(text: str | None) -> list[str]:
    """Every clock time in the answer as 24-hour ``HH:MM`` ("3:30 PM" -> "15:30", "9am" -> "09:00",
    and the time of an ISO date-time)."""
    out = []
    for m in _TIME.finditer(text or ""):
        hour, minute, half = int(m.group(1)), m.group(2), (m.group(3) or "").lower()
        if minute is None and not half:
            continue  # a bare number is not a time
        if half:
            if not 1 <= hour <= 12:
                continue
            hour = hour % 12 + (12 if half == "p" else 0)
        if hour < 24 and int(minute or 0) < 60:
            out.append(f"{hour:02d}:{int(minute or 0):02d}")
    return out

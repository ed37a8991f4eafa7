"""Reading the files a user hands in (configs, seed lists, bundles), with errors that name them.

A missing path, a folder where a file was expected, a file that cannot be read or is not UTF-8
text, and malformed JSON are each reported by path (and line where there is one) as an
``InputError``, never as a Python traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from awm_core.errors import InputError


def read_text(path: str | Path, what: str, error: type[Exception] = InputError) -> str:
    """The file's text; ``what`` names it in errors ("training config", "seed list")."""
    p = Path(path)
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if p.is_dir():
        raise error(f"{what} {p} is a folder, not a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{what} {p} is not UTF-8 text (line {line})") from None


def parse_json(text: str, where: str, error: type[Exception] = InputError) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def read_json(path: str | Path, what: str, error: type[Exception] = InputError) -> Any:
    return parse_json(read_text(path, what, error), f"{what} {path}", error)

"""awm train (filled in by the issue that owns it)."""
from __future__ import annotations

from flows.commands import group


def register(sub) -> None:
    group(sub, "train", "train (not available yet)")

"""On-disk response cache: one JSON file per request, keyed by the request's sha256."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from awm_core.llm.offline import FixtureReply, atomic_write_text

log = logging.getLogger(__name__)


def request_key(request: dict[str, Any]) -> str:
    """Stable hash of everything that determines a reply (model, messages, tools, options, keys)."""
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Replies stored under ``<dir>/<key[:2]>/<key>.json``; writes are atomic (tmp + rename)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> FixtureReply | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return FixtureReply.model_validate(data["reply"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError) as exc:
            # A damaged entry is a miss, not a failure: the call is simply made again.
            log.warning("ignoring damaged cache entry %s: %s", path, exc)
            return None

    def put(self, key: str, reply: FixtureReply, request: dict[str, Any]) -> None:
        entry = {"key": key, "request": {k: request[k] for k in ("model", "stage", "scenario_id", "attempt")},
                 "reply": reply.model_dump()}
        atomic_write_text(self._path(key), json.dumps(entry, ensure_ascii=False))

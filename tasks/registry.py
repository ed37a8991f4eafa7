"""Objects a run's Prefect tasks share but that cannot be task parameters.

Prefect hashes a task's parameters for its cache key and records them with the task run, so a
sandbox pool, an LLM client or a budget cannot be one. A flow registers them under the run's key
for as long as the run lasts and its tasks receive only the key. They live in the flow's
process, so the tasks must run there too (a thread-based task runner, or Dask workers that
register their own).
"""
from __future__ import annotations

from typing import Generic, TypeVar

from awm_core.errors import AWMError

T = TypeVar("T")


class RunRegistry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, key: str, item: T) -> None:
        self._items[key] = item

    def unregister(self, key: str) -> None:
        self._items.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __getitem__(self, key: str) -> T:
        try:
            return self._items[key]
        except KeyError:
            raise AWMError(f"{self.what} {key!r} are not registered in this process (the run's tasks must run in "
                           "the process that registered them: use a thread-based task runner)") from None

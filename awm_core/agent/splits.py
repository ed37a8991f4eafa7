"""Reproducible train/validation splits, by environment or by task within each environment.

Every unit (an environment, or one task) gets a rank from ``sha256(seed, id)``; the lowest
``round(ratio * n)`` ranks are ``train``, the rest ``val``. So the split depends only on the ids
and the seed, never on the order they arrive in, and a unit keeps its side when the seed is kept.
With two or more units each side gets at least one.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Literal, Mapping

SPLITS = ("train", "val")
SplitBy = Literal["environment", "task"]


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _train_count(n: int, ratio: float) -> int:
    k = round(ratio * n)
    if n >= 2:
        k = min(max(k, 1), n - 1)
    return k


def make_splits(env_ids_with_tasks: Mapping[str, Iterable[int]] | Iterable[tuple[str, Iterable[int]]],
                seed: int = 0, ratio: float = 0.8, by: SplitBy = "environment") -> list[dict[str, Any]]:
    """Rows ``{env_id, task_idx, split, seed}`` for every task, sorted by (env_id, task_idx).

    ``by="environment"`` keeps all tasks of an environment on one side (validation measures
    transfer to unseen environments); ``by="task"`` splits each environment's tasks.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be between 0 and 1, got {ratio}")
    if by not in ("environment", "task"):
        raise ValueError(f"by must be 'environment' or 'task', got {by!r}")
    items = env_ids_with_tasks.items() if isinstance(env_ids_with_tasks, Mapping) else env_ids_with_tasks
    envs: dict[str, list[int]] = {}
    for env_id, idxs in items:
        if env_id in envs:
            raise ValueError(f"environment {env_id!r} is listed twice")
        envs[env_id] = sorted({int(i) for i in idxs})
    side: dict[tuple[str, int], str] = {}
    if by == "environment":
        ranked = sorted(envs, key=lambda e: _rank(seed, e))
        train = set(ranked[:_train_count(len(ranked), ratio)])
        for env_id, idxs in envs.items():
            for i in idxs:
                side[(env_id, i)] = "train" if env_id in train else "val"
    else:
        for env_id, idxs in envs.items():
            ranked = sorted(idxs, key=lambda i: _rank(seed, f"{env_id}/{i}"))
            train_idx = set(ranked[:_train_count(len(ranked), ratio)])
            for i in idxs:
                side[(env_id, i)] = "train" if i in train_idx else "val"
    return [{"env_id": e, "task_idx": i, "split": s, "seed": seed} for (e, i), s in sorted(side.items())]


def select(rows: Iterable[Mapping[str, Any]], split: str) -> dict[str, list[int]]:
    """The tasks of one split as ``{env_id: [task_idx, ...]}`` (``split="all"`` keeps every row)."""
    out: dict[str, list[int]] = {}
    for r in rows:
        if split == "all" or r["split"] == split:
            out.setdefault(r["env_id"], []).append(int(r["task_idx"]))
    return {e: sorted(v) for e, v in sorted(out.items())}

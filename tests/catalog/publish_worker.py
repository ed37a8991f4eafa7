"""One writer of the concurrent-publish test, run as its own process (a machine of its own).

    python publish_worker.py NAME ROUNDS GO_FILE

Waits for GO_FILE so the writers start together, then publishes ROUNDS snapshots: each adds the
environment NAME_rR with its rollouts and republishes the environment both writers share, so
the writers touch the same tables and rows. Prints one JSON line: commit tries per round."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog_bundles import clean_env  # noqa: E402

from awm_core.settings import load_settings  # noqa: E402
from storage.catalog import Catalog  # noqa: E402

ROLLOUTS = 50


def main(name: str, rounds: int, go: Path) -> None:
    with Catalog.open(load_settings()) as cat:
        while not go.exists():
            time.sleep(0.01)
        tries = []
        for r in range(rounds):
            env_id = f"{name}_r{r}"
            with cat.publish(made_by={"writer": name, "round": r}, message=f"{name} round {r}") as pub:
                pub.add_environments([clean_env(env_id, n_tasks=3), clean_env("shared_box", n_tasks=2,
                                                                              description=f"last by {env_id}")])
                pub.add_rollouts([{"rollout_id": f"{env_id}-{i}", "run_id": name, "env_id": env_id, "task_idx": 0,
                                   "reward": 1.0, "label": "completed", "env_error": False}
                                  for i in range(ROLLOUTS)])
            tries.append(pub.commit_tries)
    print(json.dumps({"name": name, "tries": tries}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))

"""One worker process of the shared-budget test (a Dask worker, or a machine, of its own).

    python budget_worker.py NAME RUN_ID CALLS GO_FILE

Settings come from the environment (AWM_LLM__BUDGET_DSN, AWM_LLM__BUDGET_USD, fixtures). Waits
for GO_FILE so the workers start together, then makes up to CALLS offline calls through the
run's budget. Prints one JSON line: calls made, whether the cap stopped it, and whether a
call after that is refused too."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from awm_core.errors import BudgetExceeded
from awm_core.llm import LLMClient
from awm_core.llm.shared_budget import run_budget
from awm_core.settings import load_settings

MESSAGES = [{"role": "user", "content": "Tasks, please."}]


def main(name: str, run_id: str, calls: int, go: Path) -> None:
    settings = load_settings()
    budget = run_budget(settings, run_id)
    client = LLMClient.for_role(settings, "generator", budget=budget, run_id=run_id)
    while not go.exists():
        time.sleep(0.01)
    made, stopped, cost = 0, False, 0.0
    for attempt in range(1, calls + 1):
        try:
            cost += client.chat(MESSAGES, stage="tasks", scenario_id=name, attempt=attempt).record.cost_usd
        except BudgetExceeded:
            stopped = True
            break
        made += 1
    try:
        client.chat(MESSAGES, stage="tasks", scenario_id=name, attempt=calls + 1)
        refused_after = False
    except BudgetExceeded as exc:
        refused_after, message = True, str(exc)
    budget.close()
    print(json.dumps({"name": name, "made": made, "cost": cost, "stopped": stopped, "refused_after": refused_after,
                      "message": message if refused_after else ""}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))

"""awm demo: the real generate flow on the offline recordings (no network), then the quality
gate, then what to try next."""
from __future__ import annotations

import os
import sys
import time

from flows.commands import count, uses_prefect


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="generate 3 environments offline, publish them, run the quality gate",
        description="Run the generate flow on the packaged offline LLM recordings (Recipe Box, Clinic Booking, "
                    "Team Expenses; several stages fail first and are repaired), publish one catalog snapshot, "
                    "run the quality gate on it and print what to try next. Needs no network and no API key.")
    p.add_argument("-c", "--concurrency", type=count, default=3)
    uses_prefect(p).set_defaults(func=run)


def run(args) -> int:
    # The demo always replays the recordings, whatever the configured endpoint is.
    os.environ["AWM_LLM__GENERATOR__BACKEND"] = "offline"
    os.environ["AWM_LLM__GENERATOR__MODEL"] = "awm-offline"
    os.environ["AWM_LLM__EMBEDDER__BACKEND"] = "offline"
    os.environ["AWM_LLM__EMBEDDER__MODEL"] = "all-MiniLM-L6-v2"
    from awm_core.settings import DEFAULT_FIXTURES, get_settings

    get_settings.cache_clear()
    from flows.commands.generate import print_summary

    settings = get_settings()
    print(f"awm demo: data folder {settings.home_dir}", flush=True)
    print("awm demo: starting Prefect ...", flush=True)
    from awm_core.llm.embed import preload

    preload(settings)
    from flows.generate import run_generate

    t0 = time.perf_counter()
    summary = run_generate(scenarios=3, fixtures_dir=str(DEFAULT_FIXTURES), concurrency=args.concurrency,
                           skip_existing=False, progress=True)
    print_summary(summary)
    if not summary["published"]:
        print("demo: nothing was published", file=sys.stderr)
        return 1
    gate_ok = _gate(summary["snapshot"])
    first = summary["published"][0]
    print(f"""
done in {time.perf_counter() - t0:.0f} s. Try next:
  awm catalog sql "SELECT env_id, tool_count, task_count, validation_passed FROM environments"
  awm catalog sql "SELECT stage, attempt, error IS NOT NULL AS rejected FROM llm_calls WHERE attempt > 1 OR error IS NOT NULL"
  awm env serve {first}                 # its tools over MCP
  awm eval --policy reference --split all --env {first}   # replay reference solutions as an agent
  awm server start                      # the Prefect UI with this run's summary artifact""")
    return 0 if gate_ok else 1


def _gate(snapshot) -> bool:
    """The quality gate as a flow (its report lands in the Prefect UI too)."""
    try:
        from flows.gate import gate
    except ImportError:
        print("quality gate: not available in this build")
        return True
    state = gate(snapshot, return_state=True)
    if state.is_completed():
        res = state.result()
        print(f"\nquality gate on snapshot {res['snapshot']}: PASSED "
              f"({res['statistics'].get('evaluated', '?')} expectations, report {res['report_id']})")
        return True
    try:
        state.result()
    except Exception as exc:
        print(f"\nquality gate on snapshot {snapshot}: FAILED: {exc}")
    return False

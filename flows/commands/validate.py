"""awm validate [DIR]: LLM-free checks of environments, run in the sandbox.

DIR holds AgentWorldModel-1K JSONL files; without DIR the environments of the catalog's
newest snapshot are checked. Reports per environment and task: schema and seed errors, tools
that fail on their spec examples, verifiers that do not compile, verifiers that accept a
no-op run or a wrong episode made from the task's reference solution (mutations); then lists
every defect found.
"""
from __future__ import annotations

import json
import sys

from flows.commands import non_negative


def register(sub) -> None:
    p = sub.add_parser(
        "validate", help="check environments without an LLM (AWM-1K files or the catalog)",
        description="Execute what can be checked without a model: schema and seed data (zero failing statements, "
                    "foreign keys), every tool with its spec example arguments, verifier compilation, and each "
                    "verifier on a no-op episode and on wrong episodes made from the task's reference solution, where "
                    "there is one: a state-changing call dropped, an id argument swapped, an unrelated row deleted, "
                    "a wrong number in the answer (it must say complete on none). DIR: a folder of AgentWorldModel-1K "
                    "JSONL files; without DIR, the environments of the newest catalog snapshot. Exit 1 when a "
                    "defect is found.")
    p.add_argument("dir", nargs="?", default=None, help="folder of AWM-1K .jsonl files (default: the catalog)")
    p.add_argument("--snapshot", type=non_negative, default=None, help="catalog snapshot (without DIR; default newest)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(func=run)


def load_environments(args) -> tuple[list, list[str]]:
    if args.dir:
        from awm_core.interop.awm1k import read_dir

        res = read_dir(args.dir)
        return res.environments, [str(p) for p in res.problems]
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        return list(cat.environments(snapshot=args.snapshot)), []


def audit(environments, settings=None) -> list[dict]:
    from awm_core.runtime import SandboxPool
    from awm_core.settings import get_settings
    from awm_core.validation import audit_environment

    results = []
    with SandboxPool((settings or get_settings()).sandbox) as pool:
        for env in environments:
            report, skipped = audit_environment(pool, env)
            results.append({"env_id": env.id, "flavour": env.flavour, "passed": report.passed, "skipped": skipped,
                            "checks": [c.model_dump(mode="json") for c in report.checks]})
    return results


def table(results: list[dict]) -> str:
    from awm_core.models import ValidationCheck
    from awm_core.validation import skipped_mutation

    rows = ["| environment | schema | seed | tools ok | verifiers compile | no-op rejected | mutations rejected "
            "| defects |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        checks = r["checks"]

        def count(name):
            cs = [c for c in checks if c["name"] == name]
            return f"{sum(c['passed'] for c in cs)}/{len(cs)}" if cs else "-"

        def mutations():
            tried = [c for c in checks if c["name"] == "verifier_mutation"
                     and not skipped_mutation(ValidationCheck.model_validate(c))]
            return f"{sum(c['passed'] for c in tried)}/{len(tried)}" if tried else "-"

        def state(name):
            cs = [c for c in checks if c["name"] == name]
            return "-" if not cs else ("ok" if all(c["passed"] for c in cs) else f"{sum(not c['passed'] for c in cs)} errors")

        defects = sum(not c["passed"] for c in checks)
        tools = [c for c in checks if c["name"] in ("tool_example", "code_load")]
        tools_s = f"{sum(c['passed'] for c in tools)}/{len(tools)}" if tools else "-"
        rows.append(f"| {r['env_id']} | {state('schema')} | {state('seed')} | {tools_s} | {count('verifier_compile')} | "
                    f"{count('verifier_noop')} | {mutations()} | {defects} |")
    return "\n".join(rows)


def defects(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        for c in r["checks"]:
            if not c["passed"]:
                where = r["env_id"] + (f"/{c['task_idx']}" if c.get("task_idx") is not None else "")
                line = f"{where} [{c['name']}{':' + c['tool'] if c.get('tool') else ''}] {c['detail']}"
                out.append(" ".join(line.split()))
    return out


def run(args) -> int:
    envs, problems = load_environments(args)
    if not envs:
        print("no environments to validate", file=sys.stderr)
        return 1
    results = audit(envs)
    if args.json:
        print(json.dumps({"environments": results, "read_problems": problems}, indent=1))
    else:
        print(table(results))
        for r in results:
            for s in r["skipped"]:
                print(f"  {r['env_id']}: not checked: {s}")
        found = defects(results)
        print(f"\n{len(found)} defect(s) in {sum(not r['passed'] for r in results)} of {len(results)} environment(s)")
        for d in found:
            print(f"- {d}")
        for p in problems:
            print(f"unreadable record: {p}", file=sys.stderr)
    return 1 if any(not r["passed"] for r in results) else 0

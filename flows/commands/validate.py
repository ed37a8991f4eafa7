"""awm validate [DIR]: LLM-free checks of environments, run in the sandbox.

DIR holds AgentWorldModel-1K JSONL files; without DIR the environments of the catalog's
newest snapshot are checked. Reports per environment and task: schema and seed errors, tools
that fail on their spec examples, verifiers that do not compile, verifiers that accept a
no-op run or a wrong episode made from the task's reference solution (mutations). Three
things are kept apart: defects (checks that failed), parts that are not checkable on the bundle
and why (a missing piece; an evidence-collecting verifier's verdict; without seed data, a tool
that rejects its example itself because the row is not there, or a verifier's verdict on the
empty schema), and checks that passed. The exit status counts defects only.
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
                    "JSONL files; without DIR, the environments of the newest catalog snapshot. Prints a table, "
                    "the parts that are not checkable and why (not defects: e.g. no seed data, no reference "
                    "solution), and every defect. Exit 1 when a defect is found (parts not checkable do not count).")
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
    """Per environment: ``passed`` (no defect), ``checks`` (what ran: a failed one is a defect),
    ``not_checkable`` ("<part>: <why>" lines: neither passes nor defects) and their counts."""
    from awm_core.runtime import SandboxPool
    from awm_core.settings import get_settings
    from awm_core.validation import audit_environment

    results = []
    with SandboxPool((settings or get_settings()).sandbox) as pool:
        for env in environments:
            report, not_checkable = audit_environment(pool, env)
            checks = [c.model_dump(mode="json") for c in report.checks]
            results.append({"env_id": env.id, "flavour": env.flavour, "passed": report.passed,
                            "counts": {"passed": sum(c["passed"] for c in checks),
                                       "defects": sum(not c["passed"] for c in checks),
                                       "not_checkable": len(not_checkable)},
                            "not_checkable": not_checkable, "checks": checks})
    return results


def table(results: list[dict]) -> str:
    """One row per environment: checks passed/run per kind ("-": none ran), then the counts of
    passed checks, defects and parts not checkable."""
    rows = ["| environment | schema | seed | tools ok | verifiers compile | verifiers run | no-op rejected "
            "| mutations rejected | equivalents accepted | passed | defects | not checkable |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        checks = r["checks"]

        def count(*names):
            cs = [c for c in checks if c["name"] in names]
            return f"{sum(c['passed'] for c in cs)}/{len(cs)}" if cs else "-"

        def state(name):
            cs = [c for c in checks if c["name"] == name]
            return "-" if not cs else ("ok" if all(c["passed"] for c in cs) else f"{sum(not c['passed'] for c in cs)} errors")

        n = r["counts"]
        rows.append(f"| {r['env_id']} | {state('schema')} | {state('seed')} | {count('tool_example', 'code_load')} | "
                    f"{count('verifier_compile')} | {count('verifier_run')} | {count('verifier_noop')} | "
                    f"{count('verifier_mutation')} | {count('verifier_equivalence')} | {n['passed']} | {n['defects']} | "
                    f"{n['not_checkable']} |")
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
        notes = [f"{r['env_id']}: {s}" for r in results for s in r["not_checkable"]]
        found = defects(results)
        bad = sum(not r["passed"] for r in results)
        print(f"\nNot checkable ({len(notes)}; not defects: a part missing from the bundle, or a run that says "
              "nothing without seed data):")
        for n in notes:
            print(f"- {n}")
        print(f"\nDefects ({len(found)}):" if found else "\nDefects: none")
        for d in found:
            print(f"- {d}")
        print(f"\n{sum(r['counts']['passed'] for r in results)} check(s) passed; {len(found)} defect(s) in {bad} of "
              f"{len(results)} environment(s); {len(notes)} part(s) not checkable")
        for p in problems:
            print(f"unreadable record: {p}", file=sys.stderr)
    # Defects only: what could not be checked is reported, not failed.
    return 1 if any(not r["passed"] for r in results) else 0

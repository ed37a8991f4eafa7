"""awm import awm1k DIR: AgentWorldModel-1K records into the catalog (one snapshot)."""
from __future__ import annotations

import sys

from flows.commands import group, uses_prefect


def register(sub) -> None:
    actions = group(sub, "import", "import environments from published datasets into the catalog")
    p = actions.add_parser("awm1k", help="import AgentWorldModel-1K JSONL files (any subset of the stage files)",
                           description="Read gen_scenario, gen_tasks, gen_db, gen_sample, gen_spec, gen_envs, "
                                       "gen_verifier and gen_verifier.pure_code JSONL files (any subset) from DIR, "
                                       "build one Environment bundle per scenario and publish them as one snapshot. "
                                       "Records that cannot be read are reported by file and line; the rest import.")
    p.add_argument("dir", help="folder holding the dataset's .jsonl files")
    p.add_argument("--strict", action="store_true", help="exit 1 when any record could not be read")
    uses_prefect(p).set_defaults(func=run)


def run(args) -> int:
    from flows.import_awm1k import import_directory

    def progress(done: int, total: int) -> None:
        print(f"publishing environments: {done}/{total}", file=sys.stderr)

    summary = import_directory(args.dir, progress=progress)
    for p in summary.problems:
        print(f"skipped {p}", file=sys.stderr)
    if summary.snapshot_id is None:
        print("nothing imported", file=sys.stderr)
        return 1
    print(summary.markdown())
    return 1 if (args.strict and summary.problems) else 0

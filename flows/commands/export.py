"""awm export awm1k --to DIR: catalog environments back to AgentWorldModel-1K JSONL files."""
from __future__ import annotations

import sys

from flows.commands import group, non_negative


def register(sub) -> None:
    actions = group(sub, "export", "export catalog environments to other formats")
    p = actions.add_parser("awm1k", help="write AgentWorldModel-1K JSONL files",
                           description="Write the catalog's environments in the AgentWorldModel-1K format "
                                       "(one JSONL file per stage). Imported records come back as they were "
                                       "read, in their original order; native tool code and native verifiers "
                                       "have no AWM-1K form and are left out (listed on stderr), and so are "
                                       "the tasks' user scenarios and the agent policies of conversations "
                                       "(counted on stderr).")
    p.add_argument("--to", required=True, dest="to", help="output folder (created if needed)")
    p.add_argument("--snapshot", type=non_negative, default=None, help="catalog snapshot (default: latest)")
    p.add_argument("--env", action="append", default=None, metavar="ENV_ID",
                   help="export only this environment (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from awm_core.errors import CatalogError
    from awm_core.interop import awm1k
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    with Catalog.open(get_settings(), read_only=True) as cat:
        ids = args.env or cat.environment_ids(args.snapshot)
        known = set(cat.environment_ids(args.snapshot))
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise CatalogError(f"no environment(s) {unknown} in the catalog")
        envs = list(cat.environments(args.snapshot, ids))
    counts, notes = awm1k.write_dir(envs, args.to)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    for fname, n in counts.items():
        print(f"{fname}.jsonl: {n} record(s)")
    print(f"exported {len(envs)} environment(s) to {args.to}")
    return 0

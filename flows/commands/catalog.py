"""awm catalog: read-only SQL over the catalog, its snapshots, and one environment's summary."""
from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any

from flows.commands import count, group, non_negative


def register(sub) -> None:
    actions = group(sub, "catalog", "query the versioned catalog (read-only)")
    p = actions.add_parser("sql", help="run a read-only SQL query",
                           description="Run one SQL query against the catalog (opened read-only). Tables are "
                                       "named without prefix (environments, tasks, rollouts, ...). --attach-env "
                                       "builds an environment's initial SQLite database and attaches it under the "
                                       "environment id, so `SELECT * FROM recipe_box.recipes` works.")
    p.add_argument("query", help="SQL text")
    p.add_argument("--snapshot", type=non_negative, default=None, help="query the catalog as of this snapshot")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--attach-env", action="append", default=[], metavar="ENV_ID",
                   help="attach this environment's initial database (repeatable)")
    p.add_argument("--max-width", type=count, default=60, help="truncate table cells to this many characters")
    p.set_defaults(func=run_sql)

    p = actions.add_parser("snapshots", help="list snapshots with who made them")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=run_snapshots)

    p = actions.add_parser("show", help="one environment's summary")
    p.add_argument("env_id")
    p.add_argument("--snapshot", type=non_negative, default=None)
    p.set_defaults(func=run_show)


def _open():
    from awm_core.settings import get_settings
    from storage.catalog import Catalog

    return Catalog.open(get_settings(), read_only=True)


def run_sql(args) -> int:
    with _open() as cat:
        for env_id in args.attach_env:
            cat.attach_environment_db(env_id, snapshot=args.snapshot)
        table = cat.sql(args.query, snapshot=args.snapshot)
        print_rows(table.column_names, table.to_pylist(), args.format, args.max_width)
    return 0


def run_snapshots(args) -> int:
    with _open() as cat:
        snaps = cat.snapshots()
    rows = [{"snapshot": s["snapshot_id"], "time": s["time"].strftime("%Y-%m-%d %H:%M:%S") if s["time"] else "",
             "message": s["message"] or "", "flow_run_id": s["made_by"].get("flow_run_id") or "",
             "git_commit": (s["made_by"].get("git_commit") or "")[:10],
             "settings_digest": s["made_by"].get("settings_digest") or "",
             "changes": ", ".join(f"{k}={len(v)}" for k, v in s["changes"].items())} for s in snaps]
    if args.format == "json":
        rows = [{**r, "made_by": s["made_by"], "changes": s["changes"]} for r, s in zip(rows, snaps)]
    print_rows(list(rows[0]) if rows else [], rows, args.format, 60)
    return 0


def run_show(args) -> int:
    with _open() as cat:
        env = cat.get_environment(args.env_id, args.snapshot)
        gate_rows = cat.rows("SELECT snapshot, passed FROM quality_reports ORDER BY created_at DESC LIMIT 1")
    print(summary(env))
    if gate_rows:
        g = gate_rows[0]
        print(f"\nlatest gate: snapshot {g['snapshot']} {'passed' if g['passed'] else 'FAILED'}")
    return 0


def summary(env) -> str:
    lines = [f"{env.id}: {env.scenario.name}",
             f"  category {env.scenario.category} | flavour {env.flavour if env.code else '-'} | "
             f"source {env.provenance.source} | digest {env.digest()[:12]}"]
    if env.scenario.description:
        lines.append(f"  {env.scenario.description[:300]}")
    lines.append(f"  tables {len(env.db_schema.tables) if env.db_schema else 0} | "
                 f"seed statements {len(env.seed_data.statements()) if env.seed_data else 0} | "
                 f"tools {len(env.api_spec.tools) if env.api_spec else 0} | tasks {len(env.tasks)} | "
                 f"verifiers {len(env.verifiers)} | solutions {len(env.solutions)}")
    if env.missing:
        lines.append(f"  missing parts: {', '.join(env.missing)}")
    if env.validation is None:
        lines.append("  validation: never validated")
    else:
        fails = env.validation.failures()
        lines.append(f"  validation: {'passed' if env.validation.passed else 'FAILED'} "
                     f"({len(env.validation.checks) - len(fails)}/{len(env.validation.checks)} checks passed)")
        lines += [f"    failed {c.name}" + (f" task {c.task_idx}" if c.task_idx is not None else "")
                  + (f" tool {c.tool}" if c.tool else "") + (f": {c.detail[:120]}" if c.detail else "")
                  for c in fails[:20]]
    dropped = env.validation.dropped_tasks if env.validation else {}
    lines.append("  tasks:")
    for t in env.tasks:
        flags = "".join(["V" if env.verifier(t.idx) else "-", "S" if env.solution(t.idx) else "-"])
        drop = f"  [dropped: {dropped[t.idx]}]" if t.idx in dropped else ""
        lines.append(f"    {t.idx:>3} {flags} {t.text[:100]}{drop}")
    if env.api_spec:
        names = [t.name for t in env.api_spec.tools]
        lines.append(f"  tools: {', '.join(names[:40])}{' ...' if len(names) > 40 else ''}")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str, ensure_ascii=False)
    return str(v)


def print_rows(columns: list[str], rows: list[dict[str, Any]], fmt: str, max_width: int = 60,
               out=None) -> None:
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(rows, default=str, ensure_ascii=False, indent=1) + "\n")
        return
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(r[c]) for c in columns])
        out.write(buf.getvalue())
        return
    cells = [[_cell(r[c]).replace("\n", " ") for c in columns] for r in rows]
    cells = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row] for row in cells]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")

"""The first run a newcomer makes: `awm demo` on a fresh data folder, and where its time goes.

    .venv/bin/python benchmarks/first_run.py [--runs 3] [--baseline REV]

Each measure in fresh processes and fresh temporary data folders (AWM_HOME), the median of
``--runs``:

- ``awm demo``, first run (an empty data folder) and second run (the same folder again): the
  command's wall time, from process start to exit;
- its parts, each alone in a new process: importing the command line (``import flows.cli``); a
  Prefect API server start (until ``/api/health`` answers) on an empty home (the database
  migrations and block types), on a home seeded from the install-time template
  (``python -m flows.server template``; made here first if this installation has none), and on a
  home that has run before; loading the offline embedding model.

With ``--baseline REV`` the two demo runs are also timed with the code of REV (a git worktree of it,
on the same virtual environment), alternating with this code run by run so both see the same load.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PART_SCRIPTS = {
    "import the command line (import flows.cli)": "import time; t = time.perf_counter(); import flows.cli; "
                                                  "print(time.perf_counter() - t)",
    "load the offline embedding model": "import time; from awm_core.llm.embed import _load_offline_model; "
                                        "t = time.perf_counter(); _load_offline_model(); print(time.perf_counter() - t)",
}
SERVER_SCRIPT = """
import sys, time
from pathlib import Path
from flows.server import free_port, start_api_server, stop_group
t = time.perf_counter()
proc, _ = start_api_server(Path(sys.argv[1]), free_port(), timeout=300)
print(time.perf_counter() - t)
stop_group(proc)
"""


def _env(code: Path, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWM_"))}
    return {**env, "PYTHONPATH": str(code), "AWM_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def _seconds(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """The number the script prints."""
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed: {out.stderr[-1500:]}")
    return float(out.stdout.strip().splitlines()[-1])


def demo_times(code: Path) -> tuple[float, float]:
    """(first run, second run) of `awm demo` on a fresh data folder, wall seconds."""
    with tempfile.TemporaryDirectory(prefix="awm-first-run-") as tmp:
        home = Path(tmp) / ".awm"
        times = []
        for _ in range(2):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "flows.cli", "demo"], env=_env(code, home), cwd=tmp,
                                 capture_output=True, text=True, timeout=900)
            times.append(time.perf_counter() - t)
            if out.returncode != 0:
                shown = "\n".join(ln for ln in out.stdout.splitlines() if not ln.endswith(" ok"))
                raise RuntimeError(f"awm demo failed ({code}): {shown[-3000:]}\n{out.stderr[-2000:]}")
        return times[0], times[1]


def part_times() -> dict[str, float]:
    from flows.server import template_path

    out = {}
    for label, script in PART_SCRIPTS.items():
        with tempfile.TemporaryDirectory(prefix="awm-part-") as tmp:
            out[label] = _seconds([sys.executable, "-c", script], _env(REPO, Path(tmp)), REPO)
    with tempfile.TemporaryDirectory(prefix="awm-server-") as tmp:
        home = Path(tmp) / "empty"
        # A database URL of its own: the same file, but nothing is seeded into it.
        plain = _env(REPO, Path(tmp), PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db")
        out["Prefect server start, empty home (migrations, block types)"] = _seconds(
            [sys.executable, "-c", SERVER_SCRIPT, str(home)], plain, REPO)
        out["Prefect server start, same home again"] = _seconds(
            [sys.executable, "-c", SERVER_SCRIPT, str(home)], plain, REPO)
        seeded = Path(tmp) / "seeded"
        out[f"Prefect server start, home seeded from the template ({template_path().name})"] = _seconds(
            [sys.executable, "-c", SERVER_SCRIPT, str(seeded)], _env(REPO, Path(tmp)), REPO)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="a git revision to time the demo runs of, side by side")
    args = ap.parse_args()
    from flows.server import make_template, template_path

    if not template_path().is_file():
        print(f"no template in this installation: making {template_path()} (as `make install` does) ...",
              file=sys.stderr, flush=True)
        make_template()
    codes = {"this code": REPO}
    worktree = None
    if args.baseline:
        worktree = Path(tempfile.mkdtemp(prefix="awm-baseline-"))
        worktree.chmod(0o755)  # the sandbox workers run as another user and import the code from here
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(worktree), args.baseline],
                       check=True)
        codes = {f"baseline {args.baseline}": worktree, **codes}
    demos: dict[str, list[tuple[float, float]]] = {k: [] for k in codes}
    parts: list[dict[str, float]] = []
    try:
        for run in range(args.runs):
            for label, code in codes.items():
                print(f"run {run + 1}/{args.runs}: awm demo twice ({label}) ...", file=sys.stderr, flush=True)
                demos[label].append(demo_times(code))
            print(f"run {run + 1}/{args.runs}: the parts ...", file=sys.stderr, flush=True)
            parts.append(part_times())
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
            shutil.rmtree(worktree, ignore_errors=True)
    med = statistics.median
    print()
    print(f"`awm demo` on a fresh data folder, wall seconds from process start to exit, median of {args.runs}")
    print()
    print("| code | first run | second run |")
    print("|---|---:|---:|")
    for label, times in demos.items():
        print(f"| {label} | {med(t[0] for t in times):.1f} | {med(t[1] for t in times):.1f} |")
    print()
    print(f"Its parts, each alone in a new process (this code), median of {args.runs}")
    print()
    print("| part | seconds |")
    print("|---|---:|")
    for label in parts[0]:
        print(f"| {label} | {med(p[label] for p in parts):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

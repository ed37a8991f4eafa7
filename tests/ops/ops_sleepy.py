"""A flow that stays busy (with a grandchild in a session of its own) so a test can stop the
server and worker mid-run and check that nothing the worker started survives."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from prefect import flow


@flow(name="ops-sleepy")
def sleepy(marker: str, seconds: int = 600) -> None:
    child = subprocess.Popen(["sleep", str(seconds)], start_new_session=True)
    Path(marker).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(seconds)

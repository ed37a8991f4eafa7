"""What a new user sees: `awm demo`, then `awm eval`, then `awm train`, through the real console
script in a fresh folder, each on Prefect's ephemeral server (no server started, no internet:
the case where Prefect's telemetry used to log an ERROR per command)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest



@pytest.mark.slow
def test_demo_eval_train_print_no_error_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWM_"))}
    env.update(AWM_HOME=str(tmp_path / ".awm"), AWM_CONFIG=str(tmp_path / "none.toml"))
    outputs = {}
    for name, argv in [("demo", ["demo"]),
                       ("eval", ["eval", "--policy", "reference", "--split", "all", "--env", "recipe_box",
                                 "--max-tasks-per-env", "2"]),
                       ("train", ["train", "--set", "steps=1"])]:
        out = subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
        text = out.stdout + out.stderr
        assert out.returncode == 0, (name, text[-3000:])
        # The labels in the reports are lower case (environment_error); a log line's level is not.
        assert not re.search(r"\bERROR\b|Traceback", text), (name, text[-3000:])
        outputs[name] = text
    assert "gate" in outputs["demo"].lower() and "published" in outputs["demo"]
    assert "| recipe_box |" in outputs["eval"] and "1.000" in outputs["eval"]
    assert re.search(r"training run \w+ finished: 1 steps", outputs["train"]), outputs["train"][-2000:]

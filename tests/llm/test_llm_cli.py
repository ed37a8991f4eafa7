"""`awm llm serve-fixtures` as a real subprocess: starts, answers over HTTP, stops on Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from awm_core.llm.offline import write_fixture
from flows.server import free_port

REPO = Path(__file__).resolve().parents[2]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _post(url, body, headers):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def test_llm_serve_fixtures_cli_answers_and_stops(tmp_path):
    fixtures = tmp_path / "fx"
    write_fixture(fixtures, "_", "scenario", [{"content": '{"scenarios": []}', "prompt_tokens": 11,
                                                "completion_tokens": 5}])
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "llm", "serve-fixtures", "--port", str(port), "--fixtures", str(fixtures)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "AWM_HOME": str(tmp_path / "home")},
    )
    try:
        banner = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in banner, banner + proc.stderr.read()
        status, body = _post(f"http://127.0.0.1:{port}/v1/chat/completions",
                             {"model": "awm-offline", "messages": [{"role": "user", "content": "hi"}]},
                             {"X-AWM-Stage": "scenario", "X-AWM-Scenario": "_", "X-AWM-Attempt": "1"})
        assert status == 200
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == '{"scenarios": []}'
        assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
        with pytest.raises(urllib.error.HTTPError) as missing:
            _post(f"http://127.0.0.1:{port}/v1/chat/completions", {"messages": []},
                  {"X-AWM-Stage": "tasks", "X-AWM-Scenario": "nope"})
        assert missing.value.code == 404
        assert "nope/tasks.json" in json.loads(missing.value.read())["error"]["message"]
        with pytest.raises(urllib.error.HTTPError) as bad_turn:  # a policy's turn, named for what it is
            _post(f"http://127.0.0.1:{port}/v1/chat/completions", {"messages": []},
                  {"X-AWM-Stage": "policy.0", "X-AWM-Scenario": "_", "X-AWM-Turn": "second"})
        assert bad_turn.value.code == 400
        assert "X-AWM-Turn must be an integer" in json.loads(bad_turn.value.read())["error"]["message"]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert "stopped after 3 requests" in proc.stderr.read()
    finally:
        stop(proc)
        proc.stdout.close()
        proc.stderr.close()


def test_llm_serve_fixtures_rejects_bad_input(tmp_path):
    from flows.cli import main

    assert main(["llm", "serve-fixtures", "--fixtures", str(tmp_path / "absent")]) == 1
    (tmp_path / "fx").mkdir()
    assert main(["llm", "serve-fixtures", "--fixtures", str(tmp_path / "fx"), "--faults", "429,explode",
                 "--port", "0"]) == 1

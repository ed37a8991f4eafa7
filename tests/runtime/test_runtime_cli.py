"""awm env tools / call / check / serve / export."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import mcp
import pytest
from mcp import StdioServerParameters

sys.path.insert(0, str(Path(__file__).parent))
from runtime_envs import notes_environment  # noqa: E402

from awm_core.models import Environment  # noqa: E402
from flows.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bundle(tmp_path, awm_home):
    path = tmp_path / "notes.json"
    path.write_text(notes_environment(env_id="cli_notes").to_json())
    return path


def test_tools_prints_schemas(bundle, capsys):
    assert main(["env", "tools", str(bundle)]) == 0
    tools = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert tools["get_note"]["input_schema"]["required"] == ["note_id"]


def test_call_prints_the_result(bundle, capsys):
    assert main(["env", "call", str(bundle), "get_note", '{"note_id": 1}']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"ok": True, "content": {"id": 1, "title": "first", "body": "hello"}, "error": None, "error_kind": None}
    assert main(["env", "call", str(bundle), "get_note", '{"note_id": "x"}']) == 1
    assert json.loads(capsys.readouterr().out)["error_kind"] == "invalid_arguments"


@pytest.mark.parametrize("raw, fragment", [("{not json", "not valid JSON"), ("[1]", "must be a JSON object")])
def test_call_rejects_bad_json_with_exit_2(bundle, capsys, raw, fragment):
    assert main(["env", "call", str(bundle), "get_note", raw]) == 2
    assert fragment in capsys.readouterr().err


def test_check_reports_the_failing_tool(bundle, capsys):
    assert main(["env", "check", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "FAIL buggy_count" in out and "ZeroDivisionError" in out and "4/5 tools passed" in out
    assert "sandbox: " in out and "seccomp filter" in out and "Landlock ABI" in out and "WEAK" not in out


def test_allow_weak_sandbox_flag_anywhere_lets_a_weak_pool_run(bundle, capsys, monkeypatch):
    monkeypatch.setenv("AWM_SANDBOX__LANDLOCK", "false")
    monkeypatch.setenv("AWM_SANDBOX__ALLOW_WEAK_SANDBOX", "false")  # restored after the flag sets it
    assert main(["env", "call", str(bundle), "list_notes", "{}"]) == 1
    assert "refusing to run generated code" in capsys.readouterr().err
    assert main(["env", "call", str(bundle), "list_notes", "{}", "--allow-weak-sandbox"]) == 0
    capsys.readouterr()
    assert main(["env", "check", str(bundle)]) == 1
    assert "WEAK, missing: Landlock" in capsys.readouterr().out


def test_missing_bundle_file_is_a_clear_error(tmp_path, awm_home, capsys):
    assert main(["env", "tools", str(tmp_path / "nope.json")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_export_from_the_catalog_and_load_by_id(tmp_path, awm_home, capsys):
    from awm_core.settings import load_settings
    from storage.catalog import Catalog

    env = notes_environment(env_id="exported_notes")
    with Catalog.open(load_settings()) as cat:
        with cat.publish(made_by={"test": "runtime"}, message="runtime cli test") as pub:
            pub.add_environments([env])
    out_dir = tmp_path / "out"
    assert main(["env", "export", "exported_notes", "--to", str(out_dir)]) == 0
    written = Environment.from_json((out_dir / "exported_notes.json").read_text())
    assert written.digest() == env.digest()
    capsys.readouterr()
    assert main(["env", "call", "exported_notes", "list_notes", "{}"]) == 0
    assert len(json.loads(capsys.readouterr().out)["content"]) == 2


def test_serve_over_stdio_with_the_sdk_client(bundle):
    params = StdioServerParameters(command=sys.executable, args=["-m", "flows.cli", "env", "serve", str(bundle)],
                                   cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})

    async def run():
        async with mcp.Client(params, mode="legacy") as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert {"list_tools", "call_tool", "create_note"} <= names
            r = await c.call_tool("create_note", {"title": "over stdio"})
            assert not r.is_error
            r = await c.call_tool("call_tool", {"tool_name": "list_notes", "arguments": {}})
            assert "over stdio" in r.content[0].text
    anyio.run(run)


@pytest.mark.parametrize("argv, env, fragment", [
    (["--transport", "http", "--host", "0.0.0.0"], {}, "without a token"),
    (["--transport", "http", "--token-file", "MISSING"], {}, "does not exist"),
    (["--token-file", "MISSING"], {}, "applies to --transport http"),
    (["--transport", "http"], {"AWM_SERVER__MAX_SESSIONS": "-1"}, "server.max_sessions"),
    (["--transport", "http"], {"AWM_SERVER__TOKEN": "short"}, "at least 16 characters"),
])
def test_serve_refuses_bad_start_up_input_with_one_error_line(bundle, tmp_path, capsys, monkeypatch, argv, env,
                                                               fragment):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = [str(tmp_path / "none") if a == "MISSING" else a for a in argv]
    assert main(["env", "serve", str(bundle), *argv]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err


def test_server_token_is_masked_in_config_show(awm_home, monkeypatch, capsys):
    monkeypatch.setenv("AWM_SERVER__TOKEN", "a-served-token-nobody-may-see")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "a-served-token-nobody-may-see" not in out and json.loads(out)["server"]["token"] == "***"


def test_serve_over_http_with_a_token_file(bundle, tmp_path):
    """``awm env serve --transport http --token-file``, as a user starts it: a request without the
    token gets 401; the SDK client with it is issued a session and keeps its database."""
    import subprocess
    import time

    import httpx

    from flows.server import free_port

    token = "served-over-http-" + "x" * 16
    (tmp_path / "tokens").write_text(f"# the trainer's\n{token}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "env", "serve", str(bundle), "--transport", "http",
                             "--port", str(port), "--token-file", str(tmp_path / "tokens"), "--max-sessions", "4"],
                            cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                refused = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
                                     headers={"accept": "application/json, text/event-stream"})
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.2)
        assert refused.status_code == 401 and refused.json()["error"]["message"]

        async def run():
            from mcp.client.streamable_http import streamable_http_client

            auth = httpx.AsyncClient(headers={"authorization": f"Bearer {token}"})
            async with mcp.Client(streamable_http_client(url, http_client=auth)) as c:
                r = await c.call_tool("create_note", {"title": "over http"})
                sid = r.meta["awm/session"]
                r = await c.call_tool("list_notes", {}, meta={"awm/session": sid})
                assert "over http" in r.content[0].text
        anyio.run(run)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "1 bearer token(s)" in err and "at most 4 sessions" in err, err

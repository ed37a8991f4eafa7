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

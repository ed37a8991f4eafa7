"""Settings: environment variables, awm.toml, masking, CLI."""
import json

import pytest

from awm_core.errors import SettingsError
from awm_core.settings import load_settings
from flows.cli import main


def test_defaults_and_env_override(awm_home, monkeypatch):
    s = load_settings()
    assert s.home_dir == awm_home.resolve()
    assert s.generation.dedup_threshold == 0.85
    monkeypatch.setenv("AWM_LLM__GENERATOR__MODEL", "gpt-5-mini")
    monkeypatch.setenv("AWM_GENERATION__STAGE_RETRIES", "3")
    s = load_settings()
    assert s.llm.generator.model == "gpt-5-mini"
    assert s.generation.stage_retries == 3


def test_toml_file_and_precedence(awm_home, monkeypatch, tmp_path):
    (tmp_path / "awm.toml").write_text('[llm.judge]\nmodel = "from-toml"\nbase_url = "http://x/v1"\n'
                                       '[generation]\nscenarios = 7\n')
    s = load_settings()
    assert s.llm.judge.model == "from-toml" and s.generation.scenarios == 7
    monkeypatch.setenv("AWM_GENERATION__SCENARIOS", "9")
    assert load_settings().generation.scenarios == 9


def test_bad_value_names_the_setting(awm_home, monkeypatch):
    monkeypatch.setenv("AWM_SANDBOX__WORKERS", "many")
    with pytest.raises(SettingsError, match="sandbox.workers"):
        load_settings()


def test_openai_env_fills_roles_and_is_masked(awm_home, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    s = load_settings()
    assert s.llm.generator.api_key.get_secret_value() == "sk-very-secret"
    assert s.llm.judge.base_url == "http://127.0.0.1:9/v1"
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "sk-very-secret" not in out
    assert json.loads(out)["llm"]["generator"]["api_key"] == "***"


def test_cli_unknown_input_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

"""Training config, presets, config files, accelerate configs, tokenizer and import hygiene."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from awm_core.errors import SettingsError
from awm_core.train.config import PAPER, TrainConfig, preset

REPO = Path(__file__).resolve().parents[2]


def test_paper_preset_has_the_papers_values():
    assert (PAPER.group_size, PAPER.tasks_per_step, PAPER.learning_rate, PAPER.max_turns, PAPER.window) == \
        (16, 64, 7e-7, 20, 3)
    assert PAPER.episodes_per_step == 1024
    assert preset("paper", window=None).window is None


@pytest.mark.parametrize("changes, message", [
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"window": -1}, "window must be null or an integer >= 0"),
    ({"split": "test"}, "split must be one of train, val, all"),
    ({"generation_backend": "tgi"}, "generation_backend must be one of transformers, paged, vllm"),
    ({"learning_rate": 0}, "learning_rate must be a number > 0"),
    ({"max_turns": 0}, "max_turns must be an integer >= 1"),
    ({"interface": "mcp"}, "interface must be one of direct, meta"),
])
def test_bad_values_are_named(changes, message):
    with pytest.raises(SettingsError, match=message):
        preset("tiny", **changes)


def test_config_files_json_and_toml_with_preset_and_unknown_keys(tmp_path):
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"preset": "paper", "model": "models/q", "window": None, "steps": 5}))
    cfg = TrainConfig.load(js)
    assert (cfg.group_size, cfg.window, cfg.steps, cfg.model) == (16, None, 5, "models/q")
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\npreset = "tiny"\nwindow = 1\nlearning_rate = 1e-5\n')
    cfg = TrainConfig.load(toml)
    assert (cfg.window, cfg.learning_rate, cfg.group_size) == (1, 1e-5, 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"windw": 2}))
    with pytest.raises(SettingsError, match="unknown training setting.*windw"):
        TrainConfig.load(bad)
    with pytest.raises(SettingsError, match="training config .* does not exist"):
        TrainConfig.load(tmp_path / "missing.json")
    (tmp_path / "broken.toml").write_text("window = ")
    with pytest.raises(SettingsError, match="not valid TOML"):
        TrainConfig.load(tmp_path / "broken.toml")
    saved = cfg.save(tmp_path / "again.json")
    assert TrainConfig.load(saved) == cfg


def test_episodes_must_split_over_processes_and_the_token_budget_must_hold_a_sample():
    from awm_core.train.trainer import grpo_args

    with pytest.raises(SettingsError, match="must split evenly"):
        grpo_args(preset("tiny", tasks_per_step=3, group_size=3), Path("/nonexistent"), 2)
    args = grpo_args(preset("tiny", tasks_per_step=4, group_size=4), Path("out"), 2)
    assert (args.per_device_train_batch_size, args.num_generations, args.loss_type) == (8, 4, "dapo")
    assert args.gradient_accumulation_steps == 1  # micro-batches are the trainer's, cut by tokens
    with pytest.raises(SettingsError, match="must hold the longest possible sample"):
        preset("tiny", max_prompt_tokens=4096, max_tokens=16, max_tokens_per_microbatch=4000)
    with pytest.raises(SettingsError, match="grad_accum is no longer a setting; use max_tokens_per_microbatch"):
        TrainConfig.from_dict({"preset": "tiny", "grad_accum": 2})


@pytest.mark.parametrize("name, distributed", [("cpu", "NO"), ("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU")])
def test_accelerate_configs_parse(name, distributed):
    data = yaml.safe_load((REPO / "deployments" / "accelerate" / f"{name}.yaml").read_text())
    assert data["distributed_type"] == distributed
    assert data["use_cpu"] is (name == "cpu")


def test_cli_show_and_bad_override(capsys):
    from flows.cli import main

    assert main(["train", "--preset", "paper", "--set", "window=null", "--set", "model=m", "--show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["window"] is None and shown["group_size"] == 16 and shown["model"] == "m"
    assert main(["train", "--set", "windw=2", "--show"]) == 1
    assert "windw" in capsys.readouterr().err


def test_tokenizer_keeps_tool_tags_and_reloads_with_the_same_ids(tmp_path):
    from awm_core.train import models

    tok = models.train_tokenizer(["call a tool", '{"name": "x", "arguments": {}}'], vocab_size=400, out_dir=tmp_path)
    text = '<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids + [tok.convert_tokens_to_ids(models.EOS)], skip_special_tokens=True) == text
    again = models.load_tokenizer(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    rendered = again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    model = models.random_model("tiny", again)
    assert model.config.vocab_size == len(again) and models.parameter_count(model) < 500_000


def test_training_code_imports_nothing_the_gpu_machine_lacks():
    """The GPU benchmark's imports must not pull in prefect, the catalog, mcp, openai or fastapi."""
    code = ("import sys; import awm_core.train.trainer, awm_core.train.demo, awm_core.train.warmstart, "
            "awm_core.runtime, awm_core.settings\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'duckdb', 'storage', 'mcp', 'openai', "
            "'fastapi', 'flows'})\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""

"""Accelerate: the deployment configs parse as accelerate configs with the precision they claim,
the training config decides autocast, and two CPU processes (DDP over gloo) end a GRPO step with
bit-identical weights, which the trainer itself checks at the end of every run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from awm_core.errors import AWMError
from awm_core.train.config import ACCELERATE_CONFIGS, TrainConfig, preset
from test_train_grpo import counter_environment

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = REPO / "deployments" / "accelerate"

# name -> (distributed type, mixed precision, use_cpu)
CLAIMS = {"cpu": ("NO", "no", True), "single_gpu": ("NO", "bf16", False), "multi_gpu": ("MULTI_GPU", "bf16", False),
          "fsdp": ("FSDP", "bf16", False), "deepspeed_zero3": ("DEEPSPEED", "bf16", False)}


def test_every_named_accelerate_config_exists():
    assert set(ACCELERATE_CONFIGS) == set(CLAIMS) == {p.stem for p in ACCELERATE.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_accelerate_config_parses_with_the_precision_it_claims(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))  # unknown keys raise here
    distributed, precision, cpu = CLAIMS[name]
    assert isinstance(cfg, ClusterConfig)
    assert (cfg.distributed_type.value, cfg.mixed_precision, cfg.use_cpu) == (distributed, precision, cpu)
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_reshard_after_forward"] is True
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if name == "deepspeed_zero3":
        assert cfg.deepspeed_config["zero_stage"] == 3


def test_fsdp_config_becomes_a_full_shard_bf16_plugin_over_fp32_weights(monkeypatch):
    """What ``accelerate launch --config_file fsdp.yaml`` hands each process: FSDP2, full shard,
    layer-wise wrapping and a bf16 compute policy (the sharded weights keep the model's fp32)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / "fsdp.yaml"), "x.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["FSDP_SHARDING_STRATEGY"],
            env["FSDP_AUTO_WRAP_POLICY"], env["ACCELERATE_MIXED_PRECISION"]) == \
        ("true", "2", "FULL_SHARD", "TRANSFORMER_BASED_WRAP", "bf16")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_mixed_precision("bf16")
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16


@pytest.mark.parametrize("bf16", [True, False])
def test_the_training_config_not_the_yaml_decides_autocast(bf16, monkeypatch):
    from awm_core.train.trainer import grpo_args

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what multi_gpu.yaml sets
    args = grpo_args(preset("tiny", bf16=bf16), Path("out"), 1)
    assert args.mixed_precision == ("bf16" if bf16 else "no") and args.use_cpu == (not torch.cuda.is_available())


def test_diverged_processes_fail_loudly():
    from accelerate.utils import DistributedType

    from awm_core.train.trainer import parameter_sums, weights_checksum

    model = torch.nn.Linear(3, 2)
    other = torch.nn.Linear(3, 2)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.bias[1] += 1e-7  # one element, one ulp-scale step
    rows = torch.stack([parameter_sums(model), parameter_sums(other)])
    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, unwrap_model=lambda m: m,
                          gather=lambda t: rows)
    with pytest.raises(AWMError, match=r"2 processes ended training with different weights .*parameter bias"):
        weights_checksum(SimpleNamespace(accelerator=acc, model_wrapped=model))
    acc.gather = lambda t: torch.stack([parameter_sums(model)] * 2)
    assert weights_checksum(SimpleNamespace(accelerator=acc, model_wrapped=model))["weights_compared"] == 2


def test_two_cpu_processes_end_a_grpo_step_with_identical_weights(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on a machine without GPUs: the trainer
    asks for use_cpu, so accelerate runs DDP over gloo. The warm-started counter policy's episodes
    differ in reward, so the step has a real gradient that DDP must average alike on both ranks
    (under bf16 autocast, as the paper preset trains)."""
    from awm_core.train import models
    from awm_core.train.launch import write_run_dir
    from awm_core.train.trainer import checksum_digest, parameter_sums
    from flows.server import free_port

    env = counter_environment()
    # window 1 and a budget of about two samples: each rank packs its own number of samples into
    # several micro-batches whose row counts differ between the ranks (TRL's per-row gather of
    # clip statistics must still line up, and the pass counts must match)
    cfg = TrainConfig(model="random:tiny", group_size=4, tasks_per_step=2, max_turns=3, window=1,
                      interface="direct", learning_rate=1e-3, steps=1, max_tokens=40, max_prompt_tokens=2048,
                      max_tokens_per_microbatch=2100, warmstart_steps=80, warmstart_lr=3e-3, sandbox_workers=1,
                      seed=1, bf16=True)
    run_dir = write_run_dir(tmp_path / "run", cfg, [env], [(env.id, t.idx, t.text) for t in env.tasks])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "awm_core.train.launch", str(run_dir)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={
        **os.environ, "AWM_HOME": str(tmp_path / "home"), "AWM_CONFIG": str(tmp_path / "none.toml"),
        "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    out = proc.stdout + proc.stderr
    (tmp_path / "launch.log").write_text(out)
    assert proc.returncode == 0, out[out.find("Traceback"):][:4000] if "Traceback" in out else out[-4000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["weights_compared"] == 2, result
    assert result["precision"]["autocast"] == "bf16"  # the config's bf16, over the launcher's --mixed_precision no
    assert f"weights checksum {result['weights_checksum']} (processes compared: 2)" in out
    (metrics,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics["awm/episodes"] == 8 and metrics["reward_std"] > 0 and metrics["grad_norm"] > 0
    assert metrics["awm/microbatches"] > 1  # several budget-cut passes on the busiest rank
    assert {p.name for p in run_dir.glob("rollouts.rank*.jsonl")} == {"rollouts.rank0.jsonl", "rollouts.rank1.jsonl"}
    # the checksum both ranks agreed on is the one of the weights rank 0 saved
    final = models.load_model(result["final_checkpoint"])
    assert checksum_digest(parameter_sums(final)) == result["weights_checksum"]

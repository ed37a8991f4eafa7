"""The training configuration: one dataclass, a named preset with the paper's values, file I/O.

A config file is JSON or TOML with the dataclass's field names at the top level (TOML may also
put them under a ``[train]`` table). ``preset = "paper"`` in a file starts from that preset and
the file's other keys override it. Unknown keys and bad values raise ``SettingsError`` naming
the key, so a typo never silently trains with a default.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from awm_core.errors import SettingsError

GENERATION_BACKENDS = ("transformers", "vllm")
SPLITS = ("train", "val", "all")
INTERFACES = ("direct", "meta")
ACCELERATE_CONFIGS = ("cpu", "single_gpu", "multi_gpu")


@dataclass
class TrainConfig:
    """Everything one GRPO run needs besides the environments themselves.

    Batch shape: every optimizer step runs ``tasks_per_step`` tasks, each ``group_size`` times
    (one episode per completion of the GRPO group, each in its own fresh session), so
    ``tasks_per_step * group_size`` episodes per step across all processes, cut into
    ``grad_accum`` micro-batches per process.
    """

    model: str = "random:tiny"
    """A saved model folder (``from_pretrained``; its tokenizer beside it), or ``random:<shape>``
    for a randomly initialised model of a named shape (see ``awm_core.train.models.SHAPES``)."""
    tokenizer: str | None = None
    """Tokenizer folder (default: the model folder; for ``random:`` models a byte-level BPE
    tokenizer is trained on the environments' text at launch)."""
    snapshot: int | None = None
    """Catalog snapshot to train on (None: the newest snapshot whose gate passed)."""
    split: str = "train"
    group_size: int = 16
    tasks_per_step: int = 64
    max_turns: int = 20
    window: int | None = 3
    """History window w: each action is conditioned on the system prompt, the task and the last
    w turns, and every step becomes its own sample. None trains on whole trajectories."""
    interface: str = "direct"
    learning_rate: float = 7e-7
    steps: int = 100
    max_tokens: int = 1024
    """Most new tokens per policy turn."""
    max_prompt_tokens: int = 16384
    """A step whose context is longer ends the episode (the policy gives no answer)."""
    temperature: float = 1.0
    beta: float = 0.0
    """KL coefficient to the reference model (0 loads no reference model)."""
    grad_accum: int = 1
    generation_backend: str = "transformers"
    vllm_mode: str = "colocate"
    checkpoint_dir: str | None = None
    """Where checkpoints go (None: the run folder's ``checkpoints``)."""
    save_steps: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    accelerate_config: str = "cpu"
    """``cpu``, ``single_gpu``, ``multi_gpu`` (the files in deployments/accelerate) or a path."""
    seed: int = 0
    split_seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    sandbox_workers: int = 2
    rollout_threads: int = 0
    """Episodes run at once per process (0: all of the process's episodes of a step)."""
    generation_batch: int = 64
    """Most sequences per generate call (1 generates each episode's turn on its own)."""
    warmstart_steps: int = 0
    """Supervised steps on the training tasks' reference solutions before GRPO (0: none), so a
    fresh model starts out calling tools."""
    warmstart_lr: float = 1e-3
    run_name: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []

        def positive(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")

        for name in ("group_size", "tasks_per_step", "max_turns", "steps", "max_tokens", "max_prompt_tokens",
                     "grad_accum", "sandbox_workers", "generation_batch"):
            positive(name)
        if self.group_size == 1:
            problems.append("group_size must be >= 2: GRPO compares episodes of the same task")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or self.window < 0):
            problems.append(f"window must be null or an integer >= 0, got {self.window!r}")
        if self.split not in SPLITS:
            problems.append(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.interface not in INTERFACES:
            problems.append(f"interface must be one of {', '.join(INTERFACES)}, got {self.interface!r}")
        if self.generation_backend not in GENERATION_BACKENDS:
            problems.append(f"generation_backend must be one of {', '.join(GENERATION_BACKENDS)}, "
                            f"got {self.generation_backend!r}")
        if self.vllm_mode not in ("colocate", "server"):
            problems.append(f"vllm_mode must be colocate or server, got {self.vllm_mode!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            problems.append(f"learning_rate must be a number > 0, got {self.learning_rate!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            problems.append(f"temperature must be a number > 0, got {self.temperature!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            problems.append(f"beta must be a number >= 0, got {self.beta!r}")
        if not isinstance(self.save_steps, int) or self.save_steps < 0:
            problems.append(f"save_steps must be an integer >= 0, got {self.save_steps!r}")
        if not isinstance(self.warmstart_steps, int) or self.warmstart_steps < 0:
            problems.append(f"warmstart_steps must be an integer >= 0, got {self.warmstart_steps!r}")
        if not (isinstance(self.warmstart_lr, (int, float)) and self.warmstart_lr > 0):
            problems.append(f"warmstart_lr must be a number > 0, got {self.warmstart_lr!r}")
        if not isinstance(self.rollout_threads, int) or self.rollout_threads < 0:
            problems.append(f"rollout_threads must be an integer >= 0, got {self.rollout_threads!r}")
        if self.snapshot is not None and (not isinstance(self.snapshot, int) or self.snapshot < 0):
            problems.append(f"snapshot must be null or an integer >= 0, got {self.snapshot!r}")
        if not isinstance(self.model, str) or not self.model:
            problems.append("model must be a non-empty string (a model folder or random:<shape>)")
        if problems:
            raise SettingsError("invalid training config: " + "; ".join(problems))

    @property
    def episodes_per_step(self) -> int:
        return self.tasks_per_step * self.group_size

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        if not isinstance(data, dict):
            raise SettingsError(f"{source}: a training config must be an object of settings")
        data = dict(data)
        if "train" in data and isinstance(data["train"], dict) and len(data) == 1:
            data = dict(data["train"])
        preset = data.pop("preset", None)
        base: dict[str, Any] = {}
        if preset is not None:
            if preset not in PRESETS:
                raise SettingsError(f"{source}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
            base = asdict(PRESETS[preset])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"{source}: unknown training setting(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(known))}")
        base.update(data)
        try:
            return cls(**base)
        except SettingsError as exc:
            raise SettingsError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SettingsError(f"cannot read the training config {path}: {exc.strerror or exc}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise SettingsError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path


def _paper() -> TrainConfig:
    # The paper's GRPO setting (AWM §4.2 / appendix): group 16, 64 tasks per step, lr 7e-7,
    # at most 20 turns, history window 3. The model is the user's choice of a Qwen3 folder.
    return TrainConfig(model="models/Qwen3-8B", group_size=16, tasks_per_step=64, learning_rate=7e-7, max_turns=20,
                       window=3, max_tokens=1024, max_prompt_tokens=16384, grad_accum=16, bf16=True,
                       gradient_checkpointing=True, accelerate_config="multi_gpu", save_steps=10, steps=200)


def _tiny() -> TrainConfig:
    # A CPU smoke run: a few small groups, short turns.
    return TrainConfig(model="random:tiny", group_size=2, tasks_per_step=2, learning_rate=1e-4, max_turns=3, window=2,
                       interface="meta", max_tokens=16, max_prompt_tokens=4096, steps=2, grad_accum=1, accelerate_config="cpu",
                       sandbox_workers=1)


PRESETS: dict[str, TrainConfig] = {"paper": _paper(), "tiny": _tiny()}
PAPER = PRESETS["paper"]


def preset(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise SettingsError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**asdict(PRESETS[name]), **overrides}, source=f"preset {name}")


def config_field_docs() -> dict[str, Any]:
    """Field name -> default, for the docs and ``awm train preset``."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in fields(TrainConfig)}


__all__ = ["TrainConfig", "PRESETS", "PAPER", "preset", "GENERATION_BACKENDS", "ACCELERATE_CONFIGS"]

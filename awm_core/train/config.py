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

GENERATION_BACKENDS = ("transformers", "paged", "vllm")
ROLLOUT_SCHEDULERS = ("continuous", "lockstep")
SPLITS = ("train", "val", "all")
INTERFACES = ("direct", "meta")
USERS = ("llm", "scripted")  # awm_core.agent.users.USER_KINDS
MODES = ("message", "conversation")  # awm_core.agent.users.MODES
ACCELERATE_CONFIGS = ("cpu", "single_gpu", "multi_gpu", "fsdp", "deepspeed_zero3")
# Config keys that existed once, with what replaced them: an old config file gets told, not a bare "unknown".
RENAMED = {"grad_accum": "max_tokens_per_microbatch (micro-batches are now cut by a token budget)"}


@dataclass
class LoraSettings:
    """LoRA adapters through ``peft`` (``r = 0``: off, every weight trains)."""

    r: int = 0
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            out.append(f"lora.r must be an integer >= 0, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            out.append(f"lora.alpha must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            out.append(f"lora.dropout must be a number in [0, 1), got {self.dropout!r}")
        if (not isinstance(self.target_modules, list) or not self.target_modules
                or not all(isinstance(m, str) and m for m in self.target_modules)):
            out.append(f"lora.target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        return out


@dataclass
class TrainConfig:
    """Everything one GRPO run needs besides the environments themselves.

    Batch shape: every optimizer step runs ``tasks_per_step`` tasks, each ``group_size`` times
    (one episode per completion of the GRPO group, each in its own fresh session), so
    ``tasks_per_step * group_size`` episodes per step across all processes. Each process turns its
    episodes into per-step samples and cuts them into micro-batches of at most
    ``max_tokens_per_microbatch`` padded tokens; the loss is the mean over every policy token of
    the step, whatever the cut.
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
    """``train``, ``val``, ``all``, or a benchmark split imported into the catalog: ``bfcl``,
    ``bfcl:base,miss_func``, ``tau2:retail:train`` (its tasks whose reference passed the benchmark's own
    checker on import; no gate needed)."""
    group_size: int = 16
    tasks_per_step: int = 64
    max_turns: int = 20
    window: int | None = 3
    """History window w: each action is conditioned on the system prompt, the task and the last
    w turns, and every step becomes its own sample. None trains on whole trajectories."""
    interface: str = "direct"
    learning_rate: float = 7e-7
    updates_per_batch: int = 1
    """Optimizer steps on each batch of episodes (PPO's epochs, TRL's ``num_iterations``). With 1
    every update is on-policy and the clipped ratio is always 1, so nothing bounds how far one
    update pushes down the tokens of a failed episode; with 2 or more, a sample stops pulling once
    its probability ratio leaves [1 - 0.2, 1 + 0.2]. ``steps`` counts optimizer steps."""
    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up. Adam's first steps move every weight by
    about the learning rate whatever its gradient, which a small model's noisy first GRPO steps
    do not survive at a high rate."""
    steps: int = 100
    max_tokens: int = 1024
    """Most new tokens per policy turn."""
    max_prompt_tokens: int = 16384
    """A step whose context is longer ends the episode (the policy gives no answer)."""
    temperature: float = 1.0
    beta: float = 0.0
    """KL coefficient to the reference model (0 loads no reference model)."""
    max_tokens_per_microbatch: int = 32768
    """Most tokens (rows x padded length) in one forward/backward pass. Must hold the longest
    possible sample, ``max_prompt_tokens + max_tokens``."""
    generation_backend: str = "transformers"
    """``transformers`` (``generate`` on batches the scheduler forms), ``paged`` (transformers'
    continuous batching with paged attention: for GPUs) or ``vllm`` (through TRL)."""
    rollout_scheduler: str = "continuous"
    """``continuous``: an episode's next turn is queued as soon as its tool results are back and
    generation never waits for the other episodes; ``lockstep``: a batch starts only when every
    live episode waits (the old behaviour, kept for benchmarks)."""
    vllm_gpu_memory_utilization: float = 0.3
    """The GPU memory share vLLM may take in colocate mode (the rest is for training)."""
    vllm_mode: str = "colocate"
    checkpoint_dir: str | None = None
    """Where checkpoints go (None: the run folder's ``checkpoints``)."""
    save_steps: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    accelerate_config: str = "cpu"
    """``cpu``, ``single_gpu``, ``multi_gpu``, ``fsdp``, ``deepspeed_zero3`` (the files in
    deployments/accelerate) or a path."""
    seed: int = 0
    split_seed: int = 0
    bf16: bool = False
    """bf16 autocast for forward and backward; the weights and the optimizer stay fp32 (a pure
    bf16 model would round small AdamW steps away)."""
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    episode_timeout_s: float = 900.0
    """An episode still running after this long ends as an environment error (masked)."""
    sync_timeout_s: float = 1800.0
    """Longest wait of one process for the others (collectives); then every process stops."""
    judge: bool = False
    """Reward episodes with the code-augmented LLM judge on the verifier's evidence (AWM §3.4)
    instead of the verifier's verdict alone; needs an LLM (``settings.llm``)."""
    sandbox_workers: int = 2
    rollout_threads: int = 0
    """Episodes run at once per process (0: all of the process's episodes of a step)."""
    generation_batch: int = 64
    """Most sequences per generate call (1 generates each episode's turn on its own)."""
    warmstart_steps: int = 0
    """Supervised steps on the training tasks' reference solutions before GRPO (0: none), so a
    fresh model starts out calling tools."""
    warmstart_lr: float = 1e-3
    mode: str = "message"
    """``message``: a synthesized task is one user message (its text); ``conversation``: a synthesized
    task with a user scenario is played with the user simulator (``user``), the agent shown the
    environment's policy. tau2-bench's tasks are conversations in either mode
    (``awm_core.agent.users.plays_as_conversation``)."""
    user: str = "llm"
    """Who plays the user of a conversation (tau2-bench's tasks; synthesized ones in mode
    ``conversation``): ``llm``, the LLM role ``user`` (an endpoint or its offline recordings; its calls
    count against the run's LLM budget); ``scripted``, a deterministic user that gives what it knows and
    stops once the reference's actions are done."""
    max_steps: int = 100
    """Conversations: messages of every party before the episode stops (tau2-bench's max steps)."""
    max_errors: int = 10
    """Conversations: tool errors of either side before the episode stops (tau2-bench's max errors)."""
    negate_advantages: bool = False
    """A control experiment: train against the reward (every advantage negated). A run with this
    set should get worse; one that does not is not learning from the reward at all."""
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
                     "max_tokens_per_microbatch", "sandbox_workers", "generation_batch", "max_steps", "max_errors"):
            positive(name)
        if not problems and self.max_tokens_per_microbatch < self.max_prompt_tokens + self.max_tokens:
            problems.append(f"max_tokens_per_microbatch ({self.max_tokens_per_microbatch}) must hold the longest "
                            f"possible sample, max_prompt_tokens + max_tokens = "
                            f"{self.max_prompt_tokens + self.max_tokens}")
        if self.rollout_scheduler not in ROLLOUT_SCHEDULERS:
            problems.append(f"rollout_scheduler must be one of {', '.join(ROLLOUT_SCHEDULERS)}, "
                            f"got {self.rollout_scheduler!r}")
        if not (isinstance(self.vllm_gpu_memory_utilization, (int, float))
                and 0 < self.vllm_gpu_memory_utilization < 1):
            problems.append(f"vllm_gpu_memory_utilization must be a number in (0, 1), "
                            f"got {self.vllm_gpu_memory_utilization!r}")
        for name in ("episode_timeout_s", "sync_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                problems.append(f"{name} must be a number of seconds > 0, got {v!r}")
        if not isinstance(self.negate_advantages, bool):
            problems.append(f"negate_advantages must be true or false, got {self.negate_advantages!r}")
        if not isinstance(self.judge, bool):
            problems.append(f"judge must be true or false, got {self.judge!r}")
        if isinstance(self.lora, dict):
            try:
                self.lora = LoraSettings(**self.lora)
            except TypeError:
                known = [f.name for f in fields(LoraSettings)]
                unknown = sorted(set(self.lora) - set(known)) if isinstance(self.lora, dict) else []
                problems.append(f"lora has unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
                self.lora = LoraSettings()
        if isinstance(self.lora, LoraSettings):
            problems += self.lora.problems()
        else:
            problems.append(f"lora must be a table of settings (r, alpha, dropout, target_modules), got {self.lora!r}")
        if self.group_size == 1:
            problems.append("group_size must be >= 2: GRPO compares episodes of the same task")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or self.window < 0):
            problems.append(f"window must be null or an integer >= 0, got {self.window!r}")
        if self.split not in SPLITS:
            from awm_core.errors import AWMError
            from awm_core.interop.benchmarks import benchmark_categories, is_benchmark

            if not is_benchmark(self.split):
                problems.append(f"split must be one of {', '.join(SPLITS)} or a benchmark split (bfcl, "
                                f"bfcl:base,..., tau2:retail:train, ...), got {self.split!r}")
            else:
                try:
                    benchmark_categories(self.split)
                except AWMError as exc:
                    problems.append(f"split {self.split!r}: {exc}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)} (a synthesized task as one message or as a "
                            f"conversation with the user simulator), got {self.mode!r}")
        if self.user not in USERS:
            problems.append(f"user must be one of {', '.join(USERS)} (who plays the user of conversational "
                            f"tasks), got {self.user!r}")
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
        if not isinstance(self.updates_per_batch, int) or isinstance(self.updates_per_batch, bool) \
                or self.updates_per_batch < 1:
            problems.append(f"updates_per_batch must be an integer >= 1, got {self.updates_per_batch!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            problems.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
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
        for key in sorted(set(data) & set(RENAMED)):
            raise SettingsError(f"{source}: {key} is no longer a setting; use {RENAMED[key]}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"{source}: unknown training setting(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(known))}")
        if isinstance(data.get("lora"), dict) and isinstance(base.get("lora"), dict):
            data["lora"] = {**base["lora"], **data["lora"]}  # a file's [lora] table overrides the preset's keys
        base.update(data)
        try:
            return cls(**base)
        except SettingsError as exc:
            raise SettingsError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        from awm_core.files import read_text

        path = Path(path)
        text = read_text(path, "training config", SettingsError)
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
                       window=3, max_tokens=1024, max_prompt_tokens=16384, max_tokens_per_microbatch=32768, bf16=True,
                       gradient_checkpointing=True, accelerate_config="multi_gpu", save_steps=10, steps=200)


def _tiny() -> TrainConfig:
    # A CPU smoke run: a few small groups, short turns.
    return TrainConfig(model="random:tiny", group_size=2, tasks_per_step=2, learning_rate=1e-4, max_turns=3, window=2,
                       interface="meta", max_tokens=16, max_prompt_tokens=4096, steps=2, accelerate_config="cpu",
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


__all__ = ["TrainConfig", "LoraSettings", "PRESETS", "PAPER", "preset", "GENERATION_BACKENDS", "ROLLOUT_SCHEDULERS",
           "ACCELERATE_CONFIGS"]

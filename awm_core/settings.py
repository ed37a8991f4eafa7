"""One settings object for the whole project.

Sources, strongest first: keyword arguments, environment variables (``AWM_`` prefix, nested
fields joined by ``__``: ``AWM_LLM__GENERATOR__MODEL``), an ``awm.toml`` file (path in
``AWM_CONFIG``, default ``./awm.toml``), then the defaults below. ``OPENAI_BASE_URL`` and
``OPENAI_API_KEY`` fill any role that sets neither.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from awm_core.errors import SettingsError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_FIXTURES = PACKAGE_DIR / "fixtures" / "demo"


class RoleSettings(BaseModel):
    """Where one LLM role (generator, judge, embedder, policy) sends its requests."""

    backend: Literal["http", "offline"] = Field(
        "offline", description="http: an OpenAI-compatible endpoint; offline: recorded fixtures"
    )
    base_url: str | None = None
    api_key: SecretStr | None = None
    model: str = "awm-offline"
    temperature: float = 1.0
    max_tokens: int = 16_000
    timeout_s: float = 300.0


class Price(BaseModel):
    prompt_per_mtok: float = 0.0
    completion_per_mtok: float = 0.0


class LLMSettings(BaseModel):
    generator: RoleSettings = RoleSettings()
    judge: RoleSettings = RoleSettings()
    embedder: RoleSettings = RoleSettings(model="all-MiniLM-L6-v2")
    policy: RoleSettings = RoleSettings()
    fixtures_dir: Path = DEFAULT_FIXTURES
    cache: bool = Field(True, description="on-disk response cache under AWM_HOME/llm-cache")
    offline_latency_s: float = Field(0.0, description="simulated seconds per offline-backend call")
    record_dir: Path | None = Field(
        None, description="when set, every http reply is also saved as a fixture file here (replay offline)"
    )
    max_http_retries: int = 4
    backoff_base_s: float = 1.0
    budget_usd: float = Field(25.0, description="hard cap on estimated spend per run")
    prices: dict[str, Price] = Field(
        default_factory=lambda: {
            "gpt-5": Price(prompt_per_mtok=1.25, completion_per_mtok=10.0),
            "gpt-5-mini": Price(prompt_per_mtok=0.25, completion_per_mtok=2.0),
            "gpt-4.1": Price(prompt_per_mtok=2.0, completion_per_mtok=8.0),
            "gpt-4.1-mini": Price(prompt_per_mtok=0.4, completion_per_mtok=1.6),
            "text-embedding-3-large": Price(prompt_per_mtok=0.13),
            # The offline recordings are priced like a mid-size model so the demo shows
            # meaningful cost accounting and the budget cap can be exercised offline.
            "awm-offline": Price(prompt_per_mtok=0.4, completion_per_mtok=1.6),
        }
    )


class GenerationSettings(BaseModel):
    scenarios: int = 3
    tasks_per_scenario: int = 10
    target_tools: int = Field(35, description="tool count the spec stage aims at (paper: ~35)")
    stage_retries: int = Field(5, description="Prefect retries per stage; each sees earlier errors")
    dedup_threshold: float = Field(0.85, description="cosine similarity above which scenarios are duplicates")
    category_cap: int = Field(80, description="most scenarios kept per category")
    min_valid_tasks: int = Field(5, description="environments with fewer valid tasks are not published")
    concurrency: int = 4
    seed_list: Path | None = None
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="fan-out of scenarios: threads, or Dask (local worker processes, or dask_address)"
    )
    dask_address: str | None = Field(None, description="scheduler of an existing Dask cluster (tcp://host:8786)")


class SandboxSettings(BaseModel):
    """Limits of the sandbox worker processes that run generated code (``SandboxPool``)."""

    workers: int = 2
    memory_mb: int = 1024
    cpu_s: int = 60
    call_timeout_s: float = 10.0
    open_files: int = 64
    file_size_mb: int = 64
    max_threads: int = 32
    max_result_bytes: int = 4 << 20
    recycle_rss_fraction: float = Field(0.8, description="replace a worker whose memory passes this share of its limit")
    startup_timeout_s: float = 60.0
    network_namespace: bool = Field(True, description="put each worker in its own network namespace where permitted")
    separate_uid: bool = Field(True, description="run each worker under its own uid where permitted")
    user_namespace: bool = Field(True, description="when not root: a user namespace of its own around the network namespace")
    landlock: bool = Field(True, description="Landlock filesystem and TCP rules for each worker")
    seccomp: bool = Field(True, description="a seccomp filter for each worker (no exec, fork, ptrace, sockets but AF_UNIX)")
    allow_weak_sandbox: bool = Field(
        False, description="run generated code even where Landlock or seccomp cannot be applied (in-process guards only)")
    awm1k_asgi: bool = Field(False, description="call AWM-1K route handlers through the whole ASGI app, "
                                                "not the direct route-handler fast path")


class RewardSettings(BaseModel):
    completed: float = 1.0
    partial: float = 0.1
    agent_error: float = 0.0
    environment_error: float = 0.0
    format_error: float = -1.0


class GateSettings(BaseModel):
    min_env_pass_rate: float = 0.8
    min_task_pass_rate: float = 0.8
    max_tokens_per_call: int = 1_000_000


class CatalogSettings(BaseModel):
    metadata: str | None = Field(
        None,
        description="DuckLake metadata: None = SQLite under AWM_HOME/catalog; or 'postgres:dbname=... host=...'",
    )
    data_path: str | None = Field(None, description="Parquet location: None = AWM_HOME/catalog/data; or s3://...")


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 4200
    work_pool: str = "awm-local"
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    train_after_gate: bool = Field(False, description="automation: start `train` when a gate run passes")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AWM_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(Path(".awm"), description="data folder (catalog, caches, Prefect state)")
    llm: LLMSettings = LLMSettings()
    generation: GenerationSettings = GenerationSettings()
    sandbox: SandboxSettings = SandboxSettings()
    rewards: RewardSettings = RewardSettings()
    gate: GateSettings = GateSettings()
    catalog: CatalogSettings = CatalogSettings()
    server: ServerSettings = ServerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("AWM_CONFIG", "awm.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path.exists():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def model_post_init(self, __context: Any) -> None:
        base_url = os.environ.get("OPENAI_BASE_URL")
        api_key = os.environ.get("OPENAI_API_KEY")
        for role in (self.llm.generator, self.llm.judge, self.llm.embedder, self.llm.policy):
            if role.base_url is None and base_url:
                role.base_url = base_url
            if role.api_key is None and api_key:
                role.api_key = SecretStr(api_key)

    # Derived locations: one place decides where everything lives under AWM_HOME.
    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def cache_dir(self) -> Path:
        return self.home_dir / "llm-cache"

    @property
    def catalog_dir(self) -> Path:
        return self.home_dir / "catalog"

    @property
    def prefect_home(self) -> Path:
        return self.home_dir / "prefect"

    @property
    def runs_dir(self) -> Path:
        return self.home_dir / "runs"

    def role(self, name: str) -> RoleSettings:
        try:
            return getattr(self.llm, name)
        except AttributeError:
            raise SettingsError(f"unknown LLM role {name!r}; roles: generator, judge, embedder, policy") from None

    def masked(self) -> dict[str, Any]:
        """Effective settings as plain data with every secret replaced by ``***``."""
        return _mask(self.model_dump(mode="json"))

    def digest(self) -> str:
        """Stable hash of the effective settings minus secrets (recorded with each snapshot)."""
        return hashlib.sha256(json.dumps(self.masked(), sort_keys=True).encode()).hexdigest()[:16]


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if value and any(s in key.lower() for s in ("key", "secret", "password", "token")) and isinstance(value, str):
        return "***"
    return value


def load_settings(**overrides: Any) -> Settings:
    """Build the effective settings, turning validation problems into a SettingsError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        from awm_core.models import describe_validation_error

        raise SettingsError("invalid settings: " + "; ".join(describe_validation_error(exc))) from None
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read settings: {exc}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once. Tests call ``get_settings.cache_clear()``."""
    return load_settings()

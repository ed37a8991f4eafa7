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
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from awm_core.errors import SettingsError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_FIXTURES = PACKAGE_DIR / "fixtures" / "demo"
HOME_NAME = ".awm"

# Ranges every setting of a kind obeys; a bad value fails when the settings are read, naming the
# setting and where it came from, instead of deep inside the first component that uses it.
Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Rate = Annotated[float, Field(ge=0, le=1)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _url(schemes: tuple[str, ...]):
    def check(value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in schemes or not parts.netloc:
            raise ValueError(f"must be a URL like {schemes[0]}://host:port/..., got {value!r}")
        try:
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError:
            raise ValueError(f"the port of {value!r} is not a number from 0 to 65535") from None
        return value
    return AfterValidator(check)


HttpUrl = Annotated[str | None, _url(("http", "https"))]


def _timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Paris)") from None
    return value


def _cron(value: str) -> str:
    if len(value.split()) != 5:
        raise ValueError(f"a cron schedule has 5 fields (minute hour day month weekday), got {value!r}")
    return value


def find_home(start: Path | None = None) -> Path:
    """The data folder when AWM_HOME is not set: the nearest ``.awm`` in this folder or one above
    it (the way git finds ``.git``), else ``./.awm``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / HOME_NAME).is_dir():
            return folder / HOME_NAME
    return Path(HOME_NAME)


class RoleSettings(BaseModel):
    """Where one LLM role (generator, judge, embedder, policy, user) sends its requests."""

    backend: Literal["http", "offline"] = Field(
        "offline", description="http: an OpenAI-compatible endpoint; offline: recorded fixtures"
    )
    base_url: HttpUrl = None
    api_key: SecretStr | None = None
    model: str = Field("awm-offline", min_length=1)
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    max_tokens: Count = 16_000
    timeout_s: Seconds = 300.0


class Price(BaseModel):
    prompt_per_mtok: NonNegative = 0.0
    completion_per_mtok: NonNegative = 0.0


class LLMSettings(BaseModel):
    generator: RoleSettings = RoleSettings()
    judge: RoleSettings = RoleSettings()
    embedder: RoleSettings = RoleSettings(model="all-MiniLM-L6-v2")
    policy: RoleSettings = RoleSettings()
    user: RoleSettings = Field(RoleSettings(), description=(
        "the user simulator of conversational tasks (tau2-bench style): it plays the customer the agent talks to"))
    fixtures_dir: Path = DEFAULT_FIXTURES
    cache: bool = Field(True, description="on-disk response cache under AWM_HOME/llm-cache")
    offline_latency_s: NonNegative = Field(0.0, description="simulated seconds per offline-backend call")
    record_dir: Path | None = Field(
        None, description="when set, every http reply is also saved as a fixture file here (replay offline)"
    )
    max_http_retries: NonNegativeInt = 4
    backoff_base_s: NonNegative = 1.0
    budget_usd: Seconds = Field(25.0, description="hard cap on estimated spend per run")
    budget_dsn: SecretStr | None = Field(
        None, description="PostgreSQL holding the run's spend so every worker process and machine shares the "
                          "one cap (postgresql://user@host:port/db or 'dbname=... host=...'); None = a cap per process")
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
    scenarios: Count = 3
    tasks_per_scenario: Count = 10
    target_tools: Count = Field(35, description="tool count the spec stage aims at (paper: ~35)")
    stage_retries: NonNegativeInt = Field(5, description="Prefect retries per stage; each sees earlier errors")
    curate: bool = Field(True, description="apply the curation plan (awm curate) at the start of each run")
    regenerate_env_error_rate: Rate = Field(
        0.2, description="curation: regenerate an environment's code when agents hit environment errors in more "
                         "than this share of its episodes")
    curation_min_episodes: Count = Field(4, description="curation: fewest episodes before a task or environment "
                                                        "is judged")
    live_tasks: Count | None = Field(None, description="curation: make enough new scenarios to keep this many live "
                                                       "tasks (None: make generation.scenarios each run)")
    dedup_threshold: Rate = Field(0.85, description="cosine similarity above which scenarios are duplicates")
    category_cap: Count = Field(80, description="most scenarios kept per category")
    min_valid_tasks: Count = Field(5, description="environments with fewer valid tasks are not published")
    concurrency: Count = 4
    seed_list: Path | None = None
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="fan-out of scenarios: threads, or Dask (local worker processes, or dask_address)"
    )
    dask_address: Annotated[str | None, _url(("tcp", "tls", "inproc", "ucx"))] = Field(None, description="scheduler of an existing Dask cluster (tcp://host:8786)")
    dask_processes: Count | None = Field(
        None, description="local Dask cluster: worker processes, the concurrency split across their threads "
                          "(None: one single-threaded process per scenario built at once)")
    check_processes: NonNegativeInt | None = Field(
        None, description="processes that run the stages' sandbox checks beside the flow, each with its own "
                          "sandbox worker (0: in the flow's process; None: two per CPU core, at most the concurrency)")

    def check_process_count(self, concurrency: int | None = None) -> int:
        """How many check processes a run of ``concurrency`` environments at once uses."""
        if self.check_processes is not None:
            return self.check_processes
        return min(2 * (os.cpu_count() or 1), concurrency or self.concurrency)


class SandboxSettings(BaseModel):
    """Limits of the sandbox worker processes that run generated code (``SandboxPool``)."""

    workers: Count = 2
    memory_mb: Annotated[int, Field(ge=64)] = 1024
    cpu_s: Count = 60
    call_timeout_s: Seconds = 10.0
    open_files: Annotated[int, Field(ge=16)] = 64
    file_size_mb: Count = 64
    max_threads: Count = 32
    max_result_bytes: Annotated[int, Field(ge=1024)] = 4 << 20
    recycle_rss_fraction: Annotated[float, Field(gt=0, le=1)] = Field(0.8, description="replace a worker whose memory passes this share of its limit")
    startup_timeout_s: Seconds = 60.0
    network_namespace: bool = Field(True, description="put each worker in its own network namespace where permitted")
    separate_uid: bool = Field(True, description="run each worker under its own uid where permitted")
    user_namespace: bool = Field(True, description="when not root: a user namespace of its own around the network namespace")
    landlock: bool = Field(True, description="Landlock filesystem and TCP rules for each worker")
    seccomp: bool = Field(True, description="a seccomp filter for each worker (no exec, fork, ptrace, sockets but AF_UNIX)")
    allow_weak_sandbox: bool = Field(
        False, description="run generated code even where Landlock or seccomp cannot be applied (in-process guards only)")
    awm1k_asgi: bool = Field(False, description="call AWM-1K route handlers through the whole ASGI app, "
                                                "not the direct paths (bound parameters or FastAPI's handler)")


class RewardSettings(BaseModel):
    completed: float = 1.0
    partial: float = 0.1
    agent_error: float = 0.0
    environment_error: float = 0.0
    format_error: float = -1.0


class GateSettings(BaseModel):
    min_env_pass_rate: Rate = 0.8
    min_task_pass_rate: Rate = 0.8
    max_tokens_per_call: Count = 1_000_000
    # Coverage: a catalog drifting toward one domain, duplicates or thin environments fails.
    min_tools_per_env: Count = Field(2, description="fewest tools a gated environment may have")
    max_tools_per_env: Count = Field(200, description="most tools a gated environment may have")
    min_tasks_per_env: Count = Field(1, description="fewest kept tasks a gated environment may have")
    max_category_share: Rate = Field(0.5, description="largest share of gated environments one category may hold")
    min_envs_for_category_share: Count = Field(
        5, description="the category share is checked from this many gated environments on (a few are one domain "
                       "by chance)")
    max_scenario_similarity: Rate | None = Field(
        None, description="largest cosine similarity of a gated scenario to its nearest neighbour "
                          "(default: generation.dedup_threshold, the bar the scenario stage applies)")
    max_tasks_without_user_scenario: NonNegativeInt = Field(
        0, description="most kept tasks of gated environments that may lack a user scenario (what the user "
                       "simulator plays in a conversation); imported benchmarks and unvalidated AWM-1K imports "
                       "are not gated")


class ObjectStoreSettings(BaseModel):
    """How the catalog reaches an S3-compatible object store when ``catalog.data_path`` is s3://bucket/prefix.

    Credentials left unset here come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN."""

    endpoint: HttpUrl = Field(None, description="object store URL (http://host:port for a local server); "
                                                "None = AWS S3 of the region")
    region: str | None = Field(None, description="region (None: AWS_REGION, else us-east-1)")
    url_style: Literal["vhost", "path"] = Field("vhost", description="path for most local servers (MinIO, moto)")
    use_ssl: bool | None = Field(None, description="None: from the endpoint's scheme (https), true without one")
    access_key_id: SecretStr | None = Field(None, description="None: AWS_ACCESS_KEY_ID")
    secret_access_key: SecretStr | None = Field(None, description="None: AWS_SECRET_ACCESS_KEY")
    session_token: SecretStr | None = Field(None, description="None: AWS_SESSION_TOKEN")


class CatalogSettings(BaseModel):
    metadata: str | None = Field(
        None,
        description="DuckLake metadata: None = SQLite under AWM_HOME/catalog; or 'postgres:dbname=... host=...'",
    )
    data_path: str | None = Field(None, description="Parquet location: None = AWM_HOME/catalog/data; "
                                                    "or s3://bucket/prefix (see catalog.object_store)")
    object_store: ObjectStoreSettings = ObjectStoreSettings()
    publish_retries: NonNegativeInt = Field(
        5, description="times a publish is re-run after another writer committed first (DuckLake conflict)")


class ServerSettings(BaseModel):
    """The local Prefect server (host, port, work pool, schedules) and how ``awm env serve``
    serves environments over HTTP (token, session limits)."""

    host: str = Field("127.0.0.1", min_length=1)
    port: Port = 4200
    work_pool: str = Field("awm-local", min_length=1)
    nightly_cron: Annotated[str, AfterValidator(_cron)] = "0 2 * * *"
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    train_after_gate: bool = Field(False, description="automation: start `train` when a gate run passes")
    token: SecretStr | None = Field(
        None, description="`awm env serve` over HTTP: a bearer token every request must show (more with "
                          "--token-file); needed to bind an address other than loopback")
    session_idle_s: Seconds = Field(
        900, description="`awm env serve`: an environment session idle this long is closed (its database freed) "
                         "and later calls naming it get 'session expired'")
    max_sessions: Count = Field(1024, description="`awm env serve`: live environment sessions at most, per server; "
                                                  "past it a new one is refused, live ones are never evicted")
    max_sessions_per_token: Count | None = Field(
        None, description="`awm env serve`: live environment sessions at most per token (None: max_sessions)")
    max_request_bytes: Count = Field(4 * 2**20, description="`awm env serve`: larger request bodies are refused "
                                                            "(413) before parsing")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AWM_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(default_factory=find_home,
                       description="data folder (catalog, caches, Prefect state); default: the nearest .awm "
                                   "in this folder or one above it, else ./.awm")
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
        toml_path = config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path.exists():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def model_post_init(self, __context: Any) -> None:
        base_url = os.environ.get("OPENAI_BASE_URL")
        api_key = os.environ.get("OPENAI_API_KEY")
        for role in (self.llm.generator, self.llm.judge, self.llm.embedder, self.llm.policy, self.llm.user):
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
        found = getattr(self.llm, name, None)
        if isinstance(found, RoleSettings):
            return found
        raise SettingsError(f"unknown LLM role {name!r}; roles: generator, judge, embedder, policy, user")

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


def config_file() -> Path:
    return Path(os.environ.get("AWM_CONFIG", "awm.toml"))


def source_of(path: tuple[str, ...], overrides: dict[str, Any] | None = None) -> str:
    """Where the value of a setting came from, in words a user can act on."""
    node: Any = overrides or {}
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if node is not None:
        return "given by the caller"
    env = "AWM_" + "__".join(path).upper()
    if any(k.upper() == env for k in os.environ):
        return f"environment variable {env}"
    toml = config_file()
    if toml.is_file():
        line = _toml_line(toml, path)
        if line:
            return f"{toml}:{line}"
    return "default"


def _toml_line(toml: Path, path: tuple[str, ...]) -> int | None:
    """The line of ``awm.toml`` that sets ``path`` ([a.b] table + key, or a dotted key)."""
    import re

    table: tuple[str, ...] = ()
    for n, raw in enumerate(toml.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        head = re.fullmatch(r"\[\s*([^\]]+?)\s*\]", line)
        if head:
            table = tuple(p.strip().strip('"') for p in head.group(1).split("."))
            continue
        if "=" in line:
            key = tuple(p.strip().strip('"') for p in line.split("=", 1)[0].split("."))
            full = table + key
            if full == path[: len(full)] and len(full) >= 1:
                return n
    return None


def home_source() -> str:
    """How the data folder was chosen (for ``awm config show`` and "not found" errors)."""
    if os.environ.get("AWM_HOME"):
        return "environment variable AWM_HOME"
    toml = config_file()
    line = _toml_line(toml, ("home",)) if toml.is_file() else None
    if line:
        return f"{toml}:{line}"
    found = find_home()
    return "found above this folder" if found.is_absolute() else "default ./.awm (none found above this folder)"


def load_settings(**overrides: Any) -> Settings:
    """Build the effective settings, turning validation problems into a SettingsError that names
    each bad setting, what it was given, where that came from and what is allowed."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            path = tuple(str(p) for p in err.get("loc", ()))
            given = err.get("input")
            msg = err.get("msg", "invalid").removeprefix("Value error, ")
            shown = "" if isinstance(given, (dict, list)) else f" = {given!r}"
            problems.append(f"{'.'.join(path) or '(settings)'}{shown} ({source_of(path, overrides)}): {msg}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read settings: {exc}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once. Tests call ``get_settings.cache_clear()``."""
    return load_settings()

"""The versioned catalog: DuckLake through DuckDB (metadata in SQLite or PostgreSQL, data in Parquet).

One publish is one DuckLake transaction and therefore one snapshot: readers see either the
whole publish or none of it, and a process that dies half way leaves only unreferenced
Parquet files behind (DuckLake's orphan-file cleanup removes them). Each snapshot carries
who made it in DuckLake's own commit fields: author ``awm``, the publish message, and
``made_by`` (flow run id, git commit, settings digest) as JSON in ``commit_extra_info``.

Writers on several machines (PostgreSQL metadata) race at commit: each publish rewrites the one
row of the ``publishes`` table, so overlapping publishes always conflict, and the loser is re-run
whole over the winner's snapshot (``catalog.publish_retries`` times). Data on an S3-compatible
store is reached through one DuckDB secret per connection, scoped to the data path.

Queries go through a separate read-only attachment, so ``Catalog.sql`` can never write, and
``snapshot=N`` attaches the catalog as of version N (DuckLake time travel). That connection is
confined to the catalog: DuckDB's external access is off except for the catalog's metadata file,
its data path and the folder of attached environment databases, its configuration is locked,
and ``Catalog.sql`` runs only queries (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN). So SQL over the
catalog cannot read or write other files, attach databases, load extensions or change settings,
even where the query comes from someone else (a deployment parameter, a shared server).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa

from awm_core.errors import CatalogError
from awm_core.models import Environment
from storage import rows as R
from storage.schema import ENV_TABLES, SCHEMA_VERSION, TABLES, ddl

log = logging.getLogger(__name__)

ALIAS = "awm"
COLUMN_NOT_FOUND = re.compile(r'[Cc]olumn "([^"]+)" not found')
QUERY_STATEMENTS = ("SELECT", "EXPLAIN")  # what Catalog.sql runs; everything else is refused
AUTHOR = "awm"
# Test hook: the publishing process SIGKILLs itself after this many write statements, so
# tests can prove a crash at any point of a publish leaves no partial snapshot behind.
CRASH_ENV = "AWM_CATALOG_CRASH_AFTER_WRITES"


def extension_path(module: str, name: str) -> str:
    """Path of a DuckDB extension binary shipped in a ``duckdb-extension-*`` wheel."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise CatalogError(f"the {name} DuckDB extension is not installed (pip package "
                           f"{module.replace('_', '-')}=={duckdb.__version__})") from None
    path = Path(mod.__file__).parent / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise CatalogError(f"{path} is missing: the {name} extension wheel does not match duckdb {duckdb.__version__}")
    return str(path)


def connect(*extensions: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with extensions loaded by path: nothing is ever downloaded."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    wheels = {"ducklake": "duckdb_extension_ducklake", "sqlite_scanner": "duckdb_extension_sqlite_scanner",
              "postgres_scanner": "duckdb_extension_postgres_scanner", "httpfs": "duckdb_extension_httpfs"}
    for name in extensions:
        con.execute(f"LOAD '{extension_path(wheels[name], name)}'")
    return con


OBJECT_STORE_SCHEMES = ("s3://",)


@dataclass(frozen=True)
class ObjectStore:
    """The S3-compatible store holding the data path, as one DuckDB secret scoped to that path.

    Credentials are fields that never show in the repr, and every error raised while using
    them has them scrubbed out, so neither logs nor tracebacks carry them."""

    scope: str           # the data path: the secret applies to nothing else
    endpoint: str | None  # host[:port] as DuckDB wants it (no scheme); None = AWS
    region: str
    url_style: str
    use_ssl: bool
    key_id: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, data_path: str, store: Any) -> "ObjectStore":
        def secret_value(value: Any, env: str) -> str | None:
            return value.get_secret_value() if value is not None else (os.environ.get(env) or None)

        endpoint = urlsplit(store.endpoint) if store.endpoint else None
        use_ssl = store.use_ssl if store.use_ssl is not None else (endpoint is None or endpoint.scheme == "https")
        return cls(scope=data_path, endpoint=endpoint.netloc if endpoint else None,
                   region=store.region or os.environ.get("AWS_REGION") or "us-east-1",
                   url_style=store.url_style, use_ssl=use_ssl,
                   key_id=secret_value(store.access_key_id, "AWS_ACCESS_KEY_ID"),
                   secret=secret_value(store.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
                   token=secret_value(store.session_token, "AWS_SESSION_TOKEN"))

    @property
    def where(self) -> str:
        return f"{self.scope} (endpoint {self.endpoint or 'AWS S3'}, region {self.region})"

    def secret_sql(self) -> str:
        opts = {"REGION": self.region, "URL_STYLE": self.url_style, "SCOPE": self.scope, "ENDPOINT": self.endpoint,
                "KEY_ID": self.key_id, "SECRET": self.secret, "SESSION_TOKEN": self.token}
        body = ", ".join(f"{k} {_lit(v)}" for k, v in opts.items() if v is not None)
        return f"CREATE OR REPLACE SECRET awm_object_store (TYPE s3, {body}, USE_SSL {str(self.use_ssl).lower()})"

    def scrub(self, text: str) -> str:
        for value in (self.key_id, self.secret, self.token):
            if value:
                text = text.replace(value, "***")
        return text

    def install(self, con: duckdb.DuckDBPyConnection) -> None:
        """Every connection the catalog opens gets the secret (DuckDB secrets are per connection)."""
        try:
            con.execute(self.secret_sql())
        except duckdb.Error as exc:
            raise CatalogError(f"cannot set up access to the object store {self.where}: "
                               f"{self.scrub(str(exc).splitlines()[0])}") from None

    def check_reachable(self, con: duckdb.DuckDBPyConnection) -> None:
        """List the data path once, so an unreachable store or a missing bucket fails at open and
        says which, instead of failing the first write with a bare HTTP error."""
        try:
            con.execute("SELECT count(*) FROM glob(?)", [self.scope + "*"]).fetchall()
        except duckdb.Error as exc:
            raise CatalogError(f"the object store holding the catalog data is not usable: {self.where}: "
                               f"{self.scrub(str(exc).splitlines()[0])} (check catalog.object_store.endpoint, "
                               "the bucket and the credentials)") from None


@dataclass(frozen=True)
class Location:
    """Where the metadata and the data live, derived from settings."""

    metadata: str   # the DuckLake connection string after 'ducklake:'
    data_path: str
    lock_path: Path  # local file serialising writers of this machine
    store: ObjectStore | None = None  # set when the data path is on an object store

    @classmethod
    def from_settings(cls, settings: Any) -> "Location":
        cat_dir = Path(settings.catalog_dir)
        meta = settings.catalog.metadata
        if meta is None:
            meta = f"sqlite:{cat_dir / 'metadata.sqlite'}"
        elif meta.startswith("ducklake:"):
            meta = meta[len("ducklake:"):]
        if not meta.startswith(("sqlite:", "postgres:", "duckdb:")):
            meta = f"sqlite:{Path(meta).expanduser().resolve()}"
        data = settings.catalog.data_path or str(cat_dir / "data")
        store = None
        if data.startswith(OBJECT_STORE_SCHEMES):
            data = data.rstrip("/") + "/"  # a prefix of its own: s3://b/cat must not also cover s3://b/cat2
            store = ObjectStore.from_settings(data, settings.catalog.object_store)
        elif "://" not in data:
            data = str(Path(data).expanduser().resolve())
            data = data.rstrip("/") + "/"
        return cls(meta, data, cat_dir / "write.lock", store)

    @property
    def backend(self) -> str:
        return self.metadata.split(":", 1)[0]

    @property
    def extensions(self) -> tuple[str, ...]:
        # sqlite_scanner is always loaded: it also attaches environment databases for inspection.
        return ("ducklake", "sqlite_scanner") + (("postgres_scanner",) if self.backend == "postgres" else ()) + \
            (("httpfs",) if self.store is not None else ())

    def exists(self) -> bool | None:
        """False when an embedded catalog was never created; None when it cannot be told without connecting."""
        if self.backend == "sqlite":
            return Path(self.metadata.split(":", 1)[1]).exists()
        return None

    def attach_sql(self, alias: str, *, read_only: bool, snapshot: int | None = None) -> str:
        opts = [f"DATA_PATH {_lit(self.data_path)}"] if not read_only else []
        if read_only:
            opts.append("READ_ONLY")
        if snapshot is not None:
            opts.append(f"SNAPSHOT_VERSION {int(snapshot)}")
        return f"ATTACH {_lit('ducklake:' + self.metadata)} AS {alias} ({', '.join(opts)})"


def check_query(query: str) -> None:
    """Refuse anything but queries, naming the statement that is not one."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise CatalogError(str(exc).splitlines()[0]) from None
    if not statements:
        raise CatalogError("no SQL statement given")
    for st in statements:
        kind = st.type.name
        if kind not in QUERY_STATEMENTS:
            text = " ".join(st.query.split())
            raise CatalogError(f"refused: SQL over the catalog is read-only queries (SELECT, WITH, SHOW, DESCRIBE, "
                               f"EXPLAIN); this is a {kind} statement: {text[:120]}")
    check_no_secret_functions(query)


# duckdb_secrets() lists the object store's key id (only the secret itself is redacted), and its
# scope and endpoint; which_secret() names secrets. SQL over the catalog reads neither.
SECRET_FUNCTIONS = frozenset({"duckdb_secrets", "which_secret"})
_parser_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


def check_no_secret_functions(query: str) -> None:
    """Refuse a query calling a secret-listing function anywhere in it (CTEs and subqueries too)."""
    global _parser
    with _parser_lock:
        if _parser is None:
            _parser = duckdb.connect()
        tree = json.loads(_parser.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
    if tree.get("error"):  # a statement the serialiser does not cover: judge by the text, erring on refusal
        called = {f for f in SECRET_FUNCTIONS if f in query.lower()}
    else:
        called = set(_function_names(tree)) & SECRET_FUNCTIONS
    if called:
        raise CatalogError(f"refused: SQL over the catalog may not read DuckDB secrets ({', '.join(sorted(called))})")


def _function_names(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("function_name"), str):
            yield node["function_name"].lower()
        for value in node.values():
            yield from _function_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _function_names(value)


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def made_by(settings: Any, flow_run_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """The usual ``made_by`` of a publish: flow run id, git commit of the code, settings digest."""
    return {"flow_run_id": flow_run_id, "git_commit": git_commit(), "settings_digest": settings.digest(), **extra}


def _home_note(settings: Any) -> str:
    """Which data folder a "not found" refers to, so a command run from the wrong folder says so."""
    from awm_core.settings import home_source

    home = getattr(settings, "home_dir", None)
    return f"(AWM_HOME {home}, {home_source()})" if home is not None else ""


class Catalog:
    """Handle on one DuckLake catalog. Cheap to open; close it (or use ``with``) when done."""

    def __init__(self, location: Location, settings: Any, read_only: bool):
        self.location = location
        self.settings = settings
        self.read_only = read_only
        self._lock = threading.RLock()
        self._rw: duckdb.DuckDBPyConnection | None = None
        self._ro: duckdb.DuckDBPyConnection | None = None
        self._snap_cons: dict[int, duckdb.DuckDBPyConnection] = {}
        self._env_files: list[str] = []
        self._env_attached: list[tuple[str, str]] = []  # (file, alias) on every query connection
        self._env_dir: str | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, settings: Any, read_only: bool = False) -> "Catalog":
        loc = Location.from_settings(settings)
        cat = cls(loc, settings, read_only)
        if read_only:
            if loc.exists() is False:
                raise CatalogError(f"no catalog yet at {loc.metadata.split(':', 1)[1]} {_home_note(settings)} "
                                   "(publish something first, e.g. `awm import awm1k DIR` or `awm generate`)")
        else:
            if loc.backend == "sqlite":
                Path(loc.metadata.split(":", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            if "://" not in loc.data_path:
                Path(loc.data_path).mkdir(parents=True, exist_ok=True)
            loc.lock_path.parent.mkdir(parents=True, exist_ok=True)
            with cat._write_lock():
                cat._rw = cat._attach(ALIAS, read_only=False)
                if loc.store is not None:
                    loc.store.check_reachable(cat._rw)
                cat._ensure_schema()
        cat._env_dir = tempfile.mkdtemp(prefix="awm-catalog-envs-")
        # A catalog nobody closed (a process that ended without it) still leaves no folder behind.
        weakref.finalize(cat, shutil.rmtree, cat._env_dir, True)
        cat._ro = cat._attach(ALIAS, read_only=True)
        cat._ro.execute(f"USE {ALIAS}")
        cat._confine(cat._ro)
        return cat

    def _confine(self, con: duckdb.DuckDBPyConnection) -> None:
        """External access off but for the catalog's own files; then no setting can change."""
        loc = self.location
        # DuckLake reads its own data files even where they are not allowed (tried: a catalog on
        # s3:// answers queries with only the env folder allowed), but listing the data path here
        # is what lets read_parquet over the catalog's own files work, local or s3://, as before;
        # any other path or URL, s3 included, stays refused with external access off.
        dirs = [self._env_dir + "/", loc.data_path]
        paths = []
        if loc.backend in ("sqlite", "duckdb"):
            meta = loc.metadata.split(":", 1)[1]
            paths += [meta, meta + "-wal", meta + "-journal", meta + ".wal"]
        try:
            con.execute("SET allowed_directories = ?", [dirs])
            con.execute("SET allowed_paths = ?", [paths])
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except duckdb.Error as exc:
            raise CatalogError(f"cannot confine catalog queries to the catalog: {exc}") from None

    def _attach(self, alias: str, *, read_only: bool, con: duckdb.DuckDBPyConnection | None = None,
                snapshot: int | None = None) -> duckdb.DuckDBPyConnection:
        con = con or self._connect()
        try:
            con.execute(self.location.attach_sql(alias, read_only=read_only, snapshot=snapshot))
        except duckdb.Error as exc:
            raise CatalogError(f"cannot open the catalog at {self.location.metadata}: {self._scrub(exc)}") from None
        return con

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = connect(*self.location.extensions)
        if self.location.store is not None:
            self.location.store.install(con)
        return con

    def _scrub(self, exc: BaseException) -> str:
        store = self.location.store
        return store.scrub(str(exc)) if store is not None else str(exc)

    def _ensure_schema(self) -> None:
        assert self._rw is not None
        have: dict[str, set[str]] = {}
        for table_name, column_name in self._rw.execute(
                "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ?", [ALIAS]).fetchall():
            have.setdefault(table_name, set()).add(column_name)
        missing = [t for name, t in TABLES.items() if name not in have]
        # Schema evolution: columns added to a table definition after the catalog was created.
        added = [(t, c) for name, t in TABLES.items() if name in have for c in t.columns if c.name not in have[name]]
        if not missing and not added:
            return
        self._rw.execute("BEGIN")
        try:
            for table in missing:
                for stmt in ddl(ALIAS, table):
                    self._rw.execute(stmt)
                if table.name == "publishes":
                    self._rw.execute(f"INSERT INTO {ALIAS}.publishes VALUES (1, 0, NULL, NULL)")
            for table, col in added:  # new columns stay nullable: old rows have no value for them
                self._rw.execute(f'ALTER TABLE {ALIAS}."{table.name}" ADD COLUMN "{col.name}" {col.type}')
                self._rw.execute(f'COMMENT ON COLUMN {ALIAS}."{table.name}"."{col.name}" IS {_lit(col.comment)}')
            what = ([f"create {', '.join(t.name for t in missing)}"] if missing else []) + \
                   ([f"add {', '.join(f'{t.name}.{c.name}' for t, c in added)}"] if added else [])
            self._rw.execute(f"CALL {ALIAS}.set_commit_message(?, ?, extra_info => ?)",
                             [AUTHOR, f"catalog schema v{SCHEMA_VERSION}: {'; '.join(what)}",
                              json.dumps({"schema_version": SCHEMA_VERSION})])
            self._rw.execute("COMMIT")
        except BaseException:
            self._rw.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """One writer at a time on this machine (DuckLake's commit-time conflict check covers others)."""
        with self._lock, open(self.location.lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            for con in (self._rw, self._ro, *self._snap_cons.values()):
                if con is not None:
                    con.close()
            self._rw = self._ro = None
            self._snap_cons.clear()
            self._env_attached.clear()
            for f in self._env_files:
                with contextlib.suppress(OSError):
                    os.unlink(f)
            self._env_files.clear()
            if self._env_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(self._env_dir)
                self._env_dir = None

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def publish(self, made_by: dict[str, Any] | None = None, message: str = "") -> Iterator["Publisher"]:
        """Everything added inside the block becomes one snapshot, or nothing at all on error."""
        if self.read_only or self._rw is None:
            raise CatalogError("this catalog was opened read-only; open it with read_only=False to publish")
        with self._write_lock():
            con = self._rw
            pub = Publisher(con)
            con.execute("BEGIN")
            try:
                yield pub
                self._commit(pub, message or "publish", json.dumps(made_by or {}, default=str))
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
            if pub.writes:
                pub.snapshot_id = int(con.execute(f"FROM {ALIAS}.last_committed_snapshot()").fetchall()[0][0])

    def _commit(self, pub: "Publisher", message: str, extra: str) -> None:
        """Commit, re-running the whole publish on a fresh transaction when another writer's commit
        conflicts with it (a writer on another machine: this machine's writers queue on the lock).

        The re-run replays the publisher's statements over the newer snapshot, so an upsert
        replaces what the other writer just committed instead of losing it or being lost."""
        con = self._rw
        retries = self.settings.catalog.publish_retries
        for attempt in range(retries + 1):
            try:
                if pub.writes:
                    if attempt == 0:
                        pub._serialise(message)
                    con.execute(f"CALL {ALIAS}.set_commit_message(?, ?, extra_info => ?)", [AUTHOR, message, extra])
                    pub._maybe_crash(final=True)
                con.execute("COMMIT")
                pub.commit_tries = attempt + 1
                return
            except duckdb.TransactionException as exc:
                if not is_conflict(exc):
                    raise CatalogError(f"catalog commit failed: {self._scrub(exc)}") from None
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                if attempt == retries:
                    raise CatalogError(
                        f"publish {message!r} gave up after {retries + 1} {'try' if retries == 0 else 'tries'}: other writers kept committing "
                        f"conflicting changes first (raise catalog.publish_retries to wait longer); last conflict: "
                        f"{_one_line(self._scrub(exc))}") from None
                log.info("publish %r conflicted with another writer's commit; re-running it (try %d of %d): %s",
                         message, attempt + 2, retries + 1, _one_line(self._scrub(exc)))
                time.sleep(random.uniform(0.05, 0.2) * 2 ** attempt)  # jitter keeps the rivals out of step
                con.execute("BEGIN")
                pub._replay()

    # ------------------------------------------------------------------ reading
    def snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot, oldest first: id, time, message, made_by and DuckLake's change summary."""
        rows = self._query(f"SELECT snapshot_id, snapshot_time, commit_message, commit_extra_info, changes "
                           f"FROM {ALIAS}.snapshots() ORDER BY snapshot_id")
        out = []
        for sid, ts, msg, extra, changes in rows:
            try:
                info = json.loads(extra) if extra else {}
            except json.JSONDecodeError:
                info = {"raw": extra}
            out.append({"snapshot_id": int(sid), "time": ts, "message": msg, "made_by": info,
                        "changes": dict(changes or {})})
        return out

    def latest_snapshot(self) -> int:
        return int(self._query(f"FROM {ALIAS}.current_snapshot()")[0][0])

    def environment_snapshot(self) -> int:
        """The snapshot that last published environments (what evaluation and splits default to).

        Not simply the latest snapshot: evaluation, gate and training runs publish snapshots of their
        own, and rollouts and splits should name the snapshot the environments came from. The newest
        ``published_at`` of the environments table only grows from snapshot to snapshot, so a binary
        search over time travel finds the first snapshot that holds it.
        """
        latest = self.latest_snapshot()

        def newest(snap: int) -> Any:
            try:
                return self._query("SELECT max(published_at) AS t FROM environments", snapshot=snap)[0][0]
            except CatalogError:  # before the catalog schema existed
                return None

        target = newest(latest)
        if target is None:
            return latest
        lo, hi = 0, latest
        while lo < hi:
            mid = (lo + hi) // 2
            t = newest(mid)
            if t is not None and t >= target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def check_snapshot(self, snapshot: int) -> None:
        """Raise a CatalogError naming the valid range when ``snapshot`` does not exist."""
        self._check_snapshot(snapshot)

    def _check_snapshot(self, snapshot: int) -> None:
        latest = self.latest_snapshot()
        if not isinstance(snapshot, int) or snapshot < 0 or snapshot > latest:
            raise CatalogError(f"snapshot {snapshot} does not exist (snapshots are 0..{latest})")

    def _query(self, query: str, params: list[Any] | None = None, snapshot: int | None = None,
               arrow: bool = False) -> Any:
        """Fetch a query's result fully (rows, or an Arrow table) before switching catalogs back."""
        with self._lock:
            con = self._ro
            if con is None:
                raise CatalogError("the catalog is closed")
            if snapshot is not None:
                con = self._snapshot_con(snapshot)
            try:
                result = con.execute(query, params or [])
                return result.to_arrow_table() if arrow else result.fetchall()
            except duckdb.PermissionException as exc:
                raise CatalogError("refused: SQL over the catalog reads only the catalog and the environment "
                                   f"databases attached with --attach-env ({str(exc).splitlines()[0]})") from None
            except duckdb.Error as exc:
                raise CatalogError(self._data_error(exc) + self._column_hint(exc, con, snapshot)) from None

    def _column_hint(self, exc: duckdb.Error, con: duckdb.DuckDBPyConnection, snapshot: int | None) -> str:
        """Why a column the table definitions name is not there: the catalog (or the snapshot asked
        for) predates it. A catalog gains new columns when it is next opened for writing."""
        found = COLUMN_NOT_FOUND.search(str(exc)) if isinstance(exc, duckdb.BinderException) else None
        if found is None:
            return ""
        name = found.group(1)
        try:
            have = set(con.execute("SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ?",
                                   [ALIAS]).fetchall())
            latest = have if snapshot is None else set(self._ro.execute(
                "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ?", [ALIAS]).fetchall())
        except duckdb.Error:
            return ""
        tables = {t for t, _ in have}
        lacking = [t.name for t in TABLES.values() if name in t.column_names and t.name in tables
                   and (t.name, name) not in have]
        if not lacking:
            return ""
        cols = ", ".join(f"{t}.{name}" for t in lacking)
        if all((t, name) in latest for t in lacking):
            return f" (snapshot {snapshot} predates the column {cols}: it was added to the catalog later)"
        return (f" (this catalog was made by an older version and lacks the column {cols}; it gains it the next "
                "time it is opened for writing, e.g. by any publish or `awm gate`)")

    def columns(self, table: str, snapshot: int | None = None) -> list[str]:
        """The columns ``table`` has (at ``snapshot``: a column added later is not there)."""
        return [r[0] for r in self._query(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND table_name = ? "
            "ORDER BY column_index", [ALIAS, table], snapshot)]

    def _data_error(self, exc: duckdb.Error) -> str:
        """An object-store failure names the store; other errors pass through as they are."""
        text = self._scrub(exc)
        if self.location.store is not None and isinstance(exc, (duckdb.IOException, duckdb.HTTPException)):
            return f"cannot read catalog data from the object store {self.location.store.where}: {text.splitlines()[0]}"
        return text

    def _snapshot_con(self, snapshot: int) -> duckdb.DuckDBPyConnection:
        """A confined connection of its own per snapshot: once a connection is confined it may
        not attach anything new (a PostgreSQL catalog would be refused), so time travel opens one
        with the catalog as of ``snapshot`` attached before it is locked."""
        if snapshot not in self._snap_cons:
            if snapshot != self.latest_snapshot():
                self._check_snapshot(snapshot)
            con = self._attach(ALIAS, read_only=True, snapshot=snapshot)
            con.execute(f"USE {ALIAS}")
            for path, alias in self._env_attached:
                con.execute(f'ATTACH {_lit(path)} AS "{alias}" (TYPE sqlite, READ_ONLY)')
            self._confine(con)
            self._snap_cons[snapshot] = con
        return self._snap_cons[snapshot]

    def sql(self, query: str, snapshot: int | None = None, params: list[Any] | None = None) -> pa.Table:
        """Run a read-only query; tables are named without prefix. Returns a pyarrow Table.

        Only queries run (SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN); COPY, ATTACH,
        INSTALL/LOAD, SET, PRAGMA and every write are refused with a ``CatalogError``."""
        check_query(query)
        with self._lock:
            return self._query(query, params, snapshot, arrow=True)

    def rows(self, query: str, snapshot: int | None = None, params: list[Any] | None = None) -> list[dict[str, Any]]:
        return self.sql(query, snapshot, params).to_pylist()

    def environment_ids(self, snapshot: int | None = None) -> list[str]:
        return [r[0] for r in self._query("SELECT env_id FROM environments ORDER BY env_id",
                                          snapshot=snapshot)]

    def get_environment(self, env_id: str, snapshot: int | None = None) -> Environment:
        found = self._query("SELECT bundle FROM environments WHERE env_id = ?", [env_id], snapshot)
        if not found:
            where = f" at snapshot {snapshot}" if snapshot is not None else ""
            raise CatalogError(f"no environment {env_id!r} in the catalog{where} {_home_note(self.settings)}")
        return Environment.from_json(found[0][0])

    def environments(self, snapshot: int | None = None, ids: list[str] | None = None,
                     batch: int = 100) -> Iterator[Environment]:
        """Bundles in id order (all, or ``ids``), fetched a batch at a time to bound memory."""
        wanted = self.environment_ids(snapshot) if ids is None else list(ids)
        for i in range(0, len(wanted), batch):
            chunk = wanted[i:i + batch]
            found = dict(self._query("SELECT env_id, bundle FROM environments WHERE env_id IN (SELECT unnest(?))",
                                     [chunk], snapshot))
            for env_id in chunk:
                if env_id not in found:
                    raise CatalogError(f"no environment {env_id!r} in the catalog"
                                       + (f" at snapshot {snapshot}" if snapshot is not None else ""))
                yield Environment.from_json(found[env_id])

    def gate_passed(self, snapshot: int) -> bool:
        """True when the newest quality report for ``snapshot`` passed."""
        found = self._query("SELECT passed FROM quality_reports WHERE snapshot = ? "
                            "ORDER BY created_at DESC LIMIT 1", [int(snapshot)])
        return bool(found and found[0][0])

    def latest_gated_snapshot(self) -> int | None:
        """The newest snapshot whose newest quality report passed (what training uses by default)."""
        found = self._query(
            "SELECT snapshot FROM (SELECT snapshot, arg_max(passed, created_at) AS ok FROM quality_reports "
            "GROUP BY snapshot) WHERE ok ORDER BY snapshot DESC LIMIT 1")
        return int(found[0][0]) if found else None

    def attach_environment_db(self, env_id: str, alias: str | None = None, snapshot: int | None = None) -> str:
        """Build an environment's initial SQLite database and attach it (read-only) for SQL inspection."""
        from awm_core.db import build_database

        env = self.get_environment(env_id, snapshot)
        if env.db_schema is None:
            raise CatalogError(f"environment {env_id!r} has no database schema to build")
        data = build_database(env.db_schema, env.seed_data)
        fd, path = tempfile.mkstemp(prefix=f"awm-{env_id}-", suffix=".sqlite", dir=self._env_dir)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        self._env_files.append(path)
        alias = alias or env_id
        with self._lock:
            try:
                for con in (self._ro, *self._snap_cons.values()):
                    con.execute(f'ATTACH {_lit(path)} AS "{alias}" (TYPE sqlite, READ_ONLY)')
            except duckdb.Error as exc:
                raise CatalogError(f"cannot attach the database of {env_id!r}: {exc}") from None
            self._env_attached.append((path, alias))
        return alias


def is_conflict(exc: duckdb.Error) -> bool:
    """DuckLake's word for "another transaction committed a change this one collides with"."""
    return "conflict" in str(exc).lower()


class Publisher:
    """Adds rows inside one open transaction. Obtained from ``Catalog.publish``.

    Every write statement is kept with the Arrow tables it reads, so the catalog can replay the
    whole publish on a new transaction when its commit loses a race with another writer."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con
        self.writes = 0
        self.counts: dict[str, int] = {}
        self.snapshot_id: int | None = None
        self.commit_tries = 0  # more than 1 when the publish was re-run after a conflict
        self._ops: list[tuple[str, dict[str, pa.Table]]] = []
        self._crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)

    def _maybe_crash(self, final: bool = False) -> None:
        if self._crash_after and (final or self.writes >= self._crash_after):
            os.kill(os.getpid(), signal.SIGKILL)

    def _exec(self, sql: str, views: dict[str, pa.Table] | None = None) -> None:
        views = views or {}
        self._run(sql, views)
        self._ops.append((sql, views))
        self.writes += 1
        self._maybe_crash()

    def _run(self, sql: str, views: dict[str, pa.Table]) -> None:
        for name, data in views.items():
            self._con.register(name, data)
        try:
            self._con.execute(sql)
        except duckdb.Error as exc:
            raise CatalogError(f"catalog write failed: {exc}") from None
        finally:
            for name in views:
                self._con.unregister(name)

    def _serialise(self, message: str) -> None:
        """Rewrite the one ``publishes`` row, so any publish overlapping this one conflicts with it."""
        views = {"_publish": pa.table({"message": pa.array([message[:500]], pa.string())})}
        sql = (f"UPDATE {ALIAS}.publishes SET publishes = publishes + 1, last_message = (FROM _publish), "
               "last_at = now() WHERE id = 1")
        self._run(sql, views)
        self._ops.append((sql, views))

    def _replay(self) -> None:
        for sql, views in self._ops:
            self._run(sql, views)

    def add_rows(self, table_name: str, records: Iterable[Any]) -> int:
        """Insert rows into a table, honouring its key (replace or skip existing keys)."""
        table = R.check_table(table_name)
        data = R.to_arrow(table, records)
        if data.num_rows == 0:
            return 0
        data = _dedupe(data, table.key, keep_last=table.on_conflict == "replace")
        view = f"_new_{table.name}"
        views = {view: data}
        match = " AND ".join(f't."{k}" IS NOT DISTINCT FROM n."{k}"' for k in table.key)
        target = f'{ALIAS}."{table.name}"'
        if table.on_conflict == "replace":
            self._exec(f"DELETE FROM {target} t WHERE EXISTS (SELECT 1 FROM {view} n WHERE {match})", views)
            self._exec(f"INSERT INTO {target} BY NAME SELECT * FROM {view}", views)
        else:
            self._exec(f"INSERT INTO {target} BY NAME SELECT * FROM {view} n "
                       f"WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE {match})", views)
        self.counts[table.name] = self.counts.get(table.name, 0) + data.num_rows
        return data.num_rows

    def add_environments(self, envs: Iterable[Environment]) -> int:
        """Upsert bundles: a republished environment's rows in every env table are replaced."""
        envs = list(envs)
        if not envs:
            return 0
        ids = [e.id for e in envs]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise CatalogError(f"environment ids repeated in one publish: {dup}")
        per_table: dict[str, list[dict[str, Any]]] = {t: [] for t in ENV_TABLES}
        for env in envs:
            for t, rs in R.environment_rows(env).items():
                per_table[t].extend(rs)
        id_table = {"_env_ids": pa.table({"env_id": pa.array(ids, pa.string())})}
        for t in ENV_TABLES:
            # Whole-env replacement: a republished env may have fewer tasks or checks than before.
            self._exec(f'DELETE FROM {ALIAS}."{t}" WHERE env_id IN (SELECT env_id FROM _env_ids)', id_table)
            data = R.to_arrow(TABLES[t], per_table[t])
            if data.num_rows:
                self._exec(f'INSERT INTO {ALIAS}."{t}" BY NAME SELECT * FROM _env_rows', {"_env_rows": data})
            self.counts[t] = self.counts.get(t, 0) + data.num_rows
        return len(envs)

    def add_llm_calls(self, records: Iterable[Any]) -> int:
        return self.add_rows("llm_calls", records)

    def add_generation_run(self, run: Any) -> int:
        return self.add_rows("generation_runs", [run])

    def add_rollouts(self, rows: Iterable[Any]) -> int:
        return self.add_rows("rollouts", rows)

    def add_tool_calls(self, rows: Iterable[Any]) -> int:
        return self.add_rows("tool_calls", rows)

    def add_quality_report(self, report: Any) -> int:
        return self.add_rows("quality_reports", [report])

    def add_training_metrics(self, rows: Iterable[Any]) -> int:
        return self.add_rows("training_runs", rows)

    def add_splits(self, rows: Iterable[Any]) -> int:
        return self.add_rows("splits", rows)

    def add_task_telemetry(self, rows: Iterable[Any]) -> int:
        return self.add_rows("task_telemetry", rows)

    def add_arrow(self, table_name: str, data: pa.Table) -> int:
        """Bulk append of an Arrow table with the table's columns (no key check; for bulk loads)."""
        table = R.check_table(table_name)
        missing = [c for c in table.column_names if c not in data.column_names]
        if missing:
            raise CatalogError(f"{table_name}: arrow table lacks columns {missing}")
        self._exec(f'INSERT INTO {ALIAS}."{table_name}" BY NAME SELECT * FROM _bulk',
                   {"_bulk": data.select(list(table.column_names))})
        self.counts[table_name] = self.counts.get(table_name, 0) + data.num_rows
        return data.num_rows


def _dedupe(data: pa.Table, key: tuple[str, ...], keep_last: bool) -> pa.Table:
    """Drop rows repeating a key within one batch (the last wins for upserts, the first for logs)."""
    seen: dict[tuple, int] = {}
    keys = list(zip(*(data.column(k).to_pylist() for k in key)))
    for i, k in enumerate(keys):
        if keep_last or k not in seen:
            seen[k] = i
    if len(seen) == len(keys):
        return data
    return data.take(sorted(seen.values()))


def format_time(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _one_line(text: str) -> str:
    """DuckDB puts the cause of a failed commit on later lines; keep them, in one line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:600]

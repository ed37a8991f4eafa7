"""Worker-side confinement: OS limits, a network namespace, a separate uid, an audit hook,
and restricted builtins for generated modules.

Layers, strongest first:

1. Kernel (``kernel.py``): an empty network namespace (inside a user namespace of its own
   when not root), a Landlock ruleset (reads: the interpreter, libraries, this package;
   writes: the scratch folder; no TCP; signals scoped to the worker), a seccomp filter
   (no exec, fork, ptrace, mount, namespaces, non-UNIX sockets, signals to others), a
   throw-away uid when started as root, RLIMIT_AS/CPU/NOFILE/FSIZE/NPROC/CORE; the parent
   kills it when a call overruns its wall-clock limit.
2. ``sys.addaudithook``: refuses sockets, subprocesses, fork/exec, signals, ctypes,
   setrlimit, loading SQLite extensions, and file access outside the allowed folders
   (writes only inside the scratch folder).
3. Generated modules get a private copy of the builtins whose ``__import__`` only admits
   an allow-list of modules, with a harmless ``os`` stand-in for the AWM-1K flavour.

Layers 2 and 3 are in-process and can be switched off by deliberately hostile Python (the
hostile-code tests do exactly that); they turn the mistakes an LLM makes into clear
errors. Layer 1 is the boundary: the pool refuses to run generated code where Landlock or
seccomp cannot be applied, unless told ``allow_weak_sandbox``.
"""
from __future__ import annotations

import builtins
import contextlib
import math
import os
import resource
import sys
import threading
import types
from pathlib import Path
from typing import Any, Sequence

NATIVE_IMPORTS = frozenset({
    "sqlite3", "json", "datetime", "re", "math", "typing", "collections", "itertools",
    "functools", "decimal", "statistics", "uuid", "hashlib", "random", "string", "enum",
    "dataclasses", "time", "calendar", "copy", "operator", "textwrap", "fractions",
    "numbers", "zoneinfo", "__future__", "awm_core.errors",
    # datetime.strptime and time.strptime import _strptime lazily, and that import goes through
    # the calling module's __import__ (this guard), so without it strptime raises ImportError.
    "_strptime",
})
AWM1K_IMPORTS = NATIVE_IMPORTS | frozenset({
    "fastapi", "pydantic", "sqlalchemy", "starlette", "os", "typing_extensions", "uvicorn",
    "annotated_types", "email_validator",
})
VERIFIER_IMPORTS = NATIVE_IMPORTS | frozenset({"os"})

# Imported before the worker gives up root: with its own uid it may not be able to read the
# interpreter's standard library (e.g. when Python lives under a private home folder), so
# everything generated code may import, and what libraries import lazily, is loaded first.
PRELOAD = (
    "sqlite3", "json", "datetime", "re", "math", "typing", "collections", "collections.abc", "itertools",
    "functools", "decimal", "statistics", "uuid", "hashlib", "random", "string", "enum", "dataclasses", "time",
    "calendar", "copy", "operator", "textwrap", "fractions", "numbers", "zoneinfo", "__future__",
    "concurrent.futures", "concurrent.futures.thread", "email.utils", "email.message", "http", "http.cookies",
    "urllib.parse", "ipaddress", "pathlib", "tempfile", "shutil", "fnmatch", "difflib", "pprint", "base64",
    "binascii", "zlib", "struct", "bisect", "heapq", "weakref", "contextvars", "contextlib", "warnings",
    "traceback", "linecache", "tokenize", "ast", "unicodedata", "csv", "io", "secrets", "hmac", "locale",
    "encodings.idna", "encodings.latin_1", "encodings.ascii", "encodings.cp1252", "encodings.utf_16",
    "encodings.utf_32", "encodings.unicode_escape", "encodings.raw_unicode_escape", "typing_extensions",
    "annotated_types", "sqlalchemy.ext.declarative", "sqlalchemy.ext.hybrid", "sqlalchemy.ext.associationproxy",
    "sqlalchemy.sql.functions", "pydantic.networks", "fastapi.responses", "fastapi.encoders",
    "fastapi.middleware.cors", "starlette.responses", "anyio.to_thread",
    # BFCL's math backend (the bfcl flavour).
    "cmath", "mpmath", "_strptime",
    # tau2-bench's tool schemas (the tau2 flavour).
    "docstring_parser",
)

REMOVED_BUILTINS = ("exit", "quit", "input", "breakpoint", "help", "copyright", "credits", "license")

_DENY_ALWAYS = (
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.", "resource.setrlimit",
    "resource.prlimit", "socket.", "sqlite3.enable_load_extension", "sqlite3.load_extension",
    "sys.addaudithook", "urllib.Request", "http.client.connect", "ftplib.", "smtplib.",
    "poplib.", "imaplib.", "nntplib.", "telnetlib.", "webbrowser.open", "builtins.input",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.setuid", "os.setgid",
    "pty.spawn", "os.startfile", "_posixsubprocess.", "msvcrt.", "winreg.", "mmap.__new__",
)
_PATH_EVENTS = {
    "os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
    "os.chown": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,),
    "os.chdir": (0,), "os.chroot": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def cpu_soft_limit(budget_s: int) -> int:
    """RLIMIT_CPU's soft value giving the process ``budget_s`` more seconds of CPU from now.

    The limit counts whole seconds of the process's life, so the seconds used are rounded up:
    rounded down, a worker at 1.95 s with a 1 s budget would get 0.05 s."""
    return math.ceil(sum(resource.getrusage(resource.RUSAGE_SELF)[:2])) + budget_s


class SandboxViolation(PermissionError):
    """Generated code tried something the sandbox refuses (raised from the audit hook)."""


class Guard:
    """Policy state read by the audit hook.

    ``violations`` collects every refusal of the current request so the worker can classify
    a failed call as the environment's fault even when the generated code swallowed the
    refusal and raised something else.
    """

    def __init__(self, scratch: Path, read_roots: list[str], max_threads: int):
        self.scratch = str(scratch.resolve())
        self.read_roots = tuple(sorted({os.path.realpath(r) for r in read_roots if r}))
        self.max_threads = max_threads
        self.violations: list[str] = []
        self.enforcing = False
        self.tainted = False
        self._trusted = False
        self._main = threading.get_ident()

    @contextlib.contextmanager
    def trusted(self):
        """The worker's own privileged steps (moving the CPU limit); main thread only, so a
        thread left running by generated code cannot use the window."""
        self._trusted = True
        try:
            yield
        finally:
            self._trusted = False

    def refuse(self, what: str) -> None:
        msg = f"sandbox refused {what}"
        self.violations.append(msg)
        raise SandboxViolation(msg)

    def _under(self, path: Any, roots: tuple[str, ...]) -> bool:
        if isinstance(path, int) or path is None:
            return True  # an fd the process already holds
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        p = os.path.realpath(os.path.join(self.scratch, os.fspath(path)))
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def may_write(self, path: Any) -> bool:
        return self._under(path, (self.scratch,))

    def may_read(self, path: Any) -> bool:
        return self._under(path, (self.scratch, *self.read_roots))

    def hook(self, event: str, args: tuple) -> None:
        if not self.enforcing or (self._trusted and threading.get_ident() == self._main):
            return
        if event == "open":
            path, mode, flags = (list(args) + [None, None, 0])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not self.may_write(path):
                self.refuse(f"writing {path!r} (only the scratch folder is writable)")
            if not writing and not self.may_read(path):
                self.refuse(f"reading {path!r} (outside the folders the sandbox exposes)")
            return
        if event == "sqlite3.connect":
            db = args[0] if args else ""
            db = os.fsdecode(db) if isinstance(db, bytes) else str(db)
            if db.startswith("file:"):
                db = db[5:].split("?", 1)[0]
            if db not in ("", ":memory:") and not self.may_write(db):
                self.refuse(f"opening database {db!r} outside the scratch folder")
            return
        if event == "_thread.start_new_thread":
            if threading.active_count() >= self.max_threads:
                self.tainted = True  # threads left running: the worker must be replaced
                self.refuse(f"starting more than {self.max_threads} threads")
            return
        paths = _PATH_EVENTS.get(event)
        if paths is not None:
            for i in paths:
                if i < len(args) and not self.may_write(args[i]):
                    self.refuse(f"{event} on {args[i]!r} outside the scratch folder")
            return
        if event.startswith(_DENY_ALWAYS):  # one C-level scan over every prefix
            self.refuse(f"{event} (not allowed in environment code)")


def default_read_roots() -> list[str]:
    """Folders generated code (and the libraries it calls) may read: the interpreter's
    libraries, this package, time-zone data. Not the project folder, so no settings file
    with keys in it."""
    import awm_core

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             str(Path(awm_core.__file__).resolve().parent), "/usr/share/zoneinfo",
             "/etc/localtime", "/dev/null", "/dev/urandom", "/etc/mime.types"}
    for p in sys.path:
        if p and ("site-packages" in p or "dist-packages" in p or p.startswith(sys.base_prefix)):
            roots.add(p)
    return sorted(roots)


def apply_limits(cfg: dict[str, Any], read_roots: Sequence[str]) -> dict[str, Any]:
    """Set the kernel-level limits (``read_roots``: what Landlock lets the worker read, the
    guard's own list); returns which protections are active (for the hello)."""
    from awm_core.runtime import kernel

    active: dict[str, Any] = {"user_namespace": False, "network_namespace": False}
    linux = sys.platform.startswith("linux")
    if linux and not kernel.single_threaded():
        raise RuntimeError("the sandbox worker has more than one thread before its kernel layers are applied")
    elif linux and os.geteuid() == 0:
        # Root isolates by uid below; a user namespace would add nothing over it.
        if cfg.get("netns"):
            active["network_namespace"] = kernel.enter_network_namespace()
    elif linux and cfg.get("netns") and cfg.get("user_namespace", True):
        active.update(kernel.enter_namespaces())
    mb = 1 << 20
    limits = {
        resource.RLIMIT_AS: cfg["memory_mb"] * mb,
        resource.RLIMIT_NOFILE: cfg["open_files"],
        resource.RLIMIT_FSIZE: cfg["file_size_mb"] * mb,
        resource.RLIMIT_CORE: 0,
    }
    for res, value in limits.items():
        resource.setrlimit(res, (value, value))
    # The soft limit is moved forward before every request (SIGXCPU ends the worker when
    # one request burns its budget); the hard limit stays open so the worker can do that
    # after giving up root.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft_limit(cfg["cpu_s"]), resource.RLIM_INFINITY))
    active["rlimits"] = True
    active["separate_uid"] = False
    if cfg.get("uid_base") is not None and os.geteuid() == 0:
        import importlib

        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        # A uid of its own (unique while this pid lives): RLIMIT_NPROC then counts only this
        # worker's threads, the kernel refuses signals to the parent or to other workers, and
        # files readable only by their owner are out of reach.
        uid = cfg["uid_base"] + os.getpid()
        try:
            os.chown(cfg["scratch"], uid, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        except OSError:
            pass
        else:
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["max_threads"] + 8, cfg["max_threads"] + 8))
            active["separate_uid"] = True
    # Die with the parent (set after the uid change, which clears it). A parent killed before
    # this point is caught by the ppid check; a spinning orphan would still hit RLIMIT_CPU.
    active["dies_with_parent"] = False
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        active["dies_with_parent"] = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        if os.getppid() != cfg.get("parent_pid", os.getppid()):
            os._exit(0)
    active.update(apply_kernel_layers(cfg, read_roots))
    return active


def apply_kernel_layers(cfg: dict[str, Any], read_roots: Sequence[str]) -> dict[str, Any]:
    """Landlock, then seccomp (last: it refuses the calls the steps before it make)."""
    from awm_core.runtime import kernel

    active: dict[str, Any] = {"landlock": 0, "landlock_network": False, "landlock_scoped_signals": False,
                              "seccomp": False}
    if not sys.platform.startswith("linux"):
        return active
    if cfg.get("landlock", True):
        active.update(kernel.apply_landlock([*read_roots, *kernel.SYSTEM_READ_ROOTS], [cfg["scratch"]]))
    if cfg.get("seccomp", True):
        active["seccomp"] = kernel.apply_seccomp(os.getpid())
    return active


class _OsStandIn(types.ModuleType):
    """What ``import os`` gives AWM-1K code: reading the environment and path helpers only
    (the dataset's modules use ``os.getenv("DATABASE_PATH")``)."""

    def __init__(self) -> None:
        super().__init__("os")
        self.getenv = os.getenv
        self.environ = dict(os.environ)
        self.path = types.SimpleNamespace(**{k: getattr(os.path, k) for k in (
            "join", "basename", "dirname", "splitext", "exists", "isfile", "isdir", "abspath", "normpath")})
        self.sep = os.sep
        self.linesep = os.linesep
        self.urandom = os.urandom
        self.getpid = os.getpid


def make_builtins(allowed: frozenset[str], *, os_standin: bool = False, guard: "Guard | None" = None,
                  standins: dict[str, Any] | None = None) -> dict[str, Any]:
    """A private builtins dict for one generated module (tampering stays in that module).

    ``standins`` maps a module name to the object an ``import`` of it gives instead of the module.
    """
    b = dict(vars(builtins))
    for name in REMOVED_BUILTINS:
        b.pop(name, None)
    real_import = builtins.__import__
    standin = _OsStandIn() if os_standin else None

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            raise ImportError("relative imports are not available in environment code")
        top = name.split(".")[0]
        if name not in allowed and top not in allowed:
            if guard is not None:
                guard.violations.append(f"sandbox refused importing {name!r}")
            raise ImportError(f"import of {name!r} is not allowed in environment code "
                              f"(allowed: {', '.join(sorted(m for m in allowed if not m.startswith('_')))})")
        if standins and name in standins:
            return standins[name]
        if top == "os" and standin is not None:
            if name != "os":
                raise ImportError(f"import of {name!r} is not allowed in environment code")
            return standin
        return real_import(name, globals, locals, fromlist, level)

    b["__import__"] = guarded_import
    return b

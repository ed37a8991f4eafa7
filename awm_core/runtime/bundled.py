"""Benchmark code that travels in an environment's bundle, executed in a sandbox worker under its own
module names (the benchmarks' modules import each other by name): BFCL's backends, τ²'s domains."""
from __future__ import annotations

import hashlib
import json
import sys
import types
from typing import Any


def register_parents(name: str) -> None:
    """Namespace packages for every parent of ``name`` not loaded yet (their modules are registered one by one)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg not in sys.modules:
            mod = types.ModuleType(pkg)
            mod.__path__ = []
            mod.__package__ = pkg
            sys.modules[pkg] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)


def exec_modules(modules: list[list[str]], builtins: dict[str, Any], packages: tuple[str, ...] | list[str] = ()) -> int:
    """Execute ``[name, source]`` modules in order under ``builtins``, once per content.

    ``packages`` are the names whose source is a package's ``__init__``. Returns how many were executed
    (0 when an earlier environment of the same release loaded them all).
    """
    executed = 0
    for name, source in modules:
        digest = hashlib.sha256(source.encode()).hexdigest()
        found = sys.modules.get(name)
        if found is not None and getattr(found, "__awm_digest__", None) == digest:
            continue
        executed += 1
        register_parents(name)
        is_package = name in packages
        mod = types.ModuleType(name)
        mod.__dict__["__builtins__"] = builtins
        mod.__awm_digest__ = digest
        mod.__file__ = "/" + name.replace(".", "/") + ("/__init__.py" if is_package else ".py")
        if is_package:
            # Its modules may be registered already (as attributes of the namespace it replaces).
            previous = sys.modules.get(name)
            if previous is not None:
                mod.__dict__.update({k: v for k, v in vars(previous).items() if isinstance(v, types.ModuleType)})
            mod.__path__ = []
            mod.__package__ = name
        else:
            mod.__package__ = name.rpartition(".")[0]
        sys.modules[name] = mod
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], leaf, mod)
        try:
            # dont_inherit: this file's own ``from __future__ import annotations`` would turn the modules'
            # annotations into strings, which pydantic (τ²'s tool schemas) cannot resolve.
            exec(compile(source, f"<environment {name}>", "exec", dont_inherit=True), mod.__dict__)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    return executed


def read_bundle(source: str, keys: tuple[str, ...], benchmark: str, env_id: str) -> dict[str, Any]:
    """An environment's bundle (``EnvCode.source``), refused naming what it lacks."""
    bundle = json.loads(source)
    missing = [k for k in keys if k not in bundle]
    if missing:
        raise ValueError(f"the {benchmark} bundle of {env_id} lacks {', '.join(missing)}")
    return bundle

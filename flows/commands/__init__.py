"""One module per ``awm`` command group; each defines ``register(subparsers)``."""
from __future__ import annotations

import argparse


def group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """Add a command group whose sub-commands are required (bare group prints its help)."""
    parser = sub.add_parser(name, help=help, description=help)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    return actions

"""awm config: inspect the effective settings."""
from __future__ import annotations

import json

from flows.commands import group


def register(sub) -> None:
    actions = group(sub, "config", "show the effective settings (environment, awm.toml, defaults)")
    show = actions.add_parser("show", help="print the effective settings as JSON with secrets masked")
    show.set_defaults(func=show_settings)


def show_settings(args) -> int:
    from awm_core.settings import home_source, load_settings

    settings = load_settings()
    shown = {**settings.masked(), "home_dir": str(settings.home_dir), "home_from": home_source()}
    print(json.dumps(shown, indent=2, sort_keys=True))
    return 0

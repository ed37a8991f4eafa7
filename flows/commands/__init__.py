"""One module per ``awm`` command group; each defines ``register(subparsers)``.

Shared here: command groups, the Prefect environment every command starts in, and running a
flow so that an expected failure is one line (the traceback stays in the Prefect logs).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any


def group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """Add a command group whose sub-commands are required (bare group prints its help)."""
    parser = sub.add_parser(name, help=help, description=help)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    return actions


def uses_prefect(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Mark a command that runs flows: Prefect's state is made under AWM_HOME before it runs."""
    parser.set_defaults(uses_prefect=True)
    return parser


def prepare_prefect(verbose: bool = False, *, uses_prefect: bool = False) -> None:
    """Before Prefect is imported: its state under AWM_HOME, telemetry and analytics off (a machine
    without internet would log an ERROR per run), INFO logs for the server and UI but not the
    console unless ``verbose``, and the project's own server when it is running (else Prefect's
    ephemeral mode). Reads the settings, so bad settings fail here."""
    from awm_core.settings import get_settings

    settings = get_settings()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    if not uses_prefect:
        return
    settings.prefect_home.mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level
    os.environ.setdefault("PREFECT_HOME", str(settings.prefect_home))
    # A first start migrates a fresh database; on a small busy machine that can pass 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "PREFECT_API_URL" not in os.environ:
        try:
            from flows.server import api_url, is_healthy

            url = api_url(settings)
            if is_healthy(url):
                os.environ["PREFECT_API_URL"] = url
        except Exception:  # no server module or no server: ephemeral mode
            pass
    if "PREFECT_API_URL" not in os.environ:
        # Ephemeral mode: a first run starts from the database migrated at install, not an empty one.
        from pathlib import Path

        from flows.server import seed_database

        seed_database(Path(os.environ["PREFECT_HOME"]))
    quiet_console(verbose)


class _ConsoleFilter(logging.Filter):
    """Without -v the console shows warnings and errors a user acts on, not Prefect's engine
    chatter (INFO state lines, the traceback of a flow that failed on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if record.name.startswith(("prefect.flow_runs", "prefect.task_runs", "prefect.engine")):
            return not record.exc_info and not str(record.msg).startswith(("Finished in state", "Encountered exception"))
        return True


def quiet_console(verbose: bool) -> None:
    """Filter what Prefect's console handlers print. Prefect builds its handlers again when a
    flow run starts, so the filter goes on the handler class, not on the instances of now."""
    if verbose:
        return
    import prefect  # noqa: F401  (configures logging on import)
    from prefect.logging.handlers import PrefectConsoleHandler

    if not getattr(PrefectConsoleHandler, "_awm_quiet", False):
        emit, keep = PrefectConsoleHandler.emit, _ConsoleFilter()

        def quiet_emit(self, record: logging.LogRecord) -> None:
            if keep.filter(record):
                emit(self, record)

        PrefectConsoleHandler.emit = quiet_emit
        PrefectConsoleHandler._awm_quiet = True
    logging.getLogger("great_expectations").setLevel(logging.WARNING)


def run_flow(flow_fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a flow and return its result. A failure the project raised on purpose (``AWMError``)
    is raised again for the command line to print as one line; anything else is a real crash and
    keeps its traceback."""
    state = flow_fn(*args, return_state=True, **kwargs)
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        raise exc
    from awm_core.errors import AWMError

    raise AWMError(f"flow {getattr(flow_fn, 'name', flow_fn)} ended {state.type.value}: {state.message}")


# ------------------------------------------------------------------ option types
# argparse calls these on the option's text; a ValueError/ArgumentTypeError becomes
# "awm CMD: error: argument --x: <message>" and exit 2, before any work starts.


def _number(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is needed, got {text!r}") \
            from None


def count(text: str) -> int:
    """An integer >= 1 (how many of something)."""
    n = _number(int, text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def non_negative(text: str) -> int:
    """An integer >= 0 (a snapshot number, a seed, steps)."""
    n = _number(int, text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def seconds(text: str) -> float:
    """A number > 0 (a timeout, a budget)."""
    x = _number(float, text)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return x


def non_negative_float(text: str) -> float:
    x = _number(float, text)
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return x


def rate(text: str) -> float:
    """A number in [0, 1]."""
    x = _number(float, text)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return x


def port(text: str) -> int:
    """A TCP port, 0 meaning any free one."""
    n = _number(int, text)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {n}")
    return n


# ------------------------------------------------------------------ options from a flow's config


def add_config_options(parser: Any, config_cls: Any, *, flags: dict[str, str | tuple[str, ...]] | None = None,
                       metavars: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One option per field of ``config_cls`` (an ``awm_core.configs.FlowConfig``): ``--field-name``
    (or ``flags[field]``, one flag or several), the field's description and default as help, its
    allowed values as choices, its type and range checked as the option is read. A bool field is
    a switch; a list field is repeated (``--env a --env b``). Fields in ``skip`` are the command's
    own business. ``config_from_args`` builds the config back."""
    import typing

    flags, metavars = flags or {}, metavars or {}
    for name, info in config_cls.model_fields.items():
        if name in skip:
            continue
        given = flags.get(name, "--" + name.replace("_", "-"))
        flag_list = (given,) if isinstance(given, str) else given
        default = info.default
        helptext = info.description or ""
        args = typing.get_args(info.annotation)
        if info.annotation is bool:
            parser.add_argument(*flag_list, dest=name, action="store_true", help=helptext)
            continue
        if typing.get_origin(info.annotation) is typing.Literal:
            parser.add_argument(*flag_list, dest=name, default=default, choices=list(args),
                                help=f"{helptext} (default: {default})")
            continue
        if any(typing.get_origin(a) is list for a in args) or typing.get_origin(info.annotation) is list:
            parser.add_argument(*flag_list, dest=name, action="append", default=None, metavar=metavars.get(name),
                                help=f"{helptext} (repeatable)")
            continue
        parse = config_cls.field_parser(name)

        def checked(text: str, parse=parse) -> Any:
            try:
                return parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        checked.__name__ = name
        shown = "" if default is None else f" (default: {default})"
        kinds = {a for a in (args or (info.annotation,)) if a is not type(None)}
        metavar = metavars.get(name) or ("N" if kinds == {int} else "X" if kinds == {float} else None)
        parser.add_argument(*flag_list, dest=name, type=checked, default=default, metavar=metavar,
                            help=helptext + shown)


def config_from_args(config_cls: Any, args: argparse.Namespace, **own: Any) -> Any:
    """The config from the options ``add_config_options`` added, and ``own`` values for the fields
    the command handles itself."""
    return config_cls(**{name: getattr(args, name) for name in config_cls.model_fields if name not in own}, **own)

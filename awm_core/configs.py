"""The base of every flow's typed config: one pydantic model per flow, with help text per field.

A flow takes its config as one parameter, its ``awm`` command builds its options from the same
fields (``flows.commands.add_config_options``), and its deployment's parameters are the same
fields under ``config``, so a parameter is written once: name, type, range, default and help.
A bad value is one line naming the field, the value and what is allowed (an ``InputError``),
never a pydantic error dump.
"""
from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from awm_core.errors import InputError


def _describe(err: dict[str, Any], prefix: str = "") -> str:
    name = prefix + ".".join(str(p) for p in err.get("loc", ())) or "value"
    got, ctx, kind = err.get("input"), err.get("ctx") or {}, err.get("type", "")
    if kind == "literal_error":
        return f"{name} must be one of {ctx.get('expected', '?').replace(chr(39), '')}, got {got!r}"
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"{name} must be {word} {ctx[bound]}, got {got!r}"
    if kind == "extra_forbidden":
        return f"{name} is not a parameter"
    return f"{name}: {err.get('msg', 'invalid').lower()}, got {got!r}"


def describe_errors(exc: ValidationError, prefix: str = "") -> str:
    """A pydantic validation error as one line: ``field must be ..., got ...; ...``."""
    return "; ".join(_describe(e, prefix) for e in exc.errors())


class FlowConfig(BaseModel):
    """Subclasses set ``flow_name`` (for messages) and declare fields with ``Field(description=...)``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    flow_name: typing.ClassVar[str] = "flow"

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InputError(f"invalid {self.flow_name} parameters: {describe_errors(exc)}") from None

    @classmethod
    def coerce(cls, value: "FlowConfig | dict[str, Any] | None") -> "FlowConfig":
        """The config from itself, a dict of its fields (a deployment's parameters) or nothing (defaults)."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise InputError(f"invalid {cls.flow_name} parameters: expected a mapping of fields, got {value!r}")
        return cls(**value)

    @classmethod
    def field_parser(cls, name: str):
        """A function that turns one command-line string into the field's value, checked against the
        field's type and range (``none`` for an optional field), raising ``ValueError`` with the rule."""
        info = cls.model_fields[name]
        adapter = TypeAdapter(typing.Annotated[(info.annotation, *info.metadata)] if info.metadata
                              else info.annotation)
        optional = type(None) in typing.get_args(info.annotation)

        def parse(text: str) -> Any:
            if optional and text.lower() in ("none", "null"):
                return None
            try:
                return adapter.validate_strings(text) if hasattr(adapter, "validate_strings") \
                    else adapter.validate_python(text)
            except ValidationError as exc:
                raise ValueError(describe_errors(exc).removeprefix("value").lstrip(": ")) from None

        parse.__name__ = name  # argparse names the type in "invalid <name> value"
        return parse


__all__ = ["FlowConfig", "describe_errors"]

"""The base of every flow's typed config: one pydantic model per flow, with help text per field.

A flow is written as ``fn(config)`` and decorated with ``Config.as_parameters``: Prefect then sees
the config's fields as the flow's own keyword parameters (types, ranges, defaults, and the help
text as the parameter descriptions the UI shows on the run form), and the function gets one
validated config. Parameters stay flat on purpose: Prefect merges a run's parameters into its
deployment's key by key, so ``--param policy=random`` keeps the deployment's other values, where a
nested ``config`` would be replaced whole (and a deployment's budget cap silently dropped).
The ``awm`` command builds its options from the same fields (``flows.commands.add_config_options``),
so a parameter is written once: name, type, range, default and help.
A bad value is one line naming the field, the value and what is allowed (an ``InputError``),
never a pydantic error dump.
"""
from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from awm_core.errors import InputError


def _field_path(loc: tuple) -> str:
    # A union reports each branch it tried under the branch's type ("constrained-int", "list[str]"):
    # the user named the field, not the branch.
    return ".".join(str(p) for p in loc if isinstance(p, int) or str(p).isidentifier())


def _describe(err: dict[str, Any], prefix: str = "") -> str:
    name = prefix + _field_path(err.get("loc", ())) or "value"
    got, ctx, kind = err.get("input"), err.get("ctx") or {}, err.get("type", "")
    if kind == "literal_error":
        return f"{name} must be one of {ctx.get('expected', '?').replace(chr(39), '')}, got {got!r}"
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"{name} must be {word} {ctx[bound]}, got {got!r}"
    if kind == "extra_forbidden":
        return f"{name} is not a parameter"
    if kind == "value_error" and "error" in ctx:  # a validator's own message, as it wrote it
        return f"{name}: {ctx['error']}"
    return f"{name}: {err.get('msg', 'invalid').lower()}, got {got!r}"


def describe_errors(exc: ValidationError, prefix: str = "") -> str:
    """A pydantic validation error as one line: ``field must be ..., got ...; ...`` (the first
    problem per field: the others are the union branches that did not fit either)."""
    first: dict[str, str] = {}
    for e in exc.errors():
        first.setdefault(_field_path(e.get("loc", ())), _describe(e, prefix))
    return "; ".join(first.values())


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
    def as_parameters(cls, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(config)`` as a function of the config's fields (see the module docstring)."""
        fields = cls.model_fields

        @functools.wraps(fn)
        def with_fields(**values: Any) -> Any:
            return fn(cls(**values))

        del with_fields.__wrapped__  # inspect.signature would follow it back to fn(config)
        with_fields.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info.default,
                               annotation=typing.Annotated[(info.annotation, info)]) for name, info in fields.items()],
            return_annotation=inspect.signature(fn).return_annotation)
        # Prefect reads parameter descriptions from the docstring's Args section.
        with_fields.__doc__ = (inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "".join(
            f"    {name}: {' '.join((info.description or '').split())}\n" for name, info in fields.items()))
        with_fields.config_class = cls
        return with_fields

    def parameters(self) -> dict[str, Any]:
        """The fields as a flow's keyword parameters (JSON-friendly values)."""
        return self.model_dump(mode="json")

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
                return adapter.validate_strings(text)
            except ValidationError as exc:
                raise ValueError(describe_errors(exc).removeprefix("value").lstrip(": ")) from None

        parse.__name__ = name  # argparse names the type in "invalid <name> value"
        return parse


class GenerateConfig(FlowConfig):
    """What one generation run makes. Unset values come from ``settings.generation`` and ``settings.llm``."""

    flow_name = "generate"

    scenarios: typing.Annotated[int, Field(ge=1)] | list[str] | None = Field(None, description=(
        "how many scenarios to make (expanded from the seed list by the model), or the seed-list names/ids to make "
        "exactly those (default: generation.scenarios)"))
    tasks_per_scenario: int | None = Field(None, ge=1, description="user tasks per scenario (default: "
                                                                       "generation.tasks_per_scenario)")
    generator_model: str | None = Field(None, description="generator model (default: llm.generator.model)")
    concurrency: int | None = Field(None, ge=1, description="scenarios built at once (default: generation.concurrency)")
    budget_usd: float | None = Field(None, gt=0, description="hard cap on estimated LLM spend for this run "
                                                              "(default: llm.budget_usd)")
    seed_list: str | None = Field(None, description="JSON list of {name, description, category} seed scenarios "
                                                    "(default: generation.seed_list, else the built-in list)")
    fixtures_dir: str | None = Field(None, description="recordings for the offline backend (default: llm.fixtures_dir)")
    offline_latency_s: float | None = Field(None, ge=0, description="simulated seconds per offline LLM call")
    skip_existing: bool = Field(True, description="skip scenarios that are already in the catalog")
    progress: bool = Field(False, description="print a line per finished stage (else they go to the run's log)")
    publish: bool = Field(True, description="write the catalog (off: validate only)")
    curate: bool | None = Field(None, description=(
        "apply the curation plan first: regenerate environments with many environment errors, retire tasks "
        "every policy solves or none ever solved, top up to generation.live_tasks (default: generation.curate)"))


__all__ = ["FlowConfig", "GenerateConfig", "describe_errors"]

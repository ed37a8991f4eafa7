"""Turning a model's reply text into a validated artifact, or into an error a repair prompt can carry."""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from awm_core.errors import ArtifactError
from awm_core.models import Artifact, describe_validation_error

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n(.*?)\r?\n[ \t]*```", re.S)
# Finish reasons after which the text is known to be incomplete or withheld.
INCOMPLETE_FINISH = {"length": "it was cut off at the token limit", "content_filter": "it was withheld by a content filter"}


class ReplyProblem(ValueError):
    """The reply could not be used; ``problems`` are lines for the repair prompt."""

    def __init__(self, summary: str, problems: list[str]):
        self.summary = summary
        self.problems = problems
        super().__init__(summary + ("".join(f"\n- {p}" for p in problems) if problems else ""))


def _snippet(text: str, lineno: int, colno: int, width: int = 70) -> str:
    lines = text.splitlines() or [""]
    line = lines[min(lineno, len(lines)) - 1]
    start = max(0, colno - 1 - width // 2)
    shown = line[start:start + width]
    lead = "..." if start > 0 else ""
    tail = "..." if start + width < len(line) else ""
    caret = " " * (len(lead) + colno - 1 - start) + "^"
    return f"{lead}{shown}{tail}\n{caret}"


def _decode(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ReplyProblem(
            f"The reply is not valid JSON: {exc.msg} at {where}.",
            [f"JSON syntax error at {where} (character {exc.pos}): {exc.msg}; the text there is:\n"
             + _snippet(text, exc.lineno, exc.colno)],
        ) from None


def parse_json_reply(text: str) -> Any:
    """The JSON value in a reply: the whole text, or the single ```json fenced block in it.

    Nothing is ever repaired: a truncated or malformed document is a ``ReplyProblem``.
    """
    stripped = text.strip()
    if not stripped:
        raise ReplyProblem("The reply is empty; a JSON document was expected.", [])
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    blocks = _FENCE.findall(stripped)
    if len(blocks) == 1:
        return _decode(blocks[0].strip())
    if len(blocks) > 1:
        raise ReplyProblem(
            f"The reply holds {len(blocks)} fenced blocks; exactly one JSON document was expected.", []
        )
    if stripped.startswith("```"):
        raise ReplyProblem("The reply opens a ``` code fence that is never closed; the JSON is incomplete.", [])
    return _decode(stripped)


def validate_reply(data: Any, model_cls: type[BaseModel]) -> BaseModel:
    """Validate parsed JSON against an artifact (or any pydantic) model; problems name field paths."""
    try:
        if issubclass(model_cls, Artifact):
            return model_cls.from_data(data)
        return model_cls.model_validate(data)
    except ArtifactError as exc:
        problems = exc.problems
    except ValidationError as exc:
        problems = describe_validation_error(exc)
    raise ReplyProblem(
        f"The JSON does not match the {model_cls.__name__} format ({len(problems)} problem"
        f"{'s' if len(problems) != 1 else ''}; each names the field path):",
        problems,
    )


def check_finish(finish_reason: str | None, completion_tokens: int) -> None:
    why = INCOMPLETE_FINISH.get(finish_reason or "")
    if why:
        raise ReplyProblem(
            f"The reply was not used because {why} (finish_reason={finish_reason}, "
            f"{completion_tokens} completion tokens), so its JSON is incomplete. "
            "Give a complete reply that is shorter.",
            [],
        )

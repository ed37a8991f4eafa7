"""The synthesis stages, one module each, prompt beside the code.

``ENV_STAGES`` are the per-environment stages in order; ``verifier`` and ``solution`` run once
per user task (``TASK_STAGES``; their fixture/ledger names are ``verifier.<i>`` and
``solution.<i>``); ``FINAL_STAGES`` run once per environment after every kept task has its verifier
and reference solution (``user_scenarios``: the user side of each task and the agent's policy).
Every one of them is a ``Stage``.
"""
from __future__ import annotations

from awm_core.stages import code, scenario, schema, seed_data, solution, spec, tasks, user_scenarios, verifier
from awm_core.stages.base import Stage, StageContext, StageResult, run_stage, stage_name, summarise_errors

ENV_STAGES: dict[str, Stage] = {m.NAME: m for m in (tasks, schema, seed_data, spec, code)}
TASK_STAGES: dict[str, Stage] = {m.NAME: m for m in (verifier, solution)}
FINAL_STAGES: dict[str, Stage] = {m.NAME: m for m in (user_scenarios,)}
# The scenario stage stands apart on purpose: it runs once per run over the seed list and the
# catalog's existing scenarios, not over one environment's StageContext, so it is not a Stage.
# Its prompt version still belongs to what made an environment.
STAGES: dict[str, Stage] = {**ENV_STAGES, **TASK_STAGES, **FINAL_STAGES}
PROMPT_VERSION = "+".join(m.PROMPT_VERSION for m in (scenario, *STAGES.values()))

for _module in STAGES.values():  # a stage that drifts from the contract fails at import, by name
    if not isinstance(_module, Stage):
        _missing = [a for a in ("NAME", "PROMPT_VERSION", "JSON_MODE", "PER_TASK", "build_messages", "parse",
                                "execute", "run") if not hasattr(_module, a)]
        raise TypeError(f"stage module {_module.__name__} does not fit awm_core.stages.base.Stage: "
                        f"missing {', '.join(_missing)}")

__all__ = ["Stage", "STAGES", "ENV_STAGES", "TASK_STAGES", "FINAL_STAGES", "PROMPT_VERSION", "StageContext", "StageResult", "run_stage",
           "stage_name", "summarise_errors"]

"""The synthesis stages, one module each, prompt beside the code.

``ENV_STAGES`` are the per-environment stages in order; ``verifier`` and ``solution`` run
once per task (their fixture/ledger names are ``verifier.<i>`` and ``solution.<i>``).
"""
from __future__ import annotations

from awm_core.stages import code, scenario, schema, seed_data, solution, spec, tasks, verifier
from awm_core.stages.base import StageContext, StageResult, run_stage, stage_name, summarise_errors

ENV_STAGES = {m.NAME: m for m in (tasks, schema, seed_data, spec, code)}
TASK_STAGES = {m.NAME: m for m in (verifier, solution)}
STAGES = {scenario.NAME: scenario, **ENV_STAGES, **TASK_STAGES}
PROMPT_VERSION = "+".join(m.PROMPT_VERSION for m in STAGES.values())

__all__ = ["STAGES", "ENV_STAGES", "TASK_STAGES", "PROMPT_VERSION", "StageContext", "StageResult", "run_stage",
           "stage_name", "summarise_errors"]

"""Turning artifacts and plain records into typed Arrow tables for the catalog.

Every write goes through :func:`to_arrow`, so a wrong column name or a value of the wrong
type is reported as a CatalogError naming the table, the row and the column, before
anything reaches DuckLake.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import date, datetime, timezone
from typing import Any, Iterable

import pyarrow as pa

from awm_core.errors import CatalogError
from awm_core.models import Environment, task_id, utcnow
from storage.schema import TABLES, Table

ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "VARCHAR[]": pa.list_(pa.string()),
}

# Columns filled with "now" when a row leaves them out.
NOW_COLUMNS = ("created_at", "published_at")


def as_mapping(record: Any) -> tuple[dict[str, Any], bool]:
    """(fields, strict): dicts are checked strictly; typed objects may carry extra fields."""
    if isinstance(record, dict):
        return record, True
    if hasattr(record, "model_dump"):
        return record.model_dump(), False
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record), False
    raise CatalogError(f"cannot store a {type(record).__name__}: expected a dict, a pydantic model or a dataclass")


def _json(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def to_arrow(table: Table, records: Iterable[Any]) -> pa.Table:
    now = utcnow()
    columns: dict[str, list[Any]] = {c: [] for c in table.column_names}
    for i, record in enumerate(records):
        row, strict = as_mapping(record)
        if strict:
            unknown = sorted(set(row) - set(table.column_names))
            if unknown:
                raise CatalogError(f"{table.name} row {i}: unknown column(s) {unknown}; "
                                   f"columns are {list(table.column_names)}")
        for col in table.columns:
            value = row.get(col.name)
            if value is None and col.name in NOW_COLUMNS:
                value = now
            if value is None and col.required:
                raise CatalogError(f"{table.name} row {i}: column {col.name!r} is required")
            try:
                if col.type == "JSON":
                    value = _json(value)
                elif col.type == "TIMESTAMPTZ":
                    value = _timestamp(value)
            except (TypeError, ValueError) as exc:
                raise CatalogError(f"{table.name} row {i}: column {col.name!r}: {exc}") from None
            columns[col.name].append(value)
    arrays = []
    for col in table.columns:
        try:
            arrays.append(pa.array(columns[col.name], type=ARROW_TYPES[col.type]))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
            bad = next((j for j, v in enumerate(columns[col.name]) if _bad(v, col.type)), "?")
            raise CatalogError(f"{table.name} row {bad}: column {col.name!r} ({col.type}): {exc}") from None
    return pa.Table.from_arrays(arrays, names=list(table.column_names))


def _bad(value: Any, sql_type: str) -> bool:
    try:
        pa.array([value], type=ARROW_TYPES[sql_type])
        return False
    except Exception:  # noqa: BLE001 - only used to locate the offending row
        return True


def flavour_of(env: Environment) -> str:
    """An import without code still belongs to its dataset's flavour (the model defaults to native)."""
    if env.code is not None:
        return env.code.flavour
    return "awm1k" if env.provenance.source == "awm1k" else "native"


def instruction(user_scenario: dict[str, Any] | None, name: str) -> str | None:
    """One field of a user scenario's structured instructions as text (None where there is none:
    no scenario, or instructions given as one plain text)."""
    instructions = (user_scenario or {}).get("instructions")
    if not isinstance(instructions, dict):
        return None
    value = instructions.get(name)
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def environment_rows(env: Environment) -> dict[str, list[dict[str, Any]]]:
    """The rows one Environment bundle contributes to each environment-keyed table."""
    dropped = env.validation.dropped_tasks if env.validation else {}
    verifier_idx = {v.task_idx for v in env.verifiers}
    solution_idx = {s.task_idx for s in env.solutions}
    prov = env.provenance
    cost = sum(s.cost_usd for s in prov.stages.values())
    rows: dict[str, list[dict[str, Any]]] = {
        "scenarios": [{
            "env_id": env.id, "name": env.scenario.name, "description": env.scenario.description,
            "category": env.scenario.category, "extra": env.scenario.extra or None,
        }],
        "tasks": [{
            "env_id": env.id, "task_idx": t.idx, "task_id": task_id(env.id, t.idx), "text": t.text,
            "has_verifier": t.idx in verifier_idx, "has_solution": t.idx in solution_idx,
            "dropped_reason": dropped.get(t.idx), "retired_reason": env.retired_tasks.get(t.idx),
            "user_scenario": t.user_scenario, "reason_for_call": instruction(t.user_scenario, "reason_for_call"),
            "known_info": instruction(t.user_scenario, "known_info"),
        } for t in env.tasks],
        "environments": [{
            "env_id": env.id, "name": env.scenario.name, "category": env.scenario.category,
            "flavour": flavour_of(env), "source": prov.source, "digest": env.digest(),
            "tool_count": len(env.api_spec.tools) if env.api_spec else 0,
            "task_count": len(env.tasks), "verifier_count": len(env.verifiers),
            "table_count": len(env.db_schema.tables) if env.db_schema else 0,
            "seed_statement_count": len(env.seed_data.statements()) if env.seed_data else 0,
            "missing": list(env.missing),
            "validation_passed": env.validation.passed if env.validation else None,
            "db_schema": env.db_schema.model_dump(mode="json") if env.db_schema else None,
            "seed_data": env.seed_data.model_dump(mode="json") if env.seed_data else None,
            "api_spec": env.api_spec.model_dump(mode="json") if env.api_spec else None,
            "code": env.code.source if env.code else None,
            "generator_model": prov.generator_model, "prompt_version": prov.prompt_version,
            "run_id": prov.run_id, "total_tokens": prov.total_tokens, "cost_usd": cost,
            "created_at": prov.created_at, "bundle": env.to_json(), "policy": env.policy,
        }],
        "verifiers": [{
            "env_id": env.id, "task_idx": v.task_idx, "style": v.style, "function_name": v.function_name,
            "code": v.code, "success_criteria": v.success_criteria or None,
            "failure_criteria": v.failure_criteria or None, "extra": v.extra or None,
        } for v in env.verifiers],
        "reference_solutions": [{
            "env_id": env.id, "task_idx": s.task_idx,
            "calls": [c.model_dump(mode="json") for c in s.calls], "call_count": len(s.calls),
            "final_answer": s.final_answer,
        } for s in env.solutions],
        "validation_results": [{
            "env_id": env.id, "check_idx": i, "name": c.name, "passed": c.passed, "task_idx": c.task_idx,
            "tool": c.tool, "detail": c.detail or None, "validated_at": env.validation.validated_at,
        } for i, c in enumerate(env.validation.checks)] if env.validation else [],
    }
    return rows


def check_table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise CatalogError(f"unknown catalog table {name!r}; tables: {sorted(TABLES)}") from None

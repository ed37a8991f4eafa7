"""AgentWorldModel-1K interop: the dataset's JSONL records <-> Environment bundles.

Pure functions, no catalog access. The dataset keeps one JSONL file per generation stage
(``gen_scenario``, ``gen_tasks``, ``gen_db``, ``gen_sample``, ``gen_spec``, ``gen_envs``,
``gen_verifier``, ``gen_verifier.pure_code``), keyed by the scenario name, which becomes the
environment id. Any subset of the files may be present; the parts a scenario lacks are
listed in ``Environment.missing``.

Round trips are exact: every field the models do not name is kept in the models' ``extra``
dicts (``Scenario.extra["awm1k"]`` holds the per-file leftovers and each record's line
number, so the export writes the records back in their original order), and a parameter
type that was normalised to JSON Schema (``float`` -> ``number``) remembers its original.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from awm_core.errors import ArtifactError
from awm_core.models import (
    ENV_PARTS,
    ApiSpec,
    DbSchema,
    EnvCode,
    Environment,
    ParamSpec,
    Provenance,
    Scenario,
    SeedData,
    Task,
    ToolSpec,
    Verifier,
    slugify,
)

FILES = ("gen_scenario", "gen_tasks", "gen_db", "gen_sample", "gen_spec", "gen_envs",
         "gen_verifier", "gen_verifier.pure_code")
VERIFIER_FILES = {"gen_verifier": "awm1k_sql", "gen_verifier.pure_code": "awm1k_code"}
STYLE_FILES = {v: k for k, v in VERIFIER_FILES.items()}
# The parts each file provides (ENV_PARTS names).
FILE_PART = {"gen_scenario": "scenario", "gen_tasks": "tasks", "gen_db": "db_schema", "gen_sample": "seed_data",
             "gen_spec": "api_spec", "gen_envs": "code", "gen_verifier": "verifiers",
             "gen_verifier.pure_code": "verifiers"}

# Key orders of the published records, so exported lines read like the dataset's.
RECORD_ORDER = {
    "gen_scenario": ("name", "description"),
    "gen_tasks": ("scenario", "tasks"),
    "gen_db": ("scenario", "db_schema", "db_path"),
    "gen_sample": ("scenario", "tables_count", "inserts_count", "sample_data"),
    "gen_spec": ("scenario", "api_spec"),
    "gen_envs": ("scenario", "db_path", "full_code"),
    "gen_verifier": ("scenario", "task_idx", "task", "verification"),
    "gen_verifier.pure_code": ("scenario", "task_idx", "task", "verification"),
}
ENDPOINT_ORDER = ("path", "method", "summary", "description", "operation_id", "tags", "request_params",
                  "response", "required_tables", "required_fields")
PARAM_ORDER = ("type", "param_type", "required", "description", "example", "enum", "items")

# AWM-1K writes Python-ish type names; the models hold JSON Schema types.
TYPE_TO_JSON_SCHEMA = {"float": "number", "double": "number", "int": "integer", "str": "string",
                       "bool": "boolean", "list": "array", "dict": "object"}
ABSENT = "_absent"          # model fields the record did not have (so the export leaves them out)
ORIGINAL_TYPE = "awm1k_type"


@dataclass
class Problem:
    file: str
    line: int  # 1-based; 0 = not tied to one line
    message: str

    def __str__(self) -> str:
        where = f"{self.file}.jsonl:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


@dataclass
class ImportResult:
    environments: list[Environment]
    problems: list[Problem] = field(default_factory=list)
    records: dict[str, int] = field(default_factory=dict)  # file -> records read (parsed or not)


def category_of(scenario_key: str) -> str:
    """AWM-1K names are '<category>_<n>' (e_commerce_33): the category is the name without its number."""
    return re.sub(r"_\d+$", "", scenario_key) or scenario_key


def _ordered(d: dict[str, Any], order: Iterable[str]) -> dict[str, Any]:
    order = list(order)
    out = {k: d[k] for k in order if k in d}
    out.update({k: v for k, v in d.items() if k not in out})
    return out


# ============================================================================ reading


def read_dir(path: str | Path) -> ImportResult:
    """Parse every AWM-1K file present in ``path``; bad records are reported, the rest import."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError("awm1k", [f"{root} is not a directory"])
    lines: dict[str, list[tuple[int, str]]] = {}
    unreadable: list[Problem] = []
    for name in FILES:
        f = root / f"{name}.jsonl"
        if not f.exists():
            continue
        try:
            data = f.read_bytes()
        except OSError as exc:  # a directory of that name, no permission, an I/O error
            unreadable.append(Problem(name, 0, f"cannot read {f}: {exc.strerror or exc}"))
            continue
        entries = []
        # Decoded line by line, so one line that is not UTF-8 is reported and the others import.
        for i, raw in enumerate(data.split(b"\n")):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                unreadable.append(Problem(name, i + 1, f"not UTF-8 text (byte {exc.start + 1} of the line)"))
                continue
            if text.strip():
                entries.append((i + 1, text))
        lines[name] = entries
    if not lines and not unreadable:
        raise ArtifactError("awm1k", [f"no AgentWorldModel-1K files in {root} (expected any of "
                                      + ", ".join(f"{n}.jsonl" for n in FILES) + ")"])
    result = parse_lines(lines)
    result.problems[:0] = unreadable
    return result


def parse_lines(lines: dict[str, list[tuple[int, str]]]) -> ImportResult:
    """Build bundles from ``{file: [(line number, json text), ...]}``."""
    problems: list[Problem] = []
    acc: dict[str, dict[str, Any]] = {}   # scenario key -> collected parts
    order: list[str] = []
    seen: dict[tuple, int] = {}

    def slot(key: str) -> dict[str, Any]:
        if key not in acc:
            acc[key] = {"lines": {}, "fields": {}, "verifiers": []}
            order.append(key)
        return acc[key]

    for fname, entries in lines.items():
        for lineno, text in entries:
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(Problem(fname, lineno, f"invalid JSON: {exc}"))
                continue
            if not isinstance(rec, dict):
                problems.append(Problem(fname, lineno, f"expected a JSON object, got {type(rec).__name__}"))
                continue
            try:
                key, parsed = _parse_record(fname, rec)
            except (ArtifactError, ValueError, TypeError, KeyError) as exc:
                problems.append(Problem(fname, lineno, _msg(exc)))
                continue
            ident = (fname, key) + ((parsed["verifier"].task_idx,) if "verifier" in parsed else ())
            if ident in seen:
                problems.append(Problem(fname, lineno, f"duplicate record for {'/'.join(map(str, ident[1:]))} "
                                                       f"(first at line {seen[ident]}); kept the first"))
                continue
            seen[ident] = lineno
            s = slot(key)
            if "verifier" in parsed:
                v: Verifier = parsed["verifier"]
                v.extra["awm1k"]["line"] = lineno
                s["verifiers"].append(v)
            else:
                s["lines"][fname] = lineno
                s["fields"].update(parsed.pop("fields", {}))
                s.update(parsed)

    envs = []
    for key in order:
        try:
            envs.append(_bundle(key, acc[key]))
        except ArtifactError as exc:
            first = min(acc[key]["lines"].items(), key=lambda kv: kv[1], default=("(bundle)", 0))
            problems.append(Problem(first[0], first[1], f"scenario {key}: {exc}"))
    return ImportResult(envs, problems, {f: len(e) for f, e in lines.items()})


def _msg(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)


def _require(rec: dict[str, Any], name: str, kind: type) -> Any:
    if name not in rec:
        raise KeyError(name)
    value = rec[name]
    if not isinstance(value, kind):
        raise ValueError(f"field {name!r} must be {kind.__name__ if isinstance(kind, type) else kind}, "
                         f"got {type(value).__name__}")
    return value


def _rest(rec: dict[str, Any], known: Iterable[str]) -> dict[str, Any]:
    known = set(known)
    return {k: v for k, v in rec.items() if k not in known}


def _parse_record(fname: str, rec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if fname == "gen_scenario":
        name = _require(rec, "name", str)
        desc = rec.get("description", "")
        if not isinstance(desc, str):
            raise ValueError("field 'description' must be a string")
        fields = _rest(rec, ("name", "description"))
        if "description" not in rec:
            fields[ABSENT] = ["description"]
        return slugify(name), {"scenario_name": name, "description": desc, "fields": {"gen_scenario": fields}}

    key = _require(rec, "scenario", str)
    if fname == "gen_tasks":
        tasks = _require(rec, "tasks", list)
        if not all(isinstance(t, str) for t in tasks):
            raise ValueError("field 'tasks' must be a list of strings")
        return key, {"tasks": tasks, "fields": {"gen_tasks": _rest(rec, ("scenario", "tasks"))}}
    if fname == "gen_db":
        db = _require(rec, "db_schema", dict)
        schema = DbSchema.from_data({"tables": db.get("tables")})
        return key, {"db_schema": schema, "fields": {"gen_db": _rest(rec, ("scenario", "db_schema")),
                                                     "db_schema": _rest(db, ("tables",))}}
    if fname == "gen_sample":
        sample = _require(rec, "sample_data", dict)
        seed = SeedData.from_data({"tables": sample.get("tables", [])})
        return key, {"seed_data": seed, "fields": {"gen_sample": _rest(rec, ("scenario", "sample_data")),
                                                   "sample_data": _rest(sample, ("tables",))}}
    if fname == "gen_spec":
        spec = _require(rec, "api_spec", dict)
        groups = spec.get("api_groups")
        if not isinstance(groups, list):
            raise ValueError("api_spec.api_groups must be a list")
        tools, layout = [], []
        for gi, g in enumerate(groups):
            if not isinstance(g, dict) or not isinstance(g.get("endpoints", []), list):
                raise ValueError(f"api_spec.api_groups.{gi} must be an object with a list of endpoints")
            eps = g.get("endpoints", [])
            layout.append({"group_name": g.get("group_name"), "count": len(eps),
                           "fields": _rest(g, ("group_name", "endpoints"))})
            for ei, ep in enumerate(eps):
                try:
                    tools.append(_tool(ep, g.get("group_name") or ""))
                except (ArtifactError, ValueError, TypeError, KeyError) as exc:
                    raise ValueError(f"api_spec.api_groups.{gi}.endpoints.{ei}: {_msg(exc)}") from None
        api = ApiSpec.from_data({"tools": [t.model_dump() for t in tools]})
        return key, {"api_spec": api, "fields": {"gen_spec": _rest(rec, ("scenario", "api_spec")),
                                                 "api_spec": _rest(spec, ("api_groups",)),
                                                 "spec_groups": layout}}
    if fname == "gen_envs":
        code = _require(rec, "full_code", str)
        return key, {"code": EnvCode.from_data({"flavour": "awm1k", "source": code}),
                     "fields": {"gen_envs": _rest(rec, ("scenario", "full_code"))}}
    if fname in VERIFIER_FILES:
        idx = _require(rec, "task_idx", int)
        ver = _require(rec, "verification", dict)
        code = _require(ver, "code", str)
        raw = ver.get("raw_response", "")
        meta: dict[str, Any] = {}
        if isinstance(raw, str) and raw.strip().startswith("{"):
            try:
                meta = json.loads(raw)
            except json.JSONDecodeError:
                meta = {}
        style = VERIFIER_FILES[fname]
        default_fn = "verify_task" if style == "awm1k_sql" else "verify_task_completion"
        extra = {"awm1k": {"raw_response": raw, "fields": _rest(rec, ("scenario", "task_idx", "verification")),
                           "verification": _rest(ver, ("code", "raw_response"))}}
        if "raw_response" not in ver:
            extra["awm1k"][ABSENT] = ["raw_response"]
        v = Verifier.from_data({
            "task_idx": idx, "code": code, "style": style,
            "function_name": meta.get("function_name") if isinstance(meta.get("function_name"), str) else default_fn,
            "success_criteria": meta.get("success_criteria") if isinstance(meta.get("success_criteria"), str) else "",
            "failure_criteria": meta.get("failure_criteria") if isinstance(meta.get("failure_criteria"), str) else "",
            "extra": extra,
        })
        return key, {"verifier": v}
    raise ValueError(f"unknown AWM-1K file {fname}")


TOOL_MAPPED = ("operation_id", "description", "request_params", "response", "required_tables")
PARAM_MAPPED = ("type", "description", "required", "example", "param_type")


def _tool(ep: Any, group: str) -> ToolSpec:
    if not isinstance(ep, dict):
        raise ValueError("endpoint must be an object")
    name = _require(ep, "operation_id", str)
    extra = _rest(ep, TOOL_MAPPED)
    absent = [k for k in TOOL_MAPPED if k not in ep]
    params_in = ep.get("request_params", {})
    if not isinstance(params_in, dict):
        raise ValueError("request_params must be an object")
    params = {pname: _param(pname, p) for pname, p in params_in.items()}
    response = ep.get("response", {})
    if not isinstance(response, dict):  # kept verbatim; the model's `returns` is an object
        extra["response"], response = response, {}
    tables = ep.get("required_tables", [])
    if not (isinstance(tables, list) and all(isinstance(t, str) for t in tables)):
        extra["required_tables"], tables = tables, []
    if absent:
        extra[ABSENT] = absent
    return ToolSpec(name=name, description=ep.get("description", ""), parameters=params, returns=response,
                    tables=tables, group=group, extra=extra)


def _param(pname: str, p: Any) -> ParamSpec:
    if not isinstance(p, dict):
        raise ValueError(f"request_params.{pname} must be an object")
    extra = _rest(p, PARAM_MAPPED + ("enum", "items"))
    data: dict[str, Any] = {k: p[k] for k in PARAM_MAPPED if k in p}
    absent = [k for k in PARAM_MAPPED if k not in p]
    for k, kind in (("enum", list), ("items", dict)):
        if k in p:
            if isinstance(p[k], kind):
                data[k] = p[k]
            else:
                extra[k] = p[k]
    t = data.get("type", "string")
    if not isinstance(t, str):
        raise ValueError(f"request_params.{pname}.type must be a string")
    if t in TYPE_TO_JSON_SCHEMA:
        extra[ORIGINAL_TYPE] = t
        t = TYPE_TO_JSON_SCHEMA[t]
    data["type"] = t
    if absent:
        extra[ABSENT] = absent
    try:
        return ParamSpec.from_data({**data, "extra": extra})
    except ArtifactError as exc:
        raise ValueError(f"request_params.{pname}: {'; '.join(exc.problems)}") from None


def _bundle(key: str, s: dict[str, Any]) -> Environment:
    env_id = slugify(key)
    has = {FILE_PART[f] for f in s["lines"]}
    if s["verifiers"]:
        has.add("verifiers")
    book: dict[str, Any] = {"lines": s["lines"], "fields": s["fields"]}
    if env_id != key:
        book["scenario_key"] = key
    scenario = Scenario(id=env_id, name=s.get("scenario_name", key), description=s.get("description", ""),
                        category=category_of(env_id), extra={"awm1k": book})
    tasks = [Task(scenario_id=env_id, idx=i, text=t) for i, t in enumerate(s.get("tasks", []))]
    verifiers = sorted(s["verifiers"], key=lambda v: (v.task_idx, v.style != "awm1k_code"))
    try:
        return Environment(
            id=env_id, scenario=scenario, tasks=tasks, db_schema=s.get("db_schema"), seed_data=s.get("seed_data"),
            api_spec=s.get("api_spec"), code=s.get("code"), verifiers=verifiers,
            provenance=Provenance(source="awm1k"),
            missing=[p for p in ENV_PARTS if p not in has],
        )
    except (ValueError, TypeError) as exc:
        raise ArtifactError("Environment", [str(exc)]) from None


# ============================================================================ writing


def export_records(envs: Iterable[Environment]) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Records per file, in the original line order where known; plus notes on what was left out."""
    out: dict[str, list[tuple[tuple, dict[str, Any]]]] = {f: [] for f in FILES}
    notes: list[str] = []
    scenarios = policies = 0  # conversation parts: the format has no place for them
    for pos, env in enumerate(envs):
        scenarios += sum(1 for t in env.tasks if t.user_scenario is not None or t.user_prompt is not None)
        policies += env.policy is not None
        book = env.scenario.extra.get("awm1k", {}) if isinstance(env.scenario.extra, dict) else {}
        lines = book.get("lines", {})
        fields = book.get("fields", {})
        key = book.get("scenario_key", env.id)
        imported = bool(book)

        def add(fname: str, rec: dict[str, Any], line: int | None = None, sub: int = 0) -> None:
            rec = _ordered(rec, RECORD_ORDER[fname])
            ln = line if line is not None else lines.get(fname)
            out[fname].append(((ln if ln is not None else 1 << 60, pos, sub), rec))

        def wanted(fname: str, present: bool) -> bool:
            return fname in lines if imported else present

        if wanted("gen_scenario", True):
            rec = {"name": env.scenario.name if imported else env.id, "description": env.scenario.description}
            f = dict(fields.get("gen_scenario", {}))
            for k in f.pop(ABSENT, []):
                rec.pop(k, None)
            add("gen_scenario", {**rec, **f})
        if wanted("gen_tasks", bool(env.tasks)):
            add("gen_tasks", {"scenario": key, "tasks": [t.text for t in sorted(env.tasks, key=lambda t: t.idx)],
                              **fields.get("gen_tasks", {})})
        if env.db_schema is not None and wanted("gen_db", True):
            db = {"tables": [t.model_dump() for t in env.db_schema.tables], **fields.get("db_schema", {})}
            add("gen_db", {"scenario": key, "db_schema": db,
                           **fields.get("gen_db", {} if imported else {"db_path": _db_path(env.id)})})
        if env.seed_data is not None and wanted("gen_sample", True):
            sd = {"tables": [t.model_dump() for t in env.seed_data.tables], **fields.get("sample_data", {})}
            counts = {"tables_count": len(env.seed_data.tables), "inserts_count": len(env.seed_data.statements())}
            add("gen_sample", {"scenario": key, **fields.get("gen_sample", {} if imported else counts),
                               "sample_data": sd})
        if env.api_spec is not None and wanted("gen_spec", True):
            spec = {"api_groups": _groups(env.api_spec.tools, fields.get("spec_groups")), **fields.get("api_spec", {})}
            add("gen_spec", {"scenario": key, "api_spec": spec, **fields.get("gen_spec", {})})
        if env.code is not None and wanted("gen_envs", True):
            if env.code.flavour == "awm1k":
                add("gen_envs", {"scenario": key, **fields.get("gen_envs", {} if imported else
                                                                 {"db_path": _db_path(env.id)}),
                                 "full_code": env.code.source})
            else:
                notes.append(f"{env.id}: native tool code has no AWM-1K form (gen_envs record left out)")
        native = 0
        for v in env.verifiers:
            fname = STYLE_FILES.get(v.style)
            if fname is None:
                native += 1
                continue
            vb = v.extra.get("awm1k", {})
            raw = vb.get("raw_response")
            if raw is None:
                raw = "" if v.style == "awm1k_code" else json.dumps(
                    {"python_code": v.code, "function_name": v.function_name,
                     "success_criteria": v.success_criteria, "failure_criteria": v.failure_criteria})
            ver = {"code": v.code, "raw_response": raw, **vb.get("verification", {})}
            for k in vb.get(ABSENT, []):
                ver.pop(k, None)
            task = next((t.text for t in env.tasks if t.idx == v.task_idx), None)
            rec = {"scenario": key, "task_idx": v.task_idx, "task": task, **vb.get("fields", {}), "verification": ver}
            if task is None and "task" not in vb.get("fields", {}):
                rec.pop("task")
            add(fname, rec, vb.get("line"), v.task_idx)
        if native:
            notes.append(f"{env.id}: {native} native-style verifier(s) have no AWM-1K form (left out)")
    left_out = conversation_left_out(scenarios, policies)
    if left_out:
        notes.append(left_out)
    return {f: [r for _, r in sorted(rs, key=lambda x: x[0])] for f, rs in out.items()}, notes


def conversation_left_out(scenarios: int, policies: int) -> str | None:
    """The one line saying the conversation parts were not exported (None when there were none)."""
    parts = [f"{n} {word if n == 1 else plural}" for n, word, plural in (
        (scenarios, "user scenario", "user scenarios"), (policies, "policy", "policies")) if n]
    if not parts:
        return None
    them = "it" if scenarios + policies == 1 else "them"
    return f"left out: {' and '.join(parts)} (the AWM-1K format has no place for {them})"


def _db_path(env_id: str) -> str:
    return f"./outputs/databases/{env_id}.db"


def _groups(tools: list[ToolSpec], layout: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    eps = [_endpoint(t) for t in tools]
    if layout and sum(g["count"] for g in layout) == len(eps):
        out, i = [], 0
        for g in layout:
            out.append({"group_name": g["group_name"], "endpoints": eps[i:i + g["count"]], **g.get("fields", {})})
            i += g["count"]
        return out
    out = []
    for t, ep in zip(tools, eps):
        name = t.group or "default"
        if not out or out[-1]["group_name"] != name:
            out.append({"group_name": name, "endpoints": []})
        out[-1]["endpoints"].append(ep)
    return out


def _endpoint(t: ToolSpec) -> dict[str, Any]:
    extra = dict(t.extra)
    absent = set(extra.pop(ABSENT, []))
    ep: dict[str, Any] = {"operation_id": t.name, "description": t.description,
                          "request_params": {k: _param_out(p) for k, p in t.parameters.items()},
                          "response": t.returns, "required_tables": t.tables}
    for k in absent:
        ep.pop(k, None)
    ep.update(extra)  # a non-object response or odd required_tables was kept verbatim in extra
    return _ordered(ep, ENDPOINT_ORDER)


def _param_out(p: ParamSpec) -> dict[str, Any]:
    extra = dict(p.extra)
    absent = set(extra.pop(ABSENT, []))
    out: dict[str, Any] = {"type": extra.pop(ORIGINAL_TYPE, p.type), "param_type": p.param_type,
                           "required": p.required, "description": p.description, "example": p.example}
    if p.param_type is None and "param_type" not in absent:
        absent.add("param_type")  # native tools have no HTTP placement
    for k in absent:
        out.pop(k, None)
    if p.enum is not None:
        out["enum"] = p.enum
    if p.items is not None:
        out["items"] = p.items
    out.update(extra)
    return _ordered(out, PARAM_ORDER)


def dump_line(record: dict[str, Any]) -> str:
    """One JSONL line in the dataset's own style (non-ASCII kept as is)."""
    return json.dumps(record, ensure_ascii=False)


def write_dir(envs: Iterable[Environment], path: str | Path) -> tuple[dict[str, int], list[str]]:
    """Write the AWM-1K files for ``envs`` into ``path``; returns lines written per file and notes."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    records, notes = export_records(envs)
    counts = {}
    for fname, recs in records.items():
        if not recs:
            continue
        tmp = root / f".{fname}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(dump_line(r) + "\n")
        tmp.replace(root / f"{fname}.jsonl")
        counts[fname] = len(recs)
    return counts, notes

"""JSON schemas for tools: from native function signatures, and from a FastAPI OpenAPI document."""
from __future__ import annotations

import inspect
import re
import sqlite3
import types
import typing
from typing import Any, Callable

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object",
           list: "array", tuple: "array", set: "array", type(None): "null"}


def type_schema(tp: Any) -> dict[str, Any]:
    """JSON schema of a type hint (str, int, list[str], dict[str, int], X | None, Literal[...])."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        parts = [type_schema(a) for a in non_null]
        nullable = len(non_null) < len(args)
        if len(parts) == 1 and set(parts[0]) <= {"type", "items", "additionalProperties"} and "type" in parts[0]:
            out = dict(parts[0])
            if nullable:
                out["type"] = [out["type"], "null"]
            return out
        if nullable:
            parts.append({"type": "null"})
        return {"anyOf": parts}
    if origin in (list, tuple, set, frozenset, typing.Sequence if hasattr(typing, "Sequence") else list):
        out: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            item = type_schema(args[0])
            if item:
                out["items"] = item
        return out
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            val = type_schema(args[1])
            if val:
                out["additionalProperties"] = val
        return out
    if isinstance(tp, type) and tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    return {}


_ARGS_RE = re.compile(r"^\s*(\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style docstring."""
    if not doc:
        return "", {}
    doc = inspect.cleandoc(doc)
    lines = doc.splitlines()
    desc_lines = []
    for line in lines:
        if not line.strip() or re.match(r"^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?)\s*:\s*$", line):
            break
        desc_lines.append(line.strip())
    params: dict[str, str] = {}
    in_args = False
    current = None
    base_indent = None
    for line in lines:
        if re.match(r"^\s*(Args|Arguments|Parameters)\s*:\s*$", line):
            in_args, current, base_indent = True, None, None
            continue
        if in_args:
            if re.match(r"^\s*(Returns|Raises|Yields|Examples?|Notes?)\s*:\s*$", line):
                in_args = False
                continue
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            m = _ARGS_RE.match(line)
            if m and (base_indent is None or indent <= base_indent):
                base_indent = indent
                current = m.group(1)
                params[current] = m.group(3).strip()
            elif current:
                params[current] = (params[current] + " " + line.strip()).strip()
    return " ".join(desc_lines), params


def is_connection_param(p: inspect.Parameter) -> bool:
    ann = p.annotation
    return ann is sqlite3.Connection or p.name in ("conn", "connection", "db") or (
        isinstance(ann, str) and "Connection" in ann)


def function_schema(fn: Callable, spec_params: dict[str, dict] | None = None) -> tuple[str, dict[str, Any], list[str]]:
    """(description, input schema, problems) for a native tool function."""
    problems: list[str] = []
    name = fn.__name__
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        return "", {}, [f"tool {name}: cannot read its signature: {exc}"]
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolvable forward reference in generated code
        problems.append(f"tool {name}: type hints cannot be resolved: {exc}")
        hints = {}
    params = list(sig.parameters.values())
    if not params or not is_connection_param(params[0]) or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        problems.append(f"tool {name}: the first parameter must be the sqlite3.Connection "
                        f"(e.g. `def {name}(conn: sqlite3.Connection, ...)`)")
    else:
        params = params[1:]
    description, arg_docs = parse_docstring(fn.__doc__)
    props: dict[str, Any] = {}
    required: list[str] = []
    accepts_any = False
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_any = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        prop = type_schema(hints.get(p.name, p.annotation))
        spec = (spec_params or {}).get(p.name) or {}
        if not prop and spec.get("type"):
            prop = {"type": spec["type"]}
        doc = arg_docs.get(p.name) or spec.get("description")
        if doc:
            prop["description"] = doc
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        elif p.default is None or isinstance(p.default, (str, int, float, bool)):
            prop["default"] = p.default
        props[p.name] = prop
    for sp in spec_params or {}:
        if sp not in props and not accepts_any:
            problems.append(f"tool {name}: the spec lists parameter {sp!r} but the function does not accept it")
    schema = {"type": "object", "properties": props, "required": required,
              "additionalProperties": accepts_any}
    return description, schema, problems


# --------------------------------------------------------------------------- OpenAPI


def _resolve(node: Any, components: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """Inline ``$ref``s (tool schemas must stand alone); cycles become an open object."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            key = ref.rsplit("/", 1)[1]
            if key in seen:
                return {"type": "object"}
            target = _resolve(components.get(key, {}), components, seen + (key,))
            extra = {k: v for k, v in node.items() if k != "$ref"}
            return {**target, **extra} if extra else target
        return {k: _resolve(v, components, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, components, seen) for v in node]
    return node


def openapi_tools(openapi: dict[str, Any]) -> list[dict[str, Any]]:
    """One tool per operation: name = operationId; path, query and body fields merged.

    Returns dicts with name, description, input_schema and the routing facts the ASGI
    adapter needs (method, path, where each argument goes).
    """
    components = (openapi.get("components") or {}).get("schemas") or {}
    tools = []
    for path, item in (openapi.get("paths") or {}).items():
        for method, op in item.items():
            if method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE") or not isinstance(op, dict):
                continue
            name = op.get("operationId") or f"{method}_{path}"
            props: dict[str, Any] = {}
            required: list[str] = []
            where: dict[str, str] = {}
            for prm in op.get("parameters") or []:
                prm = _resolve(prm, components)
                loc = prm.get("in")
                if loc not in ("path", "query"):
                    continue
                s = dict(prm.get("schema") or {})
                s.pop("title", None)
                if prm.get("description") and "description" not in s:
                    s["description"] = prm["description"]
                props[prm["name"]] = s
                where[prm["name"]] = loc
                if prm.get("required"):
                    required.append(prm["name"])
            body_mode = None
            body = ((op.get("requestBody") or {}).get("content") or {}).get("application/json")
            if body:
                bschema = _resolve(body.get("schema") or {}, components)
                if bschema.get("type") == "object" or "properties" in bschema:
                    body_mode = "merge"
                    for k, v in (bschema.get("properties") or {}).items():
                        v = dict(v)
                        v.pop("title", None)
                        props[k] = v
                        where[k] = "body"
                    required += [k for k in bschema.get("required") or [] if k not in required]
                else:
                    body_mode = "whole"
                    bschema = dict(bschema)
                    bschema.pop("title", None)
                    props["body"] = bschema
                    where["body"] = "body"
                    if (op.get("requestBody") or {}).get("required"):
                        required.append("body")
            desc = op.get("description") or op.get("summary") or ""
            if op.get("summary") and op.get("description") and op["summary"] not in op["description"]:
                desc = f"{op['summary']}. {op['description']}"
            tools.append({
                "name": name, "description": desc,
                "input_schema": {"type": "object", "properties": props, "required": required,
                                 "additionalProperties": False},
                "method": method.upper(), "path": path, "where": where, "body_mode": body_mode,
            })
    return tools

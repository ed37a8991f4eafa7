"""The AWM-1K direct paths (parameters bound with FastAPI's functions, or FastAPI's request handler
for the route) give what the full ASGI app gives: same content, same error kinds and messages, for
every tool of the shared samples called with its spec examples, with no arguments, and with
arguments of the wrong type (sent past the pool's schema check, so FastAPI's validation answers)."""
from __future__ import annotations

import re

import pytest

from awm_core.interop.awm1k import read_dir
from awm_core.runtime.pool import SandboxPool
from awm_core.settings import load_settings


# Sample seed data is dated relative to when the database is built, so two pools built seconds
# apart differ in timestamps only; those are masked, everything else must match exactly.
_STAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?")


def _mask(v):
    if isinstance(v, str):
        return _STAMP.sub("<time>", v)
    if isinstance(v, list):
        return [_mask(x) for x in v]
    if isinstance(v, dict):
        return {k: _mask(x) for k, x in v.items()}
    return v


def _raw_call(s, tool: str, args: dict):
    """A call as the worker answers it, without the pool's argument check."""
    resp, _, _ = s.handle.worker.request({"op": "call", "sid": s.sid, "tool": tool, "args": args},
                                         instance=s.instance)
    return resp.get("ok"), _mask(resp.get("content_json")), resp.get("error_kind"), _mask(resp.get("error"))


def _results(envs, asgi: bool):
    settings = load_settings()
    out, paths = {}, {}
    with SandboxPool(settings.sandbox.model_copy(update={"awm1k_asgi": asgi}), workers=1) as pool:
        for env in envs:
            handle = pool.load(env)
            paths[env.id] = handle.call_paths
            routed = {}
            with handle.open_session() as s:
                for tool in env.api_spec.tools:
                    r = s.call(tool.name, tool.example_arguments())
                    routed[tool.name] = (r.ok, _mask(r.content), r.error_kind, _mask(r.error))
                    routed[tool.name, "none"] = _raw_call(s, tool.name, {})
                    wrong = {k: {"not": ["a", "scalar"]} for k in tool.example_arguments()}
                    routed[tool.name, "wrong types"] = _raw_call(s, tool.name, wrong)
            out[env.id] = routed
    return out, paths


def test_direct_and_asgi_paths_agree_on_every_sample_tool(awm1k_samples):
    envs = [e for e in read_dir(awm1k_samples).environments
            if e.code is not None and e.flavour == "awm1k" and e.api_spec is not None]
    if not envs:
        pytest.skip(f"no AWM-1K sample in {awm1k_samples} has both code and a tool spec")
    (direct, direct_paths), (asgi, asgi_paths) = _results(envs, asgi=False), _results(envs, asgi=True)
    assert sum(len(v) for v in direct.values()) > 0
    assert {p for v in asgi_paths.values() for p in v.values()} == {"asgi"}
    # The samples' routes take path, query and JSON body parameters only: all are bound directly.
    assert {p for v in direct_paths.values() for p in v.values()} == {"bound"}
    for env_id in asgi:
        for tool, expected in asgi[env_id].items():
            assert direct[env_id][tool] == expected, (env_id, tool)
    kinds = {r[2] for v in direct.values() for r in v.values()}
    assert None in kinds  # at least some example calls succeed, so content is compared too
    errors = [r[3] for v in direct.values() for r in v.values() if r[3]]
    assert any(e.startswith("HTTP 422") for e in errors)  # FastAPI's validation errors are compared too

"""The AWM-1K direct route-handler path gives what the full ASGI app gives: same content, same
error kinds and messages, for every tool of the shared samples called with its spec examples."""
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


def _results(envs, asgi: bool):
    settings = load_settings()
    out = {}
    with SandboxPool(settings.sandbox.model_copy(update={"awm1k_asgi": asgi}), workers=1) as pool:
        for env in envs:
            handle = pool.load(env)
            routed = {}
            with handle.open_session() as s:
                for tool in env.api_spec.tools:
                    r = s.call(tool.name, tool.example_arguments())
                    routed[tool.name] = (r.ok, _mask(r.content), r.error_kind, _mask(r.error))
            out[env.id] = routed
    return out


def test_direct_and_asgi_paths_agree_on_every_sample_tool(awm1k_samples):
    envs = [e for e in read_dir(awm1k_samples).environments
            if e.code is not None and e.flavour == "awm1k" and e.api_spec is not None]
    if not envs:
        pytest.skip(f"no AWM-1K sample in {awm1k_samples} has both code and a tool spec")
    direct, asgi = _results(envs, asgi=False), _results(envs, asgi=True)
    assert sum(len(v) for v in direct.values()) > 0
    for env_id in asgi:
        for tool, expected in asgi[env_id].items():
            assert direct[env_id][tool] == expected, (env_id, tool)
    kinds = {r[2] for v in direct.values() for r in v.values()}
    assert None in kinds  # at least some example calls succeed, so content is compared too

"""The MCP server with the official SDK client: in-process and over streamable HTTP."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import mcp
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_envs import awm1k_environment, notes_environment, serve_app  # noqa: E402

from awm_core.runtime import SandboxPool  # noqa: E402
from awm_core.runtime.mcp_server import EnvMCPServer, http_app  # noqa: E402


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, call_timeout_s=20) as p:
        yield p


@pytest.fixture(scope="module")
def notes_server(pool):
    srv = EnvMCPServer(pool, [notes_environment(env_id="mcp_notes")])
    yield srv
    srv.close()


def _titles(result) -> list[str]:
    return [n["title"] for n in json.loads(result.content[0].text)]


def test_lists_env_tools_with_exact_schemas_and_meta_tools(notes_server):
    async def main():
        async with mcp.Client(notes_server.server, mode="legacy") as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert {"list_tools", "call_tool", "create_note", "list_notes"} <= set(tools)
            assert tools["create_note"].input_schema["required"] == ["title"]
            listing = json.loads((await c.call_tool("list_tools", {})).content[0].text)
            assert {t["name"] for t in listing} == {"create_note", "list_notes", "get_note", "delete_note", "buggy_count"}
    anyio.run(main)


def test_each_connection_gets_its_own_database(notes_server):
    async def main():
        async with mcp.Client(notes_server.server, mode="legacy") as a, \
                mcp.Client(notes_server.server, mode="legacy") as b:
            r = await a.call_tool("create_note", {"title": "from a"})
            assert not r.is_error and json.loads(r.content[0].text)["title"] == "from a"
            assert "from a" in _titles(await a.call_tool("list_notes", {}))
            assert "from a" not in _titles(await b.call_tool("list_notes", {}))
            via_meta = await a.call_tool("call_tool", {"tool_name": "mcp_tool_list_notes", "arguments": '{"limit": 1}'})
            assert _titles(via_meta) == ["from a"]
            bad = await a.call_tool("create_note", {"title": 7})
            assert bad.is_error and "invalid_arguments" in bad.content[0].text
            unknown = await a.call_tool("call_tool", {"tool_name": "nope", "arguments": {}})
            assert unknown.is_error and "unknown_tool" in unknown.content[0].text
    anyio.run(main)


def test_stateless_clients_pick_their_session_with_meta(notes_server):
    async def main():
        async with mcp.Client(notes_server.server) as c:
            await c.call_tool("create_note", {"title": "k1 note"}, meta={"awm/session": "k1"})
            assert "k1 note" in _titles(await c.call_tool("list_notes", {}, meta={"awm/session": "k1"}))
            assert "k1 note" not in _titles(await c.call_tool("list_notes", {}, meta={"awm/session": "k2"}))
    anyio.run(main)


def test_several_environments_are_prefixed(pool, awm1k_samples):
    srv = EnvMCPServer(pool, [notes_environment(env_id="mcp_notes2"), awm1k_environment(awm1k_samples)])

    async def main():
        async with mcp.Client(srv.server, mode="legacy") as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert "mcp_notes2.create_note" in names and "content_platform_1.search_channels" in names
            r = await c.call_tool("content_platform_1.search_channels", {"query": "Kurzgesagt"})
            assert not r.is_error and json.loads(r.content[0].text)["channels"][0]["id"] == 1
    try:
        anyio.run(main)
    finally:
        srv.close()


def _serve_http(pool, samples, main, app=None) -> None:
    """content_platform_1 behind ``awm env serve``'s HTTP app; ``main(url)`` runs against it.
    ``app``: a function of the EnvMCPServer giving the ASGI app (default ``http_app``)."""
    srv = EnvMCPServer(pool, [awm1k_environment(samples)])
    try:
        serve_app((app or http_app)(srv), main)
    finally:
        srv.close()


def test_streamable_http(pool, awm1k_samples):

    async def main(url):
        async with mcp.Client(url, mode="legacy") as a, mcp.Client(url, mode="legacy") as b:
            assert len((await a.list_tools()).tools) == 34 + 2
            r = await a.call_tool("subscribe_to_channel", {"channel_id": 1})
            assert not r.is_error, r.content[0].text
            subs_a = json.loads((await a.call_tool("list_user_subscriptions", {})).content[0].text)
            subs_b = json.loads((await b.call_tool("list_user_subscriptions", {})).content[0].text)
            assert 1 in {s["channel_id"] for s in subs_a["subscriptions"]}
            assert 1 not in {s["channel_id"] for s in subs_b["subscriptions"]}
        async with mcp.Client(url) as modern:
            r = await modern.call_tool("search_channels", {"query": "Kurz"}, meta={"awm/session": "m1"})
            assert not r.is_error
    _serve_http(pool, awm1k_samples, main)


def test_many_concurrent_http_clients_each_keep_their_own_database(pool, awm1k_samples):
    """Eight clients at once on one server, half with MCP sessions and half stateless (their
    environment session named in _meta): each sees only its own subscription."""
    seen: dict[int, list[int]] = {}

    async def client(url: str, i: int) -> None:
        legacy = i % 2 == 0
        meta = None if legacy else {"awm/session": f"conc-{i}"}
        async with mcp.Client(url, **({"mode": "legacy"} if legacy else {})) as c:
            r = await c.call_tool("subscribe_to_channel", {"channel_id": 1 + i}, meta=meta)
            assert not r.is_error, r.content[0].text
            subs = json.loads((await c.call_tool("list_user_subscriptions", {}, meta=meta)).content[0].text)
            seen[i] = [s["channel_id"] for s in subs["subscriptions"]]

    async def main(url):
        async with mcp.Client(url, mode="legacy") as c:
            subs = json.loads((await c.call_tool("list_user_subscriptions", {})).content[0].text)
            seen[-1] = [s["channel_id"] for s in subs["subscriptions"]]  # the seed data's own
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(client, url, i)

    _serve_http(pool, awm1k_samples, main)
    # Each client subscribed to its own channel; a shared database would show the others' too.
    seed = set(seen.pop(-1))
    assert len(seen) == 8 and len(set(range(1, 9)) - seed) >= 2
    for i, subs in seen.items():
        assert set(subs) == seed | {1 + i}, (i, subs)


def test_sixteen_concurrent_clients_each_get_their_own_environment_session(pool, awm1k_samples):
    """Sixteen MCP clients at once against one server: modern (stateless, session named in
    _meta), handshake-era with an MCP session, and handshake-era served statelessly (session
    named by the X-AWM-Session header). Each writes twice and sees only its own writes."""
    import httpx
    from mcp.client.streamable_http import streamable_http_client

    seen: dict[int, list[int]] = {}

    async def client(url: str, i: int) -> None:
        kind = i % 3
        meta = {"awm/session": f"c16-{i}"} if kind == 0 else None
        if kind == 2:
            target = streamable_http_client(url, http_client=httpx.AsyncClient(headers={"X-AWM-Session": f"h16-{i}"}))
        else:
            target = url
        async with mcp.Client(target, **({} if kind == 0 else {"mode": "legacy"})) as c:
            seed = sorted(seen[-1])
            free = sorted(set(range(1, 11)) - set(seed))  # the seed data has channels 1-10
            r = await c.call_tool("subscribe_to_channel", {"channel_id": free[i % len(free)]}, meta=meta)
            assert not r.is_error, r.content[0].text
            r = await c.call_tool("unsubscribe_from_channel", {"channel_id": seed[i % len(seed)]}, meta=meta)
            assert not r.is_error, r.content[0].text
            subs = json.loads((await c.call_tool("list_user_subscriptions", {"limit": 100}, meta=meta)).content[0].text)
            seen[i] = [s["channel_id"] for s in subs["subscriptions"]]

    async def main(url):
        async with mcp.Client(url) as c:
            subs = json.loads((await c.call_tool("list_user_subscriptions", {"limit": 100},
                                                 meta={"awm/session": "seed"})).content[0].text)
            seen[-1] = [s["channel_id"] for s in subs["subscriptions"]]
        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(client, url, i)

    _serve_http(pool, awm1k_samples, main)
    seed = sorted(seen.pop(-1))
    free = sorted(set(range(1, 11)) - set(seed))
    assert len(seen) == 16 and len(seed) >= 2 and len(free) >= 2
    for i, subs in seen.items():
        assert set(subs) == set(seed) - {seed[i % len(seed)]} | {free[i % len(free)]}, (i, subs)


def _post(client, url: str, body: dict, headers: dict | None = None):
    return client.post(url, json=body, headers={"accept": "application/json, text/event-stream", **(headers or {})})


def test_stateless_json_mode_answers_a_tool_call(pool, awm1k_samples):
    """``awm env serve --stateless``: a handshake-era initialize gets no MCP session; a plain
    JSON-RPC tools/call (no session id) is one JSON response; sessions are kept by name."""
    import httpx

    from awm_core.runtime.mcp_server import http_app as app_of

    async def main(url):
        async with httpx.AsyncClient() as h:
            init = await _post(h, url, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
            assert init.status_code == 200 and "mcp-session-id" not in init.headers
            assert init.json()["result"]["protocolVersion"] == "2025-06-18"

            async def call(tool, args, session):
                r = await _post(h, url, {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                                         "params": {"name": tool, "arguments": args}},
                                {"X-AWM-Session": session, "mcp-protocol-version": "2025-06-18"})
                assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
                body = r.json()
                assert body["id"] == 7 and body["result"]["isError"] is False, body
                return json.loads(body["result"]["content"][0]["text"])

            found = await call("search_channels", {"query": "Kurzgesagt"}, "s1")
            assert found["channels"][0]["id"] == 1
            await call("subscribe_to_channel", {"channel_id": 3}, "s1")
            mine = await call("list_user_subscriptions", {"limit": 100}, "s1")
            other = await call("list_user_subscriptions", {"limit": 100}, "s2")
            assert 3 in {s["channel_id"] for s in mine["subscriptions"]}
            assert 3 not in {s["channel_id"] for s in other["subscriptions"]}
            listed = await _post(h, url, {"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {}},
                                 {"mcp-protocol-version": "2025-06-18"})
            assert len(listed.json()["result"]["tools"]) == 34 + 2

    _serve_http(pool, awm1k_samples, main, app=lambda srv: app_of(srv, stateless=True))


def test_fast_path_answers_what_the_sdk_answers(pool, awm1k_samples):
    """The same session-less tools/call requests (modern and handshake-era; a result, a tool
    error, an unknown tool) through the fast path and through the SDK give the same reply: each
    one issued a session where a tool ran (the ids differ, nothing else does)."""
    import httpx

    from awm_core.runtime.mcp_http import McpHttpEndpoint

    endpoints = []

    def app(srv):
        endpoints.append(McpHttpEndpoint(srv))
        return endpoints[0].app()

    modern = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call"}
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    cases = [({**modern, "mcp-name": name}, {"name": name, "arguments": args, "_meta": meta})
             for name, args in [("search_channels", {"query": "Kurz"}), ("get_channel_by_id", {"channel_id": "x"}),
                                ("nope", {})]]
    cases += [({"mcp-protocol-version": "2025-06-18"}, {"name": "search_channels", "arguments": {"query": "Kurz"}}),
              ({}, {"name": "call_tool", "arguments": {"tool_name": "mcp_tool_search_channels",
                                                       "arguments": '{"query": "Kurz"}'}})]

    async def main(url):
        async with httpx.AsyncClient() as h:
            for headers, params in cases:
                replies = []
                for fast in (True, False):
                    endpoints[0].fast = fast
                    r = await _post(h, url, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params},
                                    headers)
                    body = r.json()
                    issued = body.get("result", {}).get("_meta", {}).get("awm/session")
                    if params["name"] != "nope":  # a tool ran: a session was issued for it
                        assert issued and issued.startswith("awm-") and len(issued) >= 4 + 32, body
                        body["result"]["_meta"]["awm/session"] = "<issued>"
                    else:
                        assert issued is None, body
                    replies.append((r.status_code, r.headers["content-type"], body))
                assert replies[0] == replies[1], (params, replies)
                assert "result" in replies[0][2], replies[0]

    _serve_http(pool, awm1k_samples, main, app=app)

"""Serving to other machines: bearer tokens, server-issued sessions, limits and expiry."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import httpx
import mcp
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_envs import notes_environment, serve_app  # noqa: E402

from awm_core.errors import InputError, SessionError  # noqa: E402
from awm_core.runtime import SandboxPool  # noqa: E402
from awm_core.runtime.access import (  # noqa: E402
    SESSION_EXPIRED,
    SESSION_LIMIT,
    UNAUTHORIZED,
    ClientSessions,
    Tokens,
    check_bind,
    owner_of,
)
from awm_core.runtime.mcp_server import EnvMCPServer, http_app  # noqa: E402

TOKEN_A = "a" * 8 + "-token-for-trainer-one"
TOKEN_B = "b" * 8 + "-token-for-trainer-two"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# ---------------------------------------------------------------------- sessions, no server
def test_a_named_session_is_kept_then_expires_into_an_error_not_a_fresh_one():
    clock = Clock()
    table = ClientSessions(idle_s=60, max_sessions=10, clock=clock)
    first = table.named(None, "ep-1")
    assert table.named(None, "ep-1") is first
    clock.now += 59
    assert table.expire() == 0 and table.named(None, "ep-1") is first  # the touch restarts the clock
    clock.now += 61
    assert table.expire() == 1 and first.expired
    with pytest.raises(SessionError) as err:
        table.named(None, "ep-1")
    assert err.value.code == SESSION_EXPIRED and "ep-1" in str(err.value) and "expired" in str(err.value)
    assert table.stats()["live"] == 0 and table.stats()["expired"] == 1


def test_issued_ids_are_unguessable_and_an_unknown_one_is_an_error():
    table = ClientSessions(max_sessions=10)
    ids = [table.issue(None)[0] for _ in range(5)]
    assert len(set(ids)) == 5 and all(i.startswith("awm-") and len(i) >= 4 + 32 for i in ids)
    assert all(table.named(None, i).key == (None, i) for i in ids)
    with pytest.raises(SessionError) as err:
        table.named(None, "awm-" + "x" * 32)  # never issued: not opened on a client's say-so
    assert err.value.code == SESSION_EXPIRED


def test_a_name_is_scoped_to_its_token():
    table = ClientSessions(max_sessions=10)
    assert table.named("token-a", "ep") is not table.named("token-b", "ep")
    issued, _ = table.issue("token-a")
    with pytest.raises(SessionError):
        table.named("token-b", issued)  # another token cannot reach it, even knowing the id


def test_past_the_limit_a_new_session_is_refused_and_live_ones_stay():
    clock = Clock()
    table = ClientSessions(idle_s=60, max_sessions=3, max_per_owner=2, clock=clock)
    a1, a2 = table.named("a", "1"), table.named("a", "2")
    with pytest.raises(SessionError) as err:
        table.named("a", "3")
    assert err.value.code == SESSION_LIMIT and "max_sessions_per_token = 2" in str(err.value)
    assert err.value.data == {"limit": 2, "live": 2, "scope": "token"}
    b1 = table.named("b", "1")
    with pytest.raises(SessionError) as err:
        table.issue("b")
    assert "server.max_sessions = 3" in str(err.value) and err.value.data["scope"] == "server"
    assert table.named("a", "1") is a1 and table.named("a", "2") is a2 and table.named("b", "1") is b1
    assert not (a1.expired or a2.expired or b1.expired)
    clock.now += 61  # idle ones make room once they expire, on the next open
    assert table.issue("b")[1] is not None and table.stats()["live"] == 1


def test_a_busy_session_does_not_expire_mid_call():
    clock = Clock()
    table = ClientSessions(idle_s=10, clock=clock)
    state = table.named(None, "long")
    table.begin(state)
    clock.now += 100
    assert table.expire() == 0 and not state.expired
    table.end(state)
    clock.now += 11
    assert table.expire() == 1 and state.expired


def test_expired_names_are_remembered_up_to_a_bound():
    clock = Clock()
    table = ClientSessions(idle_s=1, max_sessions=4, remember_expired=3, clock=clock)
    for i in range(5):
        table.named(None, f"n{i}")
        clock.now += 2
        table.expire()
    assert len(table._expired) == 3  # the oldest forgotten: memory stays bounded


def test_bad_limits_are_refused():
    for kwargs in ({"max_sessions": 0}, {"max_per_owner": -1}, {"idle_s": 0}):
        with pytest.raises(ValueError):
            ClientSessions(**kwargs)


# ---------------------------------------------------------------------- tokens
def test_tokens_from_a_file_and_settings(tmp_path):
    f = tmp_path / "tokens"
    f.write_text(f"# trainers\n{TOKEN_A}\n\n{TOKEN_B}\n")
    tokens = Tokens.from_sources(None, f)
    assert len(tokens) == 2
    a, b = tokens.principal(f"Bearer {TOKEN_A}".encode()), tokens.principal(f"bearer {TOKEN_B}".encode())
    assert a.access_token.client_id != b.access_token.client_id
    assert TOKEN_A not in a.access_token.client_id  # the id does not give the token away
    assert tokens.principal(b"Bearer " + TOKEN_A[:-1].encode()) is None
    assert tokens.principal(TOKEN_A.encode()) is None and tokens.principal(None) is None
    assert anyio.run(tokens.verify_token, TOKEN_B).client_id == b.access_token.client_id
    assert Tokens.from_sources(None, None) is None
    assert len(Tokens.from_sources(TOKEN_A, f)) == 2


@pytest.mark.parametrize("content, fragment", [(None, "does not exist"), ("# none\n\n", "holds no token"),
                                               ("short\n", "at least 16 characters")])
def test_bad_token_files_are_clear_errors(tmp_path, content, fragment):
    f = tmp_path / "tokens"
    if content is not None:
        f.write_text(content)
    with pytest.raises(InputError, match=fragment):
        Tokens.from_sources(None, f)


def test_an_open_bind_needs_a_token():
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    with pytest.raises(InputError, match="--token-file"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", Tokens([TOKEN_A]))


# ---------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=1, call_timeout_s=20) as p:
        yield p


def _serve(pool, main, *, sessions=None, tokens=(TOKEN_A, TOKEN_B), max_body=None):
    """The notes environment behind the HTTP app with tokens; ``main(url, server)``."""
    srv = EnvMCPServer(pool, [notes_environment(env_id="served_notes")], sessions=sessions)

    async def run(url):
        await main(url, srv)

    try:
        serve_app(http_app(srv, tokens=Tokens(list(tokens)) if tokens else None, max_body=max_body), run)
    finally:
        srv.close()


def _rpc(name, arguments, *, rid=1):
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


async def _post(h, url, body, token=TOKEN_A, session=None, **headers):
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-06-18", **headers}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if session:
        headers["x-awm-session"] = session
    return await h.post(url, json=body, headers=headers)


def _titles(reply) -> list[str]:
    return [n["title"] for n in json.loads(reply["result"]["content"][0]["text"])]


def _owner(token: str) -> str:
    return owner_of(Tokens([token]).principal(f"Bearer {token}".encode()))


def _client(url: str, token: str):
    from mcp.client.streamable_http import streamable_http_client

    return streamable_http_client(url, http_client=httpx.AsyncClient(headers={"authorization": f"Bearer {token}"}))


def test_requests_without_the_right_token_are_refused_before_any_mcp_work(pool):
    async def main(url, server):
        async with httpx.AsyncClient() as h:
            for token in (None, "wrong-token-of-enough-length"):
                r = await _post(h, url, _rpc("create_note", {"title": "x"}), token=token, session="s")
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
                body = r.json()
                assert body["jsonrpc"] == "2.0" and body["error"]["code"] == UNAUTHORIZED, body
                assert "bearer token" in body["error"]["message"]
            r = await h.get(url, headers={"accept": "text/event-stream"})  # every method, not only calls
            assert r.status_code == 401
            assert server.sessions.stats()["live"] == 0  # nothing was opened for them
            r = await _post(h, url, _rpc("create_note", {"title": "x"}), session="s")
            assert r.status_code == 200 and r.json()["result"]["isError"] is False

    _serve(pool, main)


def test_one_token_cannot_reach_another_tokens_session(pool):
    async def main(url, server):
        async with httpx.AsyncClient() as h:
            r = await _post(h, url, _rpc("create_note", {"title": "A's secret"}), token=TOKEN_A, session="ep")
            assert r.json()["result"]["isError"] is False
            mine = (await _post(h, url, _rpc("list_notes", {}), token=TOKEN_A, session="ep")).json()
            theirs = (await _post(h, url, _rpc("list_notes", {}), token=TOKEN_B, session="ep")).json()
            assert "A's secret" in _titles(mine) and "A's secret" not in _titles(theirs)
            # An issued id, even known to the other token, is still not theirs.
            r = await _post(h, url, _rpc("create_note", {"title": "issued"}), token=TOKEN_A)
            issued = r.headers["x-awm-session"]
            assert r.json()["result"]["_meta"]["awm/session"] == issued
            stolen = (await _post(h, url, _rpc("list_notes", {}), token=TOKEN_B, session=issued)).json()
            assert stolen["error"]["code"] == SESSION_EXPIRED and "result" not in stolen
            # An MCP session (handshake era) opened with A answers B as if it did not exist.
            init = await _post(h, url, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
            sid = init.headers["mcp-session-id"]
            listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
            assert (await _post(h, url, listing, token=TOKEN_B, **{"mcp-session-id": sid})).status_code == 404
            assert (await _post(h, url, listing, token=TOKEN_A, **{"mcp-session-id": sid})).status_code == 200

    _serve(pool, main)


def test_a_modern_client_is_issued_a_session_and_keeps_it(pool):
    async def main(url, server):
        async with mcp.Client(_client(url, TOKEN_A)) as c:
            first = await c.call_tool("create_note", {"title": "kept"})
            sid = first.meta["awm/session"]
            again = await c.call_tool("list_notes", {}, meta={"awm/session": sid})
            assert "kept" in [n["title"] for n in json.loads(again.content[0].text)]
            other = await c.call_tool("list_notes", {})  # names none: a new session of its own
            assert "kept" not in [n["title"] for n in json.loads(other.content[0].text)]
            assert other.meta["awm/session"] != sid
        assert server.sessions.stats()["live"] == 2

    _serve(pool, main)


def test_an_expired_session_is_an_error_and_its_worker_state_is_freed(pool):
    clock = Clock()  # the sweeper runs on its own (every 0.1 s here); the clock says when a session is idle

    async def main(url, server):
        async with httpx.AsyncClient() as h:
            await _post(h, url, _rpc("create_note", {"title": "before"}), session="slow-agent")
            state = server.sessions.named(_owner(TOKEN_A), "slow-agent")
            opened = list(state.sessions.values())
            assert opened and not any(s.closed for s in opened)
            clock.now += 1
            for _ in range(100):  # the sweeper runs with no request arriving
                await anyio.sleep(0.05)
                if state.expired and not any(w.pending_close for w in pool._workers):
                    break
            assert state.expired and all(s.closed for s in opened)
            assert not any(w.pending_close for w in pool._workers)  # the worker was told to free it
            r = (await _post(h, url, _rpc("list_notes", {}), session="slow-agent")).json()
            assert r["error"]["code"] == SESSION_EXPIRED and "slow-agent" in r["error"]["message"], r
            r = (await _post(h, url, _rpc("list_notes", {}), session="slow-agent-2")).json()
            assert r["result"]["isError"] is False and "before" not in _titles(r)  # a new name: a new one

    _serve(pool, main, sessions=ClientSessions(idle_s=0.4, max_sessions=16, clock=clock))


def test_an_mcp_sessions_environment_expires_into_an_error_too(pool):
    clock = Clock()

    async def main(url, server):
        async with mcp.Client(_client(url, TOKEN_A), mode="legacy") as c:
            assert not (await c.call_tool("create_note", {"title": "legacy"})).is_error
            clock.now += 61
            assert server.sessions.expire() == 1
            with pytest.raises(mcp.MCPError) as err:
                await c.call_tool("list_notes", {})
            assert err.value.code == SESSION_EXPIRED and "initialize a new MCP session" in str(err.value)

    _serve(pool, main, sessions=ClientSessions(idle_s=60, max_sessions=16, clock=clock))


def test_the_limit_returns_its_error_and_the_server_keeps_serving(pool):
    async def main(url, server):
        async with httpx.AsyncClient() as h:
            for name in ("one", "two"):
                r = (await _post(h, url, _rpc("create_note", {"title": name}), session=name)).json()
                assert r["result"]["isError"] is False
            refused = (await _post(h, url, _rpc("create_note", {"title": "three"}), session="three")).json()
            assert refused["error"]["code"] == SESSION_LIMIT, refused
            assert "server.max_sessions = 2" in refused["error"]["message"]
            assert refused["error"]["data"]["limit"] == 2
            for name in ("one", "two"):  # never evicted to make room
                r = (await _post(h, url, _rpc("list_notes", {}), session=name)).json()
                assert name in _titles(r)
            listed = (await _post(h, url, _rpc("list_tools", {}))).json()  # needs no session
            assert listed["result"]["isError"] is False

    _serve(pool, main, sessions=ClientSessions(max_sessions=2))


def test_a_body_over_the_limit_is_refused_before_parsing(pool):
    async def main(url, server):
        async with httpx.AsyncClient() as h:
            r = await _post(h, url, _rpc("create_note", {"title": "x" * 5000}), session="s")
            assert r.status_code == 413
            assert server.sessions.stats()["live"] == 0
            r = await _post(h, url, _rpc("create_note", {"title": "small"}), session="s")
            assert r.status_code == 200

    _serve(pool, main, max_body=2048)

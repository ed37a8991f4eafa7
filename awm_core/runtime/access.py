"""Who may use a served environment, and which environment session each request reaches.

``Tokens``: the bearer tokens ``awm env serve`` accepts, compared in constant time. Each token
is a principal in the MCP SDK's own authorization model (an ``AccessToken`` behind an
``AuthenticatedUser`` in the request scope), so the SDK binds every MCP session it issues to
the token that opened it, and this module scopes client-chosen session names the same way.

``ClientSessions``: the environment sessions of one server's clients. A client reaches one
of three kinds:

- an MCP connection's own (handshake-era clients with an ``Mcp-Session-Id``);
- a session the server issued (``awm-`` and 192 random bits), handed out on the first tool
  call that names none, over HTTP;
- a name the client chose (``X-AWM-Session: episode-17``), scoped to its token.

Live sessions are never evicted to make room: past ``max_sessions`` (per server) or
``max_per_owner`` (per token) a new one is refused with an error naming the limit. A session
idle for ``idle_s`` is closed (its worker state freed) and remembered as expired, so its next
call is a "session expired" error, never a fresh database behind the client's back.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
import weakref
from collections import Counter, OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable

from awm_core.errors import InputError, SessionError

if TYPE_CHECKING:
    from awm_core.runtime.pool import EnvHandle, Session

# JSON-RPC codes in the range the spec leaves to servers (-32000 to -32099), away from the SDK's.
SESSION_EXPIRED = -32050
SESSION_LIMIT = -32051
UNAUTHORIZED = -32060

SESSION_META_KEY = "awm/session"   # where a request names its session, and a reply gives an issued id
SESSION_HEADER = "x-awm-session"   # the same over HTTP, for clients that cannot set _meta
ISSUED_PREFIX = "awm-"
MIN_TOKEN_CHARS = 16
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tokens: "Tokens | None") -> None:
    """Refuse to serve an address other than loopback without a token."""
    if tokens is None and not is_loopback(host):
        raise InputError(f"refusing to serve on {host} without a token: anyone who can reach the port could "
                         "read and change every client's environment; give one with --token-file FILE or "
                         "AWM_SERVER__TOKEN, or bind 127.0.0.1")


class Tokens:
    """The bearer tokens a server accepts; ``principal`` maps an ``Authorization`` header to the
    SDK's ``AuthenticatedUser`` (or None)."""

    def __init__(self, tokens: list[str]):
        from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
        from mcp.server.auth.provider import AccessToken

        self._users: list[tuple[bytes, Any]] = []
        for token in dict.fromkeys(tokens):
            if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
                raise InputError(f"a server token must be at least {MIN_TOKEN_CHARS} characters with no spaces "
                                 f"(got one of {len(token)}); make one with: {MAKE_TOKEN}")
            client_id = "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]
            self._users.append((token.encode(), AuthenticatedUser(AccessToken(token=token, client_id=client_id,
                                                                              scopes=[]))))
        if not self._users:
            raise InputError(f"no server token given; make one with: {MAKE_TOKEN}")

    @classmethod
    def from_sources(cls, token: str | None, token_file: Path | None) -> "Tokens | None":
        """The tokens of ``server.token`` and a token file (one per line; blank lines and lines
        starting with # ignored); None when neither gives any."""
        found = [token] if token else []
        if token_file is not None:
            try:
                text = Path(token_file).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise InputError(f"token file {token_file} does not exist") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"token file {token_file} cannot be read: {exc}") from None
            lines = [ln.strip() for ln in text.splitlines()]
            listed = [ln for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise InputError(f"token file {token_file} holds no token (one per line); make one with: {MAKE_TOKEN}")
            found += listed
        return cls(found) if found else None

    def __len__(self) -> int:
        return len(self._users)

    def principal(self, authorization: bytes | None) -> Any:
        """The ``AuthenticatedUser`` of a ``Bearer`` header value, else None. Every token is
        compared (no early exit), each in constant time."""
        if not authorization or authorization[:7].lower() != b"bearer ":
            return None
        presented = authorization[7:].strip()
        found = None
        for secret, user in self._users:
            if hmac.compare_digest(presented, secret):
                found = user
        return found

    async def verify_token(self, token: str) -> Any:
        """The SDK's ``TokenVerifier`` protocol: the ``AccessToken`` of ``token``, else None."""
        user = self.principal(b"Bearer " + token.encode())
        return user.access_token if user is not None else None


def owner_of(user: Any) -> str | None:
    """The principal that owns sessions: the token's client id, None on a server without tokens."""
    token = getattr(user, "access_token", None)
    return token.client_id if token is not None else None


class ClientState:
    """The environment sessions of one client (one per environment, opened lazily)."""

    def __init__(self, key: Hashable = None, owner: str | None = None):
        self.key = key
        self.owner = owner
        self.sessions: dict[str, "Session"] = {}
        self.lock = threading.Lock()
        self._opening: dict[str, asyncio.Future] = {}
        self.last_used = time.monotonic()
        self.busy = 0
        self.expired = False

    async def asession(self, handle: "EnvHandle") -> "Session":
        s = self.sessions.get(handle.id)
        if s is not None:
            return s
        pending = self._opening.get(handle.id)
        if pending is not None:  # a concurrent call of this client is opening it
            return await asyncio.shield(pending)
        fut = self._opening[handle.id] = asyncio.get_running_loop().create_future()
        try:
            s = await handle.aopen_session()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # marked retrieved: the waiters, if any, get it too
            raise
        finally:
            self._opening.pop(handle.id, None)
        with self.lock:
            old = self.sessions.get(handle.id)
            if old is not None or self.expired:  # opened from a thread meanwhile, or expired while opening
                s.close_later()
                if old is None:
                    raise _expired(self.key)
                s = old
            else:
                self.sessions[handle.id] = s
        fut.set_result(s)
        return s

    def close(self) -> None:
        # Called from finalizers too, so never wait on a worker here.
        for s in list(self.sessions.values()):
            s.close_later()
        self.sessions.clear()


def _expired(key: Hashable) -> SessionError:
    name = key[1] if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], str) else None
    if name is None:
        return SessionError(SESSION_EXPIRED, "this MCP session's environment session expired: its database is "
                                             "gone; initialize a new MCP session to start again", {"session": None})
    return SessionError(SESSION_EXPIRED, f"session {name!r} expired or is unknown: its database is gone; start a "
                                         "new session (call without one to be issued a new id, or use a new name)",
                        {"session": name})


class ClientSessions:
    """The live client states of one server, bounded, expiring, and never silently replaced."""

    def __init__(self, *, idle_s: float | None = None, max_sessions: int = 1024, max_per_owner: int | None = None,
                 remember_expired: int | None = None, clock: Callable[[], float] = time.monotonic):
        for name, value in (("max_sessions", max_sessions), ("max_per_owner", max_per_owner),
                            ("remember_expired", remember_expired)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if idle_s is not None and not idle_s > 0:
            raise ValueError(f"idle_s must be a positive number of seconds, got {idle_s}")
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.max_per_owner = max_per_owner or max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._live: OrderedDict[Hashable, ClientState] = OrderedDict()  # least recently used first
        self._per_owner: Counter = Counter()
        self._expired: OrderedDict[Hashable, None] = OrderedDict()
        self._remember = remember_expired or 16 * max_sessions
        self._by_connection: "weakref.WeakKeyDictionary[Any, ClientState]" = weakref.WeakKeyDictionary()
        self._connections = 0
        # Sessions of connections that went away, queued by finalizers: a finalizer may run in
        # a thread that holds the lock, so it only appends here, and the next locked step drops them.
        self._gone: list[ClientState] = []
        self.expired_total = 0

    # ------------------------------------------------------------------ lookups
    def named(self, owner: str | None, name: str) -> ClientState:
        """The session a client names: one the server issued (unknown or expired: an error), or a
        name of its own (opened on first use; expired: an error)."""
        key = (owner, name)
        with self._lock:
            self._reap()
            state = self._live.get(key)
            if state is not None:
                return self._touch(state)
            if name.startswith(ISSUED_PREFIX) or key in self._expired:
                raise _expired(key)
            return self._open(key, owner)

    def issue(self, owner: str | None) -> tuple[str, ClientState]:
        """A new server-issued session: its id (unguessable) and its state."""
        name = ISSUED_PREFIX + secrets.token_urlsafe(24)
        with self._lock:
            self._reap()
            return name, self._open((owner, name), owner)

    def of_connection(self, owner: str | None, connection: Any) -> ClientState:
        """The session of an MCP connection, closed when the connection goes away."""
        with self._lock:
            self._reap()
            state = self._by_connection.get(connection)
            if state is None:
                self._connections += 1
                state = self._by_connection[connection] = self._open(("connection", self._connections), owner)
                weakref.finalize(connection, self._forget, state)
            elif state.expired:
                raise _expired(state.key)
            return self._touch(state)

    def _touch(self, state: ClientState) -> ClientState:
        state.last_used = self._clock()
        self._live.move_to_end(state.key)
        return state

    def _open(self, key: Hashable, owner: str | None) -> ClientState:
        # (lock held)
        if len(self._live) >= self.max_sessions or self._per_owner[owner] >= self.max_per_owner:
            self._expire(self._clock())
        if len(self._live) >= self.max_sessions:
            raise SessionError(SESSION_LIMIT, f"session limit reached: {len(self._live)} sessions are live on this "
                               f"server (server.max_sessions = {self.max_sessions}); live sessions are never evicted: "
                               f"retry when one expires (after {self.idle_s} s idle) or raise the limit",
                               {"limit": self.max_sessions, "live": len(self._live), "scope": "server"})
        if self._per_owner[owner] >= self.max_per_owner:
            raise SessionError(SESSION_LIMIT, f"session limit reached: this token holds {self._per_owner[owner]} live "
                               f"sessions (server.max_sessions_per_token = {self.max_per_owner}); retry when one "
                               f"expires (after {self.idle_s} s idle) or raise the limit",
                               {"limit": self.max_per_owner, "live": self._per_owner[owner], "scope": "token"})
        state = ClientState(key, owner)
        state.last_used = self._clock()
        self._live[key] = state
        self._per_owner[owner] += 1
        return state

    # ------------------------------------------------------------------ use and expiry
    def begin(self, state: ClientState) -> None:
        """A call on ``state`` starts: it is not expired while the call runs."""
        state.busy += 1

    def end(self, state: ClientState) -> None:
        state.busy -= 1
        with self._lock:
            if state.key in self._live:
                self._touch(state)

    def expire(self) -> int:
        """Close every session idle for ``idle_s`` or longer; the number closed."""
        with self._lock:
            self._reap()
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        if self.idle_s is None:
            return 0
        closed, skipped = 0, []
        while self._live:
            key, state = next(iter(self._live.items()))
            if now - state.last_used < self.idle_s:
                break
            self._live.popitem(last=False)
            if state.busy:  # a long call: idle only once it ends
                skipped.append(state)
                continue
            self._drop(state)
            self._expired[key] = None
            closed += 1
        for state in skipped:
            self._live[state.key] = state
        while len(self._expired) > self._remember:
            self._expired.popitem(last=False)
        self.expired_total += closed
        return closed

    def _drop(self, state: ClientState) -> None:
        # (lock held; the state is already out of _live)
        state.expired = True
        self._per_owner[state.owner] -= 1
        if self._per_owner[state.owner] <= 0:
            del self._per_owner[state.owner]
        state.close()

    def _forget(self, state: ClientState) -> None:
        """An MCP connection went away (a finalizer: never locks, never waits)."""
        self._gone.append(state)

    def _reap(self) -> None:
        # (lock held)
        while self._gone:
            state = self._gone.pop()
            if self._live.pop(state.key, None) is not None:
                self._drop(state)

    def close(self) -> None:
        with self._lock:
            states = list(self._live.values())
            self._live.clear()
            self._per_owner.clear()
        for s in states:
            s.expired = True
            s.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"live": len(self._live), "owners": len(self._per_owner), "expired": self.expired_total,
                    "max_sessions": self.max_sessions, "max_per_owner": self.max_per_owner, "idle_s": self.idle_s}

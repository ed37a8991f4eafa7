"""awm env: look at, call, check, serve and export environments through the sandbox runtime.

``BUNDLE_OR_ID`` is a path to an Environment bundle ``.json`` file, or else an environment
id looked up in the catalog (newest snapshot, or ``--snapshot N``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from flows.commands import count, group, non_negative, port, seconds


def register(sub) -> None:
    actions = group(sub, "env", "environments: list tools, call one, check all, serve over MCP, export bundles")

    def target(p, many=False):
        p.add_argument("env", nargs="+" if many else None, metavar="BUNDLE_OR_ID",
                       help="a bundle .json file, or an environment id in the catalog")
        p.add_argument("--snapshot", type=non_negative, default=None, help="catalog snapshot (default: newest)")

    p = actions.add_parser("tools", help="print the tools with their JSON schemas",
                           description="Load the environment in the sandbox and print its tools as JSON "
                                       "(name, description, input_schema).")
    target(p)
    p.set_defaults(func=cmd_tools)

    p = actions.add_parser("call", help="call one tool on a fresh session and print the JSON result",
                           description="Open a fresh session (the initial database), call TOOL with the JSON "
                                       "arguments and print {ok, content, error, error_kind}. Exit code 1 when "
                                       "the call failed.")
    target(p)
    p.add_argument("tool", metavar="TOOL")
    p.add_argument("arguments", metavar="JSON-ARGS", nargs="?", default="{}", help="a JSON object (default {})")
    p.set_defaults(func=cmd_call)

    p = actions.add_parser("check", help="call every tool with the spec's example arguments; report failures",
                           description="Each tool runs on a fresh session with the example arguments from the "
                                       "API spec. Exit code 1 when any tool fails.")
    target(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_check)

    p = actions.add_parser("serve", help="serve environments over MCP (stdio or streamable HTTP)",
                           description="One process, one sandbox pool, one environment session per MCP "
                                       "client. Tools: the environment's own plus list_tools and call_tool; "
                                       "with several environments tool names are '<env_id>.<tool>'. Over HTTP "
                                       "every request shows a bearer token when the server has one (required "
                                       "on an address other than loopback); sessions are bounded and expire "
                                       "when idle (settings server.max_sessions, server.session_idle_s).")
    target(p, many=True)
    p.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (default 8000); MCP is served at /mcp")
    p.add_argument("--stateless", action="store_true",
                   help="HTTP: give no MCP session to handshake-era clients either (every tool call one JSON "
                        "exchange); clients then name their environment session with the X-AWM-Session header "
                        "or _meta['awm/session'], or are issued one on their first call")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="HTTP: bearer tokens the server accepts, one per line (with server.token, if set); "
                        "sessions are scoped to the token that opened them")
    p.add_argument("--max-sessions", type=count, metavar="N",
                   help="HTTP: live environment sessions at most (default: server.max_sessions)")
    p.add_argument("--session-idle-s", type=seconds, metavar="S",
                   help="HTTP: close an environment session idle this long (default: server.session_idle_s)")
    p.set_defaults(func=cmd_serve)

    p = actions.add_parser("export", help="write an environment's bundle JSON from the catalog",
                           description="Write <DIR>/<ENV_ID>.json, the Environment bundle as the catalog holds it.")
    p.add_argument("env_id", metavar="ENV_ID")
    p.add_argument("--to", type=Path, required=True, metavar="DIR")
    p.add_argument("--snapshot", type=non_negative, default=None, help="catalog snapshot (default: newest)")
    p.set_defaults(func=cmd_export)


def resolve_environment(ref: str, snapshot: int | None = None):
    """An Environment from a bundle file path, else from the catalog by id."""
    from awm_core.models import Environment

    path = Path(ref)
    if path.suffix == ".json" or path.is_file() or path.is_dir():
        from awm_core.files import read_text

        from awm_core.errors import ArtifactError, InputError

        try:
            return Environment.from_json(read_text(path, "bundle file"))
        except ArtifactError as exc:
            raise InputError(f"bundle file {path}: {exc}") from None
    from awm_core.settings import load_settings
    from storage.catalog import Catalog

    cat = Catalog.open(load_settings(), read_only=True)
    try:
        return cat.get_environment(ref, snapshot=snapshot)
    finally:
        cat.close()


def _pool():
    from awm_core.runtime import SandboxPool
    from awm_core.settings import load_settings

    return SandboxPool(load_settings().sandbox)


def cmd_tools(args) -> int:
    env = resolve_environment(args.env, args.snapshot)
    with _pool() as pool:
        tools = [t.to_dict() for t in pool.load(env).tools()]
    print(json.dumps(tools, indent=2))
    return 0


def cmd_call(args) -> int:
    try:
        arguments = json.loads(args.arguments)
    except json.JSONDecodeError as exc:
        print(f"error: JSON-ARGS is not valid JSON ({exc.msg} at position {exc.pos}): {args.arguments[:200]}",
              file=sys.stderr)
        return 2
    if not isinstance(arguments, dict):
        print(f"error: JSON-ARGS must be a JSON object, got {type(arguments).__name__}", file=sys.stderr)
        return 2
    env = resolve_environment(args.env, args.snapshot)
    with _pool() as pool:
        with pool.load(env).open_session() as s:
            result = s.call(args.tool, arguments)
    print(json.dumps(result.to_dict(), indent=2, default=str))
    return 0 if result.ok else 1


def cmd_check(args) -> int:
    env = resolve_environment(args.env, args.snapshot)
    from awm_core.runtime import kernel

    with _pool() as pool:
        checks = pool.check_tools(env)
        sandbox = kernel.describe(pool.protections())
    failed = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2, default=str))
    else:
        width = max((len(c.tool) for c in checks), default=4)
        for c in checks:
            status = "ok  " if c.ok else "FAIL"
            detail = "" if c.ok else f"  [{c.result.error_kind}] {(c.result.error or '')[:200]}"
            print(f"{status} {c.tool:<{width}}{detail}".rstrip())
        print(f"{len(checks) - len(failed)}/{len(checks)} tools passed with their example arguments")
        print(f"sandbox: {sandbox}")
    return 1 if failed else 0


def cmd_serve(args) -> int:
    from awm_core.errors import InputError
    from awm_core.runtime.access import ClientSessions, Tokens, check_bind
    from awm_core.runtime.mcp_server import EnvMCPServer, serve_http, serve_stdio
    from awm_core.settings import load_settings

    conf = load_settings().server
    http = args.transport == "http"
    if args.token_file is not None and not http:
        raise InputError("--token-file applies to --transport http (a stdio server has one client: its parent)")
    tokens = Tokens.from_sources(conf.token.get_secret_value() if conf.token else None,
                                 args.token_file) if http else None
    if http:
        check_bind(args.host, tokens)
    # Over stdio the one client is the parent process: its session lives as long as the server.
    sessions = ClientSessions(idle_s=(args.session_idle_s or conf.session_idle_s) if http else None,
                              max_sessions=args.max_sessions or conf.max_sessions,
                              max_per_owner=conf.max_sessions_per_token)
    envs = [resolve_environment(ref, args.snapshot) for ref in args.env]
    with _pool() as pool:
        server = EnvMCPServer(pool, envs, sessions=sessions)
        try:
            if not http:
                print(f"serving {', '.join(e.id for e in envs)} over MCP stdio", file=sys.stderr, flush=True)
                serve_stdio(server)
            else:
                auth = f"{len(tokens)} bearer token(s)" if tokens else "no token (loopback only)"
                print(f"serving {', '.join(e.id for e in envs)} at http://{args.host}:{args.port}/mcp; {auth}; "
                      f"at most {sessions.max_sessions} sessions, closed after {sessions.idle_s:g} s idle; "
                      "Ctrl-C to stop", file=sys.stderr, flush=True)
                serve_http(server, args.host, args.port, stateless=args.stateless, tokens=tokens,
                           max_body=conf.max_request_bytes)
        finally:
            server.close()
    return 0


def cmd_export(args) -> int:
    env = resolve_environment(args.env_id, args.snapshot)
    args.to.mkdir(parents=True, exist_ok=True)
    out = args.to / f"{env.id}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(env.to_json(indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0

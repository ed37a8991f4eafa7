"""awm llm: tools around the LLM layer (the local OpenAI-compatible fixture server)."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from flows.commands import group, non_negative, non_negative_float, port, rate


def register(sub) -> None:
    actions = group(sub, "llm", "LLM layer tools: serve recorded replies over a local OpenAI-compatible API")
    serve = actions.add_parser(
        "serve-fixtures",
        help="serve the fixture files at http://127.0.0.1:PORT/v1 (chat completions, embeddings) until Ctrl-C",
        description="Answer POST /v1/chat/completions from <fixtures>/<scenario>/<stage>.json, keyed by the "
                    "X-AWM-Stage, X-AWM-Scenario and X-AWM-Attempt (a policy's X-AWM-Turn) headers, and POST /v1/embeddings with the "
                    "offline embedder. Faults can be injected at a seeded rate.",
    )
    serve.add_argument("--port", type=port, default=8765, help="port on 127.0.0.1 (0 = any free port; default 8765)")
    serve.add_argument("--fixtures", type=Path, default=None,
                       help="fixtures folder (default: llm.fixtures_dir from the settings)")
    serve.add_argument("--fault-rate", type=rate, default=0.0, help="share of chat requests that get a fault (0-1)")
    serve.add_argument("--faults", default="timeout,429,500,malformed,truncated",
                       help="comma-separated fault kinds to draw from (default: all)")
    serve.add_argument("--seed", type=non_negative, default=0, help="seed of the fault draw (same seed, same faults)")
    serve.add_argument("--latency-s", type=non_negative_float, default=0.0, help="seconds to wait before every chat reply")
    serve.add_argument("--timeout-sleep-s", type=non_negative_float, default=30.0,
                       help="how long an injected timeout stalls (set it above the client's timeout)")
    serve.set_defaults(func=serve_fixtures)


def serve_fixtures(args) -> int:
    from awm_core.errors import LLMError
    from awm_core.llm.fixture_server import FixtureServer
    from awm_core.settings import load_settings

    fixtures = args.fixtures if args.fixtures is not None else load_settings().llm.fixtures_dir
    if not fixtures.is_dir():
        raise LLMError(f"fixtures folder {fixtures} does not exist")
    try:
        server = FixtureServer(fixtures, port=args.port, fault_rate=args.fault_rate, faults=args.faults,
                               seed=args.seed, latency_s=args.latency_s, timeout_sleep_s=args.timeout_sleep_s)
    except OSError as exc:
        raise LLMError(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}") from None
    faults = f", faults {','.join(server.faults)} at rate {args.fault_rate:g} (seed {args.seed})" if args.fault_rate else ""
    # Stop cleanly on Ctrl-C even when started in the background (where SIGINT arrives ignored),
    # and on SIGTERM from a process manager.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print(f"serving fixtures from {fixtures} at {server.base_url}{faults}; Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    served = len(server.requests)
    print(f"stopped after {served} request{'s' if served != 1 else ''}", file=sys.stderr, flush=True)
    return 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt

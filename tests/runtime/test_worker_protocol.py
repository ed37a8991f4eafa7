"""The worker's request table and the typed messages agree, and an unknown op is a clear error."""
from __future__ import annotations

import typing

from awm_core.runtime import SandboxPool, protocol
from awm_core.runtime.worker import OPS, Worker


def _ops_of(request_type) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(request_type)["op"]))


def test_every_op_has_a_request_type_and_a_handler():
    typed = set().union(*(_ops_of(t) for t in typing.get_args(protocol.Request)))
    methods = {name[3:] for name in vars(Worker) if name.startswith("op_")}
    assert typed == set(OPS) == methods, (typed ^ set(OPS), methods ^ set(OPS))
    for op, fn in OPS.items():
        assert fn is getattr(Worker, f"op_{op}")


def test_an_unknown_op_is_refused_by_name():
    with SandboxPool(workers=1, call_timeout_s=20) as pool:
        worker = pool._workers[0]
        reply, _, _ = worker.request({"op": "op_ping"})
        assert reply == {"ok": False, "error": "unknown op 'op_ping'", "blobs": 0}
        reply, _, _ = worker.request({"op": "ping"})
        assert reply["ok"] and {"threads", "sessions", "trims"} <= set(reply)

"""Custom Prefect events the flows emit, so automations can chain deployments on them.

Each event's resource is the catalog snapshot (``awm.catalog.snapshot.<n>``) and its payload
carries the snapshot number: a deployment trigger passes it on as a parameter with
``"{{ event.payload.snapshot }}"``. Inside a flow run Prefect relates the event to that run.
"""
from __future__ import annotations

from typing import Any

GENERATE_PUBLISHED = "awm.generate.published"
GATE_PASSED = "awm.gate.passed"


def emit_snapshot_event(event: str, snapshot: int, **payload: Any) -> None:
    """Emit ``event`` about ``snapshot``; never fails the flow (events are a notification)."""
    from prefect import get_run_logger
    from prefect.events import emit_event

    try:
        emit_event(event=event, resource={"prefect.resource.id": f"awm.catalog.snapshot.{int(snapshot)}",
                                          "prefect.resource.name": f"catalog snapshot {int(snapshot)}"},
                   payload={"snapshot": int(snapshot), **payload})
    except Exception as exc:  # noqa: BLE001  (no events client, server gone: the run's result still stands)
        get_run_logger().warning("could not emit %s for snapshot %s: %s", event, snapshot, exc)

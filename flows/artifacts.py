"""Publishing a run's report as Prefect artifacts: one markdown summary, tables, charts.

Every flow's report goes through ``publish_report`` so the artifact keys, the inline chart and
the failure policy are the same: artifacts are a convenience, so a failure to create one is
logged and never fails a run that did its work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from awm_core.report import data_uri


@dataclass
class Report:
    """What a flow shows in the UI: the summary (render its chart inline with ``data_uri``), tables
    by artifact key (rows, description), and the chart again as an image artifact."""

    key: str
    markdown: str
    description: str
    tables: dict[str, tuple[list[dict[str, Any]], str]] = field(default_factory=dict)
    chart: bytes | None = None
    chart_key: str | None = None
    chart_description: str = ""


def publish_report(report: Report, log: Any = None) -> None:
    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

    try:
        create_markdown_artifact(key=report.key, markdown=report.markdown, description=report.description)
        for key, (rows, description) in report.tables.items():
            if rows:
                create_table_artifact(key=key, table=rows, description=description)
        if report.chart and report.chart_key:
            create_image_artifact(image_url=data_uri(report.chart), key=report.chart_key, description=report.chart_description)
    except Exception as exc:
        if log is not None:
            log.warning("could not create the %s artifacts: %s", report.key, exc)

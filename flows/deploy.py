"""Register the project's deployments (``deployments/prefect.yaml``) against a Prefect server.

The yaml file is the one list of deployments; this module applies the settings on top of it and
registers each entry with ``Flow.from_source(<project folder>, entrypoint).to_deployment(...)``
and ``prefect.deploy(..., build=False, push=False)``: a process worker then runs the flows from
the project folder, offline, with no image and no code upload.

What the settings decide:

- every deployment's work pool: ``server.work_pool``;
- ``generate/nightly``: cron ``server.nightly_cron`` in ``server.timezone``; parameters
  ``scenarios``/``tasks_per_scenario`` from ``generation.*`` unless given as overrides;
- the ``train/manual`` trigger on ``awm.gate.passed``: registered only when
  ``server.train_after_gate`` is true (then Prefect creates its automation), left out otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from awm_core.configs import GenerateConfig
from awm_core.errors import DeployError, InputError
from awm_core.settings import Settings, get_settings
from flows.events import GATE_PASSED
from flows.server import api_url, ensure_work_pool, is_healthy

PROJECT_DIR = Path(__file__).resolve().parents[1]
PREFECT_YAML = PROJECT_DIR / "deployments" / "prefect.yaml"
NIGHTLY = ("generate", "nightly")


@dataclass
class Registered:
    flow_name: str
    name: str
    deployment_id: str
    entrypoint: str
    schedules: list[str] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


def load_spec(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments:`` entries of the yaml file, checked for the fields registration needs."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeployError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise DeployError(f"{path} is not valid YAML: {exc}") from None
    entries = (doc or {}).get("deployments")
    if not isinstance(entries, list) or not entries:
        raise DeployError(f"{path} has no `deployments:` list")
    for i, e in enumerate(entries):
        missing = [k for k in ("name", "entrypoint") if not (isinstance(e, dict) and e.get(k))]
        if missing:
            raise DeployError(f"{path}: deployments[{i}] lacks {', '.join(missing)}")
        if ":" not in e["entrypoint"]:
            raise DeployError(f"{path}: deployments[{i}].entrypoint {e['entrypoint']!r} must be path.py:function")
    return entries


def flow_function(entry: dict[str, Any]) -> str:
    """The entrypoint's function name (generate, gate, evaluate, train, import_awm1k)."""
    return entry["entrypoint"].rsplit(":", 1)[1]


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (``scenarios=2``, ``env_ids=["a"]``) or a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise DeployError(f"parameter {text!r} is not key=value")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def plan(settings: Settings, entries: list[dict[str, Any]], *, generate_params: dict[str, Any] | None = None,
         cron: str | None = None, timezone: str | None = None,
         train_after_gate: bool | None = None) -> list[dict[str, Any]]:
    """The entries with the settings applied (pure: what ``register`` will send)."""
    from prefect.client.schemas.schedules import CronSchedule

    train_on = settings.server.train_after_gate if train_after_gate is None else train_after_gate
    out = []
    for e in entries:
        e = json.loads(json.dumps(e))  # deep copy; the spec is plain YAML data
        e["work_pool"] = {**(e.get("work_pool") or {}), "name": settings.server.work_pool}
        if flow_function(e) == NIGHTLY[0] and e["name"] == NIGHTLY[1]:
            params = dict(e.get("parameters") or {})
            params.update({"scenarios": settings.generation.scenarios,
                           "tasks_per_scenario": settings.generation.tasks_per_scenario})
            params.update(generate_params or {})
            try:  # the flow's own config: a misspelt or out-of-range --param fails here, not at 2 am
                GenerateConfig(**params)
            except InputError as exc:
                raise DeployError(f"{e['name']} deployment: {exc}") from None
            e["parameters"] = params
            tz = timezone or settings.server.timezone
            expr = cron or settings.server.nightly_cron
            try:
                CronSchedule(cron=expr, timezone=tz)
            except ValueError as exc:
                raise DeployError(f"invalid nightly schedule cron={expr!r} timezone={tz!r}: {exc}") from None
            e["schedules"] = [{"cron": expr, "timezone": tz, "active": True}]
        triggers = []
        for t in e.get("triggers") or []:
            if GATE_PASSED in (t.get("expect") or []):
                if not train_on:
                    continue
                t["enabled"] = True
            triggers.append(t)
        e["triggers"] = triggers
        out.append(e)
    return out


def register(settings: Settings | None = None, *, spec_path: Path = PREFECT_YAML,
             generate_params: dict[str, Any] | None = None, cron: str | None = None,
             timezone: str | None = None, train_after_gate: bool | None = None,
             only: list[str] | None = None) -> tuple[list[Registered], list[str]]:
    """Register every deployment of the yaml file (or those whose flow function is in ``only``).

    Returns what was registered and the entries skipped because their flow file is absent.
    Re-registering updates deployments in place; Prefect replaces a deployment's trigger
    automations on every registration, so switching the train trigger off removes its automation.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = settings or get_settings()
    entries = plan(settings, load_spec(spec_path), generate_params=generate_params, cron=cron,
                   timezone=timezone, train_after_gate=train_after_gate)
    url = _server_url(settings)
    ensure_work_pool(settings, url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        return _register(settings, entries, only)


def _register(settings: Settings, entries: list[dict[str, Any]],
              only: list[str] | None) -> tuple[list[Registered], list[str]]:
    import prefect
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentEventTrigger
    from prefect.flows import Flow

    runner_deployments, meta, skipped = [], [], []
    for e in entries:
        flow_file = e["entrypoint"].split(":")[0]
        if only and flow_function(e) not in only:
            continue
        if not (PROJECT_DIR / flow_file).exists():
            skipped.append(f"{e['entrypoint']} ({e['name']}): {flow_file} is not in this checkout")
            continue
        flow = Flow.from_source(source=str(PROJECT_DIR), entrypoint=e["entrypoint"])
        schedules = [CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC")) for s in e.get("schedules") or []]
        triggers = [DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"}) for t in e["triggers"]]
        runner_deployments.append(flow.to_deployment(
            name=e["name"], schedules=schedules or None, parameters=e.get("parameters") or {},
            triggers=triggers or None, description=e.get("description"), tags=e.get("tags"),
            work_pool_name=e["work_pool"]["name"], job_variables=e["work_pool"].get("job_variables")))
        meta.append(Registered(flow.name, e["name"], "", e["entrypoint"],
                               schedules=[f"{s['cron']} ({s.get('timezone', 'UTC')})" for s in e.get("schedules") or []],
                               triggers=[",".join(t.get("expect") or []) for t in e["triggers"]],
                               parameters=e.get("parameters") or {}))
    if not runner_deployments:
        return [], skipped
    ids = prefect.deploy(*runner_deployments, work_pool_name=settings.server.work_pool, build=False, push=False,
                         print_next_steps_message=False,
                         ignore_warnings=True)
    for m, dep_id in zip(meta, ids):
        m.deployment_id = str(dep_id)
    return meta, skipped


def _server_url(settings: Settings) -> str:
    """PREFECT_API_URL when set, else this project's local server (`awm server start`)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or api_url(settings)
    if not is_healthy(url):
        hint = ("" if PREFECT_API_URL.value() else
                " (PREFECT_API_URL is not set, so the project's own server address was tried)")
        raise DeployError(f"no Prefect server answers at {url}{hint}; start one with `awm server start`")
    return url


def automations_for(deployment_id: str) -> list[Any]:
    """The automations whose actions run this deployment (what a trigger created)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        out = []
        for a in client.read_automations():
            for act in a.actions:
                if getattr(act, "deployment_id", None) is not None and str(act.deployment_id) == str(deployment_id):
                    out.append(a)
                    break
        return out

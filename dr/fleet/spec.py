"""The deployments a configuration asks for: one per runbook flow and service environment.

Every runbook flow gets a deployment `<flow>/<service>-<environment>` for every configured
environment (docs/deployments.md says why this shape), plus one `fleet-check/<fleet>`:

- parameters: `service`, `environment` (and `config_path` where the workers need it); the run
  form offers exactly those values (an `enum` of one in the parameter schema), so a form of
  `data-loss/apply-production` cannot name another environment;
- schedules from the configuration, in its time zone: `nightly-backup` daily at
  `[fleet] nightly_backup_at` + the environment's `backup_offset_minutes`; `verify-backup`
  weekly (`verify_cron`); `dr-drill` monthly (`drill_cron`) where the environment's `drill`
  is on (non-production by default); `fleet-check` hourly (`fleet_check_cron`, UTC);
- concurrency: the recovery flows and the drill one run at a time per environment (deployment
  concurrency 1, ENQUEUE); nightly backups and verifies share the work queue `backups`, whose
  concurrency limit is `[fleet] max_parallel_backups`; drills the queue `drills`
  (`max_parallel_drills`): Prefect hands a worker no more runs of a queue than its limit;
- the work pool: `[fleet] work_pool_type` process (pool `dr`) or kubernetes (pool
  `dr-kubernetes`, job variables from deployments/kubernetes.prefect.yaml).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dr.config import DrConfig, Target
from dr.errors import ConfigError
from dr.fleet import BACKUP_QUEUE, DRILL_QUEUE, fleet_name, fleet_tag

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_FILE = ROOT / "deployments" / "kubernetes.prefect.yaml"
KUBERNETES_TEMPLATE = ROOT / "deployments" / "kubernetes-base-job-template.json"
PROCESS_PULL = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DR_HOME }}"}}]
DEFAULT_QUEUE = "default"


@dataclass(frozen=True)
class FlowEntry:
    """One runbook flow as the fleet deploys it."""

    flow: str               # the flow's name, e.g. data-loss
    entrypoint: str         # flows/data_loss.py:data_loss
    kind: str               # scenario | building-block | scheduled | drill
    description: str
    one_at_a_time: bool = False
    queue: str = DEFAULT_QUEUE


#: every runbook flow, in the order the UI and prefect.yaml list them
CATALOGUE: tuple[FlowEntry, ...] = (
    FlowEntry("data-loss", "flows/data_loss.py:data_loss", "scenario",
              "Scenario 2: loss or corruption of data. Stops the app, safety backup, point-in-time restore to a new "
              "server, restore into the live server after approval, validate, maintenance off, delete the PTR server.",
              one_at_a_time=True),
    FlowEntry("server-loss", "flows/server_loss.py:server_loss", "scenario",
              "Scenario 1: loss of the database server. Maintenance on, revive or recreate the server, restore the "
              "newest nightly backup, validate, maintenance off after approval.", one_at_a_time=True),
    FlowEntry("backup-database", "flows/backup.py:backup_database", "building-block",
              "Backup workflow: stream a checksummed backup of a database into the store."),
    FlowEntry("restore-database", "flows/restore.py:restore_database", "building-block",
              "Restore workflow: new database, verify checksum and manifest, atomic swap; safety backup first.",
              one_at_a_time=True),
    FlowEntry("point-in-time-restore", "flows/ptr.py:point_in_time_restore", "building-block",
              "Point-in-time restore of the live server onto a NEW server (UK time, clock changes checked)."),
    FlowEntry("maintenance-on", "flows/maintenance.py:maintenance_on", "building-block",
              "Enable maintenance mode (optionally stop the app, replica counts recorded)."),
    FlowEntry("maintenance-off", "flows/maintenance.py:maintenance_off", "building-block",
              "Disable maintenance mode (recorded replicas restored, healthcheck awaited)."),
    FlowEntry("validate-service", "flows/validate.py:validate_service", "building-block",
              "Validate the app: healthcheck and data checks."),
    FlowEntry("tidy-up", "flows/tidy_up.py:tidy_up", "building-block",
              "Tidy up: delete PTR servers and replaced databases this tool created."),
    FlowEntry("reconcile", "flows/reconcile.py:reconcile", "building-block",
              "Reconcile after a table-level recovery: show, then (apply=true, after approval) re-apply the writes "
              "made after the restore point that the recovery discarded, from the incident's reconciliation pack.",
              one_at_a_time=True),
    FlowEntry("nightly-backup", "flows/nightly.py:nightly_backup", "scheduled",
              "Nightly backup (04:00 UK time by default, per-environment offset) and retention; runs in the work "
              "queue `backups`, whose limit is the fleet's parallel backups.", queue=BACKUP_QUEUE),
    FlowEntry("verify-backup", "flows/nightly.py:verify_backup", "scheduled",
              "Weekly proof that the newest backup restores: scratch database, checksum + manifest, dropped.",
              queue=BACKUP_QUEUE),
    FlowEntry("dr-drill", "flows/drill.py:dr_drill", "drill",
              "Monthly DR drill: rehearse both scenarios, measure RTO/RPO (non-production only). First Tuesday "
              "10:00 UK time by default, away from the 01:00-02:00 clock changes.", one_at_a_time=True,
              queue=DRILL_QUEUE),
)
FLEET_CHECK = FlowEntry("fleet-check", "flows/fleet_check.py:fleet_check", "fleet",
                        "Hourly: the DR readiness board of the whole fleet (artifact dr-readiness) and one notification "
                        "per problem (stale or failed backup, failed verify or drill, overdue drill, leftovers, a "
                        "paused recovery past its approval timeout), and one when it clears.")


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str
    timezone: str
    day_or: bool = True

    def as_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cron": self.cron, "timezone": self.timezone}
        if not self.day_or:
            out["day_or"] = False
        return out


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment as `dr deploy` registers it."""

    flow: str
    entrypoint: str
    name: str
    description: str
    tags: tuple[str, ...]
    parameters: dict[str, Any]
    work_pool: str
    work_queue: str
    job_variables: dict[str, Any]
    pull_steps: list[dict[str, Any]]
    schedules: tuple[ScheduleSpec, ...] = ()
    one_at_a_time: bool = False
    #: what a run does while another of the same deployment runs (deployment concurrency 1)
    collision_strategy: str = "ENQUEUE"
    #: parameters the run form offers no other value for (an enum of one)
    locked: tuple[str, ...] = ()
    service: str | None = None
    environment: str | None = None

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"

    def version(self) -> str:
        """A digest of everything registered: an unchanged deployment is not written again."""
        body = json.dumps({k: v for k, v in self.__dict__.items()}, sort_keys=True, default=str)
        return "dr-" + hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PoolSpec:
    name: str
    type: str                       # process | kubernetes
    base_job_template: dict[str, Any] | None
    queues: dict[str, int | None] = field(default_factory=dict)   # name -> concurrency limit


@dataclass(frozen=True)
class FleetSpec:
    fleet: str
    tag: str
    pool: PoolSpec
    deployments: tuple[DeploymentSpec, ...]


def _daily_cron(hh_mm: str) -> str:
    h, m = hh_mm.split(":")
    return f"{int(m)} {int(h)} * * *"


def _kubernetes_profile() -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """(pull steps, job variables, pool name) from deployments/kubernetes.prefect.yaml."""
    import yaml

    doc = yaml.safe_load(KUBERNETES_FILE.read_text())
    pool = doc["definitions"]["work_pool"]
    return doc["pull"], dict(pool.get("job_variables") or {}), pool["name"]


def _image(config: DrConfig) -> str:
    image = os.environ.get("DR_IMAGE") or config.fleet.image
    if not image:
        raise ConfigError("the Kubernetes work pool needs the worker image: set DR_IMAGE or [fleet] image",
                          field="fleet.image", source=config.source)
    return image


def build(config: DrConfig, *, config_path: str | None = None, resolve_image: bool = True) -> FleetSpec:
    """The deployments, work pool and queues `config` asks for.

    Args:
        config: the loaded configuration.
        config_path: the file as the workers see it, passed to every run (`config_path`);
            default `[fleet] config_path`, or none (the workers' $DR_CONFIG or ./dr.toml).
        resolve_image: put the Kubernetes image into the job variables (False keeps
            `{{ $DR_IMAGE }}` for `prefect deploy`, which fills it in itself).

    Raises:
        ConfigError: the Kubernetes pool is chosen but no image is given.
    """
    fc = config.fleet
    config_path = fc.config_path or config_path
    name, tag = fleet_name(config), fleet_tag(config)
    if fc.work_pool_type == "kubernetes":
        pull, job_vars, default_pool = _kubernetes_profile()
        if "image" in job_vars:
            job_vars["image"] = _image(config) if resolve_image else "{{ $DR_IMAGE }}"
        pool = PoolSpec(fc.work_pool or default_pool, "kubernetes", json.loads(KUBERNETES_TEMPLATE.read_text()),
                        {DEFAULT_QUEUE: None, BACKUP_QUEUE: fc.max_parallel_backups, DRILL_QUEUE: fc.max_parallel_drills})
    else:
        pull, job_vars = PROCESS_PULL, {}
        pool = PoolSpec(fc.work_pool or "dr", "process", None,
                        {DEFAULT_QUEUE: None, BACKUP_QUEUE: fc.max_parallel_backups, DRILL_QUEUE: fc.max_parallel_drills})
    base = {"config_path": config_path} if config_path else {}
    out: list[DeploymentSpec] = []
    for t in config.targets():
        for entry in CATALOGUE:
            if entry.flow == "dr-drill" and t.production:
                continue  # refused for production by the flow itself: no button for it either
            out.append(_deployment(entry, t, config, pool.name, job_vars, pull, tag, base))
    out.append(DeploymentSpec(
        flow=FLEET_CHECK.flow, entrypoint=FLEET_CHECK.entrypoint, name=name, description=FLEET_CHECK.description,
        tags=(tag, "fleet"), parameters=dict(base), work_pool=pool.name, work_queue=DEFAULT_QUEUE,
        job_variables=job_vars, pull_steps=pull, schedules=(ScheduleSpec(fc.fleet_check_cron, "UTC"),),
        one_at_a_time=True, collision_strategy="CANCEL_NEW", locked=tuple(base)))
    return FleetSpec(name, tag, pool, tuple(out))


def _deployment(entry: FlowEntry, t: Target, config: DrConfig, pool: str, job_vars: dict[str, Any],
                pull: list[dict[str, Any]], tag: str, base: dict[str, Any]) -> DeploymentSpec:
    params: dict[str, Any] = {"service": t.service, "environment": t.environment, **base}
    schedules: tuple[ScheduleSpec, ...] = ()
    zone = config.timezone
    if entry.flow == "nightly-backup":
        params["verify"] = "never"  # the weekly verify-backup deployment proves restores
        schedules = (ScheduleSpec(_daily_cron(t.nightly_backup_at), zone),)
    elif entry.flow == "verify-backup":
        schedules = (ScheduleSpec(config.fleet.verify_cron, zone, day_or=False),)
    elif entry.flow == "dr-drill" and t.drill:
        schedules = (ScheduleSpec(config.fleet.drill_cron, zone, day_or=False),)
    return DeploymentSpec(
        flow=entry.flow, entrypoint=entry.entrypoint, name=f"{t.service}-{t.environment}",
        description=entry.description, tags=(tag, t.service, t.environment, entry.kind), parameters=params,
        work_pool=pool, work_queue=entry.queue, job_variables=job_vars, pull_steps=pull, schedules=schedules,
        one_at_a_time=entry.one_at_a_time, locked=("service", "environment", *base),
        service=t.service, environment=t.environment)


# --- prefect.yaml for `prefect deploy` users ----------------------------------------------------------

YAML_HEADER = """\
# GENERATED by `dr deploy --write {path}` from {source}: edit dr.toml, not this file.
#
# `dr deploy` registers the same deployments through Prefect's API (faster, prunes what it
# registered earlier, and locks each run form to its own service and environment); this file
# is for `prefect deploy --all` users and the demo. Deployments are <flow>/<service>-<environment>.
# A prefect deploy user creates the fleet limits once:
#   prefect work-pool create {pool} --type {pool_type}
#   prefect work-queue create backups --pool {pool} --limit {backups}
#   prefect work-queue create drills --pool {pool} --limit {drills}
"""


def to_yaml(spec: FleetSpec, *, path: str, source: str) -> str:
    """The fleet as a prefect.yaml (`prefect deploy --all`)."""
    import yaml

    import copy

    pull = spec.deployments[0].pull_steps if spec.deployments else PROCESS_PULL
    deployments = []
    for d in spec.deployments:
        wp: dict[str, Any] = {"name": d.work_pool, "work_queue_name": d.work_queue}
        if d.job_variables:
            wp["job_variables"] = copy.deepcopy(d.job_variables)  # a copy each: no YAML anchors
        item: dict[str, Any] = {"name": d.name, "entrypoint": d.entrypoint, "description": d.description,
                                "tags": list(d.tags), "parameters": d.parameters, "work_pool": wp}
        if d.one_at_a_time:
            item["concurrency_limit"] = {"limit": 1, "collision_strategy": d.collision_strategy}
        if d.schedules:
            item["schedules"] = [s.as_yaml() for s in d.schedules]
        deployments.append(item)
    from prefect import __version__ as prefect_version

    doc: dict[str, Any] = {"name": "dr-orchestrator", "prefect-version": prefect_version, "pull": pull}
    if spec.pool.type == "kubernetes":  # the file can stand in for deployments/kubernetes.prefect.yaml
        jv = spec.deployments[0].job_variables if spec.deployments else {}
        doc["definitions"] = {"work_pool": {"name": spec.pool.name, "job_variables": copy.deepcopy(jv)}}
    doc["deployments"] = deployments
    header = YAML_HEADER.format(path=path, source=source, pool=spec.pool.name, pool_type=spec.pool.type,
                                backups=spec.pool.queues.get(BACKUP_QUEUE), drills=spec.pool.queues.get(DRILL_QUEUE))
    return header + yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True, default_flow_style=None)

"""Typed configuration: services, environments, platform, retention, validation checks.

One TOML file (`dr.toml`) describes every service and environment. Names not given are
derived from the naming conventions of the existing tooling:

- server: ``<prefix>-<service>-<env short>-pg``
- database: ``<service>_<environment>``
- storage account: ``<prefix><service>dbbkp<env short>sa``, container ``database-backup``
- nightly backup: ``<service>_<env short>_<YYYY-MM-DD>.sql.gz``

Bad configuration fails at load with a `ConfigError` naming the file and the field.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from dr.errors import ConfigError

ENVIRONMENTS: dict[str, str] = {
    "development": "dv",
    "test": "ts",
    "qa": "qa",
    "review": "rv",
    "preproduction": "pp",
    "production": "pd",
}

SERVER_NAME = re.compile(r"^(?=.{3,63}\Z)[a-zA-Z0-9]+(-[a-zA-Z0-9]+)*\Z")  # Azure's rule; compiled: Python's re
DATABASE_NAME = r"^[a-z_][a-z0-9_]{0,62}$"
SERVICE_NAME = r"^[a-z][a-z0-9]{1,19}$"
#: Kubernetes: a namespace is an RFC 1123 label; deployments and ingresses RFC 1123 subdomains
K8S_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
K8S_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
HOST_NAME = r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$"
DEFAULT_CONFIG_NAME = "dr.toml"
DEFAULT_RECOVERY_SLOT_WAIT_MINUTES = 60.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- validation checks ----------------------------------------------------------------


class HealthcheckCheck(_Strict):
    """The app's healthcheck URL answers 200."""

    kind: Literal["healthcheck"]
    required: bool = True


class RowCountCheck(_Strict):
    """A table holds between `min` and `max` rows."""

    kind: Literal["row_count"]
    table: str = Field(pattern=IDENTIFIER)
    min: int = Field(default=1, ge=0)
    max: int | None = Field(default=None, ge=0)
    required: bool = True


class LatestRecordCheck(_Strict):
    """The newest value of a timestamp column is younger than `max_age_hours`."""

    kind: Literal["latest_record"]
    table: str = Field(pattern=IDENTIFIER)
    column: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    max_age_hours: float = Field(gt=0)
    required: bool = True


class QueryCheck(_Strict):
    """A read-only SQL query returns the expected single value (compared as text)."""

    kind: Literal["query"]
    name: str = Field(min_length=1, max_length=80)
    sql: str = Field(min_length=1)
    expect: str
    required: bool = True


Check = Annotated[
    Union[HealthcheckCheck, RowCountCheck, LatestRecordCheck, QueryCheck], Field(discriminator="kind")
]


class Retention(_Strict):
    """How many nightly backups to keep, by age bucket."""

    daily: int = Field(default=7, ge=1)
    weekly: int = Field(default=4, ge=0)
    monthly: int = Field(default=6, ge=0)


class GeoRestoreSettings(_Strict):
    """Where the server-loss scenario's geo-restore puts the server in a region outage (Azure only)."""

    location: str = Field(pattern=r"^[a-z][a-z0-9]{1,40}$", description="the paired region, e.g. ukwest")
    server: str | None = Field(default=None, pattern=SERVER_NAME, description="default <server>-geo")
    delegated_subnet_resource_id: str | None = Field(default=None, min_length=20)
    private_dns_zone_arm_resource_id: str | None = Field(default=None, min_length=20)


# --- environments and services -----------------------------------------------------------


class Environment(_Strict):
    """One environment of one service; unset names follow the naming conventions."""

    platform: Literal["local", "azure"] = "local"
    app: Literal["local", "kubernetes"] = "local"
    production: StrictBool | None = None  # "no" is not false: production is never guessed from text
    server: str | None = Field(default=None, pattern=SERVER_NAME)
    database: str | None = Field(default=None, pattern=DATABASE_NAME)
    admin_user: str = Field(default="dradmin", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # Azure
    subscription_id: str | None = None
    resource_group: str | None = Field(default=None, pattern=r"^[-\w._()]{1,90}$")
    storage_account: str | None = Field(default=None, pattern=r"^[a-z0-9]{3,24}$")
    container: str = Field(default="database-backup", pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
    # Kubernetes
    namespace: str | None = Field(default=None, pattern=K8S_LABEL)
    web_deployment: str | None = Field(default=None, pattern=K8S_NAME, max_length=253)
    worker_deployment: str | None = Field(default=None, pattern=K8S_NAME, max_length=253)
    ingress: str | None = Field(default=None, pattern=K8S_NAME, max_length=253)
    temp_host: str | None = Field(default=None, pattern=HOST_NAME, max_length=253)
    kube_context: str | None = None
    healthcheck_url: str | None = None
    # Behaviour
    checks: list[Check] = Field(default_factory=lambda: [HealthcheckCheck(kind="healthcheck")])
    retention: Retention = Field(default_factory=Retention)
    rpo_minutes: int = Field(default=26 * 60, gt=0)
    rto_minutes: int = Field(default=120, gt=0)
    approval_timeout_minutes: int = Field(default=8 * 60, gt=0)
    #: how long a recovery waits for another recovery of the same environment before it gives up
    recovery_slot_wait_minutes: float = Field(default=DEFAULT_RECOVERY_SLOT_WAIT_MINUTES, gt=0, le=24 * 60)
    #: Azure: where a geo-restore goes in a region outage (needs geo-redundant backups)
    geo_restore: GeoRestoreSettings | None = None
    #: local platform: the PostgreSQL major version the environment's servers run (rehearse on the
    #: version production runs); default: the installation with the full contrib set (dr.pginstall)
    postgres_version: int | None = Field(default=None, ge=10, le=99)
    # Schedules (dr deploy): minutes after [fleet] nightly_backup_at, and the monthly drill
    backup_offset_minutes: int = Field(default=0, ge=0, lt=24 * 60)
    #: the monthly drill: default on for non-production, off for production (where it is refused)
    drill: StrictBool | None = None

    @field_validator("subscription_id")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        import uuid

        if v is not None:
            try:
                uuid.UUID(v)
            except ValueError:
                raise ValueError("must be a subscription UUID like 00000000-0000-0000-0000-000000000000")
        return v


class Service(_Strict):
    environments: dict[str, Environment] = Field(min_length=1)

    @field_validator("environments")
    @classmethod
    def _known_envs(cls, v: dict[str, Environment]) -> dict[str, Environment]:
        for name in v:
            if name not in ENVIRONMENTS:
                raise ValueError(
                    f"unknown environment '{name}'; accepted: {', '.join(ENVIRONMENTS)}"
                )
        return v


class LocalSettings(_Strict):
    """Settings of the embedded local platform."""

    state_dir: Path = Path(".dr-local")
    pg_bin_dir: Path | None = None
    dropped_retention_days: int = Field(default=5, ge=0)
    archive_timeout_seconds: int = Field(default=60, ge=1)
    #: durable writes (initdb, base backups, the server's fsync); only test suites turn this off
    fsync: StrictBool = True
    #: WAL segment size of new servers (initdb --wal-segsize), in MB: 16 as PostgreSQL and Azure;
    #: test suites use 1, so each forced archive and base backup writes 1 MB of WAL, not 16
    wal_segment_mb: int = 16

    @field_validator("wal_segment_mb")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v not in [2**i for i in range(11)]:
            raise ValueError(f"must be a power of 2 from 1 to 1024 (PostgreSQL's --wal-segsize), got {v}")
        return v


class Notifications(_Strict):
    """Where incident messages go. Webhook URLs are read from environment variables."""

    slack_webhook_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    teams_webhook_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")


class AlertRoute(_Strict):
    """Which alert starts which scenario. An alert matches when every given matcher matches."""

    match_resource: str | None = Field(default=None, min_length=3,
                                       description="case-insensitive substring of one of the alert's alertTargetIDs")
    match_rule: str | None = Field(default=None, min_length=1, description="the alert rule name, exactly")
    service: str
    environment: str
    scenario: Literal["server-loss", "data-loss"]

    @model_validator(mode="after")
    def _some_matcher(self) -> "AlertRoute":
        if not (self.match_resource or self.match_rule):
            raise ValueError("a route needs match_resource or match_rule")
        return self


class Alerts(_Strict):
    """The alert endpoint: shared token from an environment variable, routes to scenarios."""

    token_env: str = Field(default="DR_ALERT_TOKEN", pattern=r"^[A-Z_][A-Z0-9_]*$")
    max_body_bytes: int = Field(default=256 * 1024, gt=0, le=10 * 1024 * 1024)
    rate_limit_per_minute: int = Field(default=60, gt=0)
    routes: list[AlertRoute] = Field(default_factory=list)


_CRON_ITEM = r"(\*|[0-9a-z]+(-[0-9a-z]+)?)(/[0-9]+)?"
#: five cron fields (minute hour day month weekday) of numbers, names, ranges, steps and lists;
#: Prefect's own CronSchedule checks the values when `dr deploy` registers them
CRON = rf"^{_CRON_ITEM}(,{_CRON_ITEM})*( {_CRON_ITEM}(,{_CRON_ITEM})*){{4}}$"


class FleetSettings(_Strict):
    """`[fleet]`: how `dr deploy` registers the fleet, its schedules and limits, and the board's thresholds."""

    #: marks the deployments `dr deploy` registered (tag `dr-fleet:<name>`); default the prefix
    name: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,30}$")
    #: the one key that moves the fleet to Kubernetes (job variables: deployments/kubernetes.prefect.yaml)
    work_pool_type: Literal["process", "kubernetes"] = "process"
    #: default `dr` (process) or `dr-kubernetes`
    work_pool: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    #: the worker image of the Kubernetes pool ($DR_IMAGE wins)
    image: str | None = None
    #: the config file as the workers see it (default: this file's path on a process pool, DR_CONFIG on Kubernetes)
    config_path: str | None = None
    #: nightly backups and weekly verifies running at once across the fleet (work queue `backups`)
    max_parallel_backups: int = Field(default=4, ge=1, le=100)
    #: drills running at once across the fleet (work queue `drills`)
    max_parallel_drills: int = Field(default=2, ge=1, le=100)
    #: local time (the top-level `timezone`) of the nightly backup, plus each environment's offset
    nightly_backup_at: str = Field(default="04:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    #: weekly restore test, cron in the top-level `timezone` (day fields AND-ed): Sunday 06:00
    verify_cron: str = Field(default="0 6 * * 0")
    #: monthly drill: first Tuesday 10:00
    drill_cron: str = Field(default="0 10 1-7 * 2")
    #: the fleet check (staleness alerts), in UTC: hourly
    fleet_check_cron: str = Field(default="7 * * * *")
    #: the board's thresholds: a drill older than this is overdue; a verify older than this is missing
    drill_max_days: float = Field(default=35, gt=0)
    verify_max_days: float = Field(default=8, gt=0)
    #: a PTR server or replaced database older than this is reported
    leftover_max_hours: float = Field(default=24, gt=0)

    @field_validator("verify_cron", "drill_cron", "fleet_check_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        import re

        if not re.fullmatch(CRON, v):
            raise ValueError(f"'{v}' is not a cron expression: five fields, minute hour day month weekday")
        return v


@functools.lru_cache(maxsize=32)
def _clock_change_days(zone: str) -> tuple[Any, ...]:
    """The days of this year and next on which `zone`'s UTC offset changes."""
    from datetime import datetime, timedelta

    tz, day, out = ZoneInfo(zone), datetime(datetime.now().year, 1, 1), []
    before = day.replace(tzinfo=tz).utcoffset()
    for _ in range(2 * 366):
        day += timedelta(days=1)
        now = day.replace(tzinfo=tz).utcoffset()
        if now != before:
            out.append(day - timedelta(days=1))  # the change happened during the day before this midnight
        before = now
    return tuple(out)


@functools.lru_cache(maxsize=256)
def clock_change_times(zone: str, hh_mm: str) -> str | None:
    """Why local time `HH:MM` is unsafe for a daily schedule in `zone` (skipped or repeated on a clock change)."""
    tz, (h, m) = ZoneInfo(zone), map(int, hh_mm.split(":"))
    for day in _clock_change_days(zone):
        t = day.replace(hour=h, minute=m)
        a, b = t.replace(tzinfo=tz, fold=0), t.replace(tzinfo=tz, fold=1)
        if a.utcoffset() != b.utcoffset():
            exists = a.astimezone(ZoneInfo("UTC")).astimezone(tz).replace(tzinfo=None) == t
            return f"{hh_mm} {'happens twice' if exists else 'does not exist'} on {day:%Y-%m-%d} in {zone}"
    return None


class DrConfig(_Strict):
    """The whole configuration file."""

    prefix: str = Field(default="s189", pattern=r"^[a-z][a-z0-9]{0,9}$")
    timezone: str = "Europe/London"
    local: LocalSettings = Field(default_factory=LocalSettings)
    notifications: Notifications = Field(default_factory=Notifications)
    reports_dir: Path = Path("dr-reports")
    alerts: Alerts = Field(default_factory=Alerts)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    services: dict[str, Service] = Field(min_length=1)

    # where it was loaded from; not part of the file
    source: str = Field(default="<built-in>", exclude=True)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone '{v}'; use an IANA name such as Europe/London")
        return v

    @field_validator("services")
    @classmethod
    def _service_names(cls, v: dict[str, Service]) -> dict[str, Service]:
        import re

        for name in v:
            if not re.fullmatch(SERVICE_NAME, name):
                raise ValueError(
                    f"service name '{name}' must be 2-20 lowercase letters or digits, starting with a letter"
                )
        return v

    @model_validator(mode="after")
    def _resolvable(self) -> "DrConfig":
        for sname, service in self.services.items():
            for ename in service.environments:
                t = self._build_target(sname, ename)
                if t.platform == "azure" and not (t.subscription_id and t.resource_group):
                    raise ValueError(
                        f"services.{sname}.environments.{ename}: platform 'azure' needs subscription_id and resource_group"
                    )
                if t.app == "kubernetes" and not (t.namespace and t.web_deployment):
                    raise ValueError(
                        f"services.{sname}.environments.{ename}: app 'kubernetes' needs namespace and web_deployment"
                    )
                if t.drill and t.production:
                    raise ValueError(
                        f"services.{sname}.environments.{ename}.drill: drills damage data on purpose and are refused "
                        "for production; drill a non-production copy of it (e.g. preproduction) instead"
                    )
                why = clock_change_times(self.timezone, t.nightly_backup_at)
                if why:
                    where = (f"services.{sname}.environments.{ename}.backup_offset_minutes" if t.backup_offset_minutes
                             else "fleet.nightly_backup_at")
                    raise ValueError(f"{where}: the nightly backup at {why}; choose a time outside the clock-change hour")
        for i, route in enumerate(self.alerts.routes):
            env = self.services.get(route.service)
            if env is None or route.environment not in env.environments:
                raise ValueError(f"alerts.routes[{i}]: no service '{route.service}' with environment "
                                 f"'{route.environment}' is configured")
        return self

    # --- resolution ---------------------------------------------------------------------

    def target(self, service: str, environment: str) -> "Target":
        """The fully resolved names and settings of one service environment.

        Raises:
            ConfigError: the service or environment is not in the configuration.
        """
        if service not in self.services:
            raise ConfigError(
                f"unknown service '{service}'; configured: {', '.join(sorted(self.services))}",
                field="service",
                source=self.source,
            )
        envs = self.services[service].environments
        if environment not in envs:
            raise ConfigError(
                f"unknown environment '{environment}' for service '{service}'; configured: {', '.join(envs)}",
                field="environment",
                source=self.source,
            )
        return self._build_target(service, environment)

    def targets(self) -> list["Target"]:
        return [self._build_target(s, e) for s, svc in self.services.items() for e in svc.environments]

    def _build_target(self, service: str, environment: str) -> "Target":
        env = self.services[service].environments[environment]
        short = ENVIRONMENTS[environment]
        values: dict[str, Any] = env.model_dump()
        sources = {k: ("file" if k in env.model_fields_set else "default") for k in values}
        values["server"] = env.server or f"{self.prefix}-{service}-{short}-pg"
        values["database"] = env.database or f"{service}_{environment}"
        values["storage_account"] = env.storage_account or f"{self.prefix}{service}dbbkp{short}sa"[:24]
        values["production"] = env.production if env.production is not None else environment == "production"
        values["drill"] = env.drill if env.drill is not None else not values["production"]
        h, m = map(int, self.fleet.nightly_backup_at.split(":"))
        at = (h * 60 + m + env.backup_offset_minutes) % (24 * 60)
        values["nightly_backup_at"] = f"{at // 60:02d}:{at % 60:02d}"
        return Target(
            service=service,
            environment=environment,
            env_short=short,
            timezone=self.timezone,
            sources=sources,
            **{k: v for k, v in values.items() if k not in ("checks", "retention")},
            checks=env.checks,
            retention=env.retention,
        )


class Target(BaseModel):
    """A resolved service environment: every name the flows need, no defaults left."""

    model_config = ConfigDict(frozen=True)

    service: str
    environment: str
    env_short: str
    timezone: str
    platform: Literal["local", "azure"]
    app: Literal["local", "kubernetes"]
    production: bool
    server: str
    database: str
    admin_user: str
    subscription_id: str | None
    resource_group: str | None
    storage_account: str
    container: str
    namespace: str | None
    web_deployment: str | None
    worker_deployment: str | None
    ingress: str | None
    temp_host: str | None
    kube_context: str | None
    healthcheck_url: str | None
    checks: list[Check]
    retention: Retention
    rpo_minutes: int
    rto_minutes: int
    approval_timeout_minutes: int
    recovery_slot_wait_minutes: float
    geo_restore: GeoRestoreSettings | None = None
    postgres_version: int | None = None
    #: the monthly drill is scheduled (resolved: non-production unless the environment says otherwise)
    drill: bool = False
    backup_offset_minutes: int = 0
    #: local time of the nightly backup: [fleet] nightly_backup_at + backup_offset_minutes
    nightly_backup_at: str = "04:00"
    sources: dict[str, str] = Field(default_factory=dict, exclude=True)

    @property
    def key(self) -> str:
        """`<service>-<env short>`: the unit of concurrency and the prefix of names."""
        return f"{self.service}-{self.env_short}"

    def nightly_backup_name(self, day: "Any") -> str:
        """Name of the nightly backup for a date, as the existing tooling writes it."""
        return f"{self.service}_{self.env_short}_{day:%Y-%m-%d}.sql.gz"


BUILTIN_CONFIG = """
prefix = "s189"
timezone = "Europe/London"

[services.apply.environments.development]
platform = "local"
checks = [
  { kind = "healthcheck" },
  { kind = "row_count", table = "candidates", min = 1 },
  { kind = "row_count", table = "applications", min = 1 },
]
"""


def _format_loc(loc: tuple[Any, ...]) -> str:
    out: list[str] = []
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part in ("healthcheck", "row_count", "latest_record", "query"):
            continue  # discriminator tags pydantic adds to the path
        else:
            out.append(("." if out else "") + str(part))
    return "".join(out)


def parse_config(text: str, source: str = "<string>") -> DrConfig:
    """Parse and validate configuration text.

    Raises:
        ConfigError: the text is not TOML, or a field is missing, unknown or invalid;
            the message names the file and the field.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from exc
    try:
        return DrConfig.model_validate({**raw, "source": source})
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        field = _format_loc(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README for the accepted keys)"
        elif first["type"] == "missing":
            msg = "required field is missing"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(msg + more, field=field or None, source=source) from exc


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to use: the explicit path, `$DR_CONFIG`, or `./dr.toml`."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("DR_CONFIG")
    if env:
        return Path(env)
    here = Path.cwd() / DEFAULT_CONFIG_NAME
    return here if here.exists() else None


def load_config(path: str | os.PathLike[str] | None = None) -> DrConfig:
    """Load the configuration; without any file, the built-in local demo configuration.

    Raises:
        ConfigError: the file is missing or invalid.
    """
    found = find_config_path(path)
    if found is None:
        return parse_config(BUILTIN_CONFIG, "<built-in>")
    if not found.exists():
        raise ConfigError("configuration file not found", source=str(found))
    return parse_config(found.read_text(encoding="utf-8"), str(found))

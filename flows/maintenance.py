"""Maintenance workflows: send users to the maintenance page, and back."""

from __future__ import annotations

from prefect import flow

from dr.runtime import Ref
from flows.common import run_logger
from tasks.maintenance import (
    app_status,
    disable_maintenance,
    enable_maintenance,
    scale_down_app,
    scale_up_app,
    wait_until_healthy,
)


@flow(name="maintenance-on", log_prints=True)
def maintenance_on(service: str, environment: str, stop_app: bool = False, config_path: str | None = None) -> dict:
    """Show users the maintenance page; the temporary URL keeps reaching the app.

    Args:
        service: the service short name.
        environment: the environment.
        stop_app: also stop the web app and workers at once (their replica counts are recorded
            first, so maintenance-off restores them exactly): the runbook's "stop the service as
            soon as possible" when data is being corrupted.
        config_path: the configuration file.
    """
    ref = Ref(service, environment, config_path)
    log = run_logger()
    before = app_status(ref)
    if before.maintenance:
        log.info("maintenance is already on for %s %s; nothing to switch", service, environment)
    recorded = scale_down_app(ref) if stop_app else None
    after = enable_maintenance(ref)
    log.info("maintenance on: users see %s; the app is reachable at %s", after.main_url, after.temp_url)
    return {"already_on": before.maintenance, "recorded_replicas": recorded, "main_url": after.main_url,
            "temp_url": after.temp_url}


@flow(name="maintenance-off", log_prints=True)
def maintenance_off(service: str, environment: str, healthcheck_timeout: float = 120.0,
                    config_path: str | None = None) -> dict:
    """Restore the recorded replicas, send users back to the app, and wait for its healthcheck.

    Args:
        service: the service short name.
        environment: the environment.
        healthcheck_timeout: seconds to wait for the healthcheck to answer 200.
        config_path: the configuration file.
    """
    ref = Ref(service, environment, config_path)
    log = run_logger()
    before = app_status(ref)
    if not before.maintenance and before.recorded_replicas is None:
        log.info("maintenance is not on for %s %s; nothing to switch", service, environment)
    restored = scale_up_app(ref)
    after = disable_maintenance(ref)
    health = wait_until_healthy(ref, timeout=healthcheck_timeout)
    log.info("maintenance off: %s answers %s; replicas %s", after.main_url, health[0], restored)
    return {"was_on": before.maintenance, "replicas": restored, "main_url": after.main_url, "healthcheck": health[0]}

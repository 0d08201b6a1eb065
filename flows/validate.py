"""Validate workflow: is the app up and serving the data we expect?"""

from __future__ import annotations

from prefect import flow

from dr.errors import ValidationFailed
from dr.runtime import Ref
from flows.common import run_logger
from tasks.validation import run_service_checks


@flow(name="validate-service", log_prints=True)
def validate_service(service: str, environment: str, server: str | None = None, database: str | None = None,
                     healthcheck: bool = True, config_path: str | None = None) -> list[dict]:
    """Run the environment's checks (healthcheck, row counts, freshness, queries); fail if a required one fails.

    Args:
        service: the service short name.
        environment: the environment.
        server: check this server instead of the environment's own.
        database: check this database instead of the environment's own.
        healthcheck: include the app's healthcheck (off when checking a server the app does not use).
        config_path: the configuration file.
    """
    ref = Ref(service, environment, config_path)
    results = run_service_checks(ref, server=server, database=database, healthcheck=healthcheck)
    log = run_logger()
    for r in results:
        log.info("%s %s: expected %s, got %s", "PASS" if r.passed else "FAIL", r.name, r.expected, r.actual)
    failed = [r.name for r in results if r.required and not r.passed]
    if failed:
        raise ValidationFailed(f"{len(failed)} required check(s) failed: {', '.join(failed)}", failed=failed)
    return [r.__dict__ for r in results]

"""Tasks that check the service: healthcheck and data checks, published as a table."""

from __future__ import annotations

from prefect.artifacts import create_table_artifact

from dr.checks import CheckResult, run_checks
from dr.runtime import Ref
from tasks.common import dr_task


@dr_task(retries=2)
def run_service_checks(ref: Ref, server: str | None = None, database: str | None = None,
                       healthcheck: bool = True) -> list[CheckResult]:
    """Run the configured checks and publish them as a table artifact."""
    results = run_checks(ref.rt(), server=server, database=database, healthcheck=healthcheck)
    create_table_artifact(
        key=f"validation-{ref.service}-{ref.environment}",
        table=[{"check": r.name, "required": r.required, "expected": r.expected, "actual": r.actual,
                "pass": "PASS" if r.passed else "FAIL"} for r in results],
        description=f"Service checks for {ref.service} {ref.environment}",
    )
    return results

"""Service checks: is the app up, and is it serving the data we expect?"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from psycopg import sql

from dr.config import HealthcheckCheck, LatestRecordCheck, QueryCheck, RowCountCheck
from dr.database import connect
from dr.errors import DrError
from dr.runtime import Runtime


@dataclass(frozen=True)
class CheckResult:
    name: str
    required: bool
    expected: str
    actual: str
    passed: bool


def _ident(name: str) -> sql.Composable:
    parts = name.split(".")
    return sql.SQL(".").join(sql.Identifier(p) for p in parts)


def run_checks(rt: Runtime, *, server: str | None = None, database: str | None = None,
               healthcheck: bool = True) -> list[CheckResult]:
    """Run the environment's configured checks; never raises for a failed check."""
    results: list[CheckResult] = []
    conn = rt.servers.connection(server or rt.target.server, database or rt.target.database)
    for check in rt.target.checks:
        if isinstance(check, HealthcheckCheck):
            if not healthcheck:
                continue
            status, body = rt.app.healthcheck(rt.target.healthcheck_url)
            results.append(CheckResult("healthcheck", check.required, "200", f"{status} {body[:80]}", status == 200))
            continue
        try:
            with connect(conn) as c:
                c.execute("SET default_transaction_read_only = on")
                if isinstance(check, RowCountCheck):
                    n = c.execute(sql.SQL("SELECT count(*) FROM {}").format(_ident(check.table))).fetchone()[0]
                    hi = "∞" if check.max is None else str(check.max)
                    ok = n >= check.min and (check.max is None or n <= check.max)
                    results.append(CheckResult(f"rows in {check.table}", check.required, f"{check.min}..{hi}", str(n), ok))
                elif isinstance(check, LatestRecordCheck):
                    latest = c.execute(sql.SQL("SELECT max({}) FROM {}").format(
                        sql.Identifier(check.column), _ident(check.table))).fetchone()[0]
                    age = (datetime.now(timezone.utc) - latest).total_seconds() / 3600 if latest else None
                    results.append(CheckResult(
                        f"latest {check.table}.{check.column}", check.required, f"< {check.max_age_hours} h old",
                        "none" if age is None else f"{age:.1f} h old", age is not None and age < check.max_age_hours))
                elif isinstance(check, QueryCheck):
                    row = c.execute(check.sql).fetchone()
                    got = "" if row is None or row[0] is None else str(row[0])
                    results.append(CheckResult(check.name, check.required, check.expect, got, got == check.expect))
        except DrError as exc:
            results.append(CheckResult(getattr(check, "name", None) or f"{check.kind} {getattr(check, 'table', '')}".strip(),
                                       check.required, "database reachable", str(exc)[:120], False))
        except Exception as exc:  # a broken query is a failed check, shown to the person
            results.append(CheckResult(getattr(check, "name", None) or f"{check.kind} {getattr(check, 'table', '')}".strip(),
                                       check.required, "query succeeds", f"{type(exc).__name__}: {str(exc)[:100]}", False))
    return results

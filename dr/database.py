"""SQL-level work on a server: manifests, databases to restore into, the atomic swap.

Identifiers are always composed with `psycopg.sql.Identifier`, never formatted in.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

import psycopg
from psycopg import sql

from dr.commands import ConnInfo
from dr.errors import ConnectionFailed, RestoreError, VerificationFailed

log = logging.getLogger("dr.database")

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")


@contextmanager
def connect(conn: ConnInfo, *, autocommit: bool = True) -> Iterator[psycopg.Connection]:
    """Open a connection; connection failures become `ConnectionFailed` (transient)."""
    try:
        c = psycopg.connect(**conn.psycopg_kwargs(), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ConnectionFailed(f"cannot connect to {conn.describe()}: {str(exc).strip().splitlines()[0]}",
                               server=conn.host) from exc
    try:
        yield c
    finally:
        c.close()


def server_major_version(conn: ConnInfo) -> int:
    with connect(conn) as c:
        return int(c.execute("SHOW server_version_num").fetchone()[0]) // 10000


def database_exists(conn: ConnInfo, name: str) -> bool:
    with connect(conn.with_db("postgres")) as c:
        return c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def list_databases(conn: ConnInfo) -> list[str]:
    with connect(conn.with_db("postgres")) as c:
        return [r[0] for r in c.execute(
            "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> 'postgres' ORDER BY 1")]


def database_comment(conn: ConnInfo, name: str) -> str | None:
    with connect(conn.with_db("postgres")) as c:
        row = c.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row[0] if row else None


def create_database(conn: ConnInfo, name: str, *, comment: str | None = None) -> None:
    with connect(conn.with_db("postgres")) as c:
        c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name)))
        if comment:
            c.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment)))


def set_database_comment(conn: ConnInfo, name: str, comment: str) -> None:
    with connect(conn.with_db("postgres")) as c:
        c.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment)))


def drop_database(conn: ConnInfo, name: str) -> None:
    """Drop a database, ending its sessions first (idempotent)."""
    with connect(conn.with_db("postgres")) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --- manifests ---------------------------------------------------------------------------

MANIFEST_QUERIES = {
    "tables": """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r','p') AND n.nspname NOT IN ('pg_catalog','information_schema')
                   AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'
                   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
                 ORDER BY 1, 2""",
    "sequences": """SELECT schemaname, sequencename, last_value FROM pg_sequences
                    WHERE schemaname NOT IN ('pg_catalog','information_schema') ORDER BY 1, 2""",
    "objects": """SELECT c.relkind::text, count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
                    AND n.nspname NOT LIKE 'pg_temp%%' AND c.relkind IN ('r','i','S','v','m','p')
                  GROUP BY 1 ORDER BY 1""",
    # NOT NULL constraints are left out: PostgreSQL 18 lists them in pg_constraint, older versions do not
    # (a backup from 15 restored into 18 has the same constraints); not_null_constraints counts them apart
    "constraints": """SELECT count(*) FILTER (WHERE co.contype <> 'n'), count(*) FILTER (WHERE co.contype = 'n')
                      FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
                      WHERE n.nspname NOT IN ('pg_catalog','information_schema')""",
}


def read_manifest(c: psycopg.Connection) -> dict[str, Any]:
    """Row count of every table, sequence values and object counts, in the connection's snapshot."""
    tables = c.execute(MANIFEST_QUERIES["tables"]).fetchall()
    rows = {
        f"{s}.{t}": c.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(s), sql.Identifier(t))).fetchone()[0]
        for s, t in tables
    }
    seqs = {f"{s}.{n}": v for s, n, v in c.execute(MANIFEST_QUERIES["sequences"]).fetchall()}
    objects = {k: n for k, n in c.execute(MANIFEST_QUERIES["objects"]).fetchall()}
    objects["constraints"], not_null = c.execute(MANIFEST_QUERIES["constraints"]).fetchone()
    return {"rows": rows, "sequences": seqs, "objects": objects, "not_null_constraints": not_null}


def manifest_of(conn: ConnInfo) -> dict[str, Any]:
    with connect(conn, autocommit=False) as c:
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        m = read_manifest(c)
        c.rollback()
        return m


class SnapshotSession:
    """A repeatable-read transaction whose snapshot is exported for `pg_dump --snapshot`."""

    def __init__(self, conn: ConnInfo):
        self._cm = connect(conn, autocommit=False)
        self.c = self._cm.__enter__()
        self.c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self.snapshot: str = self.c.execute("SELECT pg_export_snapshot()").fetchone()[0]
        self.server_version = int(self.c.execute("SHOW server_version_num").fetchone()[0]) // 10000

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.c)

    def close(self) -> None:
        try:
            self.c.rollback()
        finally:
            self._cm.__exit__(None, None, None)


def compare_manifest(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Differences between a backup's manifest and a restored database; empty when equal."""
    problems: list[str] = []
    for table, n in expected.get("rows", {}).items():
        got = actual.get("rows", {}).get(table)
        if got is None:
            problems.append(f"table {table} is missing")
        elif got != n:
            problems.append(f"table {table} has {got} rows, the backup has {n}")
    for table in actual.get("rows", {}):
        if table not in expected.get("rows", {}):
            problems.append(f"table {table} is not in the backup")
    for seq, v in expected.get("sequences", {}).items():
        got = actual.get("sequences", {}).get(seq)
        if v is not None and (got is None or got < v):
            problems.append(f"sequence {seq} is at {got}, the backup has {v}")
    for kind, n in expected.get("objects", {}).items():
        got = actual.get("objects", {}).get(kind, 0)
        if kind == "constraints" and "not_null_constraints" not in expected:
            # a manifest from before NOT NULL constraints were counted apart: PostgreSQL 18's included them
            got = n if n in (got, got + actual.get("not_null_constraints", 0)) else got
        if got != n:
            problems.append(f"{n} objects of kind {kind!r} expected, found {got}")
    return problems


def verify_against_manifest(conn: ConnInfo, manifest: dict[str, Any]) -> dict[str, Any]:
    """Raise `VerificationFailed` unless the database holds exactly what the manifest says."""
    actual = manifest_of(conn)
    problems = compare_manifest(manifest, actual)
    if problems:
        raise VerificationFailed(
            f"restored database {conn.dbname} does not match the backup: " + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""), database=conn.dbname)
    return actual


def analyze(conn: ConnInfo) -> None:
    with connect(conn) as c:
        c.execute("ANALYZE")


# --- the swap ------------------------------------------------------------------------------


def replaced_name(database: str, when: datetime) -> str:
    """`<db>_replaced_<UTC stamp>`, cut to PostgreSQL's 63-byte limit."""
    suffix = f"_replaced_{when.astimezone(timezone.utc):%Y%m%d%H%M%S}"
    return database[: 63 - len(suffix)] + suffix


def restore_db_name(database: str, when: datetime) -> str:
    suffix = f"_restore_{when.astimezone(timezone.utc):%Y%m%d%H%M%S}"
    return database[: 63 - len(suffix)] + suffix


def free_database_name(conn: ConnInfo, name: str) -> str:
    """`name`, or `name_2`, `name_3`... when taken (the time-stamped names have 1-s resolution)."""
    candidate, n = name, 1
    while database_exists(conn, candidate):
        n += 1
        candidate = name[: 63 - len(f"_{n}")] + f"_{n}"
    return candidate


def swap_databases(conn: ConnInfo, live: str, new: str, replaced: str, *, attempts: int = 5) -> str | None:
    """Make `new` the live database in one transaction; the old one is kept as `replaced`.

    Connections to the live database are refused and ended first. If anything fails,
    the live database is left as it was (renamed back by the transaction's rollback,
    connections allowed again). Returns the name the old database now has, or None when
    there was no live database (a recreated server).
    """
    admin = conn.with_db("postgres")
    with connect(admin) as c:
        has_live = c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (live,)).fetchone() is not None
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (new,)).fetchone():
            raise RestoreError(f"database {new} to swap in does not exist", database=new)
        replaced = free_database_name(admin, replaced)  # a restore earlier in the same second may hold the name
        swapped = False
        if has_live:
            c.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(live)))
        try:
            last: Exception | None = None
            for attempt in range(attempts):
                try:
                    with c.transaction():
                        if has_live:
                            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                      "WHERE datname = %s AND pid <> pg_backend_pid()", (live,))
                            time.sleep(0.2 * (attempt + 1))
                            c.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(live), sql.Identifier(replaced)))
                        c.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(new), sql.Identifier(live)))
                    swapped = True
                    break
                except psycopg.errors.ObjectInUse as exc:  # a session came back between terminate and rename
                    last = exc
                    log.warning("swap attempt %s: %s", attempt + 1, exc)
            else:
                raise RestoreError(f"could not swap {new} in for {live}: sessions kept reconnecting ({last})",
                                   database=live, world_state=f"{live} is unchanged; {new} holds the restored data")
        finally:
            # the old database accepts connections again: live again after a failure, kept for reconciliation after
            # the swap (its name is known from the outcome, not guessed from what exists)
            if has_live:
                c.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
                    sql.Identifier(replaced if swapped else live)))
    if has_live:
        with connect(admin) as c:
            c.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(replaced), sql.Literal(f"{REPLACED_COMMENT}{datetime.now(timezone.utc).isoformat()}")))
    return replaced if has_live else None


REPLACED_COMMENT = "dr: replaced by a restore at "
SAFE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

"""SQL-level work on a server: manifests, databases to restore into, the atomic swap.

Identifiers are always composed with `psycopg.sql.Identifier`, never formatted in.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

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
    """Drop a database, ending its sessions first (idempotent).

    Raises:
        RestoreError: a superuser's session is in it and the connected role is not one (Azure: its
            own `azuresu`), so it cannot be ended; nothing was dropped.
    """
    with connect(conn.with_db("postgres")) as c:
        try:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except psycopg.errors.InsufficientPrivilege as exc:
            raise RestoreError(f"cannot drop {name}: {_unendable(c, name) or exc.diag.message_primary}",
                               database=name, world_state=f"{name} was not dropped",
                               resume_hint="run the same command again once that session has gone") from exc


def _other_sessions_sql(database: str, keep: list[int] | None = None) -> sql.Composed:
    """The other sessions of a database (pid, user), and whether the connected role may NOT end them:
    a role that is not a superuser cannot end a superuser's session (on Azure, the service's own `azuresu`)."""
    return sql.SQL(
        "SELECT a.pid, a.usename, coalesce(r.rolsuper, false) AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = "
        "current_user) FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid "
        "WHERE a.datname = {db} AND a.pid <> pg_backend_pid() AND a.pid <> ALL(ARRAY[{keep}]::int[])").format(
        db=sql.Literal(database), keep=sql.SQL(", ").join(sql.Literal(k) for k in keep or []))


def _unendable(c: psycopg.Connection, database: str, keep: list[int] | None = None) -> str | None:
    """Why sessions of `database` cannot be ended by the connected role (None when they all can)."""
    roles = sorted({user for _, user, protected in c.execute(_other_sessions_sql(database, keep)) if protected})
    if not roles:
        return None
    me = c.execute("SELECT current_user").fetchone()[0]
    return (f"a session of superuser {', '.join(repr(r) for r in roles)} is connected to {database}, and ending it "
            f"needs SUPERUSER, which '{me}' does not have (Azure gives no one SUPERUSER: such sessions are Azure's "
            "own maintenance and end by themselves)")


def swap_refusal(conn: ConnInfo, live: str) -> str | None:
    """Why the connected role could not swap a restored database in for `live` (None: it can).

    Renaming a database, and refusing connections to it, are for its owner (a role with the
    owner's privileges) with CREATEDB. On Azure the administrator is no superuser: a database
    made by another role must be granted to it first.
    """
    with connect(conn.with_db("postgres")) as c:
        row = c.execute(
            "SELECT pg_get_userbyid(d.datdba), current_user, pg_has_role(current_user, d.datdba, 'USAGE'), "
            "r.rolcreatedb OR r.rolsuper FROM pg_database d, pg_roles r "
            "WHERE d.datname = %s AND r.rolname = current_user", (live,)).fetchone()
    if row is None:
        return None
    owner, me, owns, createdb = row
    if not owns:
        return (f"the live database {live} belongs to '{owner}', and '{me}' does not have that role's privileges, which "
                f"renaming it for the swap needs (there is no superuser to do it on Azure); as '{me}', run "
                f"GRANT {owner} TO {me}")
    if not createdb:
        return f"renaming {live} for the swap needs CREATEDB, which '{me}' does not have"
    return None


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


# --- what a backup holds: identity and write fingerprint -------------------------------------
#
# A database that a restore replaced may be dropped only when a backup provably holds it: a
# backup taken of exactly that database (same server, same database OID, same cluster) with no
# write to it since. "No write since" is proved by a fingerprint read just BEFORE the backup's
# snapshot and again, with every other session ended, when it matters: every table's file
# identity (TRUNCATE, VACUUM FULL, CLUSTER and rewrites give a new relfilenode) and its
# insert/update/delete counters, every sequence's value, and the cumulative statistics' reset
# time. Reading it before the snapshot errs only on the safe side (a write committed in between
# is in the backup AND moves a counter); a write after the snapshot moves a counter at the
# latest when its session ends, which the checks force. Planner statistics (ANALYZE,
# autovacuum) and shared catalogs (database comments, ALLOW_CONNECTIONS) are left out: they
# change no content. Anything the fingerprint cannot vouch for (counters off, statistics reset,
# a crash that discarded them) compares unequal, so the database is kept.

_FINGERPRINT_TABLES = """
SELECT c.oid::bigint, n.nspname || '.' || c.relname, pg_relation_filenode(c.oid)::bigint,
       coalesce(s.n_tup_ins, -1), coalesce(s.n_tup_upd, -1), coalesce(s.n_tup_del, -1)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE c.relkind IN ('r', 'm') AND NOT c.relisshared AND c.relpersistence <> 't'
  AND c.oid NOT IN ('pg_catalog.pg_statistic'::regclass, 'pg_catalog.pg_statistic_ext_data'::regclass)
ORDER BY 1
"""


def database_identity(c: psycopg.Connection) -> dict[str, Any]:
    """Which database this is, across renames: its OID and its cluster's system identifier."""
    oid = c.execute("SELECT oid::bigint FROM pg_database WHERE datname = current_database()").fetchone()[0]
    try:
        sysid = str(c.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
    except psycopg.Error:  # not granted: the OID and the server's name still identify it
        sysid = None
    return {"database_oid": oid, "system_identifier": sysid}


def write_fingerprint(c: psycopg.Connection) -> dict[str, Any] | None:
    """What changes whenever the database's content is written (see above); None when it cannot
    be read honestly (statistics counters off). `c` must be in autocommit mode."""
    if c.execute("SELECT current_setting('track_counts')").fetchone()[0] != "on":
        return None
    c.execute("SELECT pg_stat_clear_snapshot()")  # this transaction's statistics are read fresh
    reset = c.execute("SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()").fetchone()
    return {
        "stats_reset": reset[0].isoformat() if reset and reset[0] else None,
        "tables": [list(r) for r in c.execute(_FINGERPRINT_TABLES).fetchall()],
        "sequences": [list(r) for r in c.execute(
            "SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences ORDER BY 1").fetchall()],
    }


def held_by(backup: Any, server: str, identity: dict[str, Any], fingerprint: dict[str, Any] | None) -> str | None:
    """None when `backup` (a `BackupInfo`) holds exactly this database as it is now; else why not."""
    m = backup.manifest or {}
    if not backup.complete:
        return f"backup {backup.name} is incomplete"
    if backup.source_server != server or m.get("identity") is None:
        return f"backup {backup.name} was not taken of this database"
    theirs, ours = m["identity"], identity
    if theirs.get("database_oid") != ours.get("database_oid") or (
            theirs.get("system_identifier") and ours.get("system_identifier")
            and theirs["system_identifier"] != ours["system_identifier"]):
        return f"backup {backup.name} was taken of another database"
    if fingerprint is None or m.get("writes") is None:
        return "its writes cannot be traced (statistics counters are off)"
    if m["writes"] != fingerprint:
        return f"it was written to (or its statistics were reset) after backup {backup.name} was taken"
    return None


def allow_connections(conn: ConnInfo, database: str) -> None:
    """Let sessions connect to `database` again (idempotent)."""
    with connect(conn.with_db("postgres")) as c:
        c.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(database)))


def drop_if_held(conn: ConnInfo, database: str, check: Callable[[dict[str, Any], dict[str, Any] | None], str | None]) -> str | None:
    """Drop `database` only if `check(identity, fingerprint)`, read while it has no other session, finds nothing wrong.

    Connections are refused and every other session is ended first (their statistics are then
    flushed), and the database is dropped before anyone could connect again. Returns None when
    it was dropped, else `check`'s reason (the database is left as it was, accepting connections).
    """
    admin = conn.with_db("postgres")
    with connect(admin) as c:
        allow_connections(admin, database)  # a tidy-up killed here before left it refusing them
        probe = psycopg.connect(**conn.with_db(database).psycopg_kwargs(), autocommit=True)
        dropped = False
        try:
            c.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(database)))
            _end_other_sessions(c, database, keep=probe.info.backend_pid)
            why = check(database_identity(probe), write_fingerprint(probe))
            probe.close()
            if why is None:
                c.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))
                dropped = True
            return why
        finally:
            if not probe.closed:
                probe.close()
            if not dropped:
                c.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(database)))


def _end_other_sessions(c: psycopg.Connection, database: str, keep: int | None = None,
                        timeout: float = 30.0) -> None:
    """End every session of `database` but `keep` and wait until they are gone (their statistics flushed).

    A session the connected role may not end (a superuser's) is waited for until `timeout`, then refused.
    """
    deadline = time.monotonic() + timeout
    while True:
        others = [] if keep is None else [keep]
        left = c.execute(sql.SQL("SELECT count(*), count(pg_terminate_backend(pid)) FILTER (WHERE NOT protected) "
                                 "FROM ({}) s(pid, usename, protected)").format(
            _other_sessions_sql(database, others))).fetchone()[0]
        if not left:
            return
        if time.monotonic() > deadline:
            why = _unendable(c, database, others)
            raise RestoreError(f"sessions of {database} did not end within {timeout:.0f} s" + (f": {why}" if why else ""),
                               database=database)
        time.sleep(0.05)


def _wait_for_unendable(c: psycopg.Connection, database: str, *, timeout: float, new: str) -> None:
    """Wait until no session of `database` is one the connected role may not end; after `timeout`, refuse naming it."""
    deadline = time.monotonic() + timeout
    while (why := _unendable(c, database)) is not None:
        if time.monotonic() > deadline:
            raise RestoreError(f"could not swap {new} in for {database}: {why}", database=database,
                               world_state=f"{database} is unchanged; {new} holds the restored data",
                               resume_hint="run the same command again once that session has gone")
        time.sleep(0.5)


def swap_databases(conn: ConnInfo, live: str, new: str, replaced: str, *, attempts: int = 5,
                   safety_backup: Any = None, server: str | None = None) -> tuple[str | None, str]:
    """Make `new` the live database in one transaction; the old one is kept as `replaced`.

    The live database's sessions are ended and it is renamed in the same round trip: the rename
    locks the database, so a session connecting meanwhile waits for the transaction and then finds
    the name taken by the new database (PostgreSQL waits up to 5 s for the ended sessions to exit;
    one that got in between is met by another attempt). Nothing is set that outlives the
    transaction: if the restore dies here (kill -9, a lost connection), the server rolls it back
    and the live database is exactly as it was, accepting connections.

    Args:
        safety_backup: the `BackupInfo` of the backup taken of the live database before the
            restore. Once swapped out (no session of it left, nobody connecting by its new name),
            the old database is compared with it (identity and write fingerprint); the verdict
            is recorded in the kept database's comment, where tidy-up starts from.
        server: the server's name, as the backup recorded it (needed with `safety_backup`).

    Returns:
        The name the old database now has (None when there was no live database: a recreated
        server), and the verdict on what holds it ("held by backup ..." or why nothing does).
    """
    admin = conn.with_db("postgres")
    with connect(admin) as c:
        has_live = c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (live,)).fetchone() is not None
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (new,)).fetchone():
            raise RestoreError(f"database {new} to swap in does not exist", database=new)
        replaced = free_database_name(admin, replaced)  # a restore earlier in the same second may hold the name
        if has_live:
            # a superuser's session (Azure's own azuresu) cannot be ended by a role that is not one: waited for, then refused
            _wait_for_unendable(c, live, timeout=SWAP_SESSION_WAIT, new=new)
        end_and_rename = sql.SQL(
            "SELECT count(pg_terminate_backend(pid)) FROM ({others}) s(pid, usename, protected) WHERE NOT protected; "
            "ALTER DATABASE {live_id} RENAME TO {replaced}").format(
            others=_other_sessions_sql(live), live_id=sql.Identifier(live), replaced=sql.Identifier(replaced))
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                with c.transaction():
                    if has_live:
                        c.execute(end_and_rename)  # no parameters: one simple-query round trip
                    c.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(new), sql.Identifier(live)))
                    if has_live:  # in the same transaction: a kept database always says what it is (tidy-up reads it)
                        c.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(replaced), sql.Literal(
                            f"{REPLACED_COMMENT}{datetime.now(timezone.utc).isoformat()}; not yet compared with its safety backup")))
                break
            except psycopg.errors.ObjectInUse as exc:  # a session came in between the two statements
                last = exc
                log.warning("swap attempt %s: %s", attempt + 1, exc)
        else:
            why = _unendable(c, live) if has_live else None
            raise RestoreError(f"could not swap {new} in for {live}: " + (why or f"sessions kept reconnecting ({last})"),
                               database=live, world_state=f"{live} is unchanged; {new} holds the restored data",
                               resume_hint="run the same command again once those sessions have gone")
    if not has_live:
        return None, "there was no live database"
    verdict = "no backup of it was taken before the restore"
    if safety_backup is not None:
        # every session of the old database ended with the rename (their statistics flushed); one
        # that connects by its new name since can only add writes, which make the verdict "not held"
        with connect(conn.with_db(replaced)) as probe:
            with connect(admin) as c:
                _end_other_sessions(c, replaced, keep=probe.info.backend_pid)
            why = held_by(safety_backup, server or "", database_identity(probe), write_fingerprint(probe))
        verdict = (f"held by backup {safety_backup.name} sha256={safety_backup.sha256}" if why is None
                   else f"not held by backup {safety_backup.name}: {why}")
    set_database_comment(admin, replaced, f"{REPLACED_COMMENT}{datetime.now(timezone.utc).isoformat()}; {verdict}")
    return replaced, verdict


REPLACED_COMMENT = "dr: replaced by a restore at "
#: how long a swap waits for sessions of the live database it may not end (a superuser's) before it refuses
SWAP_SESSION_WAIT = 10.0
SAFE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

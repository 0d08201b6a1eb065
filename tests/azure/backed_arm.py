"""The fake ARM with real PostgreSQL behind it, so the scenario flows run on `platform = "azure"`.

`BackedArm` is `FakeArm` (the REAL management SDK talks to it over TLS, every request body
is recorded) whose servers are real PostgreSQL clusters of the local platform:

- a point-in-time restore (`createMode=PointInTimeRestore`) is a real PITR of the source's
  base backup and WAL archive (`LocalServers.point_in_time_restore`) at the `pointInTimeUTC`
  the SDK sent; a revive (`ReviveDropped`) brings back the dropped cluster; a create
  (`Default`) runs initdb; a DELETE drops the cluster (kept for revive, as Azure does).
- Azure serves every server at `<fqdn>:5432` with TLS. Here each server gets its own
  loopback address `127.x.y.z` as its FQDN, and a forwarder on `127.x.y.z:5432` passes the
  bytes to wherever the cluster listens now; the clusters have `ssl = on` with a throw-away
  certificate and an administrator role with the password the tool reads from
  `DR_AZURE_PG_PASSWORD` (for a create, the `administratorLoginPassword` that was sent).
- `backup.earliestRestoreDate` is the cluster's first base backup.
- `azure.extensions` is enforced by the cluster itself, as on Azure, where `CREATE EXTENSION`
  of anything not allow-listed fails: each allow-list gets an installation of its own, a
  copy of the system PostgreSQL's `postgres` and `pg_ctl` in the same directory layout, so
  that PostgreSQL (which finds its share directory relative to its own executable) reads
  another `share/extension/`; the server's record (`bin_dir` in its `server.json`) names that
  installation, which the local platform then runs it with. That one lists every control file (so `pg_available_extensions`
  shows all Azure offers, as on Azure) but holds the install scripts of the allow-listed
  extensions only: anything else fails with "extension "x" has no installation script nor
  update path". Nothing of it is in the database, so `pg_dump` never carries it into a backup
  (an event trigger would be dumped, and refused on restore). The server is restarted on
  the installation of its allow-list whenever it changes (Azure needs no restart for it;
  here it ends the sessions). Other modelled parameters are set with `ALTER SYSTEM`
  (reloaded; the static ones take effect at the restart Azure asks for).

The clusters need PostgreSQL built with SSL for both the server and the client tools (the
system's PostgreSQL, not the embedded one), as real Azure does.
"""

from __future__ import annotations

import logging
import random
import shutil
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from fake_arm import FakeArm, iso

PG_PORT = 5432
log = logging.getLogger(__name__)


class Forwarder:
    """`ip:5432` → `127.0.0.1:<the cluster's current port>`, byte for byte (TLS passes through)."""

    def __init__(self, ip: str, port_of: Any):
        self.ip = ip
        self.port_of = port_of
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, PG_PORT))
        self.sock.listen(64)
        self.closed = False
        self.thread = threading.Thread(target=self._accept, name=f"fwd-{ip}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _upstream(self) -> socket.socket:
        """A connection to the cluster; a refused connect is tried again for up to 3 s."""
        deadline = time.monotonic() + 3
        while True:
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port_of()), timeout=10)
                upstream.settimeout(None)
                return upstream
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self._upstream()
        except Exception as exc:
            # the client sees "server closed the connection unexpectedly": say why in the test's log
            log.warning("forwarder %s:%d: no connection to the cluster: %r", self.ip, PG_PORT, exc)
            client.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        t.start()
        pump(client, upstream)
        t.join(5)
        client.close()
        upstream.close()

    def close(self) -> None:
        """Stop listening, and the accepting thread with it.

        Closing the socket alone leaves that thread waiting on the descriptor's number, which
        the next test's forwarder may get: it would then take that forwarder's connections and
        close them ("server closed the connection unexpectedly", seen in a full run). A
        shutdown wakes the thread first.
        """
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


class BackedArm(FakeArm):
    """A fake ARM whose servers are clusters of `local` (a `LocalServers`)."""

    def __init__(self, cert_file: str, key_file: str, *, local: Any, admin_user: str, admin_password: str):
        from dr.platforms.local.servers import ADMIN_USER

        if admin_user == ADMIN_USER:
            raise ValueError(f"the Azure administrator must not be the local platform's own ({ADMIN_USER})")
        self.local = local
        self.admin_user, self.admin_password = admin_user, admin_password
        self.forwarders: dict[str, Forwarder] = {}
        #: how far the paired region's copy reaches (a geo-restore gets no later than this)
        self.geo_replicated_until: datetime | None = None
        super().__init__(cert_file, key_file)

    def reset(self) -> None:
        super().reset()
        self.polls_to_finish = 0
        self.poll_retry_after = "1"

    def stop(self) -> None:
        super().stop()
        for f in self.forwarders.values():
            f.close()

    # --- addresses -----------------------------------------------------------------

    def address_of(self, name: str) -> str:
        """The loopback address that stands for the server's FQDN (made on first use)."""
        if name not in self.forwarders:
            for _ in range(50):
                ip = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
                try:
                    # the port from the server's metadata (get_server would also run pg_ctl status for each connection)
                    self.forwarders[name] = Forwarder(ip, lambda n=name: self.local.connection(n, "postgres").port)
                    break
                except OSError:  # taken by a parallel run
                    continue
            else:  # pragma: no cover
                raise RuntimeError("no free loopback address for a fake server")
        return self.forwarders[name].ip

    def add_server(self, sub: str, rg: str, name: str, **kw: Any) -> dict[str, Any]:
        doc = super().add_server(sub, rg, name, **kw)
        doc["properties"]["fullyQualifiedDomainName"] = self.address_of(name)
        doc["properties"]["administratorLogin"] = self.admin_user
        if self.local.server_exists(name):
            self._describe(name, doc)
        return doc

    def _describe(self, name: str, doc: dict[str, Any]) -> None:
        """Version and earliest restore point as the cluster has them."""
        info = self.local.get_server(name)
        doc["properties"]["version"] = str(info.version)
        doc["properties"]["minorVersion"] = "0"
        bases = self.local.list_base_backups(name)
        if bases:
            doc["properties"]["backup"]["earliestRestoreDate"] = iso(
                datetime.fromisoformat(bases[0]["finished_at"]))

    # --- what a server is made of -------------------------------------------------------

    def azurify(self, name: str, password: str | None = None) -> None:
        """TLS on and the administrator login, as every Azure server has them (idempotent).

        The administrator is what Azure makes (docs: "server admin user ... LOGIN, NOSUPERUSER,
        INHERIT, CREATEDB, CREATEROLE, REPLICATION", member of `azure_pg_admin`): no superuser;
        `azure_pg_admin` is a member of `pg_monitor` and `pg_signal_backend`, so the admin can
        end other roles' sessions, but not a superuser's. The local platform's own superuser
        (`dradmin`) plays Azure's `azuresu`, which only Microsoft uses. As on Azure, schema
        `public` of the template databases belongs to `azure_pg_admin`, so a database the
        admin creates is one it can create tables in.
        """
        data = self.local.servers_dir / name / "data"
        for src, dst in ((self.cert_file, "server.crt"), (self.key_file, "server.key")):
            shutil.copyfile(src, data / dst)
            (data / dst).chmod(0o600)
            self.local._chown(data / dst)
        admin = sql.Identifier(self.admin_user)
        with psycopg.connect(**self.local.connection(name, "postgres").psycopg_kwargs(), autocommit=True) as c:
            c.execute("ALTER SYSTEM SET ssl = on")
            c.execute("SELECT pg_reload_conf()")
            if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = 'azure_pg_admin'").fetchone():
                c.execute("CREATE ROLE azure_pg_admin NOLOGIN")
            c.execute("GRANT pg_monitor, pg_signal_backend TO azure_pg_admin")
            exists = c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.admin_user,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            c.execute(sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER INHERIT CREATEDB CREATEROLE REPLICATION NOBYPASSRLS "
                              "PASSWORD {}").format(admin, sql.Literal(password or self.admin_password)))
            c.execute(sql.SQL("GRANT azure_pg_admin TO {}").format(admin))
            for template in ("template1", "postgres"):
                with psycopg.connect(**self.local.connection(name, template).psycopg_kwargs(), autocommit=True) as t:
                    t.execute("ALTER SCHEMA public OWNER TO azure_pg_admin")

    def hand_over(self, name: str, database: str) -> None:
        """Make the admin own `database` and everything in it, as when it was made through the admin.

        (The local platform made it as its superuser; on Azure the service's database is made by
        the admin or the app, never by a superuser.)
        """
        admin = sql.Identifier(self.admin_user)
        with psycopg.connect(**self.local.connection(name, "postgres").psycopg_kwargs(), autocommit=True) as c:
            c.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), admin))
        with psycopg.connect(**self.local.connection(name, database).psycopg_kwargs(), autocommit=True) as c:
            c.execute("ALTER SCHEMA public OWNER TO azure_pg_admin")
            objects = c.execute(
                "SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' "
                "WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END, n.nspname, c.relname "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind IN ('r','p','v','m','S') AND n.nspname NOT IN ('pg_catalog','information_schema') "
                "AND n.nspname NOT LIKE 'pg_toast%%' AND NOT EXISTS (SELECT 1 FROM pg_depend d "  # owned sequences
                "WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i'))").fetchall()
            for kind, schema, rel in objects:
                c.execute(sql.SQL("ALTER " + kind + " {}.{} OWNER TO {}").format(
                    sql.Identifier(schema), sql.Identifier(rel), admin))

    def local_sql(self, name: str, *statements: str, database: str = "postgres") -> None:
        """Run statements as the local superuser (Azure's `azuresu`: what only Microsoft can do)."""
        with psycopg.connect(**self.local.connection(name, database).psycopg_kwargs(), autocommit=True) as c:
            for statement in statements:
                c.execute(statement)

    def attach(self, sub: str, rg: str, name: str, *, tags: dict[str, str] | None = None,
               databases: tuple[str, ...] = ()) -> dict[str, Any]:
        """Publish an existing cluster of `local` as an ARM server (the environment's live server).

        Args:
            databases: the service's databases on it, handed over to the admin (`hand_over`).
        """
        self.azurify(name)
        for database in databases:
            self.hand_over(name, database)
        self.local.take_base_backup(name)  # so that restores start from a copy with TLS on
        doc = self.add_server(sub, rg, name, tags=tags)
        self.enforce(name)  # no extension allow-listed yet, as on a new Azure server
        return doc

    def materialize(self, name: str, mode: str, props: dict[str, Any], doc: dict[str, Any]) -> None:
        if mode == "PointInTimeRestore":
            source = props["sourceServerResourceId"].rstrip("/").rsplit("/", 1)[-1]
            when = datetime.fromisoformat(props["pointInTimeUTC"].replace("Z", "+00:00"))
            self.local.point_in_time_restore(source, name, when)
            self.azurify(name)
        elif mode == "GeoRestore":
            # the paired region's copy: the source's archive up to the last WAL it shipped
            source = props["sourceServerResourceId"].rstrip("/").rsplit("/", 1)[-1]
            when = datetime.fromisoformat(props["pointInTimeUTC"].replace("Z", "+00:00"))
            latest = self.geo_replicated_until or self.local.get_restore_window(source).latest
            self.local.point_in_time_restore(source, name, min(when, latest))
            self.azurify(name)
        elif mode == "ReviveDropped":
            source = props["sourceServerResourceId"].rstrip("/").rsplit("/", 1)[-1]
            self.local.revive_dropped_server(source)
            if source != name:  # revived under another name, as Microsoft's instructions do it
                self._rename(source, name)
            self.azurify(name)
        elif mode in ("Default", "Create"):
            self.local.create_server(name)
            self.azurify(name, props.get("administratorLoginPassword"))
        else:
            raise NotImplementedError(f"the backed fake cannot {mode}")
        self.enforce(name)  # its allow-list: the source's for a restore, none for a new server
        self._describe(name, doc)

    def _rename(self, old: str, new: str) -> None:
        """Give a local cluster another name (its directory, record and archive path), running again after."""
        import os

        local = self.local
        local.stop_server(old)
        os.replace(local.servers_dir / old, local.servers_dir / new)
        meta = local._meta(new)
        meta["name"] = new
        local._write_meta(new, meta)
        local._write_conf(new, meta["port"], archive=meta.get("archive", True))
        local.start_server(new)

    # --- server parameters, applied to the cluster ------------------------------------------

    def _installation(self, allowed: frozenset[str]) -> Any:
        """`PgTools` of an installation whose `CREATE EXTENSION` takes only `allowed` (see the module docstring)."""
        import hashlib
        import os
        import subprocess

        from dr.commands import PgTools

        real_bin = Path(self.local.tools.bin_dir)
        key = hashlib.sha256(",".join(sorted(allowed)).encode()).hexdigest()[:12]
        root = self.local.state_dir / "azure-installations" / key
        paths = dict(line.split(" = ", 1) for line in subprocess.run(
            [str(real_bin / "pg_config")], capture_output=True, text=True, check=True).stdout.splitlines()
            if " = " in line)
        bin_dir, share, pkglib = (Path(paths[k]) for k in ("BINDIR", "SHAREDIR", "PKGLIBDIR"))
        mine = root / bin_dir.relative_to("/")
        if not (mine / "pg_ctl").exists():
            mine.mkdir(parents=True)
            for program in real_bin.iterdir():  # the server and pg_ctl copied (PostgreSQL resolves symlinks)
                if program.name in ("postgres", "pg_ctl"):
                    shutil.copy2(program, mine / program.name)
                else:
                    (mine / program.name).symlink_to(program)
            (root / pkglib.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
            if not (root / pkglib.relative_to("/")).exists():
                (root / pkglib.relative_to("/")).symlink_to(pkglib)
            my_share = root / share.relative_to("/")
            (my_share / "extension").mkdir(parents=True)
            for entry in share.iterdir():
                if entry.name != "extension":
                    (my_share / entry.name).symlink_to(entry)
            for f in (share / "extension").iterdir():
                ext = f.name.split("--")[0].removesuffix(".control").removesuffix(".sql")
                if f.name.endswith(".control") or ext in allowed | {"plpgsql"}:
                    (my_share / "extension" / f.name).symlink_to(f)
            for d in [root, *root.rglob("*")]:
                if not d.is_symlink():
                    os.chmod(d, os.stat(d).st_mode | 0o055)
        return PgTools.default(mine)

    def enforce(self, name: str) -> None:
        """Run server `name`'s cluster on the installation of its `azure.extensions` (restarting it if needed)."""
        allowed = frozenset(v.strip().lower() for v in self.configs.get(name, {}).get("azure.extensions", "").split(",")
                            if v.strip())
        tools = self._installation(allowed)
        self.local.stop_server(name)
        meta = self.local._meta(name)
        meta["bin_dir"] = str(tools.bin_dir)  # the local platform runs each server on its recorded installation
        self.local._write_meta(name, meta)
        self.local.start_server(name)

    def on_configuration(self, name: str, parameter: str, value: str) -> None:
        if parameter == "azure.extensions":
            self.enforce(name)
            return
        with psycopg.connect(**self.local.connection(name, "postgres").psycopg_kwargs(), autocommit=True) as c:
            c.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(parameter), sql.Literal(value)))
            c.execute("SELECT pg_reload_conf()")

    def on_restart(self, name: str) -> None:
        self.enforce(name)  # started again, on its allow-list's installation

    def dematerialize(self, name: str, doc: dict[str, Any]) -> None:
        if self.local.server_exists(name):
            self.local.delete_server(name)


def backing_servers(state_dir: Path, pg_bin_dir: Path) -> Any:
    """The local platform's servers with the system PostgreSQL (server and tools built with SSL)."""
    from dr.commands import PgTools
    from dr.platforms.local.servers import LocalServers

    return LocalServers(state_dir, PgTools.default(pg_bin_dir), archive_timeout_seconds=30, fsync=False, wal_segment_mb=1)

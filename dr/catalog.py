"""What a server offers and what a database uses, read from the catalog: extensions, parameters, versions.

Read-only queries shared by the platforms (`ServerPlatform.get_extension_support`,
`get_server_parameters`, `get_server_snapshot`), the backup manifest and the preflight checks.
"""

from __future__ import annotations

from dr.commands import ConnInfo
from dr.database import connect

#: parameters a server's own platform sets for it (where it listens, how it archives, where it
#: recovers from): never carried from one server to another
PLATFORM_MANAGED_PARAMETERS = frozenset({
    "archive_command", "archive_library", "archive_mode", "archive_timeout", "cluster_name", "config_file",
    "data_directory", "external_pid_file", "hba_file", "ident_file", "include", "include_dir", "include_if_exists",
    "listen_addresses", "log_directory", "log_filename", "port", "primary_conninfo", "primary_slot_name",
    "promote_trigger_file", "recovery_target", "recovery_target_action", "recovery_target_inclusive",
    "recovery_target_lsn", "recovery_target_name", "recovery_target_time", "recovery_target_timeline",
    "recovery_target_xid", "restore_command", "ssl", "ssl_ca_file", "ssl_cert_file", "ssl_crl_dir", "ssl_crl_file",
    "ssl_key_file", "unix_socket_directories", "unix_socket_group", "unix_socket_permissions", "fsync",
})


def available_extensions(admin: ConnInfo) -> dict[str, str]:
    """Extension name → default version, as the server's `pg_available_extensions` lists them."""
    with connect(admin) as c:
        return {n: v or "" for n, v in c.execute("SELECT name, default_version FROM pg_available_extensions ORDER BY 1")}


def database_extensions(conn: ConnInfo) -> dict[str, str]:
    """Extension name → installed version, in one database."""
    with connect(conn) as c:
        return dict(c.execute("SELECT extname, extversion FROM pg_extension ORDER BY 1").fetchall())


def server_version_text(conn: ConnInfo) -> str:
    """The server's full version, e.g. `15.18`."""
    with connect(conn) as c:
        return str(c.execute("SHOW server_version").fetchone()[0]).split()[0]

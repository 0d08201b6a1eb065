"""One error tree for the whole tool.

Every error the tool raises on purpose is a `DrError`. Each class says whether it is
transient (worth a retry) through the `transient` class attribute; Prefect tasks use
`retry_on_transient` as their `retry_condition_fn`, so bad input, auth errors and
validation failures are never retried. Context travels as typed attributes, not as
dicts inside args, and every message is written for the person on call.
"""

from __future__ import annotations

from typing import Any


class DrError(Exception):
    """Base of every error this tool raises on purpose.

    Attributes:
        transient: whether retrying the same call may succeed.
        exit_code: the process exit code the CLI uses for this error.
        world_state: what the world looks like after the failure, when known.
        resume_hint: the command or action that continues from here, when known.
    """

    transient: bool = False
    exit_code: int = 1

    def __init__(self, message: str, *, world_state: str | None = None, resume_hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.world_state = world_state
        self.resume_hint = resume_hint
        self.step: str | None = None

    def __str__(self) -> str:
        parts = [f"failed during {self.step}: {self.message}" if self.step else self.message]
        if self.world_state:
            parts.append(f"the world is now: {self.world_state}")
        if self.resume_hint:
            parts.append(f"to resume: {self.resume_hint}")
        return "; ".join(parts)

    def annotate(self, *, step: str | None = None, world_state: str | None = None,
                 resume_hint: str | None = None) -> "DrError":
        """Add where it failed, what the world looks like, and how to go on (keeps what is set)."""
        self.step = self.step or step
        self.world_state = self.world_state or world_state
        self.resume_hint = self.resume_hint or resume_hint
        return self


# --- configuration and input -------------------------------------------------------


class ConfigError(DrError, ValueError):
    """The configuration is missing, malformed, or names something unknown."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None):
        where = ": ".join(p for p in (source, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.field = field
        self.source = source


class MissingDependency(ConfigError):
    """An optional Python package needed by the chosen backend is not installed."""

    def __init__(self, package: str, purpose: str):
        super().__init__(f"{purpose} needs the Python package '{package}': pip install {package}")
        self.package = package


class InvalidInput(DrError, ValueError):
    """A parameter given by a person or an alert is not acceptable."""

    exit_code = 2


class InvalidRestoreTime(InvalidInput):
    """A point-in-time restore time is malformed, ambiguous, non-existent or outside the window."""


class ApprovalRefused(DrError):
    """A human rejected a gate, or the gate's rules refused the approval."""

    exit_code = 3


class ApprovalTimedOut(ApprovalRefused):
    """Nobody answered an approval gate in time; nothing destructive was done."""


class EnvironmentBusy(DrError):
    """The environment's recovery slot stayed taken: another recovery runs, or a crashed run still holds it.

    Attributes:
        slot: the Prefect global concurrency limit, `dr-<service>-<environment>`.
        holders: what Prefect could tell about the runs that may hold it (may be empty).
    """

    exit_code = 4

    def __init__(self, message: str, *, slot: str, holders: list[str] | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.slot = slot
        self.holders = holders or []


# --- external programs --------------------------------------------------------------


class CommandError(DrError):
    """An external program (pg_dump, psql, pg_ctl, ...) failed."""

    def __init__(self, program: str, returncode: int | None, stderr_tail: str, *, message: str | None = None):
        if message:
            text = message
        elif returncode is not None and returncode < 0:
            import signal

            text = f"{program} was killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        else:
            text = f"{program} failed with exit code {returncode}"
        if stderr_tail:
            text += f": {stderr_tail.strip()}"
        super().__init__(text)
        self.program = program
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class ToolVersionError(ConfigError):
    """A PostgreSQL client program is missing or older than the server it must talk to."""


# --- platforms -----------------------------------------------------------------------


class PlatformError(DrError):
    """A platform backend (local, azure, kubernetes) could not do what was asked."""

    def __init__(self, message: str, *, server: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.server = server


class TransientPlatformError(PlatformError):
    """A platform call failed in a way that a retry may fix (throttling, timeouts, 5xx)."""

    transient = True


class ServerNotFound(PlatformError, LookupError):
    """The named server does not exist."""


class ServerExists(PlatformError):
    """A server with this name already exists and is not the one we expected."""


class OperationTimedOut(PlatformError):
    """A long-running operation did not finish within its deadline."""


class ConnectionFailed(TransientPlatformError):
    """The database server did not accept a connection."""


# --- backups and restores ------------------------------------------------------------


class BackupError(DrError):
    """A backup could not be taken, stored, found or read."""

    def __init__(self, message: str, *, backup: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.backup = backup


class BackupNotFound(BackupError, LookupError):
    """No backup with this name (or no complete backup at all) in the store."""


class BackupExists(BackupError):
    """The store already holds a backup with this name; backups are never overwritten."""


class BackupCorrupted(BackupError):
    """The backup's bytes do not match the checksum recorded when it was taken."""


class RestoreError(DrError):
    """A restore failed. The live database is untouched unless the message says otherwise."""

    def __init__(self, message: str, *, database: str | None = None, server: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.database = database
        self.server = server


class IncompatibleBackup(RestoreError):
    """The backup needs what the target does not offer (an extension, a newer server, newer client tools).

    Raised before anything is changed. Attributes: `problems`, one line each with its fix;
    `missing_extensions`, the extensions not installed or not allow-listed.
    """

    def __init__(self, message: str, *, problems: list[str] | None = None,
                 missing_extensions: list[str] | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.problems = problems or []
        self.missing_extensions = missing_extensions or []


class VerificationFailed(RestoreError):
    """A restored database does not match the backup's manifest."""


class ValidationFailed(DrError):
    """One or more required service checks failed."""

    def __init__(self, message: str, *, failed: list[str] | None = None):
        super().__init__(message)
        self.failed = failed or []


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only errors marked transient.

    Errors that are not `DrError` (a dropped socket inside a library, an `OSError`) count
    as transient too, because they are usually the network; our own non-transient errors
    (bad input, corrupted backup, refused approval) are never retried.
    """
    try:
        state.result()
    except DrError as exc:
        return exc.transient
    except (OSError, TimeoutError):
        return True
    except Exception:
        return False
    return False

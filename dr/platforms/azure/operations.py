"""Long-running server operations: started, recorded at once, waited for with a deadline, re-attached to.

Creating, deleting or starting a flexible server is a long-running operation. Its
continuation token is written to `azure-operations.json` (`_state.OperationLog`) as soon
as Azure accepts it, and every operation waits with a stated timeout, logging its progress:
`OperationTimedOut` leaves the operation running and recorded, and making the same request
again re-attaches to it instead of starting a second one.

A server in the middle of another operation refuses a new one (409 `ServerIsBusy`, or
`ServerBusy`). Such a refusal is waited out: the request is sent again every
`progress_interval` seconds until the caller's deadline, each wait logged with the server's
state; past the deadline it is `OperationTimedOut`, with nothing sent.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any, Callable

from azure.core.polling import LROPoller
from azure.mgmt.postgresqlflexibleservers import PostgreSQLManagementClient

from dr.errors import DrError, OperationTimedOut, ServerExists, ServerNotFound
from dr.platforms.azure._arm import SDK_ERRORS, arm_error, error_code, utcnow
from dr.platforms.azure._state import OperationLog

log = logging.getLogger("dr.azure.servers")

#: A recorded operation for other parameters older than this is taken as abandoned.
STALE_OPERATION = timedelta(days=1)
#: Azure's codes for a request refused because the server is in the middle of another operation
BUSY_CODES = frozenset({"ServerIsBusy", "ServerBusy"})


class ServerOperations:
    """The long-running operations on the servers of one resource group.

    Args:
        client: the management client.
        resource_group: the resource group of the servers.
        resource_id: the ARM resource id of a server, by name.
        records: where the continuation tokens are kept.
        state_of: the state Azure reports for a server (said while waiting for a busy one).
        progress_interval: seconds between two progress log lines while waiting, and between
            two tries of a request refused because the server was busy.
    """

    def __init__(self, client: PostgreSQLManagementClient, resource_group: str, resource_id: Callable[[str], str],
                 records: OperationLog, *, state_of: Callable[[str], str] = lambda name: "busy",
                 progress_interval: float = 30.0):
        self.client = client
        self.resource_group = resource_group
        self.resource_id = resource_id
        self.records = records
        self.state_of = state_of
        self.progress_interval = progress_interval

    def _error(self, exc: Exception, *, server: str | None, doing: str) -> DrError:
        return arm_error(exc, server=server, doing=doing, resource_group=self.resource_group)

    def wait(self, poller: LROPoller, *, what: str, server: str, timeout: float, budget: float | None = None) -> Any:
        """Wait for an operation with a deadline, logging progress; raises our errors.

        Args:
            timeout: seconds left to wait.
            budget: the whole time the caller allowed (named in the timeout's message), when
                part of it went before the wait (e.g. waiting for a busy server).
        """
        start = time.monotonic()
        deadline = start + timeout
        try:
            while not poller.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OperationTimedOut(
                        f"{what} did not finish within {budget or timeout:g} s (Azure status: {poller.status()})",
                        server=server,
                        world_state=f"Azure is still working on it; the operation is recorded in "
                                    f"{self.records.path}",
                        resume_hint="run the same command again: it re-attaches to the running operation",
                    )
                poller.wait(min(remaining, self.progress_interval))
                if not poller.done():
                    log.info("%s: still %s after %.0f s (timeout %.0f s)", what, poller.status(),
                             time.monotonic() - start, timeout)
            return poller.result()
        except SDK_ERRORS as exc:
            raise self._error(exc, server=server, doing=what) from exc

    def record(self, name: str, poller: LROPoller, operation: str, fingerprint: dict[str, Any]) -> None:
        """Write the operation's continuation token down (at once, before waiting for it)."""
        self.records.put(self.resource_id(name), {
            "operation": operation,
            "fingerprint": fingerprint,
            "server": name,
            "token": poller.continuation_token(),
            "started_at": utcnow().isoformat(),
        })

    def recorded(self, name: str) -> dict[str, Any] | None:
        """The recorded unfinished operation on a server, if any."""
        return self.records.get(self.resource_id(name))

    def forget(self, name: str) -> None:
        """Drop the record of a server's operation (finished, failed or superseded)."""
        self.records.remove(self.resource_id(name))

    def reattach(self, name: str, operation: str, fingerprint: dict[str, Any]) -> LROPoller | None:
        """The poller of a recorded operation for the same request, or None when there is none.

        Raises:
            ServerExists: a recent operation for OTHER parameters is recorded for this server.
        """
        entry = self.recorded(name)
        if not entry:
            return None
        if entry.get("operation") != operation or entry.get("fingerprint") != fingerprint:
            started = datetime.fromisoformat(entry["started_at"])
            if utcnow() - started > STALE_OPERATION:
                log.warning("forgetting the %s of %s recorded at %s: it is older than %s", entry.get("operation"),
                            name, entry["started_at"], STALE_OPERATION)
                self.forget(name)
                return None
            raise ServerExists(
                f"server '{name}' has another unfinished operation ({entry.get('operation')} "
                f"{entry.get('fingerprint')}, started {entry['started_at']})",
                server=name, world_state=f"that operation is recorded in {self.records.path}",
                resume_hint="re-run the command that started it, or choose another server name")
        log.info("re-attaching to the %s of %s started at %s", operation, name, entry["started_at"])
        try:
            if operation == "delete":
                return self.client.servers.begin_delete(self.resource_group, name, continuation_token=entry["token"])
            return self.client.servers.begin_create_or_update(self.resource_group, name, {},
                                                              continuation_token=entry["token"])
        except (*SDK_ERRORS, ValueError) as exc:
            log.warning("cannot re-attach to the recorded %s of %s (%s); forgetting it", operation, name, exc)
            self.forget(name)
            return None

    def finish_recorded(self, name: str, operation: str, fingerprint: dict[str, Any], what: str,
                        timeout: float) -> bool:
        """Re-attach to and finish a recorded operation; False when there was none to finish."""
        poller = self.reattach(name, operation, fingerprint)
        if poller is None:
            return False
        try:
            self.finish(name, poller, what=what, timeout=timeout)
        except ServerNotFound:
            # the operation's status URL is gone (expired): fall back to looking at the server
            log.warning("the recorded %s of %s is no longer known to Azure; forgot it", operation, name)
            return False
        return True

    def begin(self, name: str, begin: Callable[[], LROPoller], *, what: str, timeout: float) -> LROPoller:
        """Ask Azure to start an operation; while the server is busy with another, ask again until `timeout`.

        Raises:
            OperationTimedOut: the server was still busy at the deadline; nothing was started.
        """
        start = time.monotonic()
        while True:
            try:
                return begin()
            except SDK_ERRORS as exc:
                if error_code(exc) not in BUSY_CODES:
                    raise self._error(exc, server=name, doing=what) from exc
                waited = time.monotonic() - start
                state = self.state_of(name)
                if waited >= timeout:
                    raise OperationTimedOut(
                        f"{what} was not possible: server {name} stayed busy with another operation ({state}) "
                        f"for {waited:.0f} s", server=name,
                        world_state=f"nothing was sent: Azure refused it while {name} was {state}",
                        resume_hint="run the same command again once the server's operation has ended") from exc
                log.info("%s: server %s is busy with another operation (%s); %s waits for it (%.0f s of %.0f s)",
                         what, name, state, what, waited, timeout)
                time.sleep(max(0.0, min(self.progress_interval, timeout - waited)))

    def start(self, name: str, begin: Callable[[], LROPoller], *, operation: str, fingerprint: dict[str, Any],
              what: str, timeout: float) -> LROPoller:
        """Ask Azure to start an operation (`begin`) and record it as soon as it is accepted."""
        poller = self.begin(name, begin, what=what, timeout=timeout)
        self.record(name, poller, operation, fingerprint)
        return poller

    @staticmethod
    def answer_of(poller: LROPoller) -> tuple[int | None, datetime | None]:
        """The status code of Azure's first answer to an operation, and the time it gave (its `Date`), when known."""
        import email.utils

        initial = getattr(poller.polling_method(), "_initial_response", None)
        response = getattr(initial, "http_response", None)
        if response is None:
            return None, None
        date = response.headers.get("Date")
        try:
            when = email.utils.parsedate_to_datetime(date) if date else None
        except (TypeError, ValueError):
            when = None
        return response.status_code, when

    def finish(self, name: str, poller: LROPoller, *, what: str, timeout: float, budget: float | None = None) -> Any:
        """Wait for a started operation; its record is kept only when it is still running (timed out)."""
        try:
            result = self.wait(poller, what=what, server=name, timeout=timeout, budget=budget)
        except OperationTimedOut:
            raise
        except DrError:
            self.forget(name)
            raise
        self.forget(name)
        return result

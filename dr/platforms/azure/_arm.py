"""What every part of the servers backend shares: the management client, SDK errors as ours, times.

The management SDK's pipeline retries throttling (429) and transient 5xx answers and
honours `Retry-After` (azure-core's `RetryPolicy`, configured here, never hand-rolled); a
4xx validation error is never retried. `arm_error` turns what the SDK raised into the
tool's own errors: 404 `ServerNotFound`, 409 `ServerExists` or `PlatformError`, 429/5xx
after the retries `TransientPlatformError`, anything else `PlatformError` with Azure's
code and message.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.policies import RetryPolicy
from azure.mgmt.postgresqlflexibleservers import PostgreSQLManagementClient

from dr.errors import DrError, InvalidRestoreTime, PlatformError, ServerExists, ServerNotFound, TransientPlatformError

PROVIDER_PATH = "providers/Microsoft.DBforPostgreSQL/flexibleServers"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: what the SDK raises (`HttpResponseError` is an `AzureError`; both named for the reader)
SDK_ERRORS = (HttpResponseError, AzureError)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def value_of(v: Any) -> Any:
    """The plain value of an SDK enum member (which is also a `str`), or `v` itself."""
    return getattr(v, "value", v)


def as_utc(when: datetime, what: str = "the restore time") -> datetime:
    """`when` in UTC; a naive time (or not a time) is refused."""
    if not isinstance(when, datetime):
        raise InvalidRestoreTime(f"{what} must be a datetime, not {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidRestoreTime(f"{what} must carry a time zone (UTC), got the naive time {when.isoformat()}")
    return when.astimezone(timezone.utc)


def aware(when: datetime | None) -> datetime | None:
    """`when` in UTC (a naive time from Azure is UTC)."""
    if when is None:
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def error_code(exc: Exception) -> str:
    """Azure's error code of an SDK error (`ServerIsBusy`, `ResourceNotFound`, ...), or ''."""
    err = getattr(exc, "error", None)
    return str((getattr(err, "code", None) if err is not None else None) or "")


def build_management_client(credential: Any, subscription_id: str, *, base_url: str | None = None,
                            polling_interval: float = 30, retry_total: int = 6, retry_backoff_factor: float = 1.0,
                            retry_backoff_max: float = 60, **client_kwargs: Any) -> PostgreSQLManagementClient:
    """The management client with this tool's retry policy.

    Args:
        credential: an azure-identity credential (built by the caller, at the edge).
        subscription_id: the subscription that holds the servers.
        base_url: the ARM endpoint; None for the public cloud's.
        polling_interval: seconds between polls of a long-running operation when Azure
            sends no `Retry-After`.
        retry_total: how many times a throttled (429) or transient (408/5xx) answer is retried.
        retry_backoff_factor: the exponential back-off base, in seconds, when Azure sends
            no `Retry-After` (which is always honoured).
        retry_backoff_max: the longest back-off between two tries, in seconds.
        **client_kwargs: passed to the SDK client (e.g. `connection_verify`, `transport`).
    """
    client_kwargs.setdefault("connection_timeout", 30)
    client_kwargs.setdefault("read_timeout", 120)
    retry = RetryPolicy(retry_total=retry_total, retry_backoff_factor=retry_backoff_factor,
                        retry_backoff_max=retry_backoff_max)
    return PostgreSQLManagementClient(credential, subscription_id, base_url=base_url,
                                      polling_interval=polling_interval, retry_policy=retry, **client_kwargs)


def arm_error(exc: Exception, *, server: str | None, doing: str, resource_group: str) -> DrError:
    """Our error for an SDK failure (the caller chains it with `from exc`).

    Args:
        exc: what the SDK raised.
        server: the server concerned, if any.
        doing: what was being done, as a noun phrase ("reading server 'x'").
        resource_group: the resource group of the servers (named in the messages).
    """
    first_line = (getattr(exc, "message", None) or str(exc)).splitlines()[0]
    if isinstance(exc, ClientAuthenticationError) and getattr(exc, "status_code", None) is None:
        return PlatformError(
            f"{doing} failed: cannot get an Azure token ({first_line}); sign in (`az login`), or set the "
            "AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET or workload identity variables",
            server=server)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return TransientPlatformError(f"{doing} failed: could not reach Azure ({first_line})", server=server)
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        err = exc.error
        code = (err.code if err is not None else None) or ""
        text = (err.message if err is not None else None) or exc.reason or first_line
        detail = f"{code}: {text}" if code else str(text)
        if status == 404:
            return ServerNotFound(f"server '{server}' does not exist in resource group "
                                  f"'{resource_group}' ({detail})", server=server)
        if status == 409 and "exist" in code.lower():
            return ServerExists(f"{doing} failed: server '{server}' already exists ({detail})", server=server)
        if status in (408, 429) or status >= 500:
            return TransientPlatformError(f"{doing} failed after retries: Azure answered HTTP {status} ({detail})",
                                          server=server)
        if status in (401, 403):
            return PlatformError(
                f"{doing} was not allowed (HTTP {status}, {detail}); the identity needs the roles listed "
                f"in docs/azure.md on resource group '{resource_group}'", server=server)
        if status < 400:  # a long-running operation that ended as Failed or Canceled
            return PlatformError(f"{doing} failed in Azure: {first_line}", server=server)
        return PlatformError(f"{doing} was refused by Azure (HTTP {status}, {detail})", server=server)
    if isinstance(exc, AzureError):
        return PlatformError(f"{doing} failed: {first_line}", server=server)
    return PlatformError(f"{doing} failed unexpectedly: {exc}", server=server)

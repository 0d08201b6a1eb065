"""The azure platform: flexible servers (`AzureServers`) and Blob Storage (`AzureBackupStore`).

Credentials are built here, at the edge, and handed to the backends: one
`DefaultAzureCredential` per process (environment service principal, workload
identity, managed identity or `az login`, in that order), unless one is passed in.

Environment overrides (for emulators and tests; none is needed against Azure):

- `DR_AZURE_ARM_URL`: the Azure Resource Manager endpoint (default: the public cloud's).
  A private CA for it is given the usual way, with `REQUESTS_CA_BUNDLE`.
- `DR_AZURE_STORAGE_CONNECTION_STRING`: a storage connection string (e.g. Azurite's);
  it carries its own key, so no Azure identity is used for blobs.
- `DR_AZURE_BLOB_URL`: the blob account URL instead of
  `https://<storage_account>.blob.core.windows.net` (a SAS in its query is used as is).
- `DR_AZURE_BLOB_SECONDARY_HOST`: the host of the account's read-only secondary endpoint
  (default, from the SDK: `<storage_account>-secondary.blob.core.windows.net`).
- `DR_AZURE_STATE_DIR`: where operation and dropped-server records are kept (`~/.dr`).
- `DR_AZURE_PG_PASSWORD`: the administrator password of the servers (never logged).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from azure.identity import DefaultAzureCredential
from azure.storage.blob import BlobServiceClient, ExponentialRetry

from dr.config import DrConfig, Target
from dr.errors import ConfigError
from dr.platforms.azure.servers import AzureServers, build_management_client
from dr.platforms.azure.store import AzureBackupStore

__all__ = ["AzureBackupStore", "AzureServers", "azure_servers", "azure_store", "default_credential"]

ARM_URL_ENV = "DR_AZURE_ARM_URL"
BLOB_URL_ENV = "DR_AZURE_BLOB_URL"
CONNECTION_STRING_ENV = "DR_AZURE_STORAGE_CONNECTION_STRING"
SECONDARY_HOST_ENV = "DR_AZURE_BLOB_SECONDARY_HOST"

_credential: Any = None
_credential_lock = threading.Lock()


def default_credential() -> Any:
    """The process-wide `DefaultAzureCredential` (built on first use; no network until a token is needed)."""
    global _credential
    with _credential_lock:
        if _credential is None:
            _credential = DefaultAzureCredential()
        return _credential


def _quiet_sdk_logging() -> None:
    # azure-core logs every request's headers at INFO; keep that out of the incident log
    for name in ("azure.core.pipeline.policies.http_logging_policy", "azure.identity"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def azure_servers(config: DrConfig, target: Target, *, credential: Any = None, **client_kwargs: Any) -> AzureServers:
    """The flexible servers of a target's resource group.

    Args:
        config: the whole configuration (unused today; kept for the factory signature).
        target: the resolved service environment (subscription, resource group, server).
        credential: an Azure credential; default: the process-wide `DefaultAzureCredential`.
        **client_kwargs: passed to `build_management_client` (polling interval, retries,
            `connection_verify`, ...).

    Raises:
        ConfigError: the target has no subscription or resource group.
    """
    if not (target.subscription_id and target.resource_group):
        raise ConfigError("platform 'azure' needs subscription_id and resource_group",
                          field=f"services.{target.service}.environments.{target.environment}")
    _quiet_sdk_logging()
    client = build_management_client(credential or default_credential(), target.subscription_id,
                                     base_url=os.environ.get(ARM_URL_ENV) or None, **client_kwargs)
    return AzureServers(client, target.subscription_id, target.resource_group, admin_user=target.admin_user,
                        default_template=target.server)


def blob_service_client(target: Target, *, credential: Any = None, **client_kwargs: Any) -> BlobServiceClient:
    """The blob service of a target's storage account, honouring the environment overrides."""
    client_kwargs.setdefault("retry_policy", ExponentialRetry(initial_backoff=2, increment_base=2, retry_total=5))
    client_kwargs.setdefault("max_single_get_size", 4 * 1024 * 1024)
    client_kwargs.setdefault("max_chunk_get_size", 4 * 1024 * 1024)
    conn = os.environ.get(CONNECTION_STRING_ENV)
    if conn:
        return BlobServiceClient.from_connection_string(conn, **client_kwargs)
    url = os.environ.get(BLOB_URL_ENV) or f"https://{target.storage_account}.blob.core.windows.net"
    if "sig=" in url:
        return BlobServiceClient(url, **client_kwargs)
    return BlobServiceClient(url, credential=credential or default_credential(), **client_kwargs)


def azure_store(config: DrConfig, target: Target, *, credential: Any = None, read_retry: Any = None,
                **client_kwargs: Any) -> AzureBackupStore:
    """The backup container (`target.container`) of a target's storage account.

    Args:
        config: the whole configuration (unused today; kept for the factory signature).
        target: the resolved service environment (storage account, container).
        credential: an Azure credential; default: the process-wide `DefaultAzureCredential`.
        read_retry: the retry policy of reads (default: exponential, alternating to the
            secondary endpoint); it must have `retry_to_secondary=True` to fall back.
        **client_kwargs: passed to `BlobServiceClient` (e.g. `max_chunk_get_size`).
    """
    _quiet_sdk_logging()
    service = blob_service_client(target, credential=credential, **client_kwargs)
    # reads fall back to the secondary region (RA-GRS) when the primary does not answer: the SDK's
    # retry policy alternates primary/secondary on each retry (harmless where there is no secondary)
    read_kwargs = dict(client_kwargs)
    read_kwargs["retry_policy"] = read_retry or ExponentialRetry(initial_backoff=2, increment_base=2, retry_total=5,
                                                                 retry_to_secondary=True)
    if os.environ.get(SECONDARY_HOST_ENV):
        read_kwargs["secondary_hostname"] = os.environ[SECONDARY_HOST_ENV]
    reads = blob_service_client(target, credential=credential, **read_kwargs)
    return AzureBackupStore(service.get_container_client(target.container),
                            reads=reads.get_container_client(target.container))

"""Platform backends behind small interfaces, chosen by configuration.

`get_platform(config, target)` returns the `ServerPlatform`, `BackupStore` and
`AppControl` that serve one service environment: `local` (the embedded default),
`azure` (flexible servers + Blob Storage) and, for the app, `kubernetes`.
"""

from __future__ import annotations

from dr.config import DrConfig, Target
from dr.errors import MissingDependency
from dr.platforms.base import AppControl, BackupStore, Platform, ServerPlatform


def get_platform(config: DrConfig, target: Target) -> Platform:
    """Build the three backends for a target from its configuration."""
    servers: ServerPlatform
    store: BackupStore
    app: AppControl
    if target.platform == "local":
        from dr.platforms.local import local_servers, local_store

        servers = local_servers(config, target)
        store = local_store(config, target)
    else:
        try:
            from dr.platforms.azure import azure_servers, azure_store
        except ImportError as exc:
            raise MissingDependency(exc.name or "azure-mgmt-postgresqlflexibleservers", "the azure platform") from exc
        servers = azure_servers(config, target)
        store = azure_store(config, target)
    if target.app == "local":
        from dr.platforms.local import local_app

        app = local_app(config, target)
    else:
        try:
            from dr.platforms.kubernetes import kubernetes_app
        except ImportError as exc:
            raise MissingDependency(exc.name or "kubernetes", "the kubernetes app backend") from exc
        app = kubernetes_app(config, target)
    return Platform(servers=servers, store=store, app=app)

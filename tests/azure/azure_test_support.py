"""Constants and small helpers shared by the azure tests and their conftest."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

from fake_arm import TOKEN

REPO = Path(__file__).resolve().parents[2]
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_ACCOUNT = "devstoreaccount1"
SUBSCRIPTION = "00000000-0000-0000-0000-00000000abcd"
RESOURCE_GROUP = "s189p01-apply-rg"
PRIMARY = "s189-apply-pd-pg"

# hosts and addresses the session guard of conftest.py refuses; BLOCKED lists what it refused
_AZURE_SUFFIXES = (
    "azure.com", "windows.net", "microsoftonline.com", "azure.net", "microsoft.com", "applicationinsights.azure.com",
)
BLOCKED: list[str] = []


def _is_azure_host(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    h = host.lower().rstrip(".")
    return h == "169.254.169.254" or any(h == s or h.endswith("." + s) for s in _AZURE_SUFFIXES)


def _is_loopback(address: Any) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FakeCredential:
    """A `TokenCredential` that hands out a fixed token (the fake ARM checks it)."""

    def __init__(self) -> None:
        self.calls = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.calls += 1
        return AccessToken(TOKEN, int(time.time()) + 3600)


def fast_retry(total: int, *, to_secondary: bool = False) -> Any:
    """The storage SDK's own retry policy, without its seconds of back-off and jitter."""
    from azure.storage.blob import ExponentialRetry

    return ExponentialRetry(initial_backoff=0, increment_base=0, retry_total=total, random_jitter_range=0,
                            retry_to_secondary=to_secondary)

"""Fixtures for the azure backend: a network guard, Azurite for blobs, a fake ARM over TLS.

- `_no_real_azure` (session, autouse): any attempt to resolve an Azure host, or to
  connect anywhere but the loopback, fails loudly, so a test can never reach Azure.
- `azurite`: a real Azurite blob emulator started from `<repo>/.azurite` (installed by
  `npm install --prefix .azurite --no-save azurite@3.35.0`); skipped when absent locally, a
  failure when `CI=true`.
- `fake_arm` / `arm`: the fake Resource Manager of `fake_arm.py`, served over HTTPS
  with a throw-away self-signed certificate; the REAL management SDK talks to it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from azure_test_support import (  # noqa: E402
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    BLOCKED,
    PRIMARY,
    REPO,
    RESOURCE_GROUP,
    SUBSCRIPTION,
    FakeCredential,
    _is_azure_host,
    _is_loopback,
    fast_retry,
)
from fake_arm import FakeArm  # noqa: E402

# --- the guard: nothing may reach real Azure -------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _no_real_azure() -> Iterator[None]:
    """Make any attempt to reach Azure (or any non-loopback address) fail loudly."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_azure_host(host):
            BLOCKED.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: refusing to resolve real Azure host {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guard(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            BLOCKED.append(str(address))
            raise ConnectionRefusedError(f"test guard: refusing to connect to non-loopback {address!r}")

    def connect(sock: socket.socket, address: Any) -> None:
        guard(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        guard(sock, address)
        return real_connect_ex(sock, address)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.getaddrinfo = real_getaddrinfo  # type: ignore[assignment]
        socket.socket.connect = real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = real_connect_ex  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's Azure settings or writes to ~/.dr."""
    for var in list(os.environ):
        if var.startswith(("DR_AZURE_", "AZURE_")) or var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DR_AZURE_STATE_DIR", str(tmp_path / "dr-state"))


# --- TLS certificate for the fake ARM ---------------------------------------------------


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-arm.test")])
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


# --- fake ARM -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_arm(tls_cert: tuple[str, str]) -> Iterator[FakeArm]:
    arm = FakeArm(*tls_cert).start()
    yield arm
    arm.stop()


@pytest.fixture
def arm(fake_arm: FakeArm) -> FakeArm:
    """The fake ARM, emptied, with the primary server of the apply production environment."""
    fake_arm.reset()
    fake_arm.add_server(SUBSCRIPTION, RESOURCE_GROUP, PRIMARY, tags={"environment": "production", "service": "apply"})
    return fake_arm


@pytest.fixture
def make_servers(arm: FakeArm, tls_cert: tuple[str, str], tmp_path: Path) -> Any:
    """Build an `AzureServers` on the fake ARM with fast polling (a new client each call)."""
    from dr.platforms.azure.servers import AzureServers, build_management_client

    def make(*, retry_total: int = 3, polling_interval: float = 0.05, progress_interval: float = 0.2,
             state_dir: Path | None = None) -> AzureServers:
        client = build_management_client(FakeCredential(), SUBSCRIPTION, base_url=arm.url,
                                         polling_interval=polling_interval, retry_total=retry_total,
                                         retry_backoff_factor=0.05, retry_backoff_max=1,
                                         connection_verify=tls_cert[0])
        return AzureServers(client, SUBSCRIPTION, RESOURCE_GROUP, admin_user="dradmin", default_template=PRIMARY,
                            state_dir=state_dir or tmp_path / "dr-state", progress_interval=progress_interval)

    return make


@pytest.fixture
def servers(make_servers: Any) -> Any:
    return make_servers()


# --- Azurite ---------------------------------------------------------------------------------


def _azurite_binary() -> str | None:
    explicit = os.environ.get("DR_AZURITE_BIN")
    candidates = [explicit] if explicit else [str(REPO / ".azurite" / "node_modules" / ".bin" / "azurite-blob"),
                                              shutil.which("azurite-blob")]
    for c in candidates:
        if c and Path(c).exists():
            return c
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running Azurite blob service; yields its connection string."""
    binary = _azurite_binary()
    if binary is None:
        msg = ("Azurite is not installed: run `npm install --prefix .azurite --no-save azurite@3.35.0` "
               "in the repository (or set DR_AZURITE_BIN)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " -- CI must install it", pytrace=False)
        pytest.skip(msg)
    port = _free_port()
    location = tmp_path_factory.mktemp("azurite")
    log = open(location / "azurite.log", "wb")
    proc = subprocess.Popen(
        [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location),
         "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"Azurite exited with {proc.returncode}: {(location / 'azurite.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("Azurite did not listen within 30 s")
            time.sleep(0.1)
    yield (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
           f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};")
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture
def blob_service(azurite: str) -> Any:
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(
        azurite, retry_policy=fast_retry(1),
        max_single_get_size=16 * 1024, max_chunk_get_size=16 * 1024)


@pytest.fixture
def container(blob_service: Any) -> Iterator[Any]:
    """A new, empty container for one test."""
    client = blob_service.get_container_client(f"test-{uuid.uuid4().hex[:20]}")
    client.create_container()
    yield client
    client.delete_container()


@pytest.fixture
def store(container: Any) -> Any:
    from dr.platforms.azure.store import AzureBackupStore

    return AzureBackupStore(container, block_size=64 * 1024)

"""Fault 3 of the catalogue: the connection to Blob Storage reset during an upload or a download.

A real backup (`pg_dump` of a real local PostgreSQL server) goes into a real Azurite container
through the real azure-storage-blob SDK, and a real restore (`pg_restore` into a new database,
then the swap) reads it back. The fault is injected at the HTTP boundary, as in
test_azure_blob_store.py: a requests transport adapter in front of Azurite raises, for the
chosen requests, exactly what `requests` raises when the peer resets the connection, either
before any answer (the request never lands) or in the middle of the answer's body (the chunk
is cut short). Everything else goes to Azurite.

The SDK's own retry policy (3 retries here, without back-off) survives a single reset, in both
directions: that is asserted first. A reset that persists beyond the retries must then leave:

- on upload: nothing committed, the name free, an error that says nothing was stored; the same
  backup run again succeeds;
- on download: the restore stopped before any swap, the live database exactly as before (row
  checksums), the half-restored database dropped, the backup's bytes unchanged (its sha256
  still verifies on a re-read); the same restore run again succeeds.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
from azure_test_support import fast_retry
from urllib3.exceptions import ProtocolError

from dr.backup import backup_name, take_backup
from dr.commands import PgTools
from dr.errors import DrError, TransientPlatformError
from dr.platforms.azure.store import AzureBackupStore
from dr.restore import restore_backup
from tests.faults.harness import (
    assert_nothing_lost,
    assert_says_world_state,
    live_state,
    snapshot,
)

KB = 1024
#: small blocks and chunks, so that the sample database's dump spans many of each
BLOCK = 16 * KB
CHUNK = 16 * KB


def _reset() -> ConnectionResetError:
    return ConnectionResetError(104, "Connection reset by peer")


@dataclass
class Reset:
    """Reset the connection of requests `method <blob>` (`comp=<comp>`, None: no comp).

    The first `skip` matching requests go through; the next `times` (None: every one after)
    are reset `where`: "request" (nothing reaches Azurite) or "body" (Azurite answers, and the
    connection breaks after half of the answer's body).
    """

    method: str
    blob: str
    comp: str | None
    skip: int = 0
    times: int | None = None
    where: str = "request"
    matched: int = 0
    fired: int = 0

    def matches(self, method: str, path: str, query: dict[str, list[str]]) -> bool:
        comp = (query.get("comp") or [None])[0]
        return method == self.method and path.endswith("/" + self.blob) and comp == self.comp

    def armed(self) -> bool:
        return self.matched > self.skip and (self.times is None or self.fired < self.times)


class _CutShort:
    """A urllib3 response whose body breaks after `keep` bytes, as when the peer resets mid-answer."""

    def __init__(self, raw: Any, keep: int):
        self._raw, self._keep = raw, keep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def stream(self, amt: int = 2 ** 16, decode_content: bool | None = None) -> Iterator[bytes]:
        sent = 0
        for data in self._raw.stream(amt, decode_content=decode_content):
            if sent + len(data) >= self._keep:
                yield data[: self._keep - sent]
                break
            sent += len(data)
            yield data
        raise ProtocolError(f"Connection broken: {_reset()!r}", _reset())

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        raise ProtocolError(f"Connection broken: {_reset()!r}", _reset())


class ResetAdapter(requests.adapters.HTTPAdapter):
    """Connection resets at the HTTP boundary, in front of Azurite (see `Reset`)."""

    def __init__(self) -> None:
        super().__init__()
        self.resets: list[Reset] = []
        self.seen: list[tuple[str, str, dict[str, list[str]], str]] = []  # method, path, query, x-ms-range

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        parts = urlsplit(request.url)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.seen.append((request.method, path, query, request.headers.get("x-ms-range", "")))
        for rule in self.resets:
            if not rule.matches(request.method, path, query):
                continue
            rule.matched += 1
            if not rule.armed():
                break
            rule.fired += 1
            if rule.where == "request":
                # what requests raises when the peer resets the connection while the request is sent
                raise requests.exceptions.ConnectionError(ProtocolError("Connection aborted.", _reset()),
                                                          request=request)
            response = super().send(request, **kwargs)
            length = int(response.headers.get("Content-Length", "0"))
            response.raw = _CutShort(response.raw, max(1, length // 2))
            return response
        return super().send(request, **kwargs)

    def requests_for(self, method: str, blob: str, comp: str | None) -> list[tuple[str, str, dict, str]]:
        probe = Reset(method, blob, comp)
        return [s for s in self.seen if probe.matches(s[0], s[1], s[2])]


@pytest.fixture
def resets(azurite: str, container: Any) -> tuple[ResetAdapter, AzureBackupStore]:
    """A store on the test's container whose HTTP traffic goes through a `ResetAdapter`.

    The SDK's own retry policy: 3 retries, without back-off; blocks and download chunks of 16 KiB.
    """
    from azure.storage.blob import BlobServiceClient

    adapter = ResetAdapter()
    session = requests.Session()
    session.mount("http://", adapter)
    service = BlobServiceClient.from_connection_string(
        azurite, session=session, retry_policy=fast_retry(3), max_single_get_size=CHUNK, max_chunk_get_size=CHUNK)
    return adapter, AzureBackupStore(service.get_container_client(container.container_name), block_size=BLOCK)


@pytest.fixture(scope="module")
def tools() -> PgTools:
    return PgTools.default()


def blobs(container: Any) -> dict[str, str]:
    """Every committed blob of the container, name -> sha256 of its bytes."""
    return {b.name: hashlib.sha256(container.download_blob(b.name).readall()).hexdigest()
            for b in container.list_blobs()}


def new_name(label: str) -> str:
    return backup_name("apply", "dev", "adhoc", "custom-zstd", datetime.now(timezone.utc), label)


def backup(env: Any, store: AzureBackupStore, tools: PgTools, name: str) -> Any:
    return take_backup(env.platform.servers, store, tools, server=env.target.server,
                       database=env.target.database, name=name, kind="adhoc")


def restore(env: Any, store: AzureBackupStore, tools: PgTools, name: str, jobs: int = 1) -> Any:
    return restore_backup(env.platform.servers, store, tools, server=env.target.server,
                          database=env.target.database, backup=name, jobs=jobs)


def verify_reread(store: AzureBackupStore, name: str) -> str:
    """Read the backup back whole; its bytes must match the sha256 recorded at backup time."""
    info = store.get_backup(name)
    h = hashlib.sha256()
    with store.reader(name) as r:
        while data := r.read(64 * KB):
            h.update(data)
        r.verify()
    assert h.hexdigest() == info.sha256
    return info.sha256


def restore_databases(env: Any) -> list[str]:
    return [r[0] for r in env.query("SELECT datname FROM pg_database WHERE datname LIKE '%\\_restore\\_%'",
                                    database="postgres")]


# --- upload --------------------------------------------------------------------------------


class TestUploadInterrupted:
    def test_a_single_reset_while_staging_is_survived_by_the_sdk_retry(self, shared_env, resets, tools, container):
        adapter, store = resets
        name = new_name("one-reset")
        adapter.resets.append(reset := Reset("PUT", name, "block", skip=2, times=1))
        done = backup(shared_env, store, tools, name).info
        assert reset.fired == 1
        staged = adapter.requests_for("PUT", name, "block")
        assert len(staged) > 4, "the dump must span several blocks"
        # the reset block (the third staged) was sent again with the same id: one more request than
        # blocks; with several blocks in flight its retry need not be the very next request
        block_ids = [s[2]["blockid"][0] for s in staged]
        assert len(block_ids) == len(set(block_ids)) + 1
        assert [b for b in dict.fromkeys(block_ids) if block_ids.count(b) == 2] == [block_ids[2]]
        assert done.complete and verify_reread(store, name) == done.sha256
        committed, uncommitted = container.get_blob_client(name).get_block_list("all")
        assert len(committed) == len(set(block_ids)) and uncommitted == []

    def test_a_reset_beyond_the_retries_stores_nothing_and_the_rerun_succeeds(self, shared_env, resets, tools,
                                                                             container):
        adapter, store = resets
        env = shared_env
        name = new_name("reset")
        world, blobs_before, listed = snapshot(env), blobs(container), store.list_backups()
        adapter.resets.append(reset := Reset("PUT", name, "block", skip=3))
        with pytest.raises(DrError) as err:
            backup(env, store, tools, name)
        # the reset came in the middle of staging: 3 blocks were staged before it, then every block
        # in flight (up to `transfers` at once) was tried 1 + 3 times
        assert reset.matched == 3 + reset.fired and reset.fired % 4 == 0 and 4 <= reset.fired <= 4 * store.transfers
        # nothing committed: no blob, no sidecar, the name free, the list unchanged
        assert blobs(container) == blobs_before
        assert store.list_backups() == listed
        assert not store.backup_exists(name)
        assert_nothing_lost(world, snapshot(env))
        # the error: transient (the network), says nothing was stored and how to go on
        assert isinstance(err.value, TransientPlatformError), repr(err.value)
        text = str(err.value)
        assert "could not reach blob storage" in text and "nothing was stored" in text, text
        assert name in text and "free" in text, text
        assert_says_world_state(err.value)
        # the same backup run again, the network back: stored whole; the abandoned blocks are not part of it
        adapter.resets.clear()
        done = backup(env, store, tools, name).info
        assert done.complete and verify_reread(store, name) == done.sha256
        committed, uncommitted = container.get_blob_client(name).get_block_list("all")
        assert len(committed) == -(-done.size // BLOCK) and uncommitted == []
        assert set(blobs(container)) == set(blobs_before) | {name, name + ".meta.json"}


# --- download ------------------------------------------------------------------------------


@pytest.fixture
def stored(shared_env: Any, store: AzureBackupStore, tools: PgTools) -> Iterator[tuple[str, dict[str, str]]]:
    """A backup of the live database in the container, and the live database's state it holds.

    The live database then changes, so that an unchanged live database and a restored one differ.
    """
    env = shared_env
    name = new_name("restore-me")
    held = live_state(env)
    info = backup(env, store, tools, name).info
    assert info.size > 4 * CHUNK, "the backup must span several download chunks"
    env.query("INSERT INTO providers (code, name, address) VALUES (%s, 'after the backup', '{}')",
              (uuid.uuid4().hex[:8],))
    yield name, held


class TestDownloadInterrupted:
    @pytest.mark.parametrize("where", ["request", "body"])
    def test_a_single_reset_of_a_chunk_is_survived_by_the_sdk_retry(self, shared_env, resets, tools, stored, where):
        adapter, store = resets
        name, held = stored
        adapter.resets.append(reset := Reset("GET", name, None, skip=2, times=1, where=where))
        result = restore(shared_env, store, tools, name)
        assert reset.fired == 1 and result.replaced_database
        assert live_state(shared_env) == held

    @pytest.mark.parametrize("where, jobs", [("request", 1), ("body", 1), ("body", 2)])
    def test_a_reset_beyond_the_retries_leaves_the_live_database_and_the_backup_whole(
            self, shared_env, resets, tools, stored, container, where, jobs):
        adapter, store = resets
        env = shared_env
        name, held = stored
        world, blobs_before = snapshot(env), blobs(container)
        assert world.live != held
        adapter.resets.append(reset := Reset("GET", name, None, skip=2, where=where))
        with pytest.raises(DrError) as err:
            restore(env, store, tools, name, jobs=jobs)
        # the reset came in the middle of the download: two ranges were read before it, and the
        # download stopped with at most `transfers` more asked for
        ranges = [s[3] for s in adapter.requests_for("GET", name, None)]
        whole = -(-store.get_backup(name).size // BLOCK)
        assert reset.fired >= 4 and 3 <= len(set(ranges)) <= 2 + store.transfers < whole, ranges
        # the live database exactly as before, the half-restored one dropped, nothing else changed
        assert restore_databases(env) == []
        assert_nothing_lost(world, snapshot(env))
        # the backup untouched: the same blobs, and (the network back) its bytes still verify
        # against the sha256 recorded at backup time
        adapter.resets.clear()
        assert blobs(container) == blobs_before
        verify_reread(store, name)
        # the error: transient (the network), names the backup, says the live database is untouched
        assert isinstance(err.value, TransientPlatformError), repr(err.value)
        text = str(err.value)
        assert "could not reach blob storage" in text and name in text, text
        assert f"the live database {env.target.database} on {env.target.server} is untouched" in text, text
        assert_says_world_state(err.value)
        # the same restore run again: the backup's data is live, the old database kept aside
        result = restore(env, store, tools, name, jobs=jobs)
        assert result.replaced_database and not result.already_done
        assert_nothing_lost(world, snapshot(env), allowed_states=[held], replaced_databases=1)
        assert live_state(env) == held

"""`AzureBackupStore` on a real Azurite blob service, through the real azure-storage-blob SDK.

Only the immutability refusal is injected (Azurite has no immutability policies): a
requests transport adapter answers the DELETE of one blob with the 409 that Azure
sends, everything else goes to Azurite.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests
from azure_test_support import BLOCKED, FakeCredential, fast_retry
from requests.structures import CaseInsensitiveDict

from dr.errors import (
    BackupCorrupted,
    BackupError,
    BackupExists,
    BackupNotFound,
    InvalidInput,
    TransientPlatformError,
)
from dr.platforms.azure.store import AzureBackupStore
from dr.platforms.base import BackupInfo

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=timezone.utc)


def make_info(**kw: Any) -> BackupInfo:
    """What the backup engine hands to `commit` (name/size/sha256 are filled in by the store)."""
    base = dict(name="", size=0, complete=False, created_at=T0, kind="nightly", format="custom",
                source_server="s189-apply-pd-pg", database="apply_production", server_version=16,
                finished_at=T0 + timedelta(minutes=7), manifest={"tables": {"candidates": 12}})
    base.update(kw)
    return BackupInfo(**base)


def upload(store: AzureBackupStore, name: str, data: bytes, *, piece: int = 10_007, **info: Any) -> BackupInfo:
    with store.writer(name) as w:
        for i in range(0, len(data), piece):
            w.write(data[i:i + piece])
        return w.commit(make_info(**info))


def read_all(store: AzureBackupStore, name: str, n: int = 10_000) -> tuple[bytes, Any]:
    with store.reader(name) as r:
        out = bytearray()
        while chunk := r.read(n):
            out += chunk
        r.verify()
        return bytes(out), r


def blob_names(container: Any) -> list[str]:
    return sorted(b.name for b in container.list_blobs())


class TestRoundTrip:
    def test_multi_block_upload_streams_back_with_checksum(self, store, container):
        data = os.urandom(300_001)
        manifest = {"tables": {f"table_{i}": {"rows": i, "checksum": "x" * 40} for i in range(300)}}
        assert len(json.dumps(manifest)) > 8 * 1024  # larger than blob metadata may hold
        done = upload(store, "apply_pd_2026-11-25.dump", data, manifest=manifest)
        assert done.complete and done.size == len(data)
        assert done.sha256 == hashlib.sha256(data).hexdigest()
        assert done.name == "apply_pd_2026-11-25.dump"
        # several blocks were staged and committed (64 KiB blocks)
        committed, uncommitted = container.get_blob_client(done.name).get_block_list("all")
        assert len(committed) == 5 and uncommitted == []
        # the whole BackupInfo round-trips through the sidecar, manifest included
        assert store.get_backup(done.name) == done
        assert blob_names(container) == [done.name, done.name + ".meta.json"]
        md = container.get_blob_client(done.name).get_blob_properties().metadata
        assert md["dr_sha256"] == done.sha256 and md["dr_made_by"] == "dr-orchestrator" and md["dr_kind"] == "nightly"
        assert sum(len(k) + len(v) for k, v in md.items()) < 1024
        # read back in small reads: same bytes, checksum verified, bounded buffer
        with store.reader(done.name) as r:
            out, biggest = bytearray(), 0
            while chunk := r.read(10_000):
                out += chunk
                biggest = max(biggest, len(r.buffer))
            r.verify()
        assert bytes(out) == data and r.bytes_read == len(data)
        assert biggest <= 64 * 1024  # never more than one downloaded range held (the others are in flight)

    def test_blocks_go_up_and_ranges_come_down_several_at_a_time(self, azurite, container):
        """One HTTP stream caps a transfer at one connection's throughput: uploads stage blocks and
        downloads read ranges `transfers` at a time, in order, in bounded memory."""
        from azure.storage.blob import BlobServiceClient

        adapter = ConcurrencyAdapter()
        session = requests.Session()
        session.mount("http://", adapter)
        service = BlobServiceClient.from_connection_string(azurite, session=session)
        store = AzureBackupStore(service.get_container_client(container.container_name), block_size=64 * 1024,
                                 transfers=4)
        data = os.urandom(2 * 1024 * 1024 + 17)
        done = upload(store, "parallel.dump", data, piece=100_000)
        assert adapter.peak("PUT") >= 2, adapter.peaks
        committed, _ = container.get_blob_client(done.name).get_block_list("committed")
        assert len(committed) == 33  # in order: the bytes below come back equal
        adapter.peaks.clear()
        out, reader = read_all(store, done.name, n=50_000)
        assert out == data and done.sha256 == hashlib.sha256(out).hexdigest()
        assert adapter.peak("GET") >= 2, adapter.peaks
        assert adapter.peak("GET") <= 4 and adapter.peak("PUT") <= 4  # bounded: memory is ~5 blocks

    def test_empty_backup(self, store):
        done = upload(store, "empty.dump", b"")
        assert done.size == 0 and done.sha256 == hashlib.sha256(b"").hexdigest()
        assert read_all(store, "empty.dump")[0] == b""

    def test_list_is_newest_first_and_includes_incomplete(self, store, container):
        upload(store, "old.dump", b"old", finished_at=T0 - timedelta(days=2), created_at=T0 - timedelta(days=2))
        upload(store, "new.dump", b"new", finished_at=T0)
        # a crash between the data commit and the "complete" sidecar leaves an incomplete backup
        info = make_info(name="crashed.dump", size=3, finished_at=None, created_at=T0 - timedelta(days=1))
        container.upload_blob("crashed.dump", b"abc")
        container.upload_blob("crashed.dump.meta.json", json.dumps(info.to_json()).encode())
        listed = store.list_backups()
        assert [(b.name, b.complete) for b in listed] == [("new.dump", True), ("crashed.dump", False),
                                                          ("old.dump", True)]
        with pytest.raises(BackupNotFound, match="incomplete"):
            store.open_reader("crashed.dump")


class TestNeverOverwrite:
    def test_existing_name_is_refused_and_left_alone(self, store):
        original = os.urandom(100_000)
        upload(store, "keep.dump", original)
        with pytest.raises(BackupExists):
            store.open_writer("keep.dump")
        assert read_all(store, "keep.dump")[0] == original

    def test_two_writers_racing_for_a_name(self, store):
        first, second = store.open_writer("race.dump"), store.open_writer("race.dump")
        first.write(b"A" * 70_000)
        second.write(b"B" * 70_000)
        first.commit(make_info())
        with pytest.raises(BackupExists):
            second.commit(make_info())
        assert read_all(store, "race.dump")[0] == b"A" * 70_000
        assert [b.name for b in store.list_backups()] == ["race.dump"]

    def test_blob_appearing_during_upload_is_not_overwritten(self, store, container):
        w = store.open_writer("apply_pd_2026-11-26.sql.gz")
        w.write(os.urandom(80_000))
        foreign = gzip.compress(b"-- nightly dump by the old tooling\n")
        container.upload_blob("apply_pd_2026-11-26.sql.gz", foreign, overwrite=True)
        with pytest.raises(BackupExists):
            w.commit(make_info())
        assert container.download_blob("apply_pd_2026-11-26.sql.gz").readall() == foreign
        # our reservation was released: the foreign blob is listed as it was
        [info] = store.list_backups()
        assert info.kind == "unknown" and info.complete and info.sha256 is None


class TestIntegrity:
    def test_bit_rot_is_caught_by_verify(self, store, container):
        data = os.urandom(200_000)
        upload(store, "rot.dump", data)
        rotten = bytearray(data)
        rotten[123_456] ^= 0x01
        container.upload_blob("rot.dump", bytes(rotten), overwrite=True)  # same size, one bit flipped
        with store.reader("rot.dump") as r:
            while r.read(50_000):
                pass
            with pytest.raises(BackupCorrupted, match="corrupted"):
                r.verify()

    def test_truncation_is_caught_by_verify(self, store, container):
        data = os.urandom(100_000)
        upload(store, "short.dump", data)
        container.upload_blob("short.dump", data[:-1], overwrite=True)
        with store.reader("short.dump") as r:
            r.read()
            with pytest.raises(BackupCorrupted, match="99999 bytes"):
                r.verify()

    def test_verify_before_the_end_is_refused(self, store):
        upload(store, "half.dump", os.urandom(100_000))
        with store.reader("half.dump") as r:
            r.read(10)
            with pytest.raises(BackupCorrupted, match="not read to the end"):
                r.verify()


class TestAbortedUpload:
    def test_exception_inside_the_writer_commits_nothing(self, store, container):
        with pytest.raises(RuntimeError, match="pg_dump died"):
            with store.writer("aborted.dump") as w:
                w.write(os.urandom(200_000))  # three blocks already staged
                raise RuntimeError("pg_dump died")
        assert store.list_backups() == []
        assert blob_names(container) == []
        with pytest.raises(BackupNotFound):
            store.get_backup("aborted.dump")
        # the name is free, and the staged blocks of the aborted upload are not part of the next one
        data = os.urandom(70_000)
        upload(store, "aborted.dump", data)
        assert read_all(store, "aborted.dump")[0] == data

    def test_sidecar_without_data_is_not_readable(self, store, container):
        upload(store, "no-data.dump", b"payload")
        container.delete_blob("no-data.dump")
        assert store.get_backup("no-data.dump").complete  # the record says so...
        with pytest.raises(BackupNotFound, match="no data blob"):  # ...but there is nothing to read
            store.open_reader("no-data.dump")
        store.delete_backup("no-data.dump")
        assert blob_names(container) == []

    def test_ours_without_sidecar_is_never_complete(self, store, container):
        upload(store, "lost-sidecar.dump", b"payload")
        container.delete_blob("lost-sidecar.dump.meta.json")
        info = store.get_backup("lost-sidecar.dump")
        assert not info.complete and info.kind == "nightly" and info.sha256 == hashlib.sha256(b"payload").hexdigest()
        with pytest.raises(BackupNotFound, match="incomplete"):
            store.open_reader("lost-sidecar.dump")


class TestForeignBlobs:
    def test_nightly_dump_of_the_existing_tooling(self, store, container):
        dump = gzip.compress(b"CREATE TABLE candidates ();\n" * 100)
        container.upload_blob("apply_pd_2026-11-25.sql.gz", dump)
        container.upload_blob("not a backup name!", b"x")  # listed by nobody
        [info] = store.list_backups()
        assert (info.name, info.kind, info.complete, info.sha256, info.format, info.size) == (
            "apply_pd_2026-11-25.sql.gz", "unknown", True, None, "plain-gzip", len(dump))
        assert not info.made_by_us
        assert info.created_at.tzinfo is not None
        assert store.get_backup(info.name) == info
        assert read_all(store, info.name)[0] == dump  # verify passes: nothing recorded to check against


class TestDelete:
    def test_delete_is_idempotent(self, store, container):
        upload(store, "gone.dump", b"bye")
        store.delete_backup("gone.dump")
        assert blob_names(container) == []
        store.delete_backup("gone.dump")
        store.delete_backup("never-was.dump")
        assert not store.backup_exists("gone.dump")

    def test_immutability_refusal_is_a_backup_error_not_retried(self, faults):
        adapter, held = faults
        adapter.refuse_delete.add("held.dump")
        upload(held, "held.dump", b"evidence")
        with pytest.raises(BackupError, match="immutability policy or legal hold") as err:
            held.delete_backup("held.dump")
        assert not err.value.transient and err.value.backup == "held.dump"
        assert [s for s in adapter.seen if s[0] == "DELETE"] == [("DELETE", f"/devstoreaccount1/"
                                                                  f"{held.container.container_name}/held.dump", "")]
        info = held.get_backup("held.dump")  # the backup is whole: the sidecar was not touched
        assert info.complete and read_all(held, "held.dump")[0] == b"evidence"


class TestLostAnswers:
    """The SDK retries a request whose answer was lost; the retry must not turn success into failure."""

    def test_lost_answer_to_the_data_commit(self, faults, container):
        adapter, store = faults
        adapter.lose_answer.append(("PUT", "comp=blocklist", "lost.dump"))
        data = os.urandom(150_000)
        done = upload(store, "lost.dump", data)  # the retry finds the blob there: ours, by its checksum
        assert done.complete and store.get_backup("lost.dump") == done
        assert len([s for s in adapter.seen if "comp=blocklist" in s[2]]) == 2
        assert read_all(store, "lost.dump")[0] == data

    def test_lost_answer_to_the_name_reservation(self, faults):
        adapter, store = faults
        adapter.lose_answer.append(("PUT", "", "reserved.dump.meta.json"))
        done = upload(store, "reserved.dump", b"abc")
        assert done.complete and store.get_backup("reserved.dump").complete
        # reservation, its retry (409: it is there, and it is ours), then "complete"
        assert len([s for s in adapter.seen if s[0] == "PUT" and s[1].endswith("reserved.dump.meta.json")]) == 3

    def test_other_writer_with_other_data_still_conflicts(self, faults, store):
        adapter, faulty = faults
        w = faulty.open_writer("theirs.dump")
        w.write(b"mine")
        upload(store, "theirs.dump", b"theirs")
        with pytest.raises(BackupExists):
            w.commit(make_info())
        assert read_all(store, "theirs.dump")[0] == b"theirs"


class TestInputsAndSetup:
    @pytest.mark.parametrize("name", ["../escape", "a/b.dump", "x.meta.json", "", "-rf"])
    def test_bad_names_are_refused(self, store, name):
        with pytest.raises(InvalidInput):
            store.open_writer(name)

    def test_missing_container(self, blob_service):
        missing = AzureBackupStore(blob_service.get_container_client("no-such-container"))
        with pytest.raises(BackupError, match="does not exist"):
            missing.list_backups()

    def test_factory_with_connection_string(self, azurite, container, monkeypatch):
        from dr.config import parse_config
        from dr.platforms.azure import azure_store

        monkeypatch.setenv("DR_AZURE_STORAGE_CONNECTION_STRING", azurite)
        config = parse_config(f"""
[services.apply.environments.production]
platform = "azure"
subscription_id = "00000000-0000-0000-0000-00000000abcd"
resource_group = "rg"
container = "{container.container_name}"
""")
        store = azure_store(config, config.target("apply", "production"))
        upload(store, "via-factory.dump", b"hello")
        assert [b.name for b in store.list_backups()] == ["via-factory.dump"]

    def test_real_storage_account_is_unreachable_in_tests(self):
        from dr.config import parse_config
        from dr.platforms.azure import azure_store

        config = parse_config("""
[services.apply.environments.production]
platform = "azure"
subscription_id = "00000000-0000-0000-0000-00000000abcd"
resource_group = "rg"
""")
        store = azure_store(config, config.target("apply", "production"), credential=FakeCredential(),
                            retry_policy=fast_retry(0), read_retry=fast_retry(1, to_secondary=True))
        assert store.container.url.startswith("https://s189applydbbkppdsa.blob.core.windows.net/database-backup")
        with pytest.raises(TransientPlatformError, match="could not reach blob storage"):
            store.list_backups()
        # a read tries the primary, then the secondary region: both were refused by the guard
        assert "s189applydbbkppdsa.blob.core.windows.net" in BLOCKED
        assert "s189applydbbkppdsa-secondary.blob.core.windows.net" in BLOCKED


class ConcurrencyAdapter(requests.adapters.HTTPAdapter):
    """Counts the requests to Azurite in flight at once, by method (blob data only)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.peaks: dict[str, int] = {}

    def peak(self, method: str) -> int:
        return self.peaks.get(method, 0)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        data = "comp=block&" in (request.url or "") or ("x-ms-range" in request.headers and request.method == "GET")
        if not data:
            return super().send(request, **kwargs)
        with self.lock:
            self.now[request.method] = self.now.get(request.method, 0) + 1
            self.peaks[request.method] = max(self.peaks.get(request.method, 0), self.now[request.method])
        try:
            time.sleep(0.02)  # a network's latency: what parallel transfers hide
            return super().send(request, **kwargs)
        finally:
            with self.lock:
                self.now[request.method] -= 1


class FaultAdapter(requests.adapters.HTTPAdapter):
    """Faults at the HTTP boundary, in front of Azurite.

    - `refuse_delete`: blob names whose DELETE is answered as Azure does under a
      retention policy (409 BlobImmutableDueToPolicy), without reaching Azurite;
    - `lose_answer`: (method, query part, blob name) of requests that DO reach Azurite
      but whose answer is replaced by a 503, once each, as when a connection drops.
    """

    IMMUTABLE = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobImmutableDueToPolicy</Code>'
                 b"<Message>This operation is not permitted as the blob is immutable due to a policy.</Message>"
                 b"</Error>")
    UNAVAILABLE = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
                   b"<Message>The server is busy.</Message></Error>")

    def __init__(self) -> None:
        super().__init__()
        self.refuse_delete: set[str] = set()
        self.lose_answer: list[tuple[str, str, str]] = []
        self.seen: list[tuple[str, str, str]] = []

    def _canned(self, request: requests.PreparedRequest, status: int, code: str, body: bytes) -> requests.Response:
        resp = requests.Response()
        resp.status_code, resp.reason, resp.url, resp.request = status, "fault", request.url, request
        resp.headers = CaseInsensitiveDict({"x-ms-error-code": code, "Content-Type": "application/xml",
                                            "Content-Length": str(len(body))})
        resp.raw = io.BytesIO(body)
        return resp

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        parts = urlsplit(request.url)
        path, query = unquote(parts.path), parts.query
        self.seen.append((request.method, path, query))
        if request.method == "DELETE" and any(path.endswith("/" + n) for n in self.refuse_delete):
            return self._canned(request, 409, "BlobImmutableDueToPolicy", self.IMMUTABLE)
        for rule in self.lose_answer:
            method, query_part, name = rule
            if request.method == method and query_part in query and path.endswith("/" + name):
                self.lose_answer.remove(rule)
                super().send(request, **kwargs).close()  # it happened...
                return self._canned(request, 503, "ServerBusy", self.UNAVAILABLE)  # ...but we never heard
        return super().send(request, **kwargs)


@pytest.fixture
def faults(azurite: str, container: Any) -> tuple[FaultAdapter, AzureBackupStore]:
    """A store on the same container whose HTTP traffic goes through a `FaultAdapter`."""
    from azure.storage.blob import BlobServiceClient

    adapter = FaultAdapter()
    session = requests.Session()
    session.mount("http://", adapter)
    service = BlobServiceClient.from_connection_string(
        azurite, session=session, retry_policy=fast_retry(3))
    return adapter, AzureBackupStore(service.get_container_client(container.container_name), block_size=64 * 1024)


class TestSecondaryRegion:
    """RA-GRS: when the primary endpoint does not answer, reads go to the secondary; writes never do."""

    def test_reads_fall_back_to_the_secondary_endpoint(self, azurite, container, store, monkeypatch):
        import re
        import socket

        from azure.storage.blob import ExponentialRetry

        from dr.config import parse_config
        from dr.platforms.azure import azure_store

        data = os.urandom(300 * 1024)
        upload(store, "apply_pd_2026-11-25.sql.gz", data)  # written while the primary was up
        azurite_host = re.search(r"BlobEndpoint=http://([^/]+)/", azurite).group(1)
        with socket.socket() as s:  # a port nobody listens on: the primary region is down
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        monkeypatch.setenv("DR_AZURE_STORAGE_CONNECTION_STRING", azurite.replace(azurite_host, f"127.0.0.1:{dead}"))
        monkeypatch.setenv("DR_AZURE_BLOB_SECONDARY_HOST", azurite_host)  # Azurite stands in for the secondary
        config = parse_config(f"""
[services.apply.environments.production]
platform = "azure"
subscription_id = "00000000-0000-0000-0000-00000000abcd"
resource_group = "rg"
container = "{container.container_name}"
""")
        fast = ExponentialRetry(initial_backoff=0, increment_base=0, retry_total=3, random_jitter_range=0,
                                retry_to_secondary=True)
        degraded = azure_store(config, config.target("apply", "production"), read_retry=fast,
                               retry_policy=fast_retry(1), max_single_get_size=64 * 1024, max_chunk_get_size=64 * 1024)
        assert [b.name for b in degraded.list_backups()] == ["apply_pd_2026-11-25.sql.gz"]
        with degraded.reader("apply_pd_2026-11-25.sql.gz") as r:
            assert r.read() == data
            r.verify()
        # writes need the primary: refused as a transient error, nothing is written anywhere
        with pytest.raises(TransientPlatformError, match="could not reach blob storage"):
            with degraded.writer("apply_pd_2026-11-26.sql.gz") as w:
                w.write(b"x")
        assert [b.name for b in store.list_backups()] == ["apply_pd_2026-11-25.sql.gz"]


class TestHolds:
    """A running restore's hold keeps retention away from its backup, on Blob Storage too."""

    def test_held_backup_is_left_alone_by_retention_until_released(self, store, container):
        from dr.config import Retention
        from dr.retention import apply_retention

        now = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
        old = [f"apply_pd_2026-{m:02d}-01.sql.gz" for m in (3, 4)]  # beyond every bucket: retention deletes them
        for i, name in enumerate(old):
            upload(store, name, b"x" * 10, created_at=datetime(2026, 3 + i, 1, 2, tzinfo=timezone.utc),
                   finished_at=datetime(2026, 3 + i, 1, 2, 5, tzinfo=timezone.utc), complete=True)
        upload(store, "apply_pd_2026-11-25.sql.gz", b"new", created_at=now - timedelta(hours=10),
               finished_at=now - timedelta(hours=10), complete=True)
        policy = Retention(daily=1, weekly=0, monthly=0)
        with store.hold(old[0], holder="restore-host-1"), store.hold(old[0], holder="verify-host-2"):
            assert store.held(old[0]) and not store.held(old[1])
            with pytest.raises(BackupError, match="already held by 'restore-host-1'"):
                with store.hold(old[0], holder="restore-host-1"):
                    pass
            report = apply_retention(store, policy, now, dry_run=False)
            assert [i.name for i, _ in report.deleted] == [old[1]]
            assert (old[0] in [i.name for i, why in report.skipped if "held" in why])
        assert not store.held(old[0])
        assert [i.name for i, _ in apply_retention(store, policy, now, dry_run=False).deleted] == [old[0]]
        assert [b.name for b in store.list_backups()] == ["apply_pd_2026-11-25.sql.gz"]
        assert not [b.name for b in container.list_blobs() if ".hold-" in b.name]

    def test_a_crashed_restores_hold_goes_stale(self, store, monkeypatch):
        from dr.platforms import holds

        upload(store, "apply_pd_2026-11-20.sql.gz", b"abc", complete=True)
        store.container.get_blob_client(".apply_pd_2026-11-20.sql.gz.hold-crashed").upload_blob(b"{}")
        assert store.held("apply_pd_2026-11-20.sql.gz")
        monkeypatch.setattr(holds, "HOLD_STALE_AFTER", timedelta(seconds=-1))
        assert not store.held("apply_pd_2026-11-20.sql.gz")
        with store.hold("apply_pd_2026-11-20.sql.gz", holder="crashed"):  # replaces the stale one
            pass

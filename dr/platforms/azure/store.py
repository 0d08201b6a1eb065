"""Backups in an Azure Blob Storage container, with the semantics of the local store.

Each backup is a block blob `<name>` and a sidecar blob `<name>.meta.json` holding the
whole `BackupInfo` as JSON (manifest included; blob metadata is limited to 8 KB, so the
data blob only carries a small `dr_*` subset of it).

An upload stages the stream in blocks of `block_size` bytes (`stage_block`, each with
an MD5 checked by the service; up to `transfers` blocks in flight at once) while computing
its SHA-256, so memory stays bounded (about `transfers + 1` blocks) and nothing is visible
until the commit, which runs:

1. the sidecar, `complete: false`, created only if absent: it reserves the name;
2. `commit_block_list` with `If-None-Match: *`, so an existing blob is never overwritten;
3. the sidecar again, now `complete: true`, only if still the one written in step 1.

A crash in between leaves a backup listed as incomplete, never as complete. An aborted
upload commits nothing (its staged blocks are discarded by Azure after a week). A blob
without a sidecar and without our `dr_made_by` metadata was put there by other tooling
(e.g. the existing nightly `.sql.gz` dumps) and is listed as `kind="unknown"`.

A download reads the blob in ranges of up to 4 MiB, `transfers` ranges ahead of the reader:
one HTTP stream caps a restore at one connection's throughput, several keep a restore that
consumes faster than that fed, in bounded memory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobBlock, BlobProperties, ContainerClient, ContentSettings

from dr.errors import (
    BackupCorrupted,
    BackupError,
    BackupExists,
    BackupNotFound,
    DrError,
    InvalidInput,
    TransientPlatformError,
)
from dr.platforms import holds
from dr.platforms.base import BackupInfo, BackupReader, BackupStore, BackupWriter, verify_digest
from dr.platforms.local.store import META_SUFFIX, check_backup_name

log = logging.getLogger("dr.azure.store")

DEFAULT_BLOCK_SIZE = 8 * 1024 * 1024
#: blocks uploaded, or ranges downloaded, at the same time
DEFAULT_TRANSFERS = 4
#: the largest range a download asks for (memory: `transfers` ranges ahead)
READ_RANGE = 4 * 1024 * 1024
MADE_BY = "dr-orchestrator"
#: Error codes of a write or delete refused by a time-based retention policy or a legal hold.
IMMUTABLE_CODES = {"BlobImmutableDueToPolicy", "BlobImmutableDueToLegalHold", "ContainerImmutableDueToPolicy"}
_META_FIELDS = ("kind", "format", "sha256", "size", "created_at", "finished_at", "source_server", "database",
                "server_version")


def _code(exc: Exception) -> str:
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _aware(when: datetime | None) -> datetime | None:
    if when is not None and when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when


class _AzureWriter(BackupWriter):
    """A staged upload of one backup; see the module docstring for the commit steps."""

    def __init__(self, store: "AzureBackupStore", name: str):
        self.store, self.name = store, name
        self.blob = store.container.get_blob_client(name)
        self.meta_blob = store.container.get_blob_client(name + META_SUFFIX)
        self.block_prefix = uuid.uuid4().hex  # all block ids of a blob must have the same length
        self.block_ids: list[str] = []
        self.in_flight: deque[Future] = deque()
        self.pool: ThreadPoolExecutor | None = None
        self.buffer = bytearray()
        self.hash = hashlib.sha256()
        self.bytes_written = 0
        self.committed = False
        self.closed = False

    def _nothing_stored(self, error: DrError) -> DrError:
        """Say what a failure before the data commit leaves: nothing, and the name still free."""
        return error.annotate(world_state=f"nothing was stored: backup '{self.name}' was not committed and its name "
                                          f"is still free in {self.store.where}",
                              resume_hint="run the same backup again")

    def _stage(self, chunk: bytes) -> None:
        """Stage the next block; up to `transfers` at once (waits for the oldest beyond that)."""
        block_id = base64.b64encode(f"{self.block_prefix}{len(self.block_ids):08d}".encode()).decode()
        self.block_ids.append(block_id)
        if self.store.transfers <= 1:
            self._stage_one(block_id, chunk)
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.store.transfers, thread_name_prefix="dr-blob-upload")
        while len(self.in_flight) >= self.store.transfers:
            self._wait_oldest()
        self.in_flight.append(self.pool.submit(self._stage_one, block_id, chunk))

    def _stage_one(self, block_id: str, chunk: bytes) -> None:
        try:
            self.blob.stage_block(block_id, chunk, length=len(chunk), validate_content=True)
        except AzureError as exc:
            raise self._nothing_stored(self.store._error(exc, self.name, "upload a block of")) from exc

    def _wait_oldest(self) -> None:
        try:
            self.in_flight.popleft().result()
        except BaseException:
            self._stop_staging()
            raise

    def _stop_staging(self) -> None:
        for future in self.in_flight:
            future.cancel()
        self.in_flight.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def write(self, data: bytes) -> None:
        if self.closed:
            raise BackupError(f"the upload of '{self.name}' is already finished", backup=self.name)
        if not data:
            return
        self.hash.update(data)
        self.bytes_written += len(data)
        self.buffer += data
        size = self.store.block_size
        while len(self.buffer) >= size:
            chunk = bytes(self.buffer[:size])
            del self.buffer[:size]
            self._stage(chunk)

    def commit(self, info: BackupInfo) -> BackupInfo:
        if self.closed:
            raise BackupError(f"the upload of '{self.name}' is already finished", backup=self.name)
        if self.buffer:
            self._stage(bytes(self.buffer))
            self.buffer.clear()
        while self.in_flight:  # every block staged before the commit
            self._wait_oldest()
        self._stop_staging()
        done = replace(info, name=self.name, size=self.bytes_written, sha256=self.hash.hexdigest(), complete=False)
        exists = BackupExists(f"backup '{self.name}' appeared while this one was being written; nothing was "
                              "overwritten and this upload was not saved", backup=self.name)
        # 1. the incomplete sidecar reserves the name
        sidecar = _sidecar_bytes(done)
        try:
            etag = self.meta_blob.upload_blob(sidecar, overwrite=False,
                                              content_settings=ContentSettings(content_type="application/json"))["etag"]
        except ResourceExistsError as exc:
            etag = self._own_sidecar(sidecar)  # a retry whose first answer was lost finds our own
            if etag is None:
                self.closed = True
                raise exists from exc
        except AzureError as exc:
            raise self._nothing_stored(self.store._error(exc, self.name, "save the metadata of")) from exc
        # 2. the data, never over an existing blob
        try:
            self.blob.commit_block_list(
                [BlobBlock(block_id=b) for b in self.block_ids], metadata=_blob_metadata(done),
                content_settings=ContentSettings(content_type=_content_type(self.name)),
                match_condition=MatchConditions.IfMissing)
        except AzureError as exc:
            # a retry whose first answer was lost conflicts with our own data: that is success
            if not self._landed(done):
                self.closed = True
                released = self._release(etag)
                if isinstance(exc, HttpResponseError) and exc.status_code in (409, 412):
                    raise exists from exc
                error = self.store._error(exc, self.name, "commit")
                if not released:
                    raise error.annotate(world_state=f"no data was stored; backup '{self.name}' is listed as "
                                                     "incomplete (its reservation could not be removed)",
                                         resume_hint=f"delete backup '{self.name}', then run the same backup again"
                                         ) from exc
                raise self._nothing_stored(error) from exc
        # 3. complete, only over our own sidecar
        done = replace(done, complete=True)
        try:
            self.meta_blob.upload_blob(_sidecar_bytes(done), overwrite=True, etag=etag,
                                       match_condition=MatchConditions.IfNotModified,
                                       content_settings=ContentSettings(content_type="application/json"))
        except AzureError as exc:
            self.closed = True
            raise self.store._error(exc, self.name, "mark as complete") from exc
        self.committed = self.closed = True
        log.info("backup %s saved: %d bytes in %d blocks, sha256 %s", self.name, done.size, len(self.block_ids),
                 done.sha256)
        return done

    def _own_sidecar(self, sidecar: bytes) -> str | None:
        """The etag of the existing sidecar when it is exactly the one this writer wrote."""
        try:
            downloader = self.meta_blob.download_blob()
            return downloader.properties.etag if downloader.readall() == sidecar else None
        except AzureError:
            return None

    def _landed(self, done: BackupInfo) -> bool:
        """Whether the data blob is there with this upload's checksum and size."""
        try:
            md = self.blob.get_blob_properties().metadata or {}
        except AzureError:
            return False
        return md.get("dr_sha256") == done.sha256 and md.get("dr_size") == str(done.size)

    def _release(self, etag: str) -> bool:
        """After a failed data commit: drop our name reservation (only our own sidecar); whether it is gone."""
        try:
            self.meta_blob.delete_blob(etag=etag, match_condition=MatchConditions.IfNotModified)
        except AzureError as exc:
            log.warning("could not remove the reservation %s%s: %s", self.name, META_SUFFIX, exc)
            return False
        return True

    def abort(self) -> None:
        """Discard the upload: nothing was committed, and the staged blocks expire unused."""
        self.closed = True
        self._stop_staging()
        self.buffer.clear()


class _AzureReader(BackupReader):
    """A streamed download: ranges of up to `READ_RANGE` bytes, `transfers` of them ahead of the reader."""

    def __init__(self, store: "AzureBackupStore", info: BackupInfo):
        self.store, self.info = store, info
        self.blob = store.reads.get_blob_client(info.name)
        try:
            props = self.blob.get_blob_properties()
        except ResourceNotFoundError as exc:
            raise BackupNotFound(f"backup '{info.name}' has metadata but no data blob", backup=info.name) from exc
        except AzureError as exc:
            raise store._error(exc, info.name, "read") from exc
        self.size = props.size
        self.next_offset = 0
        self.pending: deque[Future] = deque()
        self.pool = ThreadPoolExecutor(max(1, store.transfers), thread_name_prefix="dr-blob-download")
        self.buffer = bytearray()
        self.eof = False
        self.hash = hashlib.sha256()
        self.bytes_read = 0
        self._ahead()

    def _range(self, offset: int, length: int) -> bytes:
        # backups are never overwritten; bytes of another blob would fail the checksum anyway
        return self.blob.download_blob(offset=offset, length=length, max_concurrency=1).readall()

    def _ahead(self) -> None:
        while len(self.pending) < max(1, self.store.transfers) and self.next_offset < self.size:
            length = min(self.store.block_size, READ_RANGE, self.size - self.next_offset)
            self.pending.append(self.pool.submit(self._range, self.next_offset, length))
            self.next_offset += length

    def _fill(self) -> bool:
        if self.eof:
            return False
        if not self.pending:
            self.eof = True
            self.pool.shutdown(wait=False)
            return False
        try:
            chunk = self.pending.popleft().result()
        except AzureError as exc:
            self.close()
            raise self.store._error(exc, self.info.name, "read") from exc
        self.buffer += chunk
        self._ahead()
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._fill():
                pass
            n = len(self.buffer)
        while len(self.buffer) < n and self._fill():
            pass
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.hash.update(data)
        self.bytes_read += len(data)
        return data

    def verify(self) -> None:
        if self.buffer or self._fill():
            raise BackupCorrupted(f"backup '{self.info.name}' was not read to the end", backup=self.info.name)
        verify_digest(self.info, self.bytes_read, self.hash.hexdigest())

    def close(self) -> None:
        self.eof = True
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.buffer.clear()


def _sidecar_bytes(info: BackupInfo) -> bytes:
    return json.dumps(info.to_json(), indent=2, sort_keys=True).encode()


def _content_type(name: str) -> str:
    return "application/gzip" if name.endswith(".gz") else "application/octet-stream"


def _blob_metadata(info: BackupInfo) -> dict[str, str]:
    """The small subset of `info` that goes into the data blob's metadata (ASCII only)."""
    doc = info.to_json()
    md = {"dr_made_by": MADE_BY}
    for key in _META_FIELDS:
        value = doc.get(key)
        if value is None:
            continue
        text = str(value)
        if text.isascii() and text.isprintable() and len(text) <= 256:
            md[f"dr_{key}"] = text
    return md


def _info_from_properties(props: BlobProperties) -> BackupInfo:
    """The info of a data blob that has no sidecar."""
    md = {k.lower(): v for k, v in (props.metadata or {}).items()}
    created = _aware(props.creation_time or props.last_modified) or datetime.now(timezone.utc)
    if md.get("dr_made_by") == MADE_BY:
        # ours, but the sidecar is gone or was never written: never complete
        def when(key: str) -> datetime | None:
            return datetime.fromisoformat(md[key]) if md.get(key) else None

        version = md.get("dr_server_version")
        return BackupInfo(
            name=props.name, size=props.size, complete=False, created_at=when("dr_created_at") or created,
            sha256=md.get("dr_sha256"), kind=md.get("dr_kind", "unknown"), format=md.get("dr_format", "unknown"),
            source_server=md.get("dr_source_server"), database=md.get("dr_database"),
            server_version=int(version) if version and version.isdigit() else None, finished_at=when("dr_finished_at"),
        )
    fmt = "plain-gzip" if props.name.endswith(".sql.gz") else "unknown"
    return BackupInfo(name=props.name, size=props.size, complete=True, kind="unknown", format=fmt, created_at=created)


class AzureBackupStore(BackupStore):
    """`BackupStore` in one Azure Blob Storage container.

    Args:
        container: the container client (credentials are chosen by the caller); every write
            goes through it.
        block_size: bytes per staged block (and per downloaded range, up to `READ_RANGE`).
        transfers: blocks uploaded, or ranges downloaded, at once; memory use of an upload or a
            download is about `transfers + 1` blocks.
        reads: the client for listing and reading (default `container`). Give one whose retry
            policy has `retry_to_secondary=True` to read from the account's secondary region
            (RA-GRS) when the primary does not answer, as `azure_store` does: reads never need
            the primary, writes always do.
    """

    def __init__(self, container: ContainerClient, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 reads: ContainerClient | None = None, transfers: int = DEFAULT_TRANSFERS):
        if block_size <= 0 or block_size > 4000 * 1024 * 1024:
            raise InvalidInput(f"block_size must be between 1 byte and 4000 MiB, got {block_size}")
        if not 1 <= transfers <= 64:
            raise InvalidInput(f"transfers must be between 1 and 64, got {transfers}")
        self.transfers = transfers
        self.container = container
        self.reads = reads or container
        self.block_size = block_size

    def __repr__(self) -> str:
        return f"AzureBackupStore({self.where})"

    @property
    def where(self) -> str:
        return f"{self.container.account_name}/{self.container.container_name}"

    def _error(self, exc: Exception, name: str | None, doing: str) -> DrError:
        """Our error for an SDK failure (the caller chains it with `from exc`)."""
        what = f"backup '{name}'" if name else "the backups"
        if isinstance(exc, ClientAuthenticationError) and getattr(exc, "status_code", None) is None:
            return BackupError(f"cannot get an Azure token to {doing} {what} in {self.where}: {exc.message}",
                               backup=name)
        if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
            return TransientPlatformError(f"could not reach blob storage {self.where} to {doing} {what}: {exc.message}")
        if isinstance(exc, HttpResponseError) and exc.status_code is None and exc.response is None:
            # no answer at all: the SDK gave up on a stream that broke mid-body (e.g. a reset download chunk)
            return TransientPlatformError(f"could not reach blob storage {self.where} to {doing} {what}: the "
                                          f"connection broke in the middle of the answer ({exc.message})")
        if isinstance(exc, HttpResponseError):
            status, code = exc.status_code or 0, _code(exc)
            if status in (403, 409) and code in IMMUTABLE_CODES:
                return BackupError(f"{what} in {self.where} is protected by an immutability policy or legal hold "
                                   f"({code}); it was not changed", backup=name)
            if status in (408, 429) or status >= 500:
                return TransientPlatformError(f"blob storage {self.where} could not {doing} {what} after retries "
                                              f"(HTTP {status} {code})")
            if status == 403:
                return BackupError(f"not allowed to {doing} {what} in {self.where} ({code}); the identity needs "
                                   "'Storage Blob Data Contributor' on the container (see docs/azure.md)", backup=name)
            if code == "ContainerNotFound":
                return BackupError(f"container {self.where} does not exist", backup=name)
            return BackupError(f"could not {doing} {what} in {self.where} (HTTP {status} {code})", backup=name)
        return BackupError(f"could not {doing} {what} in {self.where}: {exc}", backup=name)

    def _sidecar(self, name: str) -> BackupInfo | None:
        try:
            raw = self.reads.get_blob_client(name + META_SUFFIX).download_blob().readall()
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise self._error(exc, name, "read the metadata of") from exc
        try:
            return BackupInfo.from_json(json.loads(raw))
        except (ValueError, TypeError) as exc:
            log.warning("the metadata of backup %s is unreadable (%s); listing it as incomplete", name, exc)
            return BackupInfo(name=name, size=0, complete=False, created_at=datetime.now(timezone.utc))

    def _info(self, name: str, props: BlobProperties | None = None) -> BackupInfo:
        info = self._sidecar(name)
        if info is not None:
            return info
        if props is None:
            try:
                props = self.reads.get_blob_client(name).get_blob_properties()
            except ResourceNotFoundError as exc:
                raise BackupNotFound(f"no backup named '{name}' in {self.where}", backup=name) from exc
            except AzureError as exc:
                raise self._error(exc, name, "read") from exc
        return _info_from_properties(props)

    def list_backups(self) -> list[BackupInfo]:
        """Every backup, complete or not, newest first."""
        data: dict[str, BlobProperties] = {}
        with_sidecar: set[str] = set()
        try:
            for blob in self.reads.list_blobs(include=["metadata"]):
                if blob.name.endswith(META_SUFFIX):
                    with_sidecar.add(blob.name.removesuffix(META_SUFFIX))
                else:
                    data[blob.name] = blob
        except AzureError as exc:
            raise self._error(exc, None, "list") from exc
        infos = []
        for name in sorted(set(data) | with_sidecar):
            try:
                check_backup_name(name)
            except InvalidInput:
                log.debug("skipping blob %s: not a backup name", name)
                continue
            if name in with_sidecar:
                infos.append(self._info(name, data.get(name)))
            else:
                infos.append(_info_from_properties(data[name]))
        return sorted(infos, key=lambda i: _aware(i.finished_at or i.created_at), reverse=True)

    def get_backup(self, name: str) -> BackupInfo:
        """The backup's metadata; raises `BackupNotFound`."""
        check_backup_name(name)
        return self._info(name)

    def open_writer(self, name: str) -> BackupWriter:
        """Start a staged upload; raises `BackupExists` if the name is taken."""
        check_backup_name(name)
        try:
            taken = (self.container.get_blob_client(name).exists()
                     or self.container.get_blob_client(name + META_SUFFIX).exists())
        except AzureError as exc:
            raise self._error(exc, name, "look up") from exc
        if taken:
            raise BackupExists(f"backup '{name}' already exists in {self.where}; backups are never overwritten",
                               backup=name)
        return _AzureWriter(self, name)

    def open_reader(self, name: str) -> BackupReader:
        """Open a complete backup for streaming; raises `BackupNotFound`."""
        info = self.get_backup(name)
        if not info.complete:
            raise BackupNotFound(f"backup '{name}' is incomplete (its upload never finished)", backup=name)
        return _AzureReader(self, info)

    def delete_backup(self, name: str) -> None:
        """Delete a backup and its sidecar; succeeds if already gone.

        Raises:
            BackupError: the blob is under an immutability policy or a legal hold (not retried).
        """
        check_backup_name(name)
        # data first: if it is protected, the sidecar stays and the backup stays whole
        for blob_name in (name, name + META_SUFFIX):
            try:
                self.container.get_blob_client(blob_name).delete_blob()
            except ResourceNotFoundError:
                pass
            except AzureError as exc:
                raise self._error(exc, name, "delete") from exc
        log.info("deleted backup %s from %s", name, self.where)


    # --- holds (dr/platforms/holds.py): a small marker blob beside the backup per holder ---

    supports_holds = True

    def hold(self, name: str, holder: str) -> contextlib.AbstractContextManager[None]:
        """Hold a backup for a `with` block so retention will not delete it (see `BackupStore.hold`).

        The marker is written with If-None-Match (never over another's hold); a crashed
        restore's marker goes stale after `holds.HOLD_STALE_AFTER` and may be taken over.
        """
        blob = self.container.get_blob_client(holds.marker_name(name, holder))

        def create() -> None:
            body = holds.marker_body(holder)
            try:
                try:
                    blob.upload_blob(body, overwrite=False)
                except ResourceExistsError as exc:
                    if not holds.is_stale(datetime.now(timezone.utc) - blob.get_blob_properties().last_modified):
                        raise holds.already_held(name, holder, f"blob {blob.blob_name}") from exc
                    holds.log.warning("replacing the stale hold of %s on backup %s", holder, name)
                    blob.upload_blob(body, overwrite=True)
            except AzureError as exc:
                raise self._error(exc, name, "hold") from exc

        def remove() -> None:
            try:
                blob.delete_blob()
            except ResourceNotFoundError:
                pass
            except AzureError as exc:
                holds.log.warning("could not release the hold %s (it goes stale in %s): %s", blob.blob_name,
                                  holds.HOLD_STALE_AFTER, exc)

        return holds.holding(self, name, holder, create=create, remove=remove)

    def held(self, name: str) -> bool:
        """Whether a live (not stale) hold is on the backup."""
        now = datetime.now(timezone.utc)
        live = False
        try:
            markers = list(self.reads.list_blobs(name_starts_with=holds.marker_name(name)))
        except AzureError as exc:
            raise self._error(exc, name, "read the holds of") from exc
        for b in markers:
            if holds.is_stale(now - b.last_modified):
                holds.log.warning("ignoring the stale hold %s on backup %s (since %s; delete it once no restore "
                                  "runs)", b.name, name, b.last_modified)
            else:
                live = True
        return live

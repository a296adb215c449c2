"""The site store: one fsspec URL, a fixed layout, and atomic writes.

Layout (architecture contract)::

    STORE/<site>/catalog/instances.parquet
    STORE/<site>/catalog/series.parquet
    STORE/<site>/quarantine.parquet
    STORE/<site>/deid/dicom/...
    STORE/<site>/deid/series.parquet
    STORE/<site>/deid/audit.parquet
    STORE/<site>/harmonised/<series>/...
    STORE/<site>/features/<params-hash>.parquet

Every write goes to a temporary key first and is then moved onto its final key, so a crash
never leaves a half-written object under a name that looks complete. ``write_*`` helpers skip
the write when the bytes are unchanged, which makes re-runs write nothing.
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from tasks.errors import OncoflowError
from tasks.records import QuarantineRecord, Stage

SITE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TMP_MARK = ".tmp-"

CATALOG_INSTANCES = "catalog/instances.parquet"
CATALOG_SERIES = "catalog/series.parquet"
QUARANTINE = "quarantine.parquet"
DEID_DICOM = "deid/dicom"
DEID_SERIES = "deid/series.parquet"
DEID_AUDIT = "deid/audit.parquet"
HARMONISED = "harmonised"
HARMONISED_SERIES = "harmonised/series.parquet"
FEATURES = "features"

QUARANTINE_SCHEMA = pa.schema(
    [
        ("item", pa.string()),
        ("kind", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def validate_site(site: str) -> str:
    """Return ``site`` if it is a valid site code, else raise a one-line error.

    Site codes appear in object names and Prefect tags, so they are restricted to lowercase
    letters, digits and dashes.
    """
    if not SITE_PATTERN.match(site):
        raise OncoflowError(
            f"invalid site code {site!r}: use 1-63 lowercase letters, digits and dashes"
        )
    return site


def open_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve an fsspec URL to a filesystem and a root path, with a one-line error if unusable.

    Parameters
    ----------
    url
        A local path, ``file://`` URL, ``s3://bucket/prefix`` or any fsspec URL.

    Returns
    -------
    tuple
        The filesystem and the path inside it (no trailing slash).
    """
    if not url or not url.strip():
        raise OncoflowError("empty URL")
    try:
        fs, path = url_to_fs(url)
    except (ValueError, ImportError) as exc:
        raise OncoflowError(f"unsupported URL {url!r}: {exc}") from None
    return fs, path.rstrip("/") or path


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    """Return the main protocol name of a filesystem (``file``, ``s3``, ...)."""
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Return a full URL for ``path`` on ``fs`` (adds the protocol for remote filesystems)."""
    proto = protocol_of(fs)
    return path if proto in ("file", "local") else f"{proto}://{path}"


def sha256_bytes(data: bytes) -> str:
    """Return the hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def table_to_parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a table to Parquet bytes deterministically (same table → same bytes)."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True, store_schema=True)
    return sink.getvalue()


@dataclass(frozen=True)
class SiteStore:
    """The store of one site: ``<url>/<site>/...``.

    Parameters
    ----------
    url
        fsspec URL of the store root (local path, ``file://``, ``s3://bucket/prefix``).
    site
        Site code (lowercase letters, digits, dashes).
    """

    url: str
    site: str

    def __post_init__(self) -> None:
        validate_site(self.site)
        _ = self.fs  # resolve now so a bad URL fails before any work

    @cached_property
    def _resolved(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = open_url(self.url)
        return fs, f"{root}/{self.site}"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem the store lives on."""
        return self._resolved[0]

    @property
    def root(self) -> str:
        """Path of ``<url>/<site>`` inside :attr:`fs`."""
        return self._resolved[1]

    def path(self, key: str) -> str:
        """Return the filesystem path of a store-relative key."""
        return f"{self.root}/{key.lstrip('/')}" if key else self.root

    def uri(self, key: str = "") -> str:
        """Return the full URL (with protocol) of a store-relative key."""
        return unstrip(self.fs, self.path(key))

    def _fresh(self, path: str) -> str:
        """Forget cached listings of ``path``'s folder: another process may have written it."""
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        return path

    def exists(self, key: str) -> bool:
        """Whether the key exists."""
        return bool(self.fs.exists(self._fresh(self.path(key))))

    def read_bytes(self, key: str) -> bytes:
        """Read an object."""
        return self.fs.cat_file(self._fresh(self.path(key)))

    def write_bytes(self, key: str, data: bytes, *, skip_unchanged: bool = True) -> bool:
        """Write an object atomically (temporary key, then move).

        Parameters
        ----------
        key
            Store-relative key.
        data
            Content.
        skip_unchanged
            Leave an existing object with identical content untouched.

        Returns
        -------
        bool
            True when something was written.
        """
        final = self.path(key)
        if skip_unchanged and self.fs.exists(final):
            try:
                if sha256_bytes(self.fs.cat_file(final)) == sha256_bytes(data):
                    return False
            except FileNotFoundError:
                pass
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/{TMP_MARK}{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
        self.fs.invalidate_cache(parent)
        return True

    def read_table(self, key: str) -> pa.Table | None:
        """Read a Parquet table, or None when the key does not exist."""
        path = self._fresh(self.path(key))
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            return pq.read_table(fh)

    def write_table(
        self, key: str, table: pa.Table, metadata: dict[str, str] | None = None
    ) -> bool:
        """Write a Parquet table atomically and deterministically; skip when unchanged.

        Returns
        -------
        bool
            True when something was written.
        """
        return self.write_bytes(key, table_to_parquet_bytes(table, metadata))

    def replace_quarantine(self, stage: Stage, records: list[QuarantineRecord]) -> bool:
        """Replace the quarantine rows of one stage, keeping the other stages' rows.

        Rows are sorted so the table is byte-identical for the same records.
        """
        rows: list[dict[str, Any]] = []
        current = self.read_table(QUARANTINE)
        if current is not None:
            rows = [r for r in current.to_pylist() if r["stage"] != str(stage)]
        rows.extend(r.to_row() for r in records)
        rows.sort(key=lambda r: (r["stage"], r["kind"], r["item"], r["reason"]))
        return self.write_table(QUARANTINE, pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA))

    def quarantine_rows(self, stage: Stage | None = None) -> list[dict[str, Any]]:
        """Return quarantine rows, optionally of one stage only."""
        table = self.read_table(QUARANTINE)
        rows = table.to_pylist() if table is not None else []
        return [r for r in rows if stage is None or r["stage"] == str(stage)]

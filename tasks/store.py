"""The site store: one fsspec URL, a fixed layout, and atomic writes.

Layout (architecture contract)::

    STORE/<site>/catalog/instances.parquet
    STORE/<site>/catalog/series.parquet
    STORE/<site>/quarantine.parquet
    STORE/<site>/deid/dicom/...
    STORE/<site>/deid/series.parquet
    STORE/<site>/deid/audit.parquet
    STORE/<site>/deid/units.parquet
    STORE/<site>/harmonised/<series>/...
    STORE/<site>/harmonised/series.parquet
    STORE/<site>/harmonised/units.parquet
    STORE/<site>/features/<params-hash>.parquet

The store owns every write. Each object goes to a temporary key first and is then moved onto
its final key, so a crash never leaves a half-written object under a name that looks complete.
What happens to an existing object is an explicit :class:`Existing` mode (the default skips the
write when the bytes are unchanged, which makes re-runs write nothing). A group of objects is
written with :meth:`SiteStore.commit` (old marker removed, objects written, marker last);
outputs no longer produced are removed with :meth:`SiteStore.prune`; a staged prefix becomes
final with :meth:`SiteStore.move`. Nothing outside this module touches the filesystem of a
store.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from tasks.errors import OncoflowError
from tasks.records import Stage

SITE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TMP_MARK = ".tmp-"

CATALOG_INSTANCES = "catalog/instances.parquet"
CATALOG_SERIES = "catalog/series.parquet"
QUARANTINE = "quarantine.parquet"
DEID_DICOM = "deid/dicom"
DEID_SERIES = "deid/series.parquet"
DEID_AUDIT = "deid/audit.parquet"
DEID_UNITS = "deid/units.parquet"
HARMONISED = "harmonised"
HARMONISED_SERIES = "harmonised/series.parquet"
HARMONISED_UNITS = "harmonised/units.parquet"
FEATURES = "features"
#: Object of a table in parts holding the table's schema and metadata (no rows): the name
#: Dask and Spark give it; ``pyarrow.dataset`` and ``read_parquet('<folder>/*.parquet')`` skip it.
COMMON_METADATA = "_common_metadata"

QUARANTINE_SCHEMA = pa.schema(
    [
        ("item", pa.string()),
        ("kind", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

#: Order of the quarantine rows (and of each of its parts).
QUARANTINE_SORT = ("stage", "kind", "item", "reason")


class Existing(StrEnum):
    """What a write does when its key already holds an object."""

    SKIP_UNCHANGED = "skip-unchanged"
    """Leave an object with identical content untouched; replace a different one."""
    OVERWRITE = "overwrite"
    """Always replace the object."""
    SKIP = "skip"
    """Leave any existing object untouched."""
    FAIL = "fail"
    """Raise :class:`FileExistsError`."""


LOCAL_PROTOCOLS = ("file", "local")


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


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem."""
    return protocol_of(fs) in LOCAL_PROTOCOLS


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Return a full URL for ``path`` on ``fs`` (adds the protocol for remote filesystems)."""
    proto = protocol_of(fs)
    return path if proto in LOCAL_PROTOCOLS else f"{proto}://{path}"


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


def empty_table(schema: pa.Schema) -> pa.Table:
    """Return a table of ``schema`` without rows, built from typed empty arrays.

    ``schema.empty_table()`` and converting Python values (even none) make pyarrow import
    pandas, 0.2-0.3 s of a command that only writes that nothing was found.
    """
    return pa.Table.from_arrays([pa.nulls(0, f.type) for f in schema], schema=schema)


def parquet_file(source: Any) -> pq.ParquetFile:
    """Open a Parquet file (a file object or an Arrow buffer reader) read in the calling thread.

    Read its rows with ``use_threads=False`` (see :func:`read_parquet`).
    """
    return pq.ParquetFile(source, pre_buffer=False)


def read_parquet(source: Any, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file (schema metadata kept) without ``pyarrow.dataset``.

    ``pq.read_table`` goes through ``pyarrow.dataset``, whose import alone costs about 0.3 s
    of CPU in a command that reads a few small tables; an unknown column is still an error.

    Read in the calling thread: with Arrow's thread pool, the pool's threads release the
    buffers of a Python file object (they need the GIL) after the read has returned, and one
    still doing so when the interpreter exits aborts the process ("terminate called without an
    active exception", exit code 134, about one command in 40 under load).
    """
    parquet = parquet_file(source)
    unknown = [c for c in columns or [] if c not in parquet.schema_arrow.names]
    if unknown:
        raise pa.ArrowInvalid(f"No match for FieldRef.Name({unknown[0]}) in the Parquet file")
    return parquet.read(columns=columns, use_threads=False)


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

    def is_file(self, key: str) -> bool:
        """Whether the key holds an object (not a folder, not missing)."""
        path = self._fresh(self.path(key))
        return bool(self.fs.exists(path)) and bool(self.fs.isfile(path))

    def open(self, key: str, block_size: int | None = None) -> Any:
        """Open an object for reading (a binary file object; close it, or use ``with``).

        Parameters
        ----------
        key
            Store-relative key.
        block_size
            Read-ahead of object stores in bytes (small for reading only a header).
        """
        options = {} if block_size is None else {"block_size": block_size}
        return self.fs.open(self._fresh(self.path(key)), "rb", **options)

    def open_write(self, key: str) -> Any:
        """Open an object for writing in place, as a stream (a binary file object; close it).

        Not atomic: for private work files a run writes piece by piece and removes itself
        (a listing, a plan); published and table objects go through :meth:`write_bytes`.
        """
        path = self.path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return self.fs.open(path, "wb")

    def read_bytes(self, key: str) -> bytes:
        """Read an object."""
        return self.fs.cat_file(self._fresh(self.path(key)))

    def write_bytes(
        self, key: str, data: bytes, *, mode: Existing = Existing.SKIP_UNCHANGED
    ) -> bool:
        """Write an object atomically (temporary key, then move).

        Parameters
        ----------
        key
            Store-relative key.
        data
            Content.
        mode
            What to do when the key already holds an object (see :class:`Existing`).

        Returns
        -------
        bool
            True when something was written.

        Raises
        ------
        FileExistsError
            With ``mode=Existing.FAIL`` when the key already holds an object.
        """
        final = self.path(key)
        if mode != Existing.OVERWRITE and self.fs.exists(final):
            if mode == Existing.SKIP:
                return False
            if mode == Existing.FAIL:
                raise FileExistsError(key)
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

    def stage_bytes(self, key: str, data: bytes) -> None:
        """Write an object directly, without a temporary key.

        Only for keys under a staging prefix that becomes visible as a whole through
        :meth:`move` (the staging prefix itself is the temporary key).
        """
        path = self.path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)

    def commit(
        self,
        outputs: Mapping[str, bytes],
        marker: str,
        marker_data: bytes,
        *,
        mode: Existing = Existing.SKIP_UNCHANGED,
    ) -> list[str]:
        """Write a group of objects so that the group is complete exactly when its marker exists.

        The old marker is removed first, each object is written atomically, the marker last: a
        crash in between leaves no marker, so readers (and the next run) see no complete
        output.

        Parameters
        ----------
        outputs
            Store-relative key -> content of every object of the group (not the marker).
        marker
            Key of the marker (for example a provenance document).
        marker_data
            Content of the marker.
        mode
            Write mode of each object (see :class:`Existing`).

        Returns
        -------
        list of str
            Keys written (unchanged objects are left out).
        """
        self.remove(marker)
        written = [k for k, data in outputs.items() if self.write_bytes(k, data, mode=mode)]
        if self.write_bytes(marker, marker_data, mode=Existing.OVERWRITE):
            written.append(marker)
        return written

    def remove(self, key: str) -> bool:
        """Remove an object or a whole prefix; return False when there was nothing."""
        path = self.path(key)
        self._fresh(path)
        if not self.fs.exists(path):
            return False
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            return False
        finally:
            self.fs.invalidate_cache(path)
            self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        return True

    def _key(self, path: str) -> str:
        prefix = self.root.rstrip("/") + "/"
        path = path.rstrip("/")
        return path[len(prefix) :] if path.startswith(prefix) else path

    def children(self, prefix: str) -> list[str]:
        """Return the keys of the direct children of ``prefix`` (objects and folders), sorted.

        A missing prefix has no children.
        """
        path = self.path(prefix)
        self.fs.invalidate_cache(path)
        if not self.fs.exists(path):
            return []
        try:
            return sorted(self._key(p) for p in self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def find(self, prefix: str) -> list[str]:
        """Return the keys of every object under ``prefix``, sorted (none when missing)."""
        path = self.path(prefix)
        self.fs.invalidate_cache(path)
        return sorted(self._key(p) for p in self.fs.find(path))

    def modified(self, prefix: str) -> dict[str, str]:
        """Return key -> last-modified stamp of every object under ``prefix``.

        The stamp is whatever the filesystem reports (mtime or LastModified) as a string: equal
        stamps mean the object was not rewritten.
        """
        out = {}
        for key in self.find(prefix):
            info = self.fs.info(self.path(key))
            out[key] = str(info.get("mtime", info.get("LastModified", info.get("created"))))
        return out

    def stamps(self, key: str) -> dict[str, str]:
        """Return key -> ``<size>:<modified>`` of an object, or of every object under a folder.

        Equal stamps mean nothing was rewritten: a cache key for what is derived from the
        objects (a table in parts is a folder). A missing key has no stamps.
        """
        out = {}
        for found in self.find(key):
            info = self.fs.info(self.path(found))
            changed = info.get("mtime") or info.get("LastModified") or info.get("ETag")
            out[found] = f"{info.get('size')}:{changed}"
        return out

    def table_schema(self, key: str) -> pa.Schema | None:
        """Return the Arrow schema of a table (a file, or the first part of a folder of parts).

        None when the table does not exist or has no parts yet.
        """
        path = self._fresh(self.path(key))
        if not self.fs.exists(path):
            return None
        if self.fs.isdir(path):  # every part of a table in parts has the table's schema
            children = self.children(key)
            parts = [k for k in children if _is_part(k)]
            if not parts:
                return None
            common = f"{key}/{COMMON_METADATA}"
            path = self.path(common if common in children else parts[0])
        with self.fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).schema_arrow

    def prune(
        self,
        prefix: str,
        keep: Iterable[str],
        *,
        children: bool = False,
        select: Callable[[str], bool] | None = None,
    ) -> int:
        """Remove what is under ``prefix`` and not in ``keep``, and every temporary object.

        Parameters
        ----------
        prefix
            Store-relative prefix to prune.
        keep
            Keys to keep: object keys, or with ``children=True`` keys of direct children.
        children
            Prune the direct children of ``prefix`` (whole folders) instead of each object.
        select
            Only consider keys for which ``select(key)`` is true (others are kept).

        Returns
        -------
        int
            How many objects (or children) were removed.
        """
        kept = set(keep)
        keys = self.children(prefix) if children else self.find(prefix)
        removed = 0
        for key in keys:
            stale = key not in kept and (select is None or select(key))
            if stale or TMP_MARK in key.rsplit("/", 1)[-1]:
                removed += self.remove(key)
        return removed

    def move(
        self,
        src: str,
        dst: str,
        *,
        mode: Existing = Existing.OVERWRITE,
        select: Callable[[str], bool] | None = None,
    ) -> int:
        """Move the objects under prefix ``src`` onto prefix ``dst``; return how many moved.

        With ``mode=Existing.OVERWRITE`` an existing ``dst`` prefix is removed first, and on a
        local store the whole prefix moves with one directory rename. Otherwise (or with
        ``select``) each object moves on its own, an existing object at its destination handled
        by ``mode``.

        Parameters
        ----------
        src, dst
            Store-relative prefixes.
        mode
            What to do with an existing destination (see :class:`Existing`).
        select
            Only move the objects whose key relative to ``src`` satisfies ``select``.

        Returns
        -------
        int
            Number of objects moved (on the one-rename path: the number of objects under
            ``src``).
        """
        fs = self.fs
        src_path, dst_path = self.path(src), self.path(dst)
        self._fresh(src_path)
        if not fs.exists(src_path):
            return 0
        keys = [k[len(src) + 1 :] for k in self.find(src)]
        parent = dst_path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        if mode == Existing.OVERWRITE and select is None:
            self.remove(dst)
            if is_local(fs):
                fs.mv(src_path, dst_path, recursive=True)  # one rename of the directory
                fs.invalidate_cache(parent)
                return len(keys)
        moved = 0
        for rel in keys:
            if select is not None and not select(rel):
                continue
            target = f"{dst_path}/{rel}"
            if mode != Existing.OVERWRITE and fs.exists(target):
                if mode == Existing.FAIL:
                    raise FileExistsError(f"{dst}/{rel}")
                if mode == Existing.SKIP or sha256_bytes(fs.cat_file(target)) == sha256_bytes(
                    fs.cat_file(f"{src_path}/{rel}")
                ):
                    fs.rm_file(f"{src_path}/{rel}")
                    continue
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.mv(f"{src_path}/{rel}", target)
            moved += 1
        if select is None:
            self.remove(src)
        else:
            _remove_empty_dirs(fs, src_path)
        fs.invalidate_cache(parent)
        fs.invalidate_cache(src_path)
        return moved

    def read_many(self, keys: Iterable[str], *, attempts: int = 3) -> dict[str, bytes]:
        """Read many objects at once (concurrently on object stores); missing ones are left out.

        Objects whose read failed for another reason than "not found" (a dropped connection
        under load, throttling) are read again one by one, so a transient error never passes
        for a missing object; the last error is raised.

        Parameters
        ----------
        keys
            Store-relative keys.
        attempts
            Reads of one object before its error is raised.

        Returns
        -------
        dict
            Key -> content of the objects that exist.
        """
        paths = {self.path(k): k for k in keys}
        if not paths:
            return {}
        # s3fs answers from its listing cache, which does not know objects written since by
        # other processes (the workers): forget the listings of these folders first.
        for parent in sorted({p.rsplit("/", 1)[0] for p in paths}):
            self.fs.invalidate_cache(parent)
        raw = self.fs.cat(list(paths), on_error="return")
        if isinstance(raw, bytes):  # fsspec returns bare bytes for a single path
            raw = {next(iter(paths)): raw}
        found: dict[str, bytes] = {}
        for path, key in paths.items():
            data = raw.get(path, FileNotFoundError(path))
            for attempt in range(attempts):
                if isinstance(data, FileNotFoundError):
                    break
                if not isinstance(data, BaseException):
                    found[key] = data
                    break
                if attempt == attempts - 1:
                    raise data
                try:
                    data = self.fs.cat_file(path)
                except Exception as exc:  # retried; re-raised after the last attempt
                    data = exc
        return found

    def check_reachable(self, *, create: bool = True) -> None:
        """Check the store can be used, with a one-line error otherwise.

        A missing local folder is created (with ``create``); an object store's bucket must
        already exist.

        Raises
        ------
        OncoflowError
            When the bucket is missing or the store cannot be reached.
        """
        fs = self.fs
        protocol = protocol_of(fs)
        try:
            if is_local(fs):
                if create:
                    fs.makedirs(self.root, exist_ok=True)
            elif protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
                bucket = self.root.split("/", 1)[0]
                if not fs.exists(bucket):
                    raise OncoflowError(f"store bucket not found: {protocol}://{bucket}")
            else:
                fs.exists(self.root)
        except OncoflowError:
            raise
        except Exception as exc:
            raise OncoflowError(f"store unreachable: {self.url} ({type(exc).__name__})") from None

    def sites(self) -> list[str] | None:
        """Return the site folders at the store URL, sorted; None when the URL does not exist."""
        root = self.root.rsplit("/", 1)[0] if "/" in self.root else ""
        try:
            self.fs.invalidate_cache(root)
            if not self.fs.exists(root):
                return None
            entries = self.fs.ls(root, detail=True)
        except (FileNotFoundError, OSError):
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        )

    @property
    def local(self) -> bool:
        """Whether the store is on the local filesystem."""
        return is_local(self.fs)

    @property
    def protocol(self) -> str:
        """The main protocol of the store's filesystem (``file``, ``s3``, ...)."""
        return protocol_of(self.fs)

    def connect_duckdb(self) -> Any:
        """Return a new DuckDB connection that can read this store's URLs."""
        import duckdb

        con = duckdb.connect()
        if not self.local:
            con.register_filesystem(self.fs)
        return con

    def read_table(self, key: str, columns: list[str] | None = None) -> pa.Table | None:
        """Read a Parquet table (optionally some columns), or None when the key does not exist.

        The schema metadata of the file is kept.
        """
        path = self._fresh(self.path(key))
        if not self.fs.exists(path):
            return None
        if self.fs.isdir(path):  # a table in parts (tasks.table_parts): read as one
            return self._read_parts(key, columns)
        with self.fs.open(path, "rb") as fh:
            return read_parquet(fh, columns)

    def table_files(self, key: str) -> dict[str, bytes]:
        """Return the bytes of a table's files: the file, or every part of a parted table.

        Two tables are byte-identical when these dicts are equal (tests of determinism).
        """
        path = self._fresh(self.path(key))
        if self.fs.exists(path) and self.fs.isdir(path):
            return self.read_many(k for k in self.children(key) if _is_part(k))
        return {key: self.read_bytes(key)}

    def _read_parts(self, key: str, columns: list[str] | None) -> pa.Table | None:
        tables = []
        children = self.children(key)
        for part in (k for k in children if _is_part(k)):
            with self.fs.open(self.path(part), "rb") as fh:
                tables.append(read_parquet(fh, columns))
        if not tables:
            return None
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if f"{key}/{COMMON_METADATA}" in children:  # the table's own metadata (parts carry less)
            with self.fs.open(self.path(f"{key}/{COMMON_METADATA}"), "rb") as fh:
                table = table.replace_schema_metadata(pq.read_schema(fh).metadata)
        sort_key = (table.schema.metadata or {}).get(b"oncoflow.sort_key", b"").decode()
        order = [(c, "ascending") for c in sort_key.split(",") if c in table.column_names]
        return table.sort_by(order) if order and len(tables) > 1 else table

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

    def quarantine_rows(self, stage: Stage | None = None) -> list[dict[str, Any]]:
        """Return quarantine rows, optionally of one stage only."""
        table = self.read_table(QUARANTINE)
        rows = table.to_pylist() if table is not None else []
        return [r for r in rows if stage is None or r["stage"] == str(stage)]


def _is_part(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name.startswith("part-") and name.endswith(".parquet")


def _remove_empty_dirs(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove empty directories under ``root`` (local stores; object stores have none)."""
    if not is_local(fs) or not os.path.isdir(root):
        return
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda x: -len(x[0])):
        with contextlib.suppress(OSError):  # not empty: an object arrived meanwhile
            os.rmdir(dirpath)

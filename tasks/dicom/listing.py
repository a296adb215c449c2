"""Listing a DICOM source and diffing it against the catalogue (incremental ingest).

A source is any fsspec URL (local folder, ``file://``, ``s3://bucket/prefix``). Each file is
listed with its size and a change token: the modification time for local files, the ETag for
object stores. A re-run compares the listing with ``catalog/instances.parquet`` and parses only
new or changed files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import OncoflowError
from tasks.refs import RefKey
from tasks.store import open_url, protocol_of

#: Status values of ``catalog/instances.parquet`` rows.
STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"
STATUS_DELETED = "deleted"


@dataclass(frozen=True, order=True, slots=True)
class ListedFile:
    """One file under the source root.

    Parameters
    ----------
    path
        Path relative to the source root, ``/`` separated (private: may contain names).
    size
        Size in bytes.
    mtime
        Change token: modification time (local) or ETag (object stores).
    """

    path: str
    size: int
    mtime: str


@dataclass(frozen=True)
class Batch:
    """A batch of files parsed by one task.

    Parameters
    ----------
    key
        Content key: a hash of the files' paths, sizes and change tokens (not identifying).
    files
        The files, sorted by path.
    """

    key: str
    files: tuple[ListedFile, ...]


@dataclass(frozen=True)
class BatchRef:
    """A batch whose file list is in the store: its key and how many files it has."""

    key: str
    files: int


@dataclass
class ListingDiff:
    """How a listing differs from the catalogue.

    Attributes
    ----------
    new, changed
        Files to parse (not in the catalogue, or with another size or change token).
    unchanged
        Paths whose catalogue rows stay as they are.
    unchanged_count
        How many they are, when the paths themselves are not listed.
    deleted
        Paths in the catalogue (not yet marked deleted) that are gone from the source.
    """

    new: list[ListedFile] = field(default_factory=list)
    changed: list[ListedFile] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged_count: int = 0

    @property
    def n_unchanged(self) -> int:
        """How many files are unchanged (``unchanged`` is left empty by a diff in DuckDB)."""
        return max(len(self.unchanged), self.unchanged_count)

    @property
    def to_parse(self) -> list[ListedFile]:
        """Files to parse, sorted by path."""
        return sorted(self.new + self.changed)

    @property
    def is_empty(self) -> bool:
        """True when nothing needs parsing and nothing was deleted."""
        return not (self.new or self.changed or self.deleted)


def _change_token(info: dict, protocol: str) -> str:
    """Return the change token of an fsspec ``info`` dict (ETag, else mtime, else '')."""
    for key in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is not None and value != "":
            if isinstance(value, float):
                return f"{value:.6f}"
            if hasattr(value, "isoformat"):
                return value.isoformat()
            return str(value)
    return ""


def resolve_source(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a source URL and check that it exists and is not empty.

    Parameters
    ----------
    url
        fsspec URL of the source root.

    Returns
    -------
    tuple
        Filesystem and root path.

    Raises
    ------
    OncoflowError
        When the source does not exist, cannot be reached, or holds nothing.
    """
    fs, root = open_url(url)
    try:
        if fs.isfile(root):
            return fs, root
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        raise OncoflowError(f"source not found: {url}") from None
    except PermissionError:
        raise OncoflowError(f"source not readable (permission denied): {url}") from None
    except Exception as exc:
        raise OncoflowError(f"source unreachable: {url} ({type(exc).__name__})") from None
    if not entries:
        raise OncoflowError(f"source is empty: {url}")
    return fs, root


def _list_local(root: str) -> list[ListedFile]:
    """List a local folder with ``os.scandir``: the entries fsspec's ``find`` gives, faster.

    Same semantics as fsspec's local filesystem: symbolic links are listed, not followed into
    (size of their target, or 0 when broken; modification time of the link itself), and an
    entry that vanishes while listing is skipped. Listing 10,000 files takes about a third of
    the time of ``find(detail=True)``, which matters for an unchanged re-ingest.
    """
    files = []
    prefix_len = len(root.rstrip(os.sep)) + 1
    folders = [root]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                        continue
                    stat = entry.stat(follow_symlinks=False)
                    size = stat.st_size
                    if entry.is_symlink():
                        try:
                            size = entry.stat(follow_symlinks=True).st_size
                        except OSError:
                            size = 0
                except FileNotFoundError:
                    continue
                rel = entry.path[prefix_len:].replace(os.sep, "/")
                files.append(ListedFile(rel, size, f"{stat.st_mtime:.6f}"))
    return files


def list_source(url: str) -> list[ListedFile]:
    """List every file under a source, sorted by relative path.

    Parameters
    ----------
    url
        fsspec URL of the source root (a folder/prefix, or a single file).

    Returns
    -------
    list of ListedFile
        One entry per file; directory markers of object stores are skipped.

    Raises
    ------
    OncoflowError
        When the source cannot be listed or holds no files.
    """
    fs, root = resolve_source(url)
    protocol = protocol_of(fs)
    try:
        if fs.isfile(root):
            info = fs.info(root)
            name = root.rsplit("/", 1)[-1]
            return [ListedFile(name, int(info.get("size") or 0), _change_token(info, protocol))]
        if protocol in ("file", "local"):
            files = _list_local(root)
        else:
            files = _list_found(fs.find(root, detail=True, withdirs=False), root, protocol)
    except Exception as exc:
        raise OncoflowError(f"cannot list source {url} ({type(exc).__name__})") from None
    if not files:
        raise OncoflowError(f"source holds no files: {url}")
    files.sort()
    return files


def _list_found(found: dict[str, dict], root: str, protocol: str) -> list[ListedFile]:
    """Turn the ``find(detail=True)`` result of an fsspec filesystem into listing entries."""
    prefix = root.rstrip("/") + "/"
    files = []
    for full, info in found.items():
        if info.get("type") == "directory" or full.endswith("/"):
            continue
        rel = full[len(prefix) :] if full.startswith(prefix) else full.rsplit("/", 1)[-1]
        files.append(ListedFile(rel, int(info.get("size") or 0), _change_token(info, protocol)))
    return files


def diff_listing(
    listing: Sequence[ListedFile], catalogue: Iterable[tuple[str, int, str, str]]
) -> ListingDiff:
    """Compare a listing with the catalogue's (path, size, mtime, status) rows.

    Parameters
    ----------
    listing
        Current files under the source.
    catalogue
        Rows of the existing catalogue as (path, size, mtime, status) tuples.

    Returns
    -------
    ListingDiff
        New, changed, unchanged and newly deleted files.
    """
    known = {path: (size, mtime, status) for path, size, mtime, status in catalogue}
    diff = ListingDiff()
    listed = set()
    for f in listing:
        listed.add(f.path)
        old = known.get(f.path)
        if old is None or old[2] == STATUS_DELETED:
            diff.new.append(f)
        elif old[0] != f.size or old[1] != f.mtime:
            diff.changed.append(f)
        else:
            diff.unchanged.append(f.path)
    diff.deleted = sorted(
        p for p, (_, _, status) in known.items() if p not in listed and status != STATUS_DELETED
    )
    return diff


def batch_key(files: Sequence[ListedFile], key: RefKey) -> str:
    """Return a content key for a batch: keyed hash of its paths, sizes and change tokens.

    Keyed (:mod:`tasks.refs`): the key names store objects and task runs, so it must not be
    a plain hash a guessed path could be checked against.
    """
    lines = "".join(f"{f.path}\t{f.size}\t{f.mtime}\n" for f in files)
    return "b" + key.ref(lines, 20)


def make_batches(files: Sequence[ListedFile], batch_size: int, key: RefKey) -> list[Batch]:
    """Split files (sorted by path) into batches of at most ``batch_size``.

    The split depends only on the sorted file list, so batch keys are stable across runs.
    """
    return list(batched_files(sorted(files), batch_size, key))


def batched_files(files: Iterable[ListedFile], batch_size: int, key: RefKey) -> Iterator[Batch]:
    """Cut files, already sorted by path, into batches of ``batch_size`` as they come.

    What :func:`make_batches` gives, holding one batch at a time (a plan read in pieces).
    """
    size = max(1, batch_size)
    chunk: list[ListedFile] = []
    for f in files:
        chunk.append(f)
        if len(chunk) == size:
            yield Batch(key=batch_key(chunk, key), files=tuple(chunk))
            chunk = []
    if chunk:
        yield Batch(key=batch_key(chunk, key), files=tuple(chunk))


def item_ref(item: str, key: RefKey) -> str:
    """Return an opaque short reference for a path or key (keyed, for artifacts and logs)."""
    return key.ref(item, 12)


LISTING_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime", pa.string())])


def files_to_table(files: Sequence[ListedFile]) -> pa.Table:
    """Return listing entries as an Arrow table (the private plan of a run, read in pieces)."""
    return pa.table(
        [
            pa.array([f.path for f in files], pa.string()),
            pa.array([f.size for f in files], pa.int64()),
            pa.array([f.mtime for f in files], pa.string()),
        ],
        schema=LISTING_SCHEMA,
    )


def files_from_parquet(plan: pq.ParquetFile, rows: int = 4096) -> Iterator[ListedFile]:
    """Yield the listing entries of a plan written from :func:`files_to_table`, in order."""
    for batch in plan.iter_batches(batch_size=rows, columns=list(LISTING_SCHEMA.names)):
        columns = [batch.column(i).to_pylist() for i in range(3)]
        for path, size, mtime in zip(*columns, strict=True):
            yield ListedFile(path, size, mtime)


def files_to_json(files: Sequence[ListedFile]) -> bytes:
    """Serialise listing entries (for the private plan files of a run)."""
    body = [[f.path, f.size, f.mtime] for f in files]
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def files_from_json(data: bytes) -> list[ListedFile]:
    """Read listing entries written by :func:`files_to_json`."""
    return [ListedFile(str(p), int(s), str(m)) for p, s, m in json.loads(data.decode("utf-8"))]

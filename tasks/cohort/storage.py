"""Object-storage primitives for publication: retries on transient errors, exclusive writes.

Retries use exponential backoff with full jitter (sleep a uniform random time between 0 and
``min(max_delay, base_delay * 2**attempt)``) and apply to transient errors only: throttling,
5xx responses, timeouts and dropped connections. A missing object, a permission problem or a
failed precondition is never retried.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec

from tasks.errors import OncoflowError
from tasks.store import protocol_of

T = TypeVar("T")

TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "503",
    "500",
}


class StorageUnavailable(OncoflowError):
    """Publication storage kept failing with transient errors after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a storage call that failed transiently.

    Parameters
    ----------
    attempts
        Total attempts per call (first try included).
    base_delay
        Seconds; the backoff cap doubles with each attempt.
    max_delay
        Upper bound of one sleep, seconds.
    seed
        Seed of the jitter generator (None: system entropy).
    """

    attempts: int = 8
    base_delay: float = 0.2
    max_delay: float = 10.0
    seed: int | None = None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether an error from object storage is worth retrying.

    Looks through the exception chain (s3fs wraps botocore errors in ``OSError``).
    """
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
        return False
    try:
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from s3fs.core import S3_RETRYABLE_ERRORS
    except ImportError:  # pragma: no cover - s3fs is a dependency
        ClientError = HTTPClientError = BotoConnectionError = ()  # type: ignore[assignment]  # noqa: N806
        S3_RETRYABLE_ERRORS = ()  # noqa: N806
    for err in _chain(exc):
        if isinstance(err, ClientError):
            info = err.response.get("Error", {})
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            return bool(info.get("Code") in TRANSIENT_CODES or status >= 500 or status == 429)
        if isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if isinstance(err, (HTTPClientError, BotoConnectionError, *S3_RETRYABLE_ERRORS)):
            return True
    return False


class Retrier:
    """Call functions with retries on transient storage errors (one per publish run)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._rng = random.Random(policy.seed)
        self.retries = 0

    def delay(self, attempt: int) -> float:
        """Full-jitter backoff for the given attempt (0-based)."""
        cap = min(self.policy.max_delay, self.policy.base_delay * (2**attempt))
        return self._rng.uniform(0.0, cap)

    def __call__(self, what: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Call ``fn(*args, **kwargs)``; retry transient errors, re-raise the others."""
        for attempt in range(self.policy.attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt + 1 >= self.policy.attempts:
                    raise StorageUnavailable(
                        f"storage kept failing while {what} ({self.policy.attempts} attempts): "
                        f"{type(exc).__name__}; run the command again to resume"
                    ) from exc
                self.retries += 1
                time.sleep(self.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem."""
    return protocol_of(fs) in ("file", "local")


def put_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write one object whole (local: temporary file, then rename)."""
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create an object only if it does not exist yet (raise ``FileExistsError`` otherwise).

    On S3 this is a conditional PUT (``If-None-Match: *``); locally a hard link of a complete
    temporary file, which is atomic and fails when the name exists.
    """
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        try:
            os.link(tmp, path)
        finally:
            os.unlink(tmp)
        return
    fs.pipe_file(path, data, mode="create")


def copy_object(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Copy one object within a filesystem (server-side on S3).

    ``cp_file`` copies one known object (on S3: one HEAD and one COPY request); ``copy`` would
    first expand the path and list the destination, several more requests that can each fail.
    """
    if is_local(fs):
        os.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
    fs.cp_file(src, dst)


def list_objects(fs: fsspec.AbstractFileSystem, prefix: str) -> dict[str, int]:
    """Return ``{relative name: size}`` of every object under ``prefix`` (fresh listing).

    The whole listing cache is dropped first: s3fs keeps listings of sub-prefixes (and ETags)
    that ``invalidate_cache(prefix)`` does not clear, and a stale ETag makes later reads fail.
    """
    fs.invalidate_cache()
    if not fs.exists(prefix):
        return {}
    found = fs.find(prefix, detail=True)
    base = prefix.rstrip("/") + "/"
    out = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        name = path[len(base) :] if path.startswith(base) else path.rsplit("/", 1)[-1]
        out[name] = int(info.get("size") or 0)
    return out


def remove_prefix(fs: fsspec.AbstractFileSystem, prefix: str) -> None:
    """Delete every object under ``prefix`` (no error when there is none)."""
    fs.invalidate_cache(prefix)
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    fs.invalidate_cache(prefix)

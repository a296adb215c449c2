"""DICOMweb pull: QIDO-RS search, WADO-RS retrieval per series into the raw zone, pull state.

Raw-zone layout (private zone, opaque names: every UID is hashed)::

    STORE/<site>/raw/pacs/dicomweb/<study-hash>/<series-hash>/<sop-hash>.dcm   committed series
    STORE/<site>/raw/_staging/dicomweb/<series-hash>-<attempt>/...   series being pulled
    STORE/<site>/raw/_state/dicomweb.json                            watermark and state

The normal ingest catalogues ``STORE/<site>/raw/pacs`` (:data:`PACS_ZONE`), which holds
committed series only; work in progress and state live in the ``_``-prefixed prefixes beside it.

A series is written under a staging prefix and moved to its final prefix only when every
instance listed by QIDO-RS has arrived; a study's series are committed only when all of them
succeeded, so a study is never half-ingested. A failed study is recorded in the state and
searched again by its UID on the next run, whatever the date filters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import pydicom
import requests
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import OncoflowError
from tasks.names import task_label
from tasks.pacs.credentials import DicomwebCredentials, load_credentials
from tasks.records import Stage, StageSummary
from tasks.refs import RefKey, site_ref_key
from tasks.store import Existing, SiteStore

log = logging.getLogger(__name__)

SCHEME_PREFIX = "dicomweb+"
#: What the normal ingest catalogues: committed PACS data only (pull and receiver).
PACS_ZONE = "raw/pacs"
RAW_DICOMWEB = "raw/pacs/dicomweb"
RAW_STAGING_DICOMWEB = "raw/_staging/dicomweb"
STATE_KEY = "raw/_state/dicomweb.json"
STATE_VERSION = 1
#: Ask the server for the stored transfer syntax (no transcoding on the PACS side).
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
#: QIDO-RS page size (``limit``).
QIDO_PAGE = 1000
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DATE_PATTERN = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")
# QIDO-RS JSON tags.
TAG_STUDY_UID = "0020000D"
TAG_SERIES_UID = "0020000E"
TAG_SOP_UID = "00080018"
TAG_SERIES_INSTANCES = "00201209"
TAG_MODALITY = "00080060"

T = TypeVar("T")


class PullError(Exception):
    """A series could not be pulled; the message carries no identifier (no URL, no UID)."""


def opaque_key(uid: str, key: RefKey) -> str:
    """Return the opaque object-name key of a DICOM UID (128 bits of a keyed HMAC-SHA256).

    Object names in the raw zone and task-run names never carry identifiers, nor a plain hash
    of one (:mod:`tasks.refs`); the same UID always gives the same key at a site, so a
    re-pull lands on the same name.
    """
    return key.ref(f"oncoflow-pacs:{uid}", 32)


def is_dicomweb_source(source: str) -> bool:
    """Whether ``source`` is a DICOMweb source URL (``dicomweb+http(s)://...``)."""
    return source.strip().lower().startswith(SCHEME_PREFIX)


def parse_source(source: str) -> str:
    """Return the HTTP base URL of a ``dicomweb+http(s)://host[:port]/path`` source.

    Raises
    ------
    OncoflowError
        When the URL is not a DICOMweb source or embeds credentials (they belong in the
        environment or a Prefect Secret block, never in parameters).
    """
    text = source.strip()
    if not is_dicomweb_source(text):
        raise OncoflowError(
            f"not a DICOMweb source {source!r}: use dicomweb+http://host:port/dicom-web"
        )
    url = text[len(SCHEME_PREFIX) :]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OncoflowError(
            f"not a DICOMweb source {source!r}: use dicomweb+http://host:port/dicom-web"
        )
    if parts.username or parts.password:
        raise OncoflowError(
            "credentials must not be part of the DICOMweb URL: set ONCOFLOW_DICOMWEB_USER and "
            "ONCOFLOW_DICOMWEB_PASSWORD or use a Prefect Secret block"
        )
    if parts.query or parts.fragment:
        raise OncoflowError("the DICOMweb URL must not have a query or fragment")
    return url.rstrip("/")


def parse_date(value: str, what: str) -> dt.date:
    """Parse ``YYYY-MM-DD`` or ``YYYYMMDD`` into a date, with a one-line error."""
    match = DATE_PATTERN.match(value.strip())
    try:
        if not match:
            raise ValueError
        return dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise OncoflowError(f"invalid {what} {value!r}: use YYYY-MM-DD") from None


def study_date_filter(
    since: str, until: str | None, last_success: str | None, overlap_days: int = 1
) -> str | None:
    """Return the QIDO ``StudyDate`` range for a pull, or None for no date filter.

    Parameters
    ----------
    since
        ``"last"`` (studies dated from the last successful pull minus ``overlap_days``; no
        filter on the first pull), ``"all"`` (no lower bound) or a date ``YYYY-MM-DD``.
    until
        Optional upper bound ``YYYY-MM-DD`` (inclusive).
    last_success
        ISO timestamp of the last successful pull from this source (the watermark).
    overlap_days
        Days re-searched before the watermark, for late arrivals and time zones.
    """
    lower: dt.date | None = None
    if since == "last":
        if last_success:
            lower = dt.datetime.fromisoformat(last_success).date() - dt.timedelta(overlap_days)
    elif since != "all":
        lower = parse_date(since, "--since date")
    upper = parse_date(until, "--until date") if until else None
    if lower and upper and lower > upper:
        raise OncoflowError("the --since date is after the --until date")
    if not lower and not upper:
        return None
    fmt = "%Y%m%d"
    return f"{lower.strftime(fmt) if lower else ''}-{upper.strftime(fmt) if upper else ''}"


# --------------------------------------------------------------------------- state


@dataclass
class SourceState:
    """Pull state of one DICOMweb source.

    Parameters
    ----------
    last_success
        ISO timestamp (with zone) of the start of the last pull whose search succeeded.
    failed
        Studies that failed, keyed by study key: ``{"study_uid", "attempts", "error"}``
        (private zone: the UID is kept so the study can be searched again by UID).
    """

    last_success: str | None = None
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PullState:
    """What has been pulled into a site's raw zone (``raw/_state/dicomweb.json``).

    Parameters
    ----------
    series
        Committed series, keyed by series key: ``{"study": <study key>, "instances": n}``.
    sources
        Per-source watermark and failed studies, keyed by the source's base URL.
    """

    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, SourceState] = field(default_factory=dict)

    @classmethod
    def load(cls, store: SiteStore) -> PullState:
        """Read the state from the store (an empty state when there is none)."""
        if not store.exists(STATE_KEY):
            return cls()
        try:
            raw = json.loads(store.read_bytes(STATE_KEY))
            return cls(
                series=dict(raw.get("series", {})),
                sources={k: SourceState(**v) for k, v in raw.get("sources", {}).items()},
            )
        except (ValueError, TypeError) as exc:
            raise OncoflowError(
                f"unreadable DICOMweb pull state {STATE_KEY} ({type(exc).__name__}): "
                "move it away to start from scratch"
            ) from None

    def save(self, store: SiteStore) -> bool:
        """Write the state atomically (sorted keys: same state, same bytes)."""
        body = {
            "version": STATE_VERSION,
            "series": self.series,
            "sources": {k: asdict(v) for k, v in self.sources.items()},
        }
        return store.write_bytes(STATE_KEY, json.dumps(body, indent=1, sort_keys=True).encode())

    def source(self, base_url: str) -> SourceState:
        """Return (creating it) the state of one source."""
        return self.sources.setdefault(base_url, SourceState())


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class PullJob:
    """One series to pull. UIDs are hidden from ``repr`` and never logged or returned.

    Parameters
    ----------
    study_key, series_key
        Opaque keys (keyed HMACs of the UIDs), used in names, logs and records.
    study_uid, series_uid
        The UIDs, needed for the WADO-RS request only.
    expected
        NumberOfSeriesRelatedInstances from QIDO-RS, when the server gave it.
    modality
        The series' modality from QIDO-RS (empty when the server did not give it).
    """

    study_key: str
    series_key: str
    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    expected: int | None = None
    modality: str = ""


@dataclass(frozen=True)
class StudyPlan:
    """One study found by the search and what has to be pulled for it."""

    study_key: str
    study_uid: str = field(repr=False)
    n_series: int = 0
    jobs: tuple[PullJob, ...] = ()

    @property
    def up_to_date(self) -> bool:
        """True when every series of the study is already in the raw zone."""
        return not self.jobs


@contextlib.contextmanager
def dicomweb_client(
    base_url: str, credentials: DicomwebCredentials, timeout: float = 60.0
) -> Iterator[Any]:
    """Yield a ``dicomweb_client.DICOMwebClient``; its HTTP connections close on exit.

    Closing matters: a PACS serves a bounded number of connections, and idle keep-alive
    connections left by finished tasks would hold them.
    """
    from dicomweb_client import DICOMwebClient

    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    with credentials.session() as session:
        client = DICOMwebClient(
            url=base_url, session=session, timeout=(min(10.0, timeout), timeout)
        )
        # dicomweb-client's own retry repeats *any* exception 5 times with waits of up to
        # 8 s, whatever our settings; retries are ours (search: with_backoff; series: task
        # retries).
        client.set_http_retry_params(retry=False)
        yield client


def describe_error(exc: BaseException) -> str:
    """Describe a request error in one line without its URL (URLs carry UIDs)."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, PullError):
        return str(exc)
    return type(exc).__name__


def with_backoff(call: Callable[[], T], attempts: int, delay: float) -> T:
    """Call ``call()``, retrying request errors with exponential backoff."""
    for attempt in range(attempts):
        try:
            return call()
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None and status < 500 and status not in (408, 429):
                raise
            if attempt == attempts - 1:
                raise
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def search_all(
    search: Callable[..., list[dict[str, Any]]], key_tag: str, page: int = QIDO_PAGE
) -> list[dict[str, Any]]:
    """Run a QIDO-RS search page by page (``limit``/``offset``) and return every match once.

    Paging stops at a short page, or at a page that brings nothing new: some servers ignore
    ``offset`` with some filters (Orthanc 1.10 with ``ModalitiesInStudy``), and following
    them blindly would loop for ever.
    """
    seen: dict[Any, dict[str, Any]] = {}
    offset = 0
    while True:
        batch = search(limit=page, offset=offset)
        fresh = [item for item in batch if _value(item, key_tag) not in seen]
        for item in fresh:
            seen[_value(item, key_tag)] = item
        if len(batch) < page or not fresh:
            return list(seen.values())
        offset += len(batch)


def find_study_uids(
    client: Any, modalities: Iterable[str], study_dates: str | None, attempts: int, delay: float
) -> list[str]:
    """Search studies (QIDO-RS), one query per modality, and return their UIDs sorted.

    Malformed UIDs in the answer are dropped.
    """
    base: dict[str, Any] = {"StudyDate": study_dates} if study_dates else {}
    queries = [{**base, "ModalitiesInStudy": m} for m in modalities] or [base]
    uids: set[str] = set()
    for filters in queries:
        found = with_backoff(
            lambda f=filters: search_all(
                partial(client.search_for_studies, search_filters=f, fields=["StudyInstanceUID"]),
                TAG_STUDY_UID,
            ),
            attempts,
            delay,
        )
        for item in found:
            uid = _value(item, TAG_STUDY_UID)
            if isinstance(uid, str) and UID_PATTERN.match(uid):
                uids.add(uid)
    return sorted(uids)


@dataclass(frozen=True)
class FoundSeries:
    """A series listed by QIDO-RS: its UID, instance count and modality when given."""

    series_uid: str = field(repr=False)
    count: int | None = None
    modality: str = ""


def find_series(client: Any, study_uid: str, attempts: int, delay: float) -> list[FoundSeries]:
    """List a study's series (QIDO-RS), sorted by UID."""
    try:
        found = with_backoff(
            lambda: search_all(
                partial(
                    client.search_for_series,
                    study_instance_uid=study_uid,
                    fields=["SeriesInstanceUID", "NumberOfSeriesRelatedInstances", "Modality"],
                ),
                TAG_SERIES_UID,
            ),
            attempts,
            delay,
        )
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            return []  # the study is gone from the server
        raise
    out: dict[str, FoundSeries] = {}
    for item in found:
        uid = _value(item, TAG_SERIES_UID)
        if not (isinstance(uid, str) and UID_PATTERN.match(uid)):
            continue
        count = _value(item, TAG_SERIES_INSTANCES)
        try:
            count = int(count) if count is not None else None
        except (TypeError, ValueError):
            count = None
        modality = _value(item, TAG_MODALITY)
        modality = modality.strip().upper()[:16] if isinstance(modality, str) else ""
        out[uid] = FoundSeries(uid, count, modality if modality.isalnum() else "")
    return [out[uid] for uid in sorted(out)]


def plan_pull(
    client: Any,
    state: PullState,
    base_url: str,
    modalities: list[str],
    study_dates: str | None,
    attempts: int = 3,
    delay: float = 1.0,
    threads: int = 8,
    *,
    key: RefKey,
) -> list[StudyPlan]:
    """Search the source and decide, per series, what to pull.

    A series is pulled when it is not in the state or when the server now lists a different
    number of instances for it. Studies that failed on an earlier run are searched again by
    UID even when the date filter excludes them.

    Raises
    ------
    OncoflowError
        When the server cannot be searched (one line, no identifiers).
    """
    failed_before = {v["study_uid"] for v in state.source(base_url).failed.values()}
    try:
        uids = set(find_study_uids(client, modalities, study_dates, attempts, delay))
        uids |= failed_before
        ordered = sorted(uids)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            all_series = list(pool.map(lambda u: find_series(client, u, attempts, delay), ordered))
    except (requests.RequestException, ValueError) as exc:
        host = urlsplit(base_url).netloc
        raise OncoflowError(
            f"DICOMweb search failed at {host} ({describe_error(exc)}); nothing was pulled"
        ) from None
    plans: list[StudyPlan] = []
    for study_uid, series in zip(ordered, all_series, strict=True):
        study_key = opaque_key(study_uid, key)
        jobs = []
        for found in series:
            series_key = opaque_key(found.series_uid, key)
            have = state.series.get(series_key)
            if have and (found.count is None or found.count == have.get("instances")):
                continue
            jobs.append(
                PullJob(
                    study_key, series_key, study_uid, found.series_uid, found.count, found.modality
                )
            )
        plans.append(StudyPlan(study_key, study_uid, len(series), tuple(jobs)))
    return plans


#: Where the plans of running pulls are kept (private zone: they hold UIDs).
RAW_PLANS = "raw/_state/plans"


@dataclass(frozen=True)
class SeriesHandle:
    """A pseudonymous handle on one planned series: what a pull task gets instead of UIDs.

    The worker resolves the UIDs from the plan in the private zone
    (:func:`resolve_handle`), so task parameters, task-run names, logs and results never hold
    an original UID nor a plain hash of one.

    Parameters
    ----------
    plan
        Store key of the plan (:func:`write_plan`).
    series_key, study_key
        Opaque keys (keyed HMACs) of the series and its study.
    expected
        Instances listed by QIDO-RS, when the server gave the count.
    modality
        The series' modality, for readable task-run names.
    """

    plan: str
    series_key: str
    study_key: str
    expected: int | None = None
    modality: str = ""


def write_plan(store: SiteStore, jobs: list[PullJob]) -> str:
    """Write the series to pull into the private zone and return its key (new per run).

    The plan holds UIDs, so it is passed to the pulling subflow and its tasks by key, never
    as a parameter.
    """
    key = f"{RAW_PLANS}/{uuid.uuid4().hex}.json"
    body = json.dumps([asdict(j) for j in jobs], separators=(",", ":")).encode()
    store.write_bytes(key, body, mode=Existing.OVERWRITE)
    return key


def read_plan(store: SiteStore, key: str) -> list[PullJob]:
    """Read a plan written by :func:`write_plan`."""
    return [PullJob(**item) for item in json.loads(store.read_bytes(key))]


def plan_handles(store: SiteStore, key: str) -> list[SeriesHandle]:
    """Return the pseudonymous handles of the series of a plan, in plan order."""
    return [
        SeriesHandle(key, j.series_key, j.study_key, j.expected, j.modality)
        for j in read_plan(store, key)
    ]


@functools.lru_cache(maxsize=4)
def _plan_jobs(store_url: str, site: str, key: str) -> dict[str, PullJob]:
    """Return the jobs of a plan by series key, read once per process (plans never change)."""
    return {j.series_key: j for j in read_plan(SiteStore(store_url, site), key)}


def resolve_handle(handle: SeriesHandle, store: SiteStore) -> PullJob:
    """Return the job (with its UIDs) of a handle, read from the plan in the private zone.

    Raises
    ------
    PullError
        When the plan does not list the handle's series.
    """
    job = _plan_jobs(store.url, store.site, handle.plan).get(handle.series_key)
    if job is None:
        raise PullError("the series is not in the pull's plan")
    return job


# --------------------------------------------------------------------------- retrieve


@dataclass(frozen=True)
class SeriesPull:
    """Outcome of pulling one series (opaque keys and counts only).

    Parameters
    ----------
    series_key, study_key
        Opaque keys.
    staging
        Store-relative prefix holding the complete series, to be committed.
    instances, nbytes
        Instances and bytes written.
    seconds
        Time spent pulling it (listing, retrieval, writing; retries included), for the
        share of the pull spent outside the transfer.
    """

    series_key: str
    study_key: str
    staging: str
    instances: int
    nbytes: int
    seconds: float = 0.0


@dataclass(frozen=True)
class PullSettings:
    """Where and how the series of a pull are retrieved (no identifiers, no credentials).

    Parameters
    ----------
    base_url
        DICOMweb base URL.
    store_url, site
        The site store (the plan and the raw zone).
    secret_block
        Prefect Secret block with the credentials when the environment has none.
    timeout
        HTTP read timeout (seconds).
    retries, retry_delay
        Retries of a series after a failed attempt, the first after ``retry_delay`` seconds,
        then twice as long each time.
    """

    base_url: str
    store_url: str
    site: str
    secret_block: str | None = None
    timeout: float = 60.0
    retries: int = 3
    retry_delay: float = 2.0


def series_prefix(study_key: str, series_key: str) -> str:
    """Store-relative prefix of a committed series."""
    return f"{RAW_DICOMWEB}/{study_key}/{series_key}"


def encode_dataset(ds: pydicom.Dataset) -> bytes:
    """Encode a retrieved dataset as a DICOM Part 10 file."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _retrieve_into(
    client: Any, job: PullJob, store: SiteStore, staging: str, received: set[str]
) -> int:
    """Write every instance of a series under ``staging``; return the bytes written.

    Raises
    ------
    PullError
        When an instance belongs to another series, has no valid SOP Instance UID, or an
        instance listed by QIDO-RS did not arrive.
    """
    listed = search_all(
        partial(
            client.search_for_instances,
            study_instance_uid=job.study_uid,
            series_instance_uid=job.series_uid,
            fields=["SOPInstanceUID"],
        ),
        TAG_SOP_UID,
    )
    expected = {_value(i, TAG_SOP_UID) for i in listed} - {None}
    nbytes = 0
    key = site_ref_key(store)
    for ds in client.iter_series(job.study_uid, job.series_uid, media_types=ANY_TRANSFER_SYNTAX):
        if str(ds.get("SeriesInstanceUID", "")) != job.series_uid:
            raise PullError("the server returned an instance of another series")
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        if not UID_PATTERN.match(sop_uid):
            raise PullError("the server returned an instance without a valid SOPInstanceUID")
        data = encode_dataset(ds)
        store.stage_bytes(f"{staging}/{opaque_key(sop_uid, key)}.dcm", data)
        received.add(sop_uid)
        nbytes += len(data)
    missing = expected - received
    if missing or not received:
        raise PullError(
            f"incomplete series: {len(missing)} of {len(expected)} listed instances missing"
        )
    return nbytes


def retrieve_series(job: PullJob, settings: PullSettings) -> SeriesPull:
    """Pull one series over WADO-RS into a fresh staging prefix of the raw zone (one attempt).

    The instance list comes from QIDO-RS; the series is complete only when every listed
    instance arrived. On any error the staging prefix is removed and a :class:`PullError`
    without identifiers is raised.

    Returns
    -------
    SeriesPull
        Where the complete series was staged, and its counts.
    """
    store = SiteStore(settings.store_url, settings.site)
    staging = f"{RAW_STAGING_DICOMWEB}/{job.series_key}-{uuid.uuid4().hex[:12]}"
    received: set[str] = set()
    nbytes = 0
    try:
        credentials = load_credentials(settings.secret_block)
        with dicomweb_client(settings.base_url, credentials, settings.timeout) as client:
            nbytes = _retrieve_into(client, job, store, staging, received)
    except BaseException as exc:
        store.remove(staging)
        if isinstance(exc, PullError):
            raise
        if isinstance(exc, Exception):
            raise PullError(f"{type(exc).__name__}: {describe_error(exc)}") from None
        raise
    return SeriesPull(job.series_key, job.study_key, staging, len(received), nbytes)


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Return the Prefect run logger inside a task run, else this module's logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def pull_series(handle: SeriesHandle, settings: PullSettings) -> SeriesPull:
    """Pull one planned series, retrying a failed attempt with exponential backoff.

    Runs in a worker: the UIDs are resolved there from the plan (:func:`resolve_handle`).
    The retries are the series' own, so a series that shares its task with others
    (:class:`flows.stage.Grouping`) is retried alone and the others are not pulled twice.

    Raises
    ------
    PullError
        After the last attempt failed (no identifier in the message).
    """
    t0 = time.perf_counter()
    store = SiteStore(settings.store_url, settings.site)
    job = resolve_handle(handle, store)
    for attempt in range(settings.retries + 1):
        try:
            pulled = retrieve_series(job, settings)
        except PullError as exc:
            if attempt == settings.retries:
                raise
            wait = settings.retry_delay * 2**attempt
            _run_logger().info(
                "series %s: attempt %d of %d failed (%s), retrying in %.1f s",
                handle.series_key[-6:],
                attempt + 1,
                settings.retries + 1,
                exc,
                wait,
            )
            time.sleep(wait)
        else:
            return dataclasses.replace(pulled, seconds=round(time.perf_counter() - t0, 4))
    raise AssertionError("unreachable")  # pragma: no cover


def _pull_run_name() -> str:
    """Task-run name of a one-series pull: ``pull-<modality>-<key tail>``."""
    from prefect.runtime import task_run

    handle = task_run.get_parameters().get("handle")
    return "pull-" + task_label(getattr(handle, "modality", ""), getattr(handle, "series_key", ""))


@task(name="pull-series", task_run_name=_pull_run_name, cache_policy=NO_CACHE)
def pull_series_task(handle: SeriesHandle, settings: PullSettings) -> SeriesPull:
    """Prefect task: pull one large series (see :func:`pull_series`; retries are its own)."""
    return pull_series(handle, settings)


# --------------------------------------------------------------------------- commit


def clean_staging(store: SiteStore) -> int:
    """Remove staging and plans left by an interrupted run; return how many were removed."""
    return store.prune(RAW_STAGING_DICOMWEB, (), children=True) + store.prune(
        RAW_PLANS, (), children=True
    )


def commit_series(store: SiteStore, pulled: SeriesPull) -> str:
    """Move a complete staged series onto its final prefix (replacing an older copy).

    On a local store this is one directory rename; on object stores a copy then delete of
    each object, run before the ingest so the ingest never sees a partly moved series.

    Returns
    -------
    str
        The store-relative prefix of the committed series.
    """
    final = series_prefix(pulled.study_key, pulled.series_key)
    store.move(pulled.staging, final, mode=Existing.OVERWRITE)
    return final


StudyOutcome = Literal["pulled", "skipped", "failed"]


@dataclass
class PullSettlement:
    """What the commit of a pull did: per-study outcomes, counts and the per-study rows."""

    studies: dict[str, int] = field(
        default_factory=lambda: {"pulled": 0, "skipped": 0, "failed": 0}
    )
    series: dict[str, int] = field(default_factory=lambda: {"pulled": 0, "skipped": 0, "failed": 0})
    instances: int = 0
    nbytes: int = 0
    rows: list[dict[str, object]] = field(default_factory=list)
    committed: bool = False

    def summary(self, site: str, source: str, study_dates: str | None, found: int) -> StageSummary:
        """Return the pull's summary: studies ok (pulled or up to date) and failed."""
        return StageSummary(
            stage=Stage.INGEST,
            site=site,
            counts={
                "ok": self.studies["pulled"] + self.studies["skipped"],
                "failed": self.studies["failed"],
            },
            extra={
                "source": source,
                "study_dates": study_dates,
                "studies": {"found": found, **self.studies},
                "series": self.series,
                "instances": self.instances,
                "bytes": self.nbytes,
            },
        )


def settle_pull(
    store: SiteStore,
    state: PullState,
    base_url: str,
    plans: list[StudyPlan],
    results: dict[str, SeriesPull | str],
) -> PullSettlement:
    """Commit every study whose series all arrived; discard and record the others.

    Parameters
    ----------
    store
        The site store.
    state
        The pull state (failed studies are recorded in it, committed series too).
    base_url
        The DICOMweb source.
    plans
        The studies of this pull.
    results
        Per series key: the staged series, or a one-line error.

    Returns
    -------
    PullSettlement
        Counts and one row per study (opaque keys only).
    """
    out = PullSettlement()
    for plan in plans:
        outcome, error = _settle_study(store, state, base_url, plan, results)
        out.studies[outcome] += 1
        out.series["skipped"] += plan.n_series - len(plan.jobs)
        done = [p for j in plan.jobs if isinstance(p := results[j.series_key], SeriesPull)]
        if outcome == "pulled":
            out.committed = True
            out.series["pulled"] += len(done)
            out.instances += sum(p.instances for p in done)
            out.nbytes += sum(p.nbytes for p in done)
        elif outcome == "failed":
            out.series["failed"] += len(plan.jobs)
        row = {"study": plan.study_key, "series": plan.n_series, "to_pull": len(plan.jobs)}
        out.rows.append({**row, "outcome": outcome, "error": error})
    return out


def _settle_study(
    store: SiteStore,
    state: PullState,
    base_url: str,
    plan: StudyPlan,
    results: dict[str, SeriesPull | str],
) -> tuple[StudyOutcome, str]:
    """Commit a study whose series all arrived, or discard its staging and record the failure."""
    failures = state.source(base_url).failed
    if plan.up_to_date:
        failures.pop(plan.study_key, None)
        return "skipped", ""
    pulled = [results[j.series_key] for j in plan.jobs]
    errors = sorted({p for p in pulled if isinstance(p, str)})
    if errors:
        for p in pulled:
            if isinstance(p, SeriesPull):
                store.remove(p.staging)
        previous = failures.get(plan.study_key, {})
        failures[plan.study_key] = {
            "study_uid": plan.study_uid,
            "attempts": int(previous.get("attempts", 0)) + 1,
            "error": "; ".join(errors),
        }
        return "failed", "; ".join(errors)
    for p in pulled:
        assert isinstance(p, SeriesPull)
        commit_series(store, p)
        state.series[p.series_key] = {"study": p.study_key, "instances": p.instances}
    failures.pop(plan.study_key, None)
    return "pulled", ""


def now_iso() -> str:
    """Return the current time as an ISO timestamp with the local zone."""
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")

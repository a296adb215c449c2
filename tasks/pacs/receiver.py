"""A DICOM storage SCP (C-STORE receiver) that lands instances in the site's raw zone.

Raw-zone layout (private zone, opaque names)::

    STORE/<site>/raw/_incoming/<study-hash>/<series-hash>/<sop-hash>.dcm   study still arriving
    STORE/<site>/raw/pacs/received/<study-hash>/<series-hash>/<sop-hash>.dcm  quiet study

* Atomic writes: pynetdicom hands the dataset to the handler only after the whole C-STORE
  arrived, and the handler writes it to a temporary name and renames it, so a connection
  dropped mid-association leaves no partial file.
* Allow-list: associations from calling AE titles not on the list are rejected.
* Batching: a study is moved from ``_incoming`` to ``received`` (and an ingest runs) once no
  instance of it has arrived for ``quiet_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from tasks.errors import OncoflowError
from tasks.pacs.dicomweb import UID_PATTERN, opaque_key
from tasks.refs import site_ref_key
from tasks.store import TMP_MARK, Existing, SiteStore

log = logging.getLogger("oncoflow.receiver")

RAW_INCOMING = "raw/_incoming"
RAW_RECEIVED = "raw/pacs/received"
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
AE_TITLE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.")


def validate_ae_title(title: str, what: str = "AE title") -> str:
    """Return a valid AE title (1-16 characters, no backslash or control characters)."""
    text = title.strip()
    if not 1 <= len(text) <= 16 or not set(text) <= AE_TITLE_CHARS:
        raise OncoflowError(f"invalid {what} {title!r}: use 1-16 letters, digits, space, _-.")
    return text


@dataclass
class ReceiverStats:
    """Counters of a receiver's life (no identifiers)."""

    received: int = 0
    failed: int = 0
    studies_committed: int = 0
    instances_committed: int = 0
    ingest_runs: int = 0
    rejected_associations: int = 0

    def to_dict(self) -> dict[str, int]:
        """Return the counters as a dict."""
        return dict(self.__dict__)


@dataclass
class StorageReceiver:
    """C-STORE receiver for one site.

    Parameters
    ----------
    store
        The site store.
    ae_title
        Our AE title (called AE title).
    allow
        Calling AE titles allowed to send; every other association is rejected.
    port, host
        Where to listen.
    quiet_seconds
        A study is committed once no instance of it has arrived for this long.
    on_batch
        Called (in the thread running :meth:`run`) with the study keys just committed, e.g.
        to run the normal ingest on the raw zone.
    """

    store: SiteStore
    ae_title: str
    allow: list[str]
    port: int = 11112
    host: str = "0.0.0.0"  # a storage SCP listens for the PACS and modalities
    quiet_seconds: float = 30.0
    on_batch: Callable[[list[str]], None] | None = None
    stats: ReceiverStats = field(default_factory=ReceiverStats)
    _last: dict[str, float] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _server: object | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self.ae_title = validate_ae_title(self.ae_title)
        if not self.allow:
            raise OncoflowError(
                "no calling AE title allowed: give --allow AE for each PACS or modality"
            )
        self.allow = [validate_ae_title(a, "allowed AE title") for a in self.allow]

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start listening (non-blocking); pick up studies left in ``_incoming`` earlier."""
        self._recover()
        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = list(self.allow)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_REJECTED, self._handle_rejected),
        ]
        try:
            self._server = ae.start_server(
                (self.host, self.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            raise OncoflowError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        log.info("listening on %s:%s as %s", self.host, self.port, self.ae_title)

    @property
    def bound_port(self) -> int:
        """The TCP port actually listened on (useful with ``port=0``)."""
        return int(self._server.server_address[1])  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Stop listening and end :meth:`run`."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None

    def run(self, poll_seconds: float = 1.0) -> None:
        """Commit quiet studies until :meth:`stop` is called, then commit what is left."""
        while not self._stop.wait(poll_seconds):
            self.commit_due()
        self.commit_due(force=True)

    # ----------------------------------------------------------------- receiving

    def _handle_rejected(self, event: evt.Event) -> None:
        self.stats.rejected_associations += 1
        log.warning("association rejected (calling AE title not allowed)")

    def _handle_store(self, event: evt.Event) -> int:
        """Write one received instance atomically under ``_incoming``."""
        try:
            ds = event.dataset
            uids = [
                str(ds.get(k, ""))
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            ]
        except Exception:
            self.stats.failed += 1
            return STATUS_CANNOT_UNDERSTAND
        if not all(UID_PATTERN.match(u) for u in uids):
            self.stats.failed += 1
            log.warning("instance refused: missing or malformed UIDs")
            return STATUS_CANNOT_UNDERSTAND
        study, series, sop = (opaque_key(u, site_ref_key(self.store)) for u in uids)
        key = f"{RAW_INCOMING}/{study}/{series}/{sop}.dcm"
        try:
            data = event.encoded_dataset(include_meta=True)
            # Temporary key, then rename: readers never see a partial file. A second attempt
            # covers a commit removing the (then empty) study folder at the same moment.
            try:
                self.store.write_bytes(key, data, mode=Existing.OVERWRITE)
            except FileNotFoundError:
                self.store.write_bytes(key, data, mode=Existing.OVERWRITE)
        except Exception as exc:
            self.stats.failed += 1
            log.error("could not write a received instance: %s", type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self._last[study] = time.monotonic()
            self.stats.received += 1
        return STATUS_SUCCESS

    # ----------------------------------------------------------------- batching

    def _recover(self) -> None:
        """Remove temporary files of an earlier process; schedule its incoming studies."""
        self.store.prune(RAW_INCOMING, (), select=lambda _key: False)  # temporary objects only
        now = time.monotonic()
        with self._lock:
            for entry in self.store.children(RAW_INCOMING):
                self._last.setdefault(entry.rsplit("/", 1)[-1], now)

    def due(self, force: bool = False) -> dict[str, float]:
        """Studies quiet for ``quiet_seconds`` (all pending ones when ``force``)."""
        now = time.monotonic()
        with self._lock:
            return {k: t for k, t in self._last.items() if force or now - t >= self.quiet_seconds}

    def commit_due(self, force: bool = False) -> list[str]:
        """Move quiet studies from ``_incoming`` to ``received`` and call ``on_batch``.

        Returns
        -------
        list of str
            Study keys committed.
        """
        committed = []
        for study, seen in sorted(self.due(force).items()):
            moved = self._commit_study(study)
            with self._lock:
                if self._last.get(study) == seen:
                    del self._last[study]
            if moved:
                committed.append(study)
                self.stats.studies_committed += 1
                self.stats.instances_committed += moved
                log.info("study %s committed: %d instances", study, moved)
        if committed and self.on_batch is not None:
            self.stats.ingest_runs += 1
            try:
                self.on_batch(committed)
            except Exception as exc:  # the receiver keeps running; the next batch retries
                log.error("ingest after a batch failed: %s: %s", type(exc).__name__, exc)
        return committed

    def _commit_study(self, study: str) -> int:
        """Move the complete files of one study; return how many were moved."""
        return self.store.move(
            f"{RAW_INCOMING}/{study}",
            f"{RAW_RECEIVED}/{study}",
            select=lambda rel: _complete_instance(rel.rsplit("/", 1)[-1]),
        )


def _complete_instance(name: str) -> bool:
    """Whether a file name under ``_incoming`` is a completely written instance."""
    return name.endswith(".dcm") and not name.startswith(TMP_MARK)

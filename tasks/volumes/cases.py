"""Cases of a non-DICOM cohort: pyradiomics' batch CSV or a folder of image/mask pairs.

**Cases CSV** (pyradiomics' batch format): one row per (image, mask) with columns ``Image`` and
``Mask`` (paths or URLs, relative ones resolved against the CSV's folder) and optional
``Patient``, ``Study``, ``Modality``, ``ROI`` (a name) and ``Label`` (the label value to use; by
default every label of the mask). Column names compare case-insensitively; other columns are
ignored. Several rows may share an image (one mask each).

**Folder** (naming rule): every ``<case>_image.<ext>`` with a ``<case>_mask.<ext>``,
``<case>_label.<ext>`` or ``<case>_seg.<ext>`` in the same folder (any depth), ``<ext>`` one of
``.nii.gz``, ``.nii``, ``.nrrd``; ``<case>`` is the patient. pyradiomics' sample data
(``brain1_image.nrrd`` + ``brain1_label.nrrd``) follows it.

ROIs: a mask gives one ROI per label: named by ``ROI`` when it has one label (or ``Label`` picks
one), ``<ROI>-<label>`` when several, ``label-<n>`` without a name; names are lowercased to
letters, digits and dashes. Without ``Patient`` each image is its own patient; without
``Study`` each patient has one study; without ``Modality`` the modality is ``OT``.

The result is the private table ``catalog/volumes.parquet`` (paths and patient IDs: private zone).

**Names that are not UTF-8** (legacy code-page exports, e.g. ISO-8859-2 or Windows-1250): such a
file (an image or mask of the folder rule, or a CSV's ``Image``/``Mask`` cell holding such bytes)
cannot be a text column and is never opened; it is returned escaped
(:func:`tasks.dicom.listing.escape_name`, source-relative) for an ``undecodable-name``
quarantine row, like a DICOM file's, and its case is left out. Every other case is listed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tasks.dicom.listing import escape_name, is_utf8_name
from tasks.errors import OncoflowError
from tasks.records import Reason
from tasks.store import SiteStore, open_url, unstrip
from tasks.volumes.images import SUFFIXES, volume_suffix

CATALOG_VOLUMES = "catalog/volumes.parquet"
#: Mask file stems of the folder naming rule.
MASK_WORDS = ("mask", "label", "seg")
MODALITY = re.compile(r"^[A-Z]{2,4}$")
#: Files a NIfTI/NRRD folder may hold besides the volumes (notes, tables, scripts).
NOTE_SUFFIXES = (".csv", ".tsv", ".txt", ".md", ".json", ".yaml", ".yml", ".py", ".pdf")
#: Words of file names that name the file's role, not a person (left out of leak-gate values).
FILE_WORDS = frozenset({"image", "img", "mask", "label", "labels", "seg", "segmentation"})

VOLUMES_SCHEMA = pa.schema(
    [
        ("volume_key", pa.string()),
        ("image", pa.string()),
        ("masks", pa.list_(pa.string())),
        ("labels", pa.list_(pa.int64())),
        ("roi_names", pa.list_(pa.string())),
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("modality", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass
class VolumeCase:
    """One image volume with its masks (private: paths and the patient ID).

    Parameters
    ----------
    image
        URL or path of the image.
    masks
        URLs or paths of its masks (one entry per CSV row; a mask may repeat with other labels).
    labels
        Label to use per mask entry (0: every label of the mask).
    roi_names
        ROI name per mask entry (empty: from the labels).
    patient_id, study_id, modality
        From the CSV (or the folder's case name), private.
    reference
        The image as the source names it (CSV cell, or path within the folder): the volume
        key hashes it, so a cohort moved or given by another path keeps its pseudonyms.
    """

    image: str
    masks: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    roi_names: list[str] = field(default_factory=list)
    patient_id: str = ""
    study_id: str = ""
    modality: str = "OT"
    status: str = "ok"
    reason: str = ""
    detail: str = ""

    reference: str = ""

    @property
    def volume_key(self) -> str:
        """Private key of the volume: SHA-256 of its image reference."""
        return hashlib.sha256((self.reference or self.image).encode("utf-8")).hexdigest()

    def row(self) -> dict[str, Any]:
        """Return the ``catalog/volumes.parquet`` row."""
        return {
            "volume_key": self.volume_key,
            "image": self.image,
            "masks": self.masks,
            "labels": self.labels,
            "roi_names": self.roi_names,
            "patient_id": self.patient_id,
            "study_id": self.study_id,
            "modality": self.modality,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
        }


def roi_slug(name: str) -> str:
    """Lowercase a ROI name to letters, digits and dashes (at most 32 characters)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    return slug[:32].strip("-")


def is_volume_source(source: str) -> bool:
    """Whether SOURCE is a cases CSV or a folder holding NIfTI/NRRD files and no other images.

    Hidden files and notes (``.csv``, ``.txt``, ``.md``, ``.json``, ``.yaml``, ``.py``, ``.pdf``)
    are ignored; any other file (DICOM, with or without a suffix) makes it a DICOM source.

    Raises
    ------
    OncoflowError
        When SOURCE cannot be listed.
    """
    if source.lower().endswith(".csv"):
        return True
    fs, root = open_url(source)
    seen = False
    try:
        if not fs.isdir(root):
            return False
        # stops at the first other file: a DICOM source costs one folder listing, not a walk
        for _, _, files in fs.walk(root):
            for name in files:
                if name.startswith(".") or name.lower().endswith(NOTE_SUFFIXES):
                    continue
                if not volume_suffix(name):
                    return False
                seen = True
    except OSError:
        return False
    return seen


def _join(base: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return f"{base.rstrip('/')}/{path}"


def _hand_over(url: str, bad: list[str], undecodable: list[str] | None) -> None:
    """Add the escaped names to ``undecodable``; without it, such a name is a one-line error."""
    if not bad:
        return
    if undecodable is None:
        raise OncoflowError(f"a file name under {url} is not UTF-8 (rename it, e.g. with convmv)")
    undecodable.extend(sorted(set(bad)))


def read_cases_csv(url: str, undecodable: list[str] | None = None) -> list[VolumeCase]:
    """Read a cases CSV into volume cases (rows sharing an image are merged).

    Parameters
    ----------
    url
        The CSV (path or fsspec URL).
    undecodable
        Receives the ``Image``/``Mask`` cells whose bytes are not UTF-8 (a CSV saved in a legacy
        code page naming such files), escaped; their rows are left out. Without it, such a
        cell is a one-line error.

    Raises
    ------
    OncoflowError
        One line for an unreadable file, missing ``Image``/``Mask`` columns, a bad ``Label``
        or ``Modality``, or other text that is not UTF-8 (naming the row).
    """
    fs, path = open_url(url)
    try:
        # a legacy code page's bytes are kept (surrogate escapes) so its rows can be told apart
        text = fs.cat_file(path).decode("utf-8-sig", "surrogateescape")
    except FileNotFoundError:
        raise OncoflowError(f"cases file not found: {url}") from None
    except OSError as exc:
        raise OncoflowError(f"cases file {url}: cannot read ({type(exc).__name__})") from None
    bad: list[str] = []
    reader = csv.DictReader(io.StringIO(text))
    columns = {c.strip().lower(): c for c in reader.fieldnames or []}
    missing = [c for c in ("image", "mask") if c not in columns]
    if missing:
        found = escape_name(", ".join(reader.fieldnames or [])) or "none"
        raise OncoflowError(
            f"cases file {url.rsplit('/', 1)[-1]}: needs columns Image and Mask "
            f"(pyradiomics' batch format); found: {found}"
        )
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    by_image: dict[str, VolumeCase] = {}
    for number, raw in enumerate(reader, start=2):
        row = {k: (raw.get(v) or "").strip() for k, v in columns.items()}
        if not row["image"] and not row["mask"]:
            continue
        where = f"cases file {url.rsplit('/', 1)[-1]} line {number}"
        if not row["image"] or not row["mask"]:
            raise OncoflowError(f"{where}: Image and Mask are both needed")
        names = [row[c] for c in ("image", "mask") if not is_utf8_name(row[c])]
        if names:  # never opened: the file is quarantined, the row left out
            bad.extend(escape_name(n) for n in names)
            continue
        for column in ("patient", "study"):
            if not is_utf8_name(row.get(column) or ""):
                raise OncoflowError(
                    f"{where}: {column.title()} is not UTF-8 text (save the file as UTF-8)"
                )
        label = 0
        if row.get("label"):
            try:
                label = int(float(row["label"]))
            except ValueError:
                raise OncoflowError(f"{where}: Label must be a whole number") from None
            if label <= 0:
                raise OncoflowError(f"{where}: Label must be positive")
        modality = (row.get("modality") or "OT").upper()
        if not MODALITY.match(modality):
            raise OncoflowError(f"{where}: Modality must be a DICOM modality code, e.g. CT, MR")
        image = _join(base, row["image"])
        case = by_image.setdefault(
            image,
            VolumeCase(
                image=image,
                reference=row["image"],
                patient_id=row.get("patient") or "",
                study_id=row.get("study") or "",
                modality=modality,
            ),
        )
        case.masks.append(_join(base, row["mask"]))
        case.labels.append(label)
        case.roi_names.append(roi_slug(row.get("roi") or ""))
    _hand_over(url, bad, undecodable)
    if not by_image and not bad:
        raise OncoflowError(f"cases file {url.rsplit('/', 1)[-1]} lists no case")
    return [by_image[k] for k in sorted(by_image)]


def cases_from_folder(url: str, undecodable: list[str] | None = None) -> list[VolumeCase]:
    """List the image/mask pairs of a folder by the naming rule (``<case>_image.<ext>``).

    Images without a mask are returned quarantined (``missing-mask``).

    Parameters
    ----------
    url
        The folder (path or fsspec URL).
    undecodable
        Receives the paths within the folder of the images and masks whose path is not UTF-8,
        escaped (:func:`tasks.dicom.listing.escape_name`); their cases are left out. Without
        it, such a name is a one-line error.
    """
    fs, root = open_url(url)
    bad: list[str] = []
    files = sorted(fs.find(root))
    by_stem: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for path in files:
        name = path.rsplit("/", 1)[-1]
        suffix = volume_suffix(name)
        stem = name[: -len(suffix)] if suffix else name
        case, _, word = stem.rpartition("_")
        if not suffix or not case:
            continue
        folder = path.rsplit("/", 1)[0]
        by_stem[(folder, case)][word.lower()] = path
    cases = []
    for (_, case), found in sorted(by_stem.items()):
        image = found.get("image")
        if image is None:
            continue
        mask = next((found[w] for w in MASK_WORDS if w in found), None)
        paths = [p for p in (image, mask) if p is not None]
        if not all(map(is_utf8_name, paths)):  # SimpleITK aborts the process on such a path
            bad.extend(escape_name(p[len(root) :].lstrip("/")) for p in paths)
            continue
        volume = VolumeCase(
            image=unstrip(fs, image), patient_id=case, reference=image[len(root) :].lstrip("/")
        )
        if mask is None:
            volume.status, volume.reason = "quarantined", str(Reason.MISSING_MASK)
            volume.detail = "no <case>_mask/_label/_seg file beside the image"
        else:
            volume.masks, volume.labels, volume.roi_names = [unstrip(fs, mask)], [0], [""]
        cases.append(volume)
    _hand_over(url, bad, undecodable)
    if not cases and not bad:
        rule = ", ".join(SUFFIXES[:3])
        raise OncoflowError(
            f"no <case>_image file with a <case>_mask (or _label, _seg) in {url} ({rule})"
        )
    return cases


def list_cases(source: str, undecodable: list[str] | None = None) -> list[VolumeCase]:
    """Return the cases of a cases CSV or a folder (see the module docstring).

    Parameters
    ----------
    source
        A cases CSV or a folder (path or fsspec URL).
    undecodable
        Receives the files whose name is not UTF-8, escaped and source-relative (see
        :func:`cases_from_folder`, :func:`read_cases_csv`).

    Raises
    ------
    OncoflowError
        One line for a bad SOURCE (also when its own path is not UTF-8).
    """
    if not is_utf8_name(source):
        raise OncoflowError("the source's path is not UTF-8 (rename it, e.g. with convmv)")
    if source.lower().endswith(".csv"):
        return read_cases_csv(source, undecodable)
    return cases_from_folder(source, undecodable)


def check_case(case: VolumeCase) -> VolumeCase:
    """Check the files of a case exist; quarantine it (``missing-file``) otherwise."""
    if case.status != "ok":
        return case
    for what, location in [("image", case.image), *(("mask", m) for m in case.masks)]:
        fs, path = open_url(location)
        if not fs.exists(path):
            case.status, case.reason = "quarantined", str(Reason.MISSING_FILE)
            case.detail = f"{what} file not found"
            return case
        if not volume_suffix(path):
            case.status, case.reason = "quarantined", str(Reason.UNSUPPORTED_IMAGE)
            case.detail = f"{what} is not NIfTI or NRRD (.nii.gz, .nii, .nrrd)"
            return case
    return case


def volumes_table(cases: list[VolumeCase]) -> pa.Table:
    """Return the private ``catalog/volumes.parquet`` table (sorted by volume key)."""
    rows = sorted((c.row() for c in cases), key=lambda r: r["volume_key"])
    return pa.Table.from_pylist(rows, schema=VOLUMES_SCHEMA)


def write_catalogue(store: SiteStore, source: str, cases: list[VolumeCase]) -> bool:
    """Write ``catalog/volumes.parquet`` with the SOURCE in its metadata; True when written."""
    return store.write_table(CATALOG_VOLUMES, volumes_table(cases), {"source": source})


def volume_identifiers(store: SiteStore) -> list[str] | None:
    """Return the identifying values of ``catalog/volumes.parquet`` (None without the table).

    Patient and study IDs from the cases, and the file names (without folder and suffix) of
    every image and mask, which often carry a patient's name or a date: what the leak gate
    must never find in a published file.
    """
    table = store.read_table(CATALOG_VOLUMES)
    if table is None:
        return None
    values: set[str] = set()
    for row in table.select(["image", "masks", "patient_id", "study_id"]).to_pylist():
        values.update(v for v in (row["patient_id"], row["study_id"]) if v)
        for location in [row["image"], *(row["masks"] or [])]:
            name = location.rsplit("/", 1)[-1]
            stem = name[: -len(volume_suffix(name))] if volume_suffix(name) else name
            words = [w for w in re.split(r"[\W_]+", stem) if w and w.lower() not in FILE_WORDS]
            if words:
                values.add(" ".join(words))
    return sorted(values)

"""IBSI identifiers of pyradiomics feature columns (Arrow field metadata of the features table).

The reviewed table ``ibsi_features.csv`` beside this module pairs every pyradiomics 3.0.1
feature and image filter with its Image Biomarker Standardisation Initiative identifier (IBSI 1
and IBSI 2 reference manuals, MIRP's feature-name reference; sources in the file's header) and
notes where pyradiomics departs from the IBSI definition. :func:`annotate_table` writes, on
every feature column of a features table, the field metadata

``ibsi``
    the feature's 4-character identifier (empty where IBSI defines none);
``ibsi_name``, ``ibsi_family``
    the IBSI name and the identifier of its feature family;
``ibsi_filter``
    the identifier of the image filter (``L6PA`` LoG, ``25BO`` separable wavelets; empty for
    ``original`` and for filters IBSI does not define);
``ibsi_note``
    the departures from IBSI that apply to this column (feature definition, pyradiomics' fixed
    bin size discretisation, a filter without an identifier); absent when there is none.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from base64 import b64encode
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from tasks.radiomics.params import RadiomicsParams

TABLE_FILE = Path(__file__).with_name("ibsi_features.csv")
#: Coding schemes of the feature codes in DICOM SR: IBSI identifiers, and pyradiomics' own
#: private scheme (as its ``labs/pyradiomics-dcm`` converter codes features IBSI lacks).
IBSI_SCHEME = "IBSI"
PRIVATE_SCHEME = "99PYRADIOMICS"

#: A pyradiomics feature column: ``<image type>_<feature class>_<feature>``.
FEATURE_COLUMN = re.compile(
    r"^(?P<image>[a-z][A-Za-z0-9-]*)_"
    r"(?P<cls>firstorder|shape|shape2D|glcm|glrlm|glszm|gldm|ngtdm)_(?P<feature>[A-Za-z0-9]+)$"
)
#: Classes computed on discretised intensities (and the first-order features that are).
DISCRETISED_CLASSES = frozenset({"glcm", "glrlm", "glszm", "gldm", "ngtdm"})
DISCRETISED_FIRSTORDER = frozenset({"Entropy", "Uniformity"})
FIXED_BIN_SIZE_NOTE = (
    "pyradiomics' fixed bin size counts bins from 0, IBSI's (Q3RU) from the lowest intensity "
    "of the ROI (MIRP calls pyradiomics' variant 'fbsp')"
)
NO_FILTER_CODE_NOTE = "computed on a {name} image: a filter without an IBSI identifier"


@dataclass(frozen=True)
class IbsiEntry:
    """One row of the reviewed table.

    Parameters
    ----------
    kind
        ``class``, ``feature`` or ``filter``.
    feature_class
        pyradiomics feature class (empty for filters).
    name
        pyradiomics feature or image type name (empty for a class row).
    ibsi
        IBSI identifier (empty where IBSI defines none).
    ibsi_name
        IBSI name of the feature, family or filter.
    mirp
        MIRP's name.
    unit
        Unit token: ``mm3``, ``mm2``, ``mm``, ``/mm``, ``1``, ``I`` (image intensity unit),
        ``I2`` (its square), ``I2.mm3``.
    note
        Departure from IBSI, or why there is no identifier.
    """

    kind: str
    feature_class: str
    name: str
    ibsi: str
    ibsi_name: str
    mirp: str
    unit: str
    note: str


@dataclass(frozen=True)
class IbsiTable:
    """The reviewed table, indexed."""

    features: dict[tuple[str, str], IbsiEntry]
    classes: dict[str, IbsiEntry]
    filters: dict[str, IbsiEntry]


def parse_table(text: str) -> IbsiTable:
    """Parse the CSV text of the reviewed table (``#`` lines are comments).

    Raises
    ------
    ValueError
        On a malformed row: unknown kind, an identifier that is not 4 characters, a duplicate.
    """
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    features: dict[tuple[str, str], IbsiEntry] = {}
    classes: dict[str, IbsiEntry] = {}
    filters: dict[str, IbsiEntry] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        entry = IbsiEntry(
            kind=row["kind"],
            feature_class=row["class"],
            name=row["name"],
            ibsi=row["ibsi"],
            ibsi_name=row["ibsi_name"],
            mirp=row["mirp"],
            unit=row["unit"],
            note=row["note"],
        )
        if entry.ibsi and not re.fullmatch(r"[0-9A-Z]{4}", entry.ibsi):
            raise ValueError(f"IBSI table: bad identifier {entry.ibsi!r} for {entry.name!r}")
        if entry.kind == "feature":
            key = (entry.feature_class, entry.name)
            target: dict = features
        elif entry.kind == "class":
            key, target = entry.feature_class, classes
        elif entry.kind == "filter":
            key, target = entry.name, filters
        else:
            raise ValueError(f"IBSI table: unknown kind {entry.kind!r}")
        if key in target:
            raise ValueError(f"IBSI table: duplicate row {key!r}")
        target[key] = entry
    return IbsiTable(features=features, classes=classes, filters=filters)


@lru_cache(maxsize=1)
def load_table() -> IbsiTable:
    """Return the reviewed table shipped beside this module."""
    return parse_table(TABLE_FILE.read_text(encoding="utf-8"))


def private_code_value(meaning: str) -> str:
    """Return the 6-character code value pyradiomics-dcm gives a feature (``class_feature``)."""
    return b64encode(hashlib.sha1(meaning.encode()).digest()).decode("ascii")[:6]


@lru_cache(maxsize=1)
def reviewed_codes() -> frozenset[tuple[str, str, str]]:
    """Every (scheme, value, meaning) a measurement report may use beyond standard schemes.

    The leak gate keeps code items found here: they come from the reviewed table, never from
    patient data.
    """
    table = load_table()
    # the report's language, highdicom's default (RFC 5646)
    codes: set[tuple[str, str, str]] = {("RFC5646", "en-US", "English (United States)")}
    for entry in [*table.features.values(), *table.filters.values()]:
        if entry.ibsi:
            codes.add((IBSI_SCHEME, entry.ibsi, entry.ibsi_name))
    for cls, name in table.features:
        meaning = f"{cls}_{name}"
        codes.add((PRIVATE_SCHEME, private_code_value(meaning), meaning))
    return frozenset(codes)


@dataclass(frozen=True)
class ColumnIbsi:
    """What the table says about one feature column.

    Parameters
    ----------
    column
        The column name.
    image_type, feature_class, feature
        Parsed from the name (image type as in the parameter file: ``Original``, ``LoG``, ...).
    entry
        The feature's row (None for a feature the table does not know).
    filter_entry
        The image type's row.
    notes
        Departures from IBSI that apply to this column.
    """

    column: str
    image_type: str
    feature_class: str
    feature: str
    entry: IbsiEntry | None
    filter_entry: IbsiEntry | None
    notes: tuple[str, ...]

    @property
    def ibsi(self) -> str:
        """The feature's IBSI identifier (empty when none)."""
        return self.entry.ibsi if self.entry else ""

    @property
    def filter_code(self) -> str:
        """The filter's IBSI identifier (empty for ``Original`` and unnamed filters)."""
        return self.filter_entry.ibsi if self.filter_entry else ""

    def metadata(self) -> dict[bytes, bytes]:
        """Arrow field metadata of the column."""
        family = load_table().classes.get(self.feature_class)
        out = {
            b"ibsi": self.ibsi.encode(),
            b"ibsi_name": (self.entry.ibsi_name if self.entry else "").encode(),
            b"ibsi_family": (family.ibsi if family else "").encode(),
            b"ibsi_filter": self.filter_code.encode(),
        }
        if self.notes:
            out[b"ibsi_note"] = "; ".join(self.notes).encode()
        return out

    def description(self) -> str:
        """One sentence for catalogues (Croissant field description)."""
        text = f"pyradiomics {self.feature_class} {self.feature}, image type {self.image_type}"
        if self.ibsi:
            assert self.entry is not None
            text += f"; IBSI {self.ibsi} ({self.entry.ibsi_name})"
        else:
            text += "; no IBSI identifier"
        if self.filter_code:
            assert self.filter_entry is not None
            text += f"; filter IBSI {self.filter_code} ({self.filter_entry.ibsi_name})"
        if self.notes:
            text += "; departs from IBSI: " + "; ".join(self.notes)
        return text


def uses_fixed_bin_size(params: RadiomicsParams | None, image_type: str) -> bool:
    """Whether pyradiomics discretises with a bin width (its default) for this image type."""
    if params is None:
        return True
    canonical = params.canonical()
    overrides = canonical["imageType"].get(image_type) or {}
    setting = {**canonical["setting"], **overrides}
    return "binCount" not in setting


def describe_column(column: str, params: RadiomicsParams | None = None) -> ColumnIbsi | None:
    """Return the IBSI description of a pyradiomics feature column (None for other columns).

    Parameters
    ----------
    column
        A column name such as ``original_shape_MeshVolume`` or ``wavelet-LLH_glcm_Contrast``.
    params
        The parameters the table was extracted with (discretisation per image type); None
        assumes pyradiomics' default (fixed bin width).
    """
    from tasks.radiomics.cache import part_for_feature  # imports pyradiomics: only when needed

    match = FEATURE_COLUMN.match(column)
    if match is None:
        return None
    try:
        image_type = part_for_feature(column, shape_enabled=False)
    except ValueError:
        return None
    table = load_table()
    cls, feature = match["cls"], match["feature"]
    entry = table.features.get((cls, feature))
    filter_entry = table.filters.get(image_type)
    notes: list[str] = []
    if entry is not None and entry.note:
        notes.append(entry.note)
    discretised = cls in DISCRETISED_CLASSES or (
        cls == "firstorder" and feature in DISCRETISED_FIRSTORDER
    )
    if discretised and uses_fixed_bin_size(params, image_type):
        notes.append(FIXED_BIN_SIZE_NOTE)
    if image_type != "Original" and not (filter_entry and filter_entry.ibsi):
        notes.append(NO_FILTER_CODE_NOTE.format(name=image_type))
    return ColumnIbsi(
        column=column,
        image_type=image_type,
        feature_class=cls,
        feature=feature,
        entry=entry,
        filter_entry=filter_entry,
        notes=tuple(notes),
    )


def annotate_table(table: pa.Table, params: RadiomicsParams | None = None) -> pa.Table:
    """Return ``table`` with IBSI field metadata on every pyradiomics feature column.

    Other columns and the schema metadata are left as they are.
    """
    fields = []
    for field in table.schema:
        described = describe_column(field.name, params)
        if described is not None:
            merged = dict(field.metadata or {})
            merged.update(described.metadata())
            field = field.with_metadata(merged)
        fields.append(field)
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return pa.Table.from_arrays(table.columns, schema=schema)


def field_description(field: pa.Field) -> str | None:
    """Catalogue description of an annotated feature field (None when it carries no IBSI data)."""
    meta = field.metadata or {}
    if b"ibsi" not in meta:
        return None
    described = describe_column(field.name)
    if described is None:
        return None
    note = meta.get(b"ibsi_note", b"").decode()
    return replace(described, notes=(note,) if note else ()).description()

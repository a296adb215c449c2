"""A multilingual canary corpus: real DICOM files with names and free text planted everywhere.

Shared by the de-identification engine tests and the leak gate tests. Every canary is a
person's name (or a dated free-text note) in one of the data space's languages, written in
its own script with its diacritics, plus a CJK and an Arabic name. :func:`write_corpus` plants
them with the synthetic writers (:mod:`tasks.synthetic.dicom_images`) in every place an
identifier hides in practice:

* ``PatientName`` and a nested PN (an item of a sequence, and an SR-style PNAME item);
* descriptors (``StudyDescription``, ``SeriesDescription``, ``ProtocolName``) next to technical
  words and a date or time in a common European form (``"CT THORAX 17.05.2023"``);
* comments (``ImageComments`` LT, ``PatientComments``);
* a text VR in a numeric attribute (``PatientWeight`` written as UT; the same text under the
  DS VR in implicit files);
* private tags (a private block, and a text value under an allow-listed private tag);
* retired attributes (``(0020,1020)`` Reference LO, ``(7FE0,0020)`` Coefficients SDVN OW);
* elements after Pixel Data (a private block in group 7FE1 and ``(FFFC,FFFC)`` padding);
* file meta (``SourceApplicationEntityTitle`` and ``PrivateInformation``) and the preamble;
* encapsulated documents (PDF, CDA, STL, OBJ, MTL) whose title and bytes hold the name;

in explicit VR little endian, implicit VR, explicit VR big endian and deflated files, each with
its declared character set (``ISO_IR 100``, ``101``, ``126``, ``144``, ``192``).

:func:`find_canaries` reports the canaries found in any bytes, decoding them in every
plausible encoding (UTF-8, Latin-1, Latin-2, ISO-8859-7, ISO-8859-5, UTF-16 LE/BE) and matching
case-folded words, with and without diacritics.

>>> files = write_corpus(tmp_path)  # doctest: +SKIP
>>> find_canaries(deidentified_bytes)  # doctest: +SKIP
[]
"""

from __future__ import annotations

import io
import unicodedata
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tasks.synthetic.dicom_images import make_uid, new_dataset


@dataclass(frozen=True)
class Canary:
    """One planted person (or note).

    Parameters
    ----------
    language
        Language or script of the name (``"de"``, ``"el"``, ``"zh"``...).
    family, given
        Name parts as written in the language (diacritics and script kept).
    charsets
        Specific Character Set values that can encode the name.
    """

    language: str
    family: str
    given: str
    charsets: tuple[str, ...]

    @property
    def person_name(self) -> str:
        """The DICOM PN form ``family^given``."""
        return f"{self.family}^{self.given}"

    @property
    def words(self) -> tuple[str, ...]:
        """The distinctive words searched for.

        Each name part of 4+ letters (shorter ones, such as the Irish particle ``Nic``, occur
        by chance in pseudonyms and codes); for ideographic names the given name (two
        ideographs), since one ideograph alone is not distinctive.
        """
        if all(ord(ch) >= 0x2E80 for ch in self.family + self.given):
            return (self.given,)
        parts = f"{self.family} {self.given}".replace("-", " ").split()
        return tuple(p for p in parts if len(p) >= 4)


#: ISO_IR 192 (UTF-8) encodes every canary; the single-byte sets only their own scripts.
_LATIN1 = ("ISO_IR 100", "ISO_IR 192")
_LATIN2 = ("ISO_IR 101", "ISO_IR 192")
_UTF8 = ("ISO_IR 192",)

CANARIES: tuple[Canary, ...] = (
    Canary("de", "Müller", "Jürgen", _LATIN1),
    Canary("de", "Weißgerber-Schön", "Dörte", _LATIN1),
    Canary("fr", "Lefèvre", "Geneviève", _LATIN1),
    Canary("pl", "Wiśniewska", "Małgorzata", _LATIN2),
    Canary("pl", "Brzęczyszczykiewicz", "Grzegorz", _LATIN2),
    Canary("cs", "Dvořáková", "Růžena", _LATIN2),
    Canary("hu", "Szőke", "Erzsébet", _LATIN2),
    Canary("ro", "Ştefănescu", "Ioana", _LATIN2),
    Canary("el", "Παπαδοπούλου", "Ελένη", ("ISO_IR 126", "ISO_IR 192")),
    Canary("bg", "Иванова", "Радосвета", ("ISO_IR 144", "ISO_IR 192")),
    Canary("hr", "Kovačević", "Đurđica", _LATIN2),
    Canary("lt", "Žemaitytė", "Gražina", _UTF8),
    Canary("lv", "Bērziņa", "Līga", _UTF8),
    Canary("sv", "Åkesson", "Björn", _LATIN1),
    Canary("pt", "Gonçalves", "João", _LATIN1),
    Canary("ga", "Ó Briain", "Siobhán", _LATIN1),
    Canary("ga", "Nic Gearailt", "Aoibheann", _LATIN1),
    Canary("zh", "王", "秀英", _UTF8),
    Canary("ar", "الهاشمي", "فاطمة", _UTF8),
)

#: Dates and times as people write them in descriptors and notes (the real date 2023-05-17).
DATES: tuple[str, ...] = (
    "17.05.2023",
    "17/05/2023",
    "2023-05-17",
    "2023.05.17.",
    "17 May 2023",
    "5. Mai 2021",
    "17 maja 2023",
    "17 Μαΐου 2023",
    "17 май 2023",
    "17. května 2023",
    "2023. május 17.",
    "17-05-2023",
)
TIMES: tuple[str, ...] = ("14:30", "14h30", "14.30")

#: Character sets of the corpus and the Python codec of each.
CHARSETS: dict[str, str] = {
    "ISO_IR 100": "latin_1",
    "ISO_IR 101": "iso8859_2",
    "ISO_IR 126": "iso8859_7",
    "ISO_IR 144": "iso8859_5",
    "ISO_IR 192": "utf_8",
}
#: Transfer syntaxes of the corpus, by short name.
SYNTAXES: dict[str, str] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "big-endian": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
}
#: Encapsulated document SOP classes (name -> (SOP class UID, MIME type)).
DOCUMENTS: dict[str, tuple[str, str]] = {
    "pdf": ("1.2.840.10008.5.1.4.1.1.104.1", "application/pdf"),
    "cda": ("1.2.840.10008.5.1.4.1.1.104.2", "text/XML"),
    "stl": ("1.2.840.10008.5.1.4.1.1.104.3", "model/stl"),
    "obj": ("1.2.840.10008.5.1.4.1.1.104.4", "model/obj"),
    "mtl": ("1.2.840.10008.5.1.4.1.1.104.5", "model/mtl"),
}
#: Where each image file carries canaries (the ``places`` of :class:`CanaryFile`).
PLACES: tuple[str, ...] = (
    "preamble",
    "file-meta",
    "PatientName",
    "descriptor",
    "ProtocolName",
    "comment",
    "nested-PN",
    "text-in-numeric",
    "private",
    "safe-private-text",
    "retired",
    "after-pixel-data",
)
#: Searched decodings of raw bytes.
DECODINGS: tuple[str, ...] = (
    "utf_8",
    "latin_1",
    "iso8859_2",
    "iso8859_7",
    "iso8859_5",
    "utf_16_le",
    "utf_16_be",
)


@dataclass(frozen=True)
class CanaryFile:
    """One written corpus file.

    Parameters
    ----------
    path
        The file.
    kind
        ``"image"`` or the document kind (``"pdf"``, ``"stl"``...).
    syntax
        Short transfer syntax name (a key of :data:`SYNTAXES`).
    charset
        Declared Specific Character Set.
    patient_id
        The planted PatientID (ASCII).
    canaries
        The canaries planted in this file.
    places
        Where they were planted.
    """

    path: Path
    kind: str
    syntax: str
    charset: str
    patient_id: str
    canaries: tuple[Canary, ...]
    places: tuple[str, ...]

    @property
    def identifiers(self) -> list[str]:
        """What a private catalogue knows of this patient: PatientID and every planted name."""
        return [self.patient_id, *(c.person_name for c in self.canaries)]


def _fold(text: str) -> str:
    """Case-fold and strip diacritics (NFKD, combining marks dropped)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def decoded_texts(data: bytes) -> list[str]:
    """Return ``data`` decoded in every encoding of :data:`DECODINGS` (errors replaced).

    The UTF-16 decodings are made at both byte offsets.
    """
    texts = []
    for codec in DECODINGS:
        texts.append(data.decode(codec, "replace"))
        if codec.startswith("utf_16"):
            texts.append(data[1:].decode(codec, "replace"))
    return texts


def find_canaries(
    data: bytes, canaries: Iterable[Canary] = CANARIES, *, dates: bool = True
) -> list[str]:
    """Return the canary words (and, with ``dates``, the date forms) present in ``data``.

    Parameters
    ----------
    data
        Any bytes: a DICOM file, a table, a log.
    canaries
        Canaries to look for (default: all).
    dates
        Also look for the planted dates and times of :data:`DATES` and :data:`TIMES`.

    Returns
    -------
    list[str]
        The words found (sorted, unique); empty when the bytes are clean.
    """
    folded = [_fold(t) for t in decoded_texts(data)]
    found = set()
    for canary in canaries:
        for word in canary.words:
            needle = _fold(word)
            if any(needle in text for text in folded):
                found.add(word)
    if dates:
        for form in (*DATES, *TIMES):
            needle = _fold(form)
            if any(needle in text for text in folded):
                found.add(form)
    return sorted(found)


def _text(canary: Canary, syntax: str, index: int, codec: str) -> dict[str, str]:
    """The free text planted with one canary (descriptor, comment, protocol)."""
    dates = [d for d in DATES if _encodable_text(d, codec)]
    date = dates[index % len(dates)]
    time = TIMES[index % len(TIMES)]
    name = f"{canary.family} {canary.given}"
    return {
        "study": f"CT THORAX {date}",
        "series": f"{name} AX 5mm {date} {time}",
        "protocol": f"Protokoll {canary.given} {syntax}",
        "comment": f"Befund {name} vom {date} um {time}",
    }


def _image(canary: Canary, other: Canary, charset: str, syntax: str, index: int) -> Dataset:
    """A small CT image carrying ``canary`` (and ``other`` in nested places) everywhere."""
    sop = make_uid("canary", index, "sop")
    ds = new_dataset(CTImageStorage, sop)
    ds.SpecificCharacterSet = charset
    ds.StudyInstanceUID = make_uid("canary", index, "study")
    ds.SeriesInstanceUID = make_uid("canary", index, "series")
    ds.FrameOfReferenceUID = make_uid("canary", index, "frame")
    ds.PatientName = canary.person_name
    ds.PatientID = f"CANARY-{index:04d}"
    ds.PatientBirthDate = "19620517"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime = "20230517", "143000"
    ds.SeriesDate, ds.SeriesTime = "20230517", "143500"
    ds.Modality, ds.Manufacturer = "CT", "SIEMENS"
    ds.BodyPartExamined = "CHEST"
    text = _text(canary, syntax, index, CHARSETS[charset])
    ds.StudyDescription = text["study"]
    ds.SeriesDescription = text["series"]
    ds.ProtocolName = text["protocol"]
    ds.ImageComments = text["comment"]
    ds.PatientComments = f"{other.family} {other.given}"
    weight = f"{canary.family} {canary.given}"
    if syntax == "implicit":  # no VR on disk: the name sits in a DS-typed attribute's bytes
        with config.disable_value_validation():
            ds.add(DataElement(0x00101030, "DS", _placeholder(weight, charset)))
    else:
        ds.add(DataElement(0x00101030, "UT", weight))
    # nested PN: a referenced request with a physician, and a structured PNAME item
    request = Dataset()
    request.RequestedProcedureID = "RQ1"
    request.add(DataElement(0x00321032, "PN", other.person_name))  # RequestingPhysician
    ds.RequestAttributesSequence = Sequence([request])
    person = Dataset()
    person.ValueType = "PNAME"
    person.PersonName = other.person_name
    ds.ContentSequence = Sequence([person])
    # private tags: a private block, and text under an allow-listed private b-value tag
    block = ds.private_block(0x0011, "ACME HIS EXPORT 2.1", create=True)
    block.add_new(0x10, "LO", f"{canary.family} {canary.given}")
    siemens = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    siemens.add_new(0x0C, "LO", canary.family)
    # retired attributes
    ds.add(DataElement(0x00201020, "LO", canary.given))  # Reference (retired)
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], "5"
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = (np.arange(16, dtype=np.uint16) * 100).tobytes()
    encoded = f"{canary.family}^{canary.given}".encode(CHARSETS[charset])
    padded = encoded + b"\x00" * (len(encoded) % 2)
    # after Pixel Data: a retired OW, a private block and trailing padding
    ds.add(DataElement(0x7FE00020, "OW", padded))  # Coefficients SDVN (retired)
    after = ds.private_block(0x7FE1, "ACME TRAILER", create=True)
    after.add_new(0x10, "LO", f"{canary.given} {canary.family}")
    ds.add(DataElement(0xFFFCFFFC, "OB", padded))  # Data Set Trailing Padding
    # file meta and preamble
    ds.file_meta.SourceApplicationEntityTitle = _ascii(canary.family)[:16] or "CANARY"
    ds.file_meta.PrivateInformationCreatorUID = make_uid("canary", "creator")
    ds.file_meta.PrivateInformation = padded
    ds.preamble = (padded + b"\x00" * 128)[:128]
    return ds


def _placeholder(text: str, charset: str) -> str:
    """A DS value as long as ``text`` encoded, replaced by the text after writing (implicit)."""
    size = len(text.encode(CHARSETS[charset]))
    return "9" * (size + size % 2)


def _ascii(text: str) -> str:
    """An ASCII transliteration by diacritic stripping (other scripts give ``""``)."""
    return "".join(ch for ch in _fold(text) if ch.isascii() and ch.isalpha()).upper()


def _document(canary: Canary, kind: str, charset: str, index: int) -> Dataset:
    """An encapsulated document (PDF, CDA, STL, OBJ or MTL) naming ``canary``."""
    sop_class, mime = DOCUMENTS[kind]
    ds = new_dataset(sop_class, make_uid("canary-doc", index, kind))
    ds.SpecificCharacterSet = charset
    ds.StudyInstanceUID = make_uid("canary-doc", index, "study")
    ds.SeriesInstanceUID = make_uid("canary-doc", index, kind, "series")
    ds.PatientName = canary.person_name
    ds.PatientID = f"CANARY-DOC-{index:04d}"
    ds.Modality = "DOC" if kind in ("pdf", "cda") else "M3D"
    ds.DocumentTitle = f"{canary.family} {canary.given}"
    ds.MIMETypeOfEncapsulatedDocument = mime
    name = f"{canary.family} {canary.given}"
    body = {
        "pdf": f"%PDF-1.4\n% {name}\n%%EOF\n",
        "cda": f"<ClinicalDocument><name>{name}</name></ClinicalDocument>",
        "stl": f"solid {name}\nendsolid {name}\n",
        "obj": f"# {name}\no face\nv 0 0 0\n",
        "mtl": f"# {name}\nnewmtl skin\n",
    }[kind].encode("utf-8")
    ds.EncapsulatedDocument = body + b"\x00" * (len(body) % 2)
    ds.EncapsulatedDocumentLength = len(body)
    return ds


def _save(ds: Dataset, path: Path, syntax: str) -> None:
    """Write ``ds`` in a transfer syntax (deflated via pydicom; big endian written by pydicom)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.TransferSyntaxUID = SYNTAXES[syntax]
    weight = ds.get(0x00101030)
    with config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    if syntax == "implicit" and weight is not None and weight.VR == "DS":
        name = f"{ds.PatientName.family_name} {ds.PatientName.given_name}"
        encoded = name.encode(CHARSETS[str(ds.SpecificCharacterSet)])
        encoded += b" " * (len(encoded) % 2)
        data = path.read_bytes()
        placeholder = str(weight.value).encode("ascii")
        assert data.count(placeholder) == 1 and len(placeholder) == len(encoded)
        path.write_bytes(data.replace(placeholder, encoded))


def write_corpus(folder: Path) -> list[CanaryFile]:
    """Write the canary corpus under ``folder`` and describe each file.

    Every canary is planted in an image file in each of its character sets, the transfer
    syntaxes cycling (so each syntax meets several scripts), and a document of every kind is
    written in UTF-8 and a single-byte set.

    Parameters
    ----------
    folder
        Output folder (created).

    Returns
    -------
    list[CanaryFile]
        The files, in writing order.
    """
    files: list[CanaryFile] = []
    syntaxes = list(SYNTAXES)
    index = 0
    for number, canary in enumerate(CANARIES):
        other = CANARIES[(number + 7) % len(CANARIES)]
        for charset in canary.charsets:
            codec = CHARSETS[charset]
            nested = other if _encodable(other, codec) else canary
            syntax = syntaxes[index % len(syntaxes)]
            ds = _image(canary, nested, charset, syntax, index)
            path = folder / "images" / f"{index:03d}-{canary.language}-{syntax}.dcm"
            _save(ds, path, syntax)
            files.append(
                CanaryFile(
                    path=path,
                    kind="image",
                    syntax=syntax,
                    charset=charset,
                    patient_id=str(ds.PatientID),
                    canaries=(canary, nested) if nested is not canary else (canary,),
                    places=PLACES,
                )
            )
            index += 1
    for number, kind in enumerate(DOCUMENTS):
        for canary, charset in ((CANARIES[number], "ISO_IR 192"), (CANARIES[8], "ISO_IR 126")):
            ds = _document(canary, kind, charset, index)
            syntax = "explicit" if charset == "ISO_IR 192" else "deflated"
            path = folder / "documents" / f"{index:03d}-{kind}-{canary.language}.dcm"
            _save(ds, path, syntax)
            files.append(
                CanaryFile(
                    path=path,
                    kind=kind,
                    syntax=syntax,
                    charset=charset,
                    patient_id=str(ds.PatientID),
                    canaries=(canary,),
                    places=("PatientName", "DocumentTitle", "encapsulated-document"),
                )
            )
            index += 1
    return files


def _encodable(canary: Canary, codec: str) -> bool:
    return _encodable_text(canary.person_name, codec)


def _encodable_text(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def inflated(data: bytes) -> bytes:
    """Return ``data`` plus, for a deflated Part 10 file, its inflated data set (best effort).

    The deflated stream starts after the file meta group; its length comes from the group
    length element.
    """
    if len(data) < 144 or data[128:132] != b"DICM" or b"1.2.840.10008.1.2.1.99" not in data[:512]:
        return data
    length = int.from_bytes(data[140:144], "little")
    try:
        return data + zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[144 + length :])
    except zlib.error:
        return data


def corpus_bytes(files: Iterable[CanaryFile]) -> bytes:
    """Concatenate the (inflated) bytes of corpus files (for a check that the canaries are in)."""
    out = io.BytesIO()
    for file in files:
        out.write(inflated(file.path.read_bytes()))
    return out.getvalue()

"""Raw-byte view of DICOM files for leak scans (deflated data sets are inflated first)."""

from __future__ import annotations

import zlib
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

_META_START = 128 + 4  # preamble + "DICM"
_GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL element: tag, VR, length, value


def searchable_bytes(path: str | Path) -> bytes:
    """Return the bytes a leak scan must search in ``path``.

    Parameters
    ----------
    path
        Any file.

    Returns
    -------
    bytes
        The raw bytes; for a Deflated Explicit VR Little Endian file, followed by the
        inflated data set (identifiers in it are not visible in the raw bytes).
    """
    data = Path(path).read_bytes()
    if len(data) < _META_START or data[128:132] != b"DICM":
        return data
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, EOFError, ValueError, KeyError, AttributeError):
        return data  # unreadable meta: the raw bytes are all there is
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return data
    start = _META_START + _GROUP_LENGTH_ELEMENT + int(meta.FileMetaInformationGroupLength)
    try:
        return data + zlib.decompress(data[start:], -zlib.MAX_WBITS)
    except zlib.error:
        return data

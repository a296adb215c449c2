"""Reading and writing NIfTI/NRRD volumes as bytes, keeping only pixels and geometry."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import SimpleITK as sitk

from tasks.dicom.listing import is_utf8_name
from tasks.errors import OncoflowError

#: File suffixes of the volume formats read (lower case).
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")


def volume_suffix(name: str) -> str:
    """Return the volume suffix of a file name (``.nii.gz``, ``.nii``, ``.nrrd``), or ``""``."""
    low = name.lower()
    return next((s for s in SUFFIXES if low.endswith(s)), "")


def sitk_path(path: str) -> str:
    """Return ``path`` for SimpleITK after checking it is UTF-8 text.

    SimpleITK aborts the whole Python process ("terminate called ... std::logic_error") on a
    ``str`` holding surrogate escapes, which is how Python gives back a path whose bytes are
    not UTF-8. Volumes are only handed to SimpleITK as temporary files, so such a path can
    only come from the temporary folder (``TMPDIR``).

    Raises
    ------
    OncoflowError
        One line, when the path is not UTF-8.
    """
    if not is_utf8_name(path):
        raise OncoflowError("the temporary folder's path is not UTF-8: set TMPDIR to one that is")
    return path


def read_image_bytes(data: bytes, suffix: str) -> sitk.Image:
    """Read a NIfTI or NRRD image from its bytes with SimpleITK.

    Raises
    ------
    RuntimeError
        When SimpleITK cannot read it.
    """
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return sitk.ReadImage(sitk_path(path))
    finally:
        os.unlink(path)


def clean_copy(image: sitk.Image, array: np.ndarray | None = None) -> sitk.Image:
    """Return a new image with ``image``'s geometry and pixels (or ``array``) and nothing else.

    No metadata is copied: NIfTI ``descrip``, ``aux_file``, ``intent_name``, ``db_name`` and
    NRRD key/value fields, which SimpleITK keeps in the metadata dictionary, are dropped.
    """
    pixels = sitk.GetArrayFromImage(image) if array is None else array
    out = sitk.GetImageFromArray(np.ascontiguousarray(pixels))
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    return out


def nrrd_bytes(image: sitk.Image) -> bytes:
    """Encode an image as a gzip-compressed NRRD (spacing and origin written as exact text)."""
    fd, path = tempfile.mkstemp(suffix=".nrrd")
    os.close(fd)
    try:
        sitk.WriteImage(image, sitk_path(path), useCompression=True)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)

"""File-level faults found in real PACS exports, and the grids of faulty extra series."""

from __future__ import annotations

import shutil
import struct
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from tasks.synthetic.phantoms import Grid

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
# Gaps between slices for the inconsistent-spacing series, as multiples of the nominal spacing:
# irregular, never a multiple of it (so it is not a missing slice).
IRREGULAR_GAPS = (1.0, 1.0, 1.0, 1.3, 0.7, 1.0, 1.4, 1.0, 1.0)


def write_empty(path: Path) -> None:
    """Write a zero-byte file (an interrupted copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def write_truncated(source: Path, path: Path) -> tuple[int, int]:
    """Copy ``source`` and cut the copy in the middle of its Pixel Data value.

    Only explicit VR little-endian sources with native pixel data are supported.

    Returns
    -------
    tuple
        (length of Pixel Data declared in the header, bytes of it actually present).
    """
    data = source.read_bytes()
    at = data.rindex(PIXEL_DATA_TAG + b"OW") if PIXEL_DATA_TAG + b"OW" in data else -1
    if at < 0:
        raise ValueError("source has no explicit-VR OW Pixel Data element")
    value_start = at + 12  # tag(4) VR(2) reserved(2) length(4)
    (declared,) = struct.unpack("<I", data[at + 8 : at + 12])
    kept = declared // 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: value_start + kept])
    return declared, kept


def write_text(path: Path, text: str) -> None:
    """Write a non-DICOM text file (export notes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_jpeg(path: Path, pixels: np.ndarray) -> None:
    """Write a non-DICOM JPEG thumbnail of a slice (uint8 pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)


def copy_file(source: Path, path: Path) -> None:
    """Write an exact duplicate of ``source`` under another name."""
    shutil.copyfile(source, path)


def write_dicomdir(path: Path, headers: list[Dataset], fileset_uid: str) -> None:
    """Write a DICOMDIR indexing ``headers``.

    Its file references point into a folder that is not part of the export.

    Parameters
    ----------
    path
        Target path (usually ``<site>/DICOMDIR``).
    headers
        Datasets to index (pixel data is dropped).
    fileset_uid
        File-set UID (fixed for determinism).
    """
    fs = FileSet()
    fs.UID = fileset_uid
    fs.ID = "PACSEXPORT"
    for ds in headers:
        copy = Dataset(ds)
        copy.file_meta = ds.file_meta
        if "PixelData" in copy:
            del copy.PixelData
        fs.add(copy)
    with tempfile.TemporaryDirectory() as tmp:
        fs.write(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "DICOMDIR", path)


def irregular_grid(grid: Grid) -> Grid:
    """``grid`` with slice gaps that vary beyond any tolerance (same number of slices)."""
    step = grid.offsets[1] - grid.offsets[0]
    offsets = [0.0]
    for i in range(grid.slices - 1):
        offsets.append(round(offsets[-1] + step * IRREGULAR_GAPS[i % len(IRREGULAR_GAPS)], 4))
    return replace(grid, offsets=tuple(offsets))


def localizer_grid(grid: Grid) -> Grid:
    """Return a single plane through the middle of ``grid``, orthogonal to its slices (a scout).

    Its rows run along the grid's rows and its columns against the slice normal: coronal for
    an axial head-first grid.
    """
    orientation = tuple(float(v) + 0.0 for v in (*grid.row_dir, *(-grid.normal)))
    return Grid.centred(
        orientation, grid.centre, grid.pixel_spacing, 1.0, 1, grid.rows, grid.columns
    )

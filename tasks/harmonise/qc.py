"""The QC picture: one slice through the ROI with the mask outlines, as a PNG (Pillow)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from PIL import Image

from tasks.harmonise.masks import Mask
from tasks.store import DEID_DICOM, DEID_SERIES, HARMONISED_SERIES, SiteStore

#: Outline colours, one per ROI in name order.
COLOURS = ((255, 40, 40), (40, 220, 40), (60, 140, 255), (255, 200, 0), (220, 0, 220))


def qc_slice_index(masks: list[Mask], depth: int) -> int:
    """Return the plane index with the largest area of the first mask (middle plane if none)."""
    for mask in masks:
        area = sitk.GetArrayViewFromImage(mask.image).reshape(depth, -1).sum(axis=1)
        if area.any():
            return int(np.argmax(area))
    return depth // 2


def _outline(plane: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D mask with a 4-neighbour outside the mask."""
    inside = plane.astype(bool)
    padded = np.pad(inside, 1)
    core = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & inside
    return inside & ~core


def _grey(plane: np.ndarray) -> np.ndarray:
    """Window a plane to 8 bits between its 0.5th and 99.5th percentiles."""
    plane = plane.astype(np.float64)
    lo, hi = np.percentile(plane, [0.5, 99.5]) if plane.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((plane - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def qc_png(image: sitk.Image, masks: list[Mask], max_size: int = 384) -> bytes:
    """Render the QC picture of a harmonised image and its masks.

    Parameters
    ----------
    image
        The harmonised image.
    masks
        Masks on the same grid (outlined in :data:`COLOURS`, in order).
    max_size
        Longest side of the picture in pixels (physical aspect ratio kept).

    Returns
    -------
    bytes
        PNG content (deterministic for the same input).
    """
    array = sitk.GetArrayViewFromImage(image)
    depth = array.shape[0]
    k = qc_slice_index(masks, depth)
    grey = _grey(array[k])
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    for i, mask in enumerate(masks):
        edge = _outline(sitk.GetArrayViewFromImage(mask.image)[k])
        rgb[edge] = COLOURS[i % len(COLOURS)]
    sx, sy = image.GetSpacing()[:2]
    width, height = array.shape[2] * sx, array.shape[1] * sy
    scale = max_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(rgb, mode="RGB").resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """Return PNG bytes as a ``data:`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def thumbnail_data_uri(png: bytes, size: int = 128) -> str:
    """Return a small PNG thumbnail of a QC picture as a ``data:`` URI (for markdown)."""
    picture = Image.open(io.BytesIO(png))
    picture.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def dicom_preview_png(data: bytes, max_size: int = 256) -> bytes | None:
    """Render the middle frame of one de-identified DICOM image as a grey PNG.

    For series that harmonisation quarantined (no harmonised image exists): the operator sees
    what was rejected. Only call it on objects under ``deid/`` (de-identified, burned-in text
    cleaned); returns None when the file holds no renderable pixels.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.pixel_array.astype(np.float64)
    except Exception:  # no pixel data, unsupported compression: nothing to show
        return None
    if pixels.ndim == 4 or (pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) > 1):
        return None  # colour: not a modality image
    if pixels.ndim == 3:
        pixels = pixels[pixels.shape[0] // 2]
    grey = _grey(pixels)
    picture = Image.fromarray(grey, mode="L")
    picture.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@dataclass(frozen=True)
class QuarantinedPreview:
    """The middle image of a series harmonisation quarantined (pseudonymous key, reason)."""

    series: str
    modality: str
    reason: str
    png: bytes


def quarantined_previews(
    store: SiteStore, modalities: Sequence[str] = (), limit: int = 12, size: int = 128
) -> tuple[list[QuarantinedPreview], int]:
    """Render the series that harmonisation quarantined, from their de-identified DICOM.

    Only series with status ``ok`` in ``deid/series.parquet`` and files under ``deid/``
    qualify: a series quarantined before or by de-identification (burned-in text, an
    unreadable file) has no object there and is never rendered.

    Parameters
    ----------
    store
        The site store (``harmonised/series.parquet`` written by this run).
    modalities
        Only these modalities (empty: all).
    limit
        Most series rendered (in series key order).
    size
        Longest side of each picture.

    Returns
    -------
    tuple
        The pictures and how many series harmonisation quarantined in all.
    """
    harmonised = store.read_table(HARMONISED_SERIES)
    deid = store.read_table(DEID_SERIES)
    if harmonised is None or deid is None or "paths" not in deid.column_names:
        return [], 0
    wanted = {m.upper() for m in modalities}
    rejected = sorted(
        (
            r
            for r in harmonised.to_pylist()
            if r.get("status") == "quarantined"
            and (not wanted or (r.get("modality") or "").upper() in wanted)
        ),
        key=lambda r: r["series"],
    )
    paths = {
        r["series"]: r.get("paths") or []
        for r in deid.to_pylist()
        if (r.get("status") or "ok") == "ok"
    }
    out = []
    for row in rejected[:limit]:
        files = [p for p in paths.get(row["series"], []) if p.startswith(f"{DEID_DICOM}/")]
        if not files:
            continue
        try:
            png = dicom_preview_png(store.read_bytes(files[len(files) // 2]), max_size=size)
        except FileNotFoundError:
            png = None
        if png is not None:
            reason = row.get("reason") or "quarantined"
            out.append(QuarantinedPreview(row["series"], row.get("modality") or "", reason, png))
    return out, len(rejected)

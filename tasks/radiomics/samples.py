"""Small harmonised inputs for tests and benchmarks of the extract stage.

NIfTI image + masks + ``harmonised/series.parquet``, following the harmonised contract of
``docs/tables.md``, so the extract flow reads them exactly as it reads the harmonise stage's
output. Images are textured (smoothed noise plus a lesion with its own texture) so that every
pyradiomics feature class sees more than one grey level.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import SimpleITK as sitk

from tasks.harmonise.plan import SERIES_SCHEMA
from tasks.store import HARMONISED, HARMONISED_SERIES, SiteStore

HARMONISED_SCHEMA = SERIES_SCHEMA

#: (background mean, background sd, lesion mean, lesion texture amplitude) per modality.
INTENSITY = {
    "CT": (40.0, 60.0, 80.0, 120.0),
    "MR": (300.0, 60.0, 700.0, 200.0),
    "PT": (1.0, 0.4, 6.0, 2.5),
}
UNITS = {"CT": "HU", "MR": "MR-none", "PT": "SUVbw"}

RoiKind = Literal["sphere", "empty", "one-voxel", "outside", "flat", "shifted"]


@dataclass(frozen=True)
class SampleRoi:
    """One mask of a sample series.

    Parameters
    ----------
    name
        Normalised ROI name (``mask-<name>.nii.gz``).
    radius_mm
        Radius of the spherical lesion mask.
    kind
        ``sphere`` (normal), or a defect: ``empty`` (no voxel), ``one-voxel``, ``outside`` (the
        mask's grid lies entirely outside the image), ``flat`` (a single-slice disc),
        ``shifted`` (the mask's grid is shifted by 2.5 voxels: overlapping but misaligned).
    """

    name: str
    radius_mm: float = 10.0
    kind: RoiKind = "sphere"


@dataclass(frozen=True)
class SampleSeries:
    """One sample image series with its masks.

    Parameters
    ----------
    series
        Pseudonymous series key (``2.25.<digits>``).
    modality
        ``CT``, ``MR`` or ``PT``.
    size
        Voxels (x, y, z).
    spacing
        Voxel spacing in mm (x, y, z).
    rois
        Masks to write.
    seed
        Random seed of the texture (same seed, same bytes).
    """

    series: str
    modality: str = "CT"
    size: tuple[int, int, int] = (40, 40, 20)
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)
    rois: tuple[SampleRoi, ...] = field(default_factory=lambda: (SampleRoi("gtv"),))
    seed: int = 0

    @property
    def patient(self) -> str:
        """Pseudonymous patient key derived from the series key."""
        return "p-" + hashlib.sha256(self.series.encode()).hexdigest()[:12]

    @property
    def study(self) -> str:
        """Pseudonymous study key derived from the series key."""
        return (
            "2.25." + str(int(hashlib.sha256(b"study" + self.series.encode()).hexdigest(), 16))[:30]
        )


def series_key(index: int) -> str:
    """Return a deterministic pseudonymous series key for sample ``index``."""
    digest = hashlib.sha256(f"sample-series-{index}".encode()).hexdigest()
    return "2.25." + str(int(digest, 16))[:36]


def make_image(spec: SampleSeries) -> sitk.Image:
    """Return the textured image of a sample series (CT as int16 HU, MR/PET as float32)."""
    rng = np.random.default_rng(spec.seed)
    nx, ny, nz = spec.size
    bg_mean, bg_sd, lesion_mean, lesion_amp = INTENSITY[spec.modality]
    noise = sitk.GetImageFromArray(rng.normal(0.0, 1.0, size=(nz, ny, nx)).astype(np.float32))
    noise.SetSpacing(spec.spacing)
    texture = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 1.5))
    texture /= max(float(texture.std()), 1e-6)
    fine = rng.normal(0.0, 0.3, size=(nz, ny, nx))
    arr = bg_mean + bg_sd * (0.5 * texture + fine)
    lesion = _sphere(spec, max((r.radius_mm for r in spec.rois), default=10.0) * 1.1)
    arr = np.where(lesion, lesion_mean + lesion_amp * (texture + fine), arr)
    if spec.modality == "PT":
        arr = np.clip(arr, 0.0, None)
    if spec.modality == "CT":
        image = sitk.GetImageFromArray(np.round(arr).astype(np.int16))
    else:
        image = sitk.GetImageFromArray(arr.astype(np.float32))
    image.SetSpacing(spec.spacing)
    image.SetOrigin((-0.5 * nx * spec.spacing[0], -0.5 * ny * spec.spacing[1], 0.0))
    return image


def _sphere(spec: SampleSeries, radius_mm: float, in_plane: bool = False) -> np.ndarray:
    nx, ny, nz = spec.size
    z, y, x = np.indices((nz, ny, nx), dtype=np.float64)
    sx, sy, sz = spec.spacing
    d2 = ((x - (nx - 1) / 2) * sx) ** 2 + ((y - (ny - 1) / 2) * sy) ** 2
    if not in_plane:
        d2 = d2 + ((z - (nz - 1) / 2) * sz) ** 2
    return d2 <= radius_mm**2


def make_mask(spec: SampleSeries, roi: SampleRoi, image: sitk.Image) -> sitk.Image:
    """Return the uint8 label mask (label 1) of ``roi`` on the grid of ``image``."""
    nx, ny, nz = spec.size
    arr = np.zeros((nz, ny, nx), dtype=np.uint8)
    if roi.kind in ("sphere", "outside", "shifted"):
        arr[_sphere(spec, roi.radius_mm)] = 1
    elif roi.kind == "one-voxel":
        arr[nz // 2, ny // 2, nx // 2] = 1
    elif roi.kind == "flat":
        arr[nz // 2][_sphere(spec, roi.radius_mm, in_plane=True)[nz // 2]] = 1
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(image)
    if roi.kind == "outside":
        ox, oy, oz = image.GetOrigin()
        mask.SetOrigin((ox + 10_000.0, oy, oz))
    elif roi.kind == "shifted":
        ox, oy, oz = image.GetOrigin()
        mask.SetOrigin((ox + 2.5 * spec.spacing[0], oy, oz))
    return mask


def nifti_bytes(image: sitk.Image) -> bytes:
    """Encode an image as gzip-compressed NIfTI bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        return path.read_bytes()


def write_harmonised_sample(store: SiteStore, specs: list[SampleSeries]) -> pa.Table:
    """Write sample series under ``harmonised/`` and their ``harmonised/series.parquet``.

    Parameters
    ----------
    store
        The site store to write into.
    specs
        Series to write.

    Returns
    -------
    pyarrow.Table
        The ``harmonised/series.parquet`` table as written.
    """
    rows = []
    for spec in specs:
        image = make_image(spec)
        data = nifti_bytes(image)
        image_key = f"{HARMONISED}/{spec.series}/image.nii.gz"
        store.write_bytes(image_key, data)
        mask_keys, mask_hashes = [], []
        for roi in spec.rois:
            mask_data = nifti_bytes(make_mask(spec, roi, image))
            key = f"{HARMONISED}/{spec.series}/mask-{roi.name}.nii.gz"
            store.write_bytes(key, mask_data)
            mask_keys.append(key)
            mask_hashes.append(hashlib.sha256(mask_data).hexdigest())
        rows.append(
            {
                "series": spec.series,
                "study": spec.study,
                "patient": spec.patient,
                "modality": spec.modality,
                "body_part": "CHEST",
                "manufacturer": "SYNTHETIC",
                "acquisition_date": "20200101",
                "age_at_study": "060Y",
                "sex": "O",
                "image": image_key,
                "image_sha256": hashlib.sha256(data).hexdigest(),
                "size": list(spec.size),
                "spacing": list(spec.spacing),
                "rois": [r.name for r in spec.rois],
                "masks": mask_keys,
                "mask_sha256": mask_hashes,
                "intensity": UNITS[spec.modality],
                "status": "ok",
                "reason": "",
            }
        )
    rows.sort(key=lambda r: r["series"])
    table = pa.Table.from_pylist(rows, schema=HARMONISED_SCHEMA)
    store.write_table(HARMONISED_SERIES, table)
    return table

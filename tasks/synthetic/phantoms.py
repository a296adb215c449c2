"""Image grids and textured phantoms evaluated in patient coordinates (LPS, mm).

A phantom is a continuous function of the patient position, so CT, MR and PET grids of any
spacing or orientation sample the same anatomy and the same lesions. Lesions are ellipsoids
whose inside carries band-limited texture (a sum of random plane waves) and a linear gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Tissue values per modality: (mean, noise sd). PET values are SUVbw.
TISSUE: dict[str, dict[str, tuple[float, float]]] = {
    "CT": {
        "air": (-1000.0, 4.0),
        "body": (40.0, 12.0),
        "lung": (-820.0, 25.0),
        "bone": (450.0, 30.0),
    },
    "MR": {"air": (2.0, 2.0), "body": (320.0, 15.0), "lung": (40.0, 8.0), "bone": (520.0, 20.0)},
    "PT": {"air": (0.02, 0.01), "body": (1.0, 0.08), "lung": (0.35, 0.04), "bone": (1.6, 0.1)},
}
# Lesion values per modality: (mean, texture amplitude, gradient amplitude).
LESION: dict[str, tuple[float, float, float]] = {
    "CT": (45.0, 35.0, 25.0),
    "MR": (780.0, 140.0, 80.0),
    "PT": (6.0, 1.8, 1.2),
}
BODY_SEMI_AXES = (150.0, 100.0)
LUNGS = (((-75.0, -5.0), (55.0, 65.0)), ((75.0, -5.0), (55.0, 65.0)))
SPINE = ((0.0, 75.0), 18.0)


def ds_str(value: float, decimals: int = 4) -> str:
    """Format ``value`` as a short DS string (at most ``decimals`` decimals, no ``-0``)."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True)
class Grid:
    """A stack of parallel image planes.

    Parameters
    ----------
    orientation
        ImageOrientationPatient (row direction, column direction).
    first_position
        ImagePositionPatient of the slice with the smallest offset along the normal.
    pixel_spacing
        PixelSpacing (row spacing, column spacing) in mm.
    offsets
        Offset of each slice along the normal from ``first_position``, ascending, in mm.
    rows, columns
        Matrix size.
    """

    orientation: tuple[float, ...]
    first_position: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    offsets: tuple[float, ...]
    rows: int
    columns: int

    @classmethod
    def centred(
        cls,
        orientation: tuple[float, ...],
        centre: tuple[float, float, float],
        pixel_spacing: tuple[float, float],
        slice_spacing: float,
        slices: int,
        rows: int,
        columns: int,
    ) -> Grid:
        """Build an evenly spaced grid whose centre is ``centre``."""
        row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
        normal = np.cross(row_dir, col_dir)
        first = (
            np.array(centre)
            - row_dir * pixel_spacing[1] * (columns - 1) / 2
            - col_dir * pixel_spacing[0] * (rows - 1) / 2
            - normal * slice_spacing * (slices - 1) / 2
        )
        first = tuple(round(float(v), 4) for v in first)
        offsets = tuple(round(k * slice_spacing, 4) for k in range(slices))
        return cls(tuple(orientation), first, pixel_spacing, offsets, rows, columns)  # type: ignore[arg-type]

    @property
    def row_dir(self) -> np.ndarray:
        """Direction of increasing column index."""
        return np.array(self.orientation[:3])

    @property
    def col_dir(self) -> np.ndarray:
        """Direction of increasing row index."""
        return np.array(self.orientation[3:])

    @property
    def normal(self) -> np.ndarray:
        """Slice normal (row direction x column direction)."""
        return np.cross(self.row_dir, self.col_dir)

    @property
    def slices(self) -> int:
        """Number of slices."""
        return len(self.offsets)

    def position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``k``, rounded to 4 decimals."""
        pos = np.array(self.first_position) + self.normal * self.offsets[k]
        return tuple(round(float(v), 4) + 0.0 for v in pos)  # type: ignore[return-value]

    @property
    def centre(self) -> tuple[float, float, float]:
        """Patient coordinates of the centre of the volume."""
        middle = (np.array(self.position(0)) + np.array(self.position(self.slices - 1))) / 2
        middle += self.row_dir * self.pixel_spacing[1] * (self.columns - 1) / 2
        middle += self.col_dir * self.pixel_spacing[0] * (self.rows - 1) / 2
        return tuple(round(float(v), 4) for v in middle)  # type: ignore[return-value]

    def points(self) -> np.ndarray:
        """Patient coordinates of every voxel centre, shape (slices, rows, columns, 3)."""
        k = np.array([self.position(k) for k in range(self.slices)])[:, None, None, :]
        j = np.arange(self.rows)[None, :, None, None] * self.pixel_spacing[0]
        i = np.arange(self.columns)[None, None, :, None] * self.pixel_spacing[1]
        return k + j * self.col_dir + i * self.row_dir

    def sitk_geometry(self) -> dict[str, tuple[float, ...] | tuple[int, ...]]:
        """Size, spacing, origin and direction as SimpleITK reports them."""
        r, c, n = self.row_dir, self.col_dir, self.normal
        step = self.offsets[1] - self.offsets[0] if self.slices > 1 else 1.0
        direction = np.stack([r, c, n], axis=1).ravel()
        return {
            "size": (self.columns, self.rows, self.slices),
            "spacing": (self.pixel_spacing[1], self.pixel_spacing[0], round(step, 4)),
            "origin": self.position(0),
            "direction": tuple(float(v) + 0.0 for v in direction),
        }


@dataclass(frozen=True, eq=False)
class Lesion:
    """An axis-aligned textured ellipsoid.

    Parameters
    ----------
    centre, semi_axes
        Centre and semi-axes (x, y, z) in patient mm.
    waves, phases
        Plane-wave texture: wave vectors in cycles/mm (K, 3) and phases (K,).
    gradient
        Gradient direction (unit vector) of the linear intensity ramp.
    """

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    waves: np.ndarray = field(repr=False)
    phases: np.ndarray = field(repr=False)
    gradient: tuple[float, float, float] = (0.0, 0.0, 1.0)

    @property
    def volume_mm3(self) -> float:
        """Analytic volume 4/3 pi abc."""
        a, b, c = self.semi_axes
        return 4.0 / 3.0 * math.pi * a * b * c

    def scaled(self, factor: float) -> Lesion:
        """Return the same lesion with semi-axes multiplied by ``factor``."""
        semi = tuple(round(s * factor, 2) for s in self.semi_axes)
        return Lesion(self.centre, semi, self.waves, self.phases, self.gradient)  # type: ignore[arg-type]

    def radius2(self, points: np.ndarray) -> np.ndarray:
        """Normalised squared radius: < 1 inside, 1 on the surface."""
        q = (points - np.array(self.centre)) / np.array(self.semi_axes)
        return np.einsum("...i,...i->...", q, q)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Boolean mask of points inside the ellipsoid."""
        return self.radius2(points) <= 1.0

    def texture(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Texture in about [-2, 2] (unit variance) plus the ramp in [-1, 1]."""
        rel = points - np.array(self.centre)
        arg = 2 * math.pi * np.tensordot(rel, self.waves.T, axes=1) + self.phases
        waves = np.cos(arg).sum(axis=-1) / math.sqrt(len(self.phases) / 2)
        ramp = np.tensordot(rel / np.array(self.semi_axes), np.array(self.gradient), axes=1)
        return np.clip(waves, -2.0, 2.0), np.clip(ramp, -1.0, 1.0)

    def cross_section(
        self, origin: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray, n_points: int = 36
    ) -> np.ndarray | None:
        """Polygon where the plane through ``origin`` spanned by the directions cuts the surface.

        Returns
        -------
        numpy.ndarray or None
            Points (n_points, 3) in patient mm on the ellipsoid surface, or None when the plane
            misses the lesion or grazes it (cross-section radius below 0.5 mm).
        """
        s = np.array(self.semi_axes)
        a = (origin - np.array(self.centre)) / s
        b, d = row_dir / s, col_dir / s
        quad = np.array([[b @ b, b @ d], [b @ d, d @ d]])
        lin = np.array([a @ b, a @ d])
        centre_uv = -np.linalg.solve(quad, lin)
        value = a @ a - 1.0 + lin @ centre_uv
        if value >= 0:
            return None
        theta = np.linspace(0.0, 2 * math.pi, n_points, endpoint=False)
        e = np.stack([np.cos(theta), np.sin(theta)], axis=1)
        t = np.sqrt(-value / np.einsum("ni,ij,nj->n", e, quad, e))
        if t.min() < 0.5:
            return None
        uv = centre_uv + t[:, None] * e
        return origin + uv[:, :1] * row_dir + uv[:, 1:] * col_dir


def random_lesion(rng: np.random.Generator, side: int, z_centre: float) -> Lesion:
    """Draw a lesion inside the left (``side=1``) or right (``side=-1``) lung near ``z_centre``."""
    centre = (
        round(side * 75.0 + rng.uniform(-12, 12), 2),
        round(-5.0 + rng.uniform(-12, 12), 2),
        round(z_centre + rng.uniform(-22, 22), 2),
    )
    semi = tuple(round(float(v), 2) for v in rng.uniform(10.0, 18.0, size=3))
    k = 12
    directions = rng.normal(size=(k, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    waves = directions / rng.uniform(6.0, 14.0, size=(k, 1))
    gradient = rng.normal(size=3)
    gradient /= np.linalg.norm(gradient)
    return Lesion(
        centre,  # type: ignore[arg-type]
        semi,  # type: ignore[arg-type]
        waves,
        rng.uniform(0, 2 * math.pi, size=k),
        tuple(float(g) for g in gradient),  # type: ignore[arg-type]
    )


def _ellipse(
    points: np.ndarray, centre: tuple[float, float], semi: tuple[float, float]
) -> np.ndarray:
    x = (points[..., 0] - centre[0]) / semi[0]
    y = (points[..., 1] - centre[1]) / semi[1]
    return x * x + y * y <= 1.0


def render(
    grid: Grid, modality: str, lesions: list[Lesion], rng: np.random.Generator
) -> np.ndarray:
    """Sample the phantom on ``grid``.

    Parameters
    ----------
    grid
        Image grid.
    modality
        ``CT`` (HU), ``MR`` (arbitrary units) or ``PT`` (SUVbw).
    lesions
        Lesions to paint over the anatomy.
    rng
        Generator for the voxel noise.

    Returns
    -------
    numpy.ndarray
        Float64 values of shape (slices, rows, columns).
    """
    pts = grid.points()
    tissue = TISSUE[modality]
    labels = np.zeros(pts.shape[:-1], dtype=np.int8)  # 0 air
    labels[_ellipse(pts, (0.0, 0.0), BODY_SEMI_AXES)] = 1
    for centre, semi in LUNGS:
        labels[_ellipse(pts, centre, semi)] = 2
    labels[_ellipse(pts, SPINE[0], (SPINE[1], SPINE[1]))] = 3
    means = np.array([tissue[t][0] for t in ("air", "body", "lung", "bone")])
    sds = np.array([tissue[t][1] for t in ("air", "body", "lung", "bone")])
    values = means[labels] + sds[labels] * rng.standard_normal(labels.shape)
    mean, amp, grad = LESION[modality]
    for lesion in lesions:
        inside = lesion.inside(pts)
        waves, ramp = lesion.texture(pts[inside])
        noise = tissue["body"][1] * rng.standard_normal(waves.shape)
        values[inside] = mean + amp * waves + grad * ramp + noise
    return values

"""Series → volume: oncoflow's checked reader against a plain SimpleITK ImageSeriesReader.

Both read the same CT series from the same folder in the same run. The baseline is what a
script would do without checks: ``ImageSeriesReader.GetGDCMSeriesFileNames`` (GDCM sorts the
files by position) then ``ImageSeriesReader.Execute``. oncoflow reads every file with pydicom,
orders planes along the normal, checks orientation, matrix, spacing, missing slices and tilt,
applies rescale per plane and builds the SimpleITK image
(:func:`tasks.harmonise.volume.read_volume`).

Usage::

    uv run python benchmarks/harmonise.py [--slices 120] [--size 512] [--repeat 5]

Prints the median times and the ratio baseline/oncoflow (target >= 0.8, i.e. the checks cost
at most 25 %). Also checks that both produce the same voxels and geometry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.runtime import pin_native_threads
from tasks.harmonise.config import HarmoniseConfig
from tasks.harmonise.volume import read_volume
from tests.dicom_factory import Geometry, image_series, oblique_direction


def write_series(folder: Path, slices: int, size: int) -> list[Path]:
    """Write a CT series (int16, oblique, random texture) and return its files (shuffled)."""
    g = Geometry(
        size=(size, size, slices),
        spacing=(0.7, 0.7, 1.25),
        origin=(-180.0, -170.0, -75.0),
        direction=oblique_direction(12.0, (1, 0, 0)),
    )
    rng = np.random.default_rng(0)
    values = rng.integers(-1024, 2000, size=(slices, size, size)).astype(np.float64)
    paths = []
    for i, ds in enumerate(image_series(values, g, series_key="bench")):
        path = folder / f"{rng.integers(1 << 30):010d}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def baseline(folder: Path) -> sitk.Image:
    """Plain SimpleITK: GDCM sorts the series, ImageSeriesReader reads it."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def oncoflow(paths: list[Path], config: HarmoniseConfig) -> sitk.Image:
    """oncoflow's checked reader on the same files."""
    return read_volume([pydicom.dcmread(p) for p in paths], config).image


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    pin_native_threads()
    config = HarmoniseConfig()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_series(folder, args.slices, args.size)
        # Warm both paths (imports, page cache), interleave the measured runs.
        baseline(folder)
        oncoflow(paths, config)
        t_base, t_ours = [], []
        ref = ours = None
        for _ in range(args.repeat):
            t, ref = timed(lambda: baseline(folder), 1)
            t_base.append(t)
            t, ours = timed(lambda: oncoflow(paths, config), 1)
            t_ours.append(t)
    assert isinstance(ref, sitk.Image) and isinstance(ours, sitk.Image)
    same_voxels = np.array_equal(sitk.GetArrayViewFromImage(ref), sitk.GetArrayViewFromImage(ours))
    geometry_delta = max(
        float(np.max(np.abs(np.array(ref.GetOrigin()) - ours.GetOrigin()))),
        float(np.max(np.abs(np.array(ref.GetDirection()) - ours.GetDirection()))),
        float(np.max(np.abs(np.array(ref.GetSpacing()) - ours.GetSpacing()))),
    )
    base, mine = statistics.median(t_base), statistics.median(t_ours)
    mb = args.slices * args.size * args.size * 2 / 1e6
    print(f"series: {args.slices} slices of {args.size}x{args.size} int16 ({mb:.0f} MB), oblique")
    print(f"baseline  SimpleITK ImageSeriesReader (GDCM sort + read): {base * 1000:8.1f} ms")
    print(f"oncoflow  read_volume (pydicom + checks + rescale):      {mine * 1000:8.1f} ms")
    print(f"same voxels: {same_voxels}; max geometry difference: {geometry_delta:.2e}")
    print(f"ratio baseline/oncoflow: {base / mine:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()

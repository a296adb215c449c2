"""Check the extract stage's filters against what the site has, before any work starts.

A filter that selects nothing is almost always a typo (``--roi GTV`` for ``gtv``, a series key
from another site, ``--modality MR`` on a CT-only site): the run stops with one line naming
what exists instead of exiting cleanly with an empty result. ROI names compare
case-insensitively. A ``label`` setting other than the harmonised masks' label is refused the
same way: harmonised masks are 0/1 images, one per ROI, so any other label would quarantine
every ROI and give a table without a feature column.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.errors import OncoflowError, did_you_mean
from tasks.radiomics.extract import RoiUnit, select_units
from tasks.radiomics.params import RadiomicsParams
from tasks.store import SiteStore

#: How many names an error message lists before "...".
LIST_LIMIT = 12


def _names(values: Sequence[str]) -> str:
    shown = ", ".join(values[:LIST_LIMIT])
    return shown + (f", ... ({len(values)} in all)" if len(values) > LIST_LIMIT else "")


def inventory(units: Sequence[RoiUnit]) -> str:
    """Describe the harmonised (series, ROI) units in one line, without identifiers.

    Examples
    --------
    ``3 harmonised series (CT 2, MR 1); ROIs: gtv, lung``
    """
    by_series = {u.series: u.modality or "?" for u in units}
    if not by_series:
        return "no harmonised series with an ROI mask"
    modalities = Counter(by_series.values())
    rois = sorted({u.roi for u in units})
    mods = ", ".join(f"{m} {n}" for m, n in sorted(modalities.items()))
    return f"{len(by_series)} harmonised series ({mods}); ROIs: {_names(rois)}"


def check_selection(
    units: Sequence[RoiUnit],
    series: Sequence[str] = (),
    rois: Sequence[str] = (),
    modalities: Sequence[str] = (),
) -> list[RoiUnit]:
    """Return the selected units; raise when a filter the user gave matches nothing.

    Parameters
    ----------
    units
        Every harmonised unit of the site.
    series, rois, modalities
        The filters the user gave (empty: not given). ROI names and modalities compare
        case-insensitively.

    Returns
    -------
    list of RoiUnit
        The units every filter keeps.

    Raises
    ------
    OncoflowError
        One line naming the filter that matches nothing and what the site has.
    """
    have = inventory(units)
    present_series = {u.series for u in units}
    unknown_series = [s for s in series if s not in present_series]
    if unknown_series:
        raise OncoflowError(
            f"--series {unknown_series[0]}: no harmonised series with this key "
            f"(the site has {have})"
        )
    present_rois = sorted({u.roi for u in units})
    lower = {r.lower() for r in present_rois}
    unknown_rois = [r for r in rois if r.lower() not in lower]
    if unknown_rois:
        raise OncoflowError(
            f"--roi {unknown_rois[0]}: no ROI of this name{did_you_mean(unknown_rois[0], lower)} "
            f"(the site has {have})"
        )
    present_mods = {u.modality.upper() for u in units}
    unknown_mods = [m for m in modalities if m.upper() not in present_mods]
    if unknown_mods:
        raise OncoflowError(
            f"--modality {unknown_mods[0].upper()}: no harmonised series of this modality "
            f"(the site has {have})"
        )
    selected = select_units(list(units), list(series), list(rois), list(modalities))
    if not selected:
        raise OncoflowError(f"the filters together match no (series, ROI) (the site has {have})")
    return selected


def mask_labels(store: SiteStore, unit: RoiUnit) -> list[int]:
    """Return the non-zero labels of one harmonised mask."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="oncoflow-mask-") as tmp:
        path = Path(tmp) / "mask.nii.gz"
        path.write_bytes(store.read_bytes(unit.mask))
        array = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
        return [int(v) for v in np.unique(array) if v != 0]


def check_label(store: SiteStore, units: Sequence[RoiUnit], params: RadiomicsParams) -> None:
    """Refuse a ``label`` setting that no harmonised mask carries.

    Harmonised masks are 0/1 images (one file per ROI), so only label 1 has voxels. The labels
    present are read from the first selected mask, so the message shows them, not a guess.

    Raises
    ------
    OncoflowError
        When ``setting.label`` (or an image type's override) is not a label present.
    """
    wanted = {params.setting.label or 1}
    for overrides in params.imageType.values():
        if overrides is not None and overrides.label is not None:
            wanted.add(overrides.label)
    if wanted <= {1} or not units:
        return
    present = mask_labels(store, units[0])
    missing = sorted(wanted - set(present))
    if missing:
        rois = sorted({u.roi for u in units})
        raise OncoflowError(
            f"setting.label {missing[0]}: no harmonised mask has a voxel with this label "
            f"(labels present: {', '.join(map(str, present)) or 'none'}; each ROI is its own "
            f"0/1 mask: choose ROIs with --roi, the site has {_names(rois)})"
        )

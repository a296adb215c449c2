"""The per-series task on a local store: outputs, provenance, idempotence, quarantine, plan."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from tasks.errors import OncoflowError
from tasks.harmonise.config import HarmoniseConfig, load_config
from tasks.harmonise.plan import plan_units, series_table
from tasks.harmonise.series import harmonise_series, nifti_bytes
from tasks.records import Reason, Status
from tasks.store import SiteStore
from tests.dicom_factory import (
    Geometry,
    add_pet,
    deid_store,
    image_series,
    oblique_direction,
    rtstruct,
    segmentation,
    sphere_contours,
)

REPO = Path(__file__).resolve().parents[2]
G = Geometry(size=(28, 26, 12), spacing=(1.0, 1.0, 2.0), origin=(-14, -13, -11))
G_OBL = Geometry(
    size=(24, 24, 10), spacing=(1.2, 1.2, 2.5), origin=(3, -20, 7), direction=oblique_direction(20)
)


def ct_with_rtstruct(key: str, roi: str = "GTV-1", shift=(0.0, 0.0, 0.0)):
    centre = G.physical(np.array([14.2, 12.7, 5.6]))
    hu = np.where(np.linalg.norm(G.points() - centre, axis=-1) <= 6, 60.0, -800.0)
    images = image_series(hu, G, series_key=key)
    contours = [c + np.array(shift) for c in sphere_contours(G, centre, 6.0, 48)]
    return images, rtstruct(images, {roi: contours, "Body": sphere_contours(G, centre, 9.0)})


def cases() -> dict[str, dict]:
    ct, rt = ct_with_rtstruct("ct")
    pet_vals = np.full(G_OBL.size[::-1], 2000.0)
    pet_vals[4:7, 8:14, 8:14] = 20000.0
    pet = add_pet(
        image_series(pet_vals, G_OBL, modality="PT", slope=1.0, intercept=0.0, series_key="pt")
    )
    mask = np.zeros(G_OBL.size[::-1], np.uint8)
    mask[4:7, 8:14, 8:14] = 1
    seg = segmentation(pet, {"Tumour": mask})
    gap_ct, _ = ct_with_rtstruct("gap")
    del gap_ct[5]
    return {
        "ct": {"datasets": ct},
        "ct-rt": {"datasets": [rt], "kind": "rtstruct", "refs": ["ct"]},
        "pet": {"datasets": pet},
        "pet-seg": {"datasets": [seg], "kind": "seg", "refs": ["pet"]},
        "gap": {"datasets": gap_ct},
        "orphan-rt": {
            "datasets": [ct_with_rtstruct("x")[1]],
            "kind": "rtstruct",
            "raw_refs": ["2.25.1"],
        },
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The de-identified input store, written once per module (tests get a copy)."""
    root = tmp_path_factory.mktemp("template")
    return root, deid_store(SiteStore(str(root), "site-a"), cases())


def copy_store(template: tuple[Path, dict[str, str]], target: Path) -> SiteStore:
    shutil.copytree(template[0], target)
    return SiteStore(str(target), "site-a")


@pytest.fixture()
def store(template, tmp_path: Path) -> tuple[SiteStore, dict[str, str]]:
    return copy_store(template, tmp_path / "store"), template[1]


def run_all(store: SiteStore, config: HarmoniseConfig | None = None):
    config = config or HarmoniseConfig()
    units, records = plan_units(store)
    return {u.series: harmonise_series(store, u, config) for u in units}, records


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_plan_units_from_deid_table(store) -> None:
    site, keys = store
    units, records = plan_units(site)
    assert [u.series for u in units] == sorted([keys["ct"], keys["pet"], keys["gap"]])
    by_key = {u.series: u for u in units}
    assert [s.kind for s in by_key[keys["ct"]].segmentations] == ["rtstruct"]
    assert [s.kind for s in by_key[keys["pet"]].segmentations] == ["seg"]
    assert by_key[keys["ct"]].meta["age_at_study"] == "061Y"
    assert len(by_key[keys["ct"]].keys) == 12
    assert [(r.item, r.reason) for r in records] == [
        (keys["orphan-rt"], Reason.MISSING_REFERENCED_SERIES)
    ]


def test_plan_without_deid_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(OncoflowError, match="has no site 'site-b'"):
        plan_units(SiteStore(str(tmp_path), "site-b"))
    (tmp_path / "site-b").mkdir()
    with pytest.raises(OncoflowError, match="run `oncoflow deidentify` first"):
        plan_units(SiteStore(str(tmp_path), "site-b"))


def test_outputs_provenance_and_quarantine(store) -> None:
    site, keys = store
    outcomes, _ = run_all(site)
    ct = outcomes[keys["ct"]]
    assert ct.result.status == Status.OK and ct.result.computed
    assert ct.row["rois"] == ["gtv"] and ct.row["intensity"] == "HU"
    assert ct.row["size"] == [28, 26, 12] and ct.row["spacing"] == [1.0, 1.0, 2.0]
    root = Path(site.path(f"harmonised/{keys['ct']}"))
    assert sorted(p.name for p in root.iterdir()) == [
        "image.nii.gz",
        "mask-gtv.nii.gz",
        "provenance.json",
        "qc.png",
    ]
    image = sitk.ReadImage(str(root / "image.nii.gz"))
    mask = sitk.ReadImage(str(root / "mask-gtv.nii.gz"))
    arr = sitk.GetArrayFromImage(image)
    assert image.GetPixelID() == sitk.sitkInt16
    assert set(np.unique(arr).tolist()) == {-800, 60}
    np.testing.assert_allclose(image.GetOrigin(), G.origin, atol=1e-4)
    assert mask.GetSize() == image.GetSize()
    m = sitk.GetArrayFromImage(mask).astype(bool)
    assert (arr[m] == 60).mean() > 0.97  # the mask covers the bright ball
    assert gzip.decompress((root / "image.nii.gz").read_bytes())  # valid gzip; mtime 0:
    assert (root / "image.nii.gz").read_bytes()[4:8] == b"\0\0\0\0"

    prov = json.loads((root / "provenance.json").read_text())
    assert prov["series"] == keys["ct"]
    assert [s["name"] for s in prov["steps"]] == ["read-series", "rtstruct-masks", "intensity"]
    assert len(prov["steps"][0]["inputs"]) == 12
    assert prov["packages"]["SimpleITK"] and prov["code_version"].startswith(
        prov["packages"]["oncoflow"]
    )
    assert prov["outputs"]["files"]["image.nii.gz"] == ct.row["image_sha256"]
    assert prov["steps"][1]["parameters"]["ignored_rois"] == 1  # "Body" is not mapped

    qc = Image.open(root / "qc.png")
    pixels = np.asarray(qc.convert("RGB"))
    assert ((pixels == [255, 40, 40]).all(axis=-1)).sum() > 10  # red outline drawn

    pet = outcomes[keys["pet"]]
    assert pet.row["intensity"] == "SUVbw" and pet.row["rois"] == ["gtv"]
    suv = sitk.GetArrayFromImage(sitk.ReadImage(site.path(pet.row["image"])))
    factor = 75000 / (370e6 * 2 ** (-3600 / 6586.2))
    assert suv.max() == pytest.approx(20000 * factor, rel=1e-5)

    gap = outcomes[keys["gap"]]
    assert gap.result.status == Status.QUARANTINED and gap.row["reason"] == "missing-slice"
    assert [(r.kind, r.reason) for r in gap.quarantine] == [("series", Reason.MISSING_SLICE)]
    assert not Path(site.path(f"harmonised/{keys['gap']}")).exists()

    table = series_table([o.row for o in outcomes.values()])
    assert table.column("series").to_pylist() == sorted(outcomes)
    assert table.schema.field("size").type.value_type.bit_width == 64


def test_rerun_writes_nothing_and_bytes_are_deterministic(store, template, tmp_path: Path) -> None:
    site, _ = store
    run_all(site)
    before = snapshot(Path(site.path("harmonised")))
    outcomes, _ = run_all(site)
    assert all(not o.result.computed for o in outcomes.values() if o.result.status == Status.OK)
    assert snapshot(Path(site.path("harmonised"))) == before
    # A fresh store with the same input gives byte-identical outputs.
    other = copy_store(template, tmp_path / "other")
    run_all(other)
    again = {k: v[1] for k, v in snapshot(Path(other.path("harmonised"))).items()}
    assert again == {k: v[1] for k, v in before.items()}


def test_config_change_recomputes_and_removes_stale_masks(store) -> None:
    site, keys = store
    run_all(site)
    root = Path(site.path(f"harmonised/{keys['ct']}"))
    spaced = HarmoniseConfig(target_spacing=(2.0, 2.0, 2.0), roi_map={"tumour": ["gtv.*"]})
    outcomes, _ = run_all(site, spaced)
    ct = outcomes[keys["ct"]]
    assert ct.result.computed and ct.row["rois"] == ["tumour"]
    assert ct.row["spacing"] == [2.0, 2.0, 2.0] and ct.row["size"] == [14, 13, 12]
    assert sorted(p.name for p in root.iterdir()) == [
        "image.nii.gz",
        "mask-tumour.nii.gz",
        "provenance.json",
        "qc.png",
    ]
    prov = json.loads((root / "provenance.json").read_text())
    assert prov["config"]["target_spacing"] == [2.0, 2.0, 2.0]
    assert "resample" in [s["name"] for s in prov["steps"]]


def test_mask_problems_quarantine_series_or_mask(tmp_path: Path) -> None:
    site = SiteStore(str(tmp_path / "s"), "site-a")
    ct, rt_out = ct_with_rtstruct("o", shift=(400.0, 0.0, 0.0))
    ct2, _ = ct_with_rtstruct("p")
    centre = G.physical(np.array([14.2, 12.7, 5.6]))
    good = sphere_contours(G, centre, 6.0, 48)
    far = [c + np.array([0.0, 400.0, 0.0]) for c in good]
    rt_mixed = rtstruct(ct2, {"GTV": good, "Lesion-2": far})
    keys = deid_store(
        site,
        {
            "out": {"datasets": ct},
            "out-rt": {"datasets": [rt_out], "kind": "rtstruct", "refs": ["out"]},
            "mixed": {"datasets": ct2},
            "mixed-rt": {"datasets": [rt_mixed], "kind": "rtstruct", "refs": ["mixed"]},
        },
    )
    config = HarmoniseConfig(roi_map={"gtv": ["gtv(-1)?"], "second": [r"lesion-\d"]})
    outcomes, _ = run_all(site, config)
    out = outcomes[keys["out"]]
    assert out.result.status == Status.QUARANTINED
    assert out.result.reason == "mask-outside-image"
    mixed = outcomes[keys["mixed"]]
    assert mixed.result.status == Status.OK and mixed.row["rois"] == ["gtv"]
    assert [(r.item, r.kind, r.reason) for r in mixed.quarantine] == [
        (f"{keys['mixed']}/second", "mask", Reason.MASK_OUTSIDE_IMAGE)
    ]
    # Skipped on re-run, the mask problem is still reported.
    again, _ = run_all(site, config)
    assert not again[keys["mixed"]].result.computed
    assert again[keys["mixed"]].quarantine == mixed.quarantine


def test_default_yaml_equals_model_defaults_and_errors(tmp_path: Path) -> None:
    assert load_config(REPO / "deployments/harmonise/config.yaml") == HarmoniseConfig()
    assert HarmoniseConfig().normalise_roi("Tumour") == "gtv"
    assert HarmoniseConfig().normalise_roi(" GTV-1 ") == "gtv"
    assert HarmoniseConfig().normalise_roi("gtv") == "gtv"
    assert HarmoniseConfig().normalise_roi("CTV") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("target_spacing: [1, 0, 1]\n")
    with pytest.raises(OncoflowError, match="target_spacing"):
        load_config(bad)
    bad.write_text("roi_map: {GTV: ['x']}\n")
    with pytest.raises(OncoflowError, match="roi_map"):
        load_config(bad)
    bad.write_text("unknown_key: 1\n")
    with pytest.raises(OncoflowError, match="unknown_key"):
        load_config(bad)
    with pytest.raises(OncoflowError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_nifti_bytes_are_deterministic_and_readable() -> None:
    image = sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    image.SetDirection(oblique_direction(15))
    image.SetOrigin((1.5, -2.0, 3.25))
    a, b = nifti_bytes(image), nifti_bytes(image)
    assert a == b
    back = sitk.ReadImage(_tmp_nii(a))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)


def _tmp_nii(data: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False) as fh:
        fh.write(data)
    return fh.name


def test_qc_png_is_an_image() -> None:
    from tasks.harmonise.masks import Mask
    from tasks.harmonise.qc import qc_png, thumbnail_data_uri

    image = sitk.GetImageFromArray(
        np.random.default_rng(0).normal(size=(5, 20, 30)).astype(np.float32)
    )
    image.SetSpacing((1.0, 2.0, 3.0))
    arr = np.zeros((5, 20, 30), np.uint8)
    arr[3, 5:10, 10:20] = 1
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(image)
    png = qc_png(image, [Mask("gtv", mask)], max_size=120)
    picture = Image.open(io.BytesIO(png))
    assert picture.size == (90, 120)  # 30 mm wide, 40 mm high
    assert qc_png(image, [Mask("gtv", mask)], max_size=120) == png
    assert thumbnail_data_uri(png).startswith("data:image/png;base64,")


def test_seg_preferred_over_rtstruct_for_the_same_roi(tmp_path: Path) -> None:
    site = SiteStore(str(tmp_path / "s"), "site-a")
    ct, rt = ct_with_rtstruct("both")
    box = np.zeros(G.size[::-1], np.uint8)
    box[4:7, 10:15, 11:17] = 1
    seg = segmentation(ct, {"GTV-1": box})
    keys = deid_store(
        site,
        {
            "ct": {"datasets": ct},
            "rt": {"datasets": [rt], "kind": "rtstruct", "refs": ["ct"]},
            "seg": {"datasets": [seg], "kind": "seg", "refs": ["ct"]},
        },
    )
    outcomes, _ = run_all(site)
    row = outcomes[keys["ct"]].row
    assert row["rois"] == ["gtv"]
    mask = sitk.ReadImage(site.path(row["masks"][0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), box)
    prov = json.loads(site.read_bytes(f"harmonised/{keys['ct']}/provenance.json"))
    names = [s["name"] for s in prov["steps"]]
    assert names == ["read-series", "seg-masks", "rtstruct-masks", "select-masks", "intensity"]


def test_deleted_output_is_recomputed_and_stale_folders_removed(store) -> None:
    from tasks.harmonise.plan import remove_stale

    site, keys = store
    run_all(site)
    mask = Path(site.path(f"harmonised/{keys['ct']}/mask-gtv.nii.gz"))
    content = mask.read_bytes()
    mask.unlink()
    outcomes, _ = run_all(site)
    assert outcomes[keys["ct"]].result.computed
    assert not outcomes[keys["pet"]].result.computed
    assert mask.read_bytes() == content
    site.write_bytes("harmonised/2.25.999/image.nii.gz", b"old")
    site.write_table("harmonised/series.parquet", series_table([]))
    removed = remove_stale(site, {keys["ct"], keys["pet"]})
    assert removed == 1
    names = sorted(p.name for p in Path(site.path("harmonised")).iterdir())
    assert names == sorted([keys["ct"], keys["pet"], "series.parquet"])


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("gantry_tilt: sideways\n")
    for args, needle in [
        (["--store", str(tmp_path), "--config", str(bad)], "gantry_tilt"),
        (["--store", str(tmp_path)], "has no site 'site-x'"),
        (["--store", str(tmp_path / "nowhere")], "does not exist"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["harmonise", "--site", "site-x", *args])
        assert info.value.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]

"""A NIfTI/NRRD cohort from a cases CSV through ingest, deidentify, harmonise and extract.

The cases are pyradiomics' own sample images, cropped (tests/data/volumes/make_cases.py), with
patient names and birth dates planted in the CSV, the file names and every header field. The
features must equal pyradiomics run directly on the same files, and nothing of the inputs'
identities may reach the de-identified zone or later outputs.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from radiomics.featureextractor import RadiomicsFeatureExtractor

from flows.deidentify import build_params as deid_params
from flows.deidentify import deidentify
from flows.extract import build_params as extract_params
from flows.extract import extract_radiomics
from flows.harmonise import build_params as harmonise_params
from flows.harmonise import harmonise
from flows.runtime import RuntimeOptions, dask_cluster
from flows.volumes import ingest_volumes
from tasks.deid.pseudonyms import SiteKeys
from tasks.store import SiteStore
from tasks.volumes.cases import (
    CATALOG_VOLUMES,
    cases_from_folder,
    is_volume_source,
    read_cases_csv,
)
from tasks.volumes.deid import plan_volume_jobs, volume_series_uid

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "volumes"
SITE = "site-n"
SECRET = "volumes-secret-0123456789-abcdefghijklmnopqrstuv"
PARAMS = {
    "setting": {"binWidth": 25, "label": 1},
    "imageType": {"Original": {}},
    "featureClass": {c: [] for c in ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm")},
}
#: What must never leave the private catalogue: names, dates, file stems, header text.
IDENTITIES = [
    "Παπαδόπουλος", "Γεώργιος", "Петрова", "Ивана", "Изследване", "Wójcik", "Zofia",
    "Szőke", "Árpád", "Siobhán", "Bhriain", "Papadopoulos", "Petrova", "Wojcik", "Szoke",
    "Ni_Bhriain", "1961-03-04", "04.03.1961", "04/03/1961", "1958-07-21", "1949.05.12",
    "12/05/1949", "_image.n", "_mask.n", "cases.csv",
]  # fmt: skip
#: (image file stem, label in its mask, expected harmonised ROI name)
EXPECTED = [
    ("Papadopoulos_Georgios_1961-03-04", 1, "gtv"),  # ROI "tumour" -> the ROI map's gtv
    ("Petrova_Ivana_04.03.1961", 1, "label-1"),  # no ROI name: from the label
    ("Wojcik_Zofia_1958", 1, "gtv"),  # "Lesion"
    ("Szoke_Arpad_1949", 1, "gtv"),  # rows with Label 1 "GTV" and Label 2 "peritumoral ring"
    ("Szoke_Arpad_1949", 2, "peritumoral-ring"),
    ("Ni_Bhriain_Siobhan", 1, "label-1"),  # two labels, no names
    ("Ni_Bhriain_Siobhan", 2, "label-2"),
]


@pytest.fixture(scope="module")
def cohort(prefect_api: str, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("volumes")
    source = work / "export"
    shutil.copytree(DATA, source)
    params_file = work / "params.json"
    params_file.write_text(json.dumps(PARAMS))
    url = str(work / "store")
    runtime = RuntimeOptions(workers=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ONCOFLOW_SITE_SECRET", SECRET)
        ingested = ingest_volumes(str(source / "cases.csv"), SITE, url)
        with dask_cluster(runtime):
            deidentified = deidentify(deid_params(SITE, url), runtime)
            harmonised = harmonise(harmonise_params(SITE, url), runtime)
            extracted = extract_radiomics(extract_params(SITE, url, str(params_file)), runtime)
    store = SiteStore(url, SITE)
    yield {
        "source": source,
        "store": store,
        "summaries": (ingested, deidentified, harmonised, extracted),
        "keys": SiteKeys.derive(SECRET.encode(), SITE),
        "table": pq.read_table(store.path(extracted.extra["table"])),
    }


def test_every_stage_completes(cohort):
    ingested, deidentified, harmonised, extracted = cohort["summaries"]
    assert ingested.counts == {"ok": 5} and ingested.extra["masks"] == 6
    assert deidentified.counts == {"ok": 5}
    assert harmonised.counts == {"ok": 5} and harmonised.extra["masks"] == 7
    assert extracted.counts == {"ok": 7}


def test_features_equal_pyradiomics_on_the_same_files(cohort):
    source, keys = cohort["source"], cohort["keys"]
    jobs = {Path(j.image).name: j for j in plan_volume_jobs(cohort["store"])}
    rows = {(r["series"], r["roi"]): r for r in cohort["table"].to_pylist()}
    extractor = RadiomicsFeatureExtractor(PARAMS)
    for stem, label, roi in EXPECTED:
        image = next(source.glob(f"{stem}_image.*"))
        mask = next(source.glob(f"{stem}_mask.*"))
        series = volume_series_uid(keys, jobs[image.name])
        ours = rows[(series, roi)]
        assert ours["status"] == "ok", (stem, roi, ours["reason"], ours["detail"])
        reference = extractor.execute(str(image), str(mask), label=label)
        features = {k: float(v) for k, v in reference.items() if not k.startswith("diagnostics")}
        assert len(features) > 80
        for name, value in features.items():
            got = ours[name]
            if math.isnan(value):
                assert math.isnan(got), (stem, name)
            else:
                assert math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-9), (stem, name, got)


def test_patients_are_keyed_like_dicom_and_rois_named(cohort):
    table = cohort["table"]
    keys = cohort["keys"]
    patients = set(table.column("patient").to_pylist())
    # Szőke Árpád has two ROIs of one image: one patient, one series
    assert len(patients) == 5
    assert keys.patient_pseudonym("Szőke Árpád") in patients
    assert keys.patient_pseudonym("Γεώργιος Παπαδόπουλος") in patients
    assert sorted(table.column("roi").to_pylist()) == sorted(r for _, _, r in EXPECTED)
    harmonised = cohort["store"].read_table("harmonised/series.parquet").to_pylist()
    spacing = {tuple(r["spacing"]) for r in harmonised}
    assert (0.664062, 0.664062, 2.1) in spacing  # NRRD spacing kept to the last bit


def _texts(path: Path) -> str:
    """Everything a file says, decoded: tables as rows and metadata, gzip members inflated."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        table = pq.read_table(io.BytesIO(data))
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        return json.dumps([table.to_pylist(), meta], ensure_ascii=False, default=str)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", "replace") + data.decode("latin-1")


def test_no_identity_of_the_inputs_in_any_output(cohort):
    root = Path(cohort["store"].root)
    checked = 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_dir() or relative.startswith("catalog/"):  # the private catalogue
            continue
        text = _texts(path) + relative
        leaked = [word for word in IDENTITIES if word in text]
        assert not leaked, (relative, leaked)
        checked += 1
    assert checked > 30
    # the private catalogue does hold them (the de-identified zone is made from it)
    catalogue = json.dumps(
        cohort["store"].read_table(CATALOG_VOLUMES).to_pylist(), ensure_ascii=False
    )
    assert "Szőke Árpád" in catalogue and "Szoke_Arpad_1949_image.nrrd" in catalogue


def test_cases_csv_and_folder_rule(tmp_path):
    cases = read_cases_csv(str(DATA / "cases.csv"))
    lung1 = next(c for c in cases if "Szoke" in c.image)
    assert (lung1.labels, lung1.roi_names) == ([1, 2], ["gtv", "peritumoral-ring"])
    assert lung1.modality == "CT" and lung1.study_id == "CT-1"
    assert is_volume_source(str(DATA)) and is_volume_source(str(DATA / "cases.csv"))
    assert not is_volume_source(str(DATA.parent.parent / "unit"))
    folder = cases_from_folder(str(DATA))
    assert len(folder) == 5 and all(c.masks and c.labels == [0] for c in folder)
    assert {c.patient_id for c in folder} >= {"Szoke_Arpad_1949", "Wojcik_Zofia_1958"}
    (tmp_path / "lonely_image.nrrd").write_bytes(b"x")
    (lonely,) = cases_from_folder(str(tmp_path))
    assert (lonely.status, lonely.reason) == ("quarantined", "missing-mask")


def test_worked_example_reads_the_tables_with_duckdb_and_plots(cohort, tmp_path):
    import runpy

    example = runpy.run_path(str(DATA.parents[2] / "examples" / "feature_by_site.py"))
    params = tmp_path / "params.json"
    params.write_text(json.dumps(PARAMS))
    feature = "original_shape_VoxelVolume"
    frame = example["feature_by_site"](Path(cohort["store"].url), params, feature)
    table = {(r["roi"], r[feature]) for r in cohort["table"].to_pylist()}
    assert set(zip(frame["roi"], frame["value"], strict=True)) == table
    assert set(frame["site"]) == {SITE}
    example["plot"](frame, feature, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leak_gate_knows_the_cases_identities(cohort):
    from tasks.deid.scan_phi import IdentifierMatcher, catalogue_identifiers

    values = catalogue_identifiers(cohort["store"])  # no DICOM catalogue at this site
    assert "Szőke Árpád" in values and "Papadopoulos Georgios 1961 03 04" in values
    matcher = IdentifierMatcher(values)
    assert matcher.found("report for Papadopoulos Georgios")
    assert not matcher.found("original_shape_VoxelVolume of the image and its mask")


def test_legacy_file_names_are_quarantined_through_the_flow(tmp_path, prefect_api, monkeypatch):
    """A folder where a legacy tool named two cases in ISO-8859-2 and CP1253: their four files
    are quarantined (``undecodable-name``) through the Prefect flow while the UTF-8 cases
    ingest; a re-run changes nothing; Prefect records no name, escaped or hashed."""
    import hashlib
    import os

    import anyio

    from tasks.dicom.listing import escape_name
    from tests.services import prefect_records

    site = "site-legacy-volumes"
    source = tmp_path / "folder"
    source.mkdir()
    for stem in ("Wojcik_Zofia_1958", "Ni_Bhriain_Siobhan"):
        for word in ("image", "mask"):
            shutil.copy(DATA / f"{stem}_{word}.nrrd", source / f"Łucja {stem}_{word}.nrrd")
    legacy = ["Szőke Árpád".encode("iso-8859-2"), "Παπαδόπουλος".encode("cp1253")]
    for stem in legacy:
        for word in (b"image", b"mask"):
            target = os.path.join(os.fsencode(source), stem + b"_" + word + b".nrrd")
            shutil.copy(DATA / f"Szoke_Arpad_1949_{word.decode()}.nrrd", target)
    monkeypatch.setenv("ONCOFLOW_SITE_SECRET", SECRET)
    url = str(tmp_path / "store")
    first = ingest_volumes(str(source), site, url)
    assert first.counts == {"ok": 2, "quarantined": 4}
    assert first.reasons == {"undecodable-name": 4}
    store = SiteStore(url, site)
    rows = [r for r in store.quarantine_rows("ingest") if r["reason"] == "undecodable-name"]
    assert sorted(r["item"] for r in rows) == sorted(
        escape_name(os.fsdecode(s + w)) for s in legacy for w in (b"_image.nrrd", b"_mask.nrrd")
    )
    before = {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()}
    second = ingest_volumes(str(source), site, url)
    assert second.counts == first.counts and second.extra["table_written"] is False
    assert {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()} == before

    runs, logs, artifacts, tasks = anyio.run(prefect_records, ["ingest-volumes"])
    ours = [r for r in runs if r.name == f"ingest-volumes-{site}"]
    assert len(ours) == 2
    haystack = "\n".join(
        [f"{r.name} {r.parameters} {r.state}" for r in runs]
        + [log.message for log in logs]
        + [f"{a.key} {a.description} {a.data}" for a in artifacts]
        + [t.name for t in tasks]
    )
    assert "undecodable-name" in haystack
    for item in [r["item"] for r in rows]:
        name = os.fsdecode(os.path.basename(os.fsencode(item)))
        for value in (item, item.split("_")[0], name.encode("utf-8", "surrogateescape").hex()):
            assert value not in haystack
            assert hashlib.sha256(value.encode()).hexdigest()[:12] not in haystack
    for word in ("Szőke", "Árpád", "Παπαδόπουλος", "Łucja", "Sz\\x", "\\udc"):
        assert word not in haystack

"""Publish and verify on a local folder: versions, no-op republish, tampering, leftovers, gate."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.cohort.publish import publish_cohort
from tasks.cohort.spec import parse_spec
from tasks.cohort.storage import RetryPolicy
from tasks.cohort.verify import verify_url
from tasks.errors import OncoflowError
from tests.unit.test_cohort_fixture import PARAMS_HASH, build_site, mrn

SPEC = {
    "name": "lung",
    "title": "Lung cohort",
    "description": "Chest imaging",
    "licence": "CC-BY-4.0",
    "features": PARAMS_HASH,
    "include": {"dicom": True},
}
FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, seed=1)


def publish(store, to, spec=SPEC, **kw):
    return publish_cohort(
        store, parse_spec(spec), to, policy=FAST, date_published="2026-01-02", **kw
    )


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture()
def store(tmp_path: Path):
    return build_site(str(tmp_path / "store"))


def test_publish_verify_and_read_back(store, tmp_path: Path) -> None:
    out = tmp_path / "pub"
    result = publish(store, str(out))
    assert result.created and result.version == "v1"
    assert result.leak_gate == "passed"
    files = tree(out)
    assert not [f for f in files if f.startswith("lung/.staging")]
    assert files[-1] == "lung/v1/series.parquet"
    assert "lung/v1/COMMITTED" in files and "lung/v1/SHA256SUMS" in files
    report = verify_url(str(out / "lung" / "v1"))
    assert report.ok, report.problems
    assert report.objects == result.files
    # independent readers: pyarrow for the tables, the manifest's counts agree
    series = pq.read_table(out / "lung/v1/series.parquet")
    assert series.num_rows == 4
    assert "paths" not in series.column_names and "status" not in series.column_names
    features = pq.read_table(out / "lung/v1/features.parquet")
    assert "patient_id" not in features.column_names
    manifest = json.loads((out / "lung/v1/manifest.json").read_text())
    assert manifest["counts"]["series"] == 4
    assert manifest["contentHash"] == result.content_hash
    image = series.column("image").to_pylist()[0]
    assert (out / "lung/v1" / image).exists()


def test_republish_is_a_no_op_and_new_content_makes_v2(store, tmp_path: Path) -> None:
    out = tmp_path / "pub"
    first = publish(store, str(out))
    before = {p: p.stat().st_mtime_ns for p in (out / "lung").rglob("*") if p.is_file()}
    again = publish(store, str(out))
    assert not again.created and again.version == "v1"
    assert again.content_hash == first.content_hash
    after = {p: p.stat().st_mtime_ns for p in (out / "lung").rglob("*") if p.is_file()}
    assert after == before  # nothing written
    changed = publish(store, str(out), spec={**SPEC, "title": "Lung cohort, revised"})
    assert changed.created and changed.version == "v2"
    assert verify_url(str(out / "lung")).versions == ["v1", "v2"]
    assert verify_url(str(out / "lung")).ok
    # v1 untouched
    assert {p: p.stat().st_mtime_ns for p in (out / "lung/v1").rglob("*") if p.is_file()} == {
        p: t for p, t in before.items() if "/v1/" in str(p)
    }


def test_tampering_is_detected_naming_the_first_problem(store, tmp_path: Path) -> None:
    out = tmp_path / "pub"
    publish(store, str(out))
    v1 = out / "lung/v1"
    image = sorted((v1 / "images").iterdir())[0]
    data = bytearray(image.read_bytes())
    data[-1] ^= 1
    image.write_bytes(bytes(data))
    report = verify_url(str(v1))
    assert not report.ok
    assert report.problems[0] == f"v1/images/{image.name}: checksum mismatch"

    (v1 / "extra.txt").write_text("x")
    assert "v1/extra.txt: not listed in SHA256SUMS" in verify_url(str(v1)).problems
    (v1 / "COMMITTED").unlink()
    assert verify_url(str(v1)).problems[0].startswith("v1/COMMITTED: missing")


def test_manifest_tampering(store, tmp_path: Path) -> None:
    out = tmp_path / "pub"
    publish(store, str(out))
    sums = out / "lung/v1/SHA256SUMS"
    sums.write_text(sums.read_text().replace("  series.parquet", "  series2.parquet"))
    assert verify_url(str(out / "lung/v1")).problems == [
        "v1/SHA256SUMS: does not match the commit marker"
    ]


def test_leftovers_of_a_killed_run_are_cleaned(store, tmp_path: Path) -> None:
    out = tmp_path / "pub"
    (out / "lung/v1/images").mkdir(parents=True)
    (out / "lung/v1/images/half.nii.gz").write_bytes(b"partial")
    (out / "lung/.staging/0123/series.parquet").parent.mkdir(parents=True)
    (out / "lung/.staging/0123/series.parquet").write_bytes(b"old")
    assert verify_url(str(out / "lung")).problems == ["no committed version found"]
    result = publish(store, str(out))
    assert result.version == "v1" and result.created
    assert sorted(result.cleaned) == [".staging/0123", "v1"]
    assert verify_url(str(out / "lung/v1")).ok
    assert not (out / "lung/v1/images/half.nii.gz").exists()
    assert not (out / "lung/.staging").exists() or not any((out / "lung/.staging").iterdir())


def test_leak_gate_hit_commits_nothing(store, tmp_path: Path) -> None:
    out = tmp_path / "pub"

    seen: list[str] = []

    def gate(_store, read, names):
        assert tree(out) == []  # the gate runs before anything reaches the target
        seen.extend(names)
        if "series.parquet" not in names:
            return []
        assert read("series.parquet")[:4] == b"PAR1"
        return ["series.parquet: a patient identifier"]

    with pytest.raises(OncoflowError, match="leak gate found 1 residual identifier"):
        publish(store, str(out), leak_gate=gate)
    assert tree(out) == []
    # every object of the version went through the gate: files, tables, manifest, checksums
    assert {"series.parquet", "manifest.json", "SHA256SUMS"} <= set(seen)
    assert any(name.endswith(".dcm") for name in seen)


def test_changed_source_after_harmonise_is_refused(store, tmp_path: Path) -> None:
    table = store.read_table("harmonised/series.parquet")
    key = table.column("image").to_pylist()[0]
    store.write_bytes(key, b"not the harmonised image")
    with pytest.raises(OncoflowError, match="source changed since it was planned"):
        publish(store, str(tmp_path / "pub"))
    assert not (tmp_path / "pub/lung/v1").exists()


def test_leak_gate_finds_a_catalogue_identifier_in_a_published_table(tmp_path: Path) -> None:
    store = build_site(str(tmp_path / "store"))
    table = store.read_table("harmonised/series.parquet")
    makers = table.column("manufacturer").to_pylist()
    makers[1] = f"ACME for {mrn('site-a', 1)}"
    table = table.set_column(
        table.column_names.index("manufacturer"), "manufacturer", pa.array(makers)
    )
    store.write_table("harmonised/series.parquet", table)
    out = tmp_path / "pub"
    with pytest.raises(OncoflowError) as err:
        publish(store, str(out))
    assert str(err.value).endswith("(first: series.parquet: manufacturer: identifier)")
    assert mrn("site-a", 1) not in str(err.value)
    assert tree(out) == []  # staging removed, nothing committed


def test_identifier_shaped_keys_are_refused(tmp_path: Path) -> None:
    store = build_site(str(tmp_path / "store"))
    table = store.read_table("harmonised/series.parquet")
    patients = table.column("patient").to_pylist()
    patients[0] = "Doe^John"
    table = table.set_column(table.column_names.index("patient"), "patient", pa.array(patients))
    store.write_table("harmonised/series.parquet", table)
    with pytest.raises(OncoflowError, match="not a pseudonymous key"):
        publish(store, str(tmp_path / "pub"))

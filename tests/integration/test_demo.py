"""`oncoflow demo` end to end, as the README's first command runs it (3 sites x 3 patients)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tasks.synthetic import CohortTruth
from tasks.synthetic.scan import searchable_bytes
from tests.services import BIN

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


def test_demo_end_to_end(tmp_path, prefect_api):
    out = tmp_path / "demo"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env.pop("ONCOFLOW_SITE_SECRET", None)  # the demo generates one and says so
    proc = subprocess.run(
        [str(BIN / "oncoflow"), "demo", "--out", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated demo site secret" in proc.stderr
    result = json.loads(proc.stdout)
    assert sorted(result["sites"]) == ["site-a", "site-b", "site-c"]
    truth = CohortTruth.load(out / "source" / "truth.json")
    for site, stages in result["sites"].items():
        by_stage = {s["stage"]: s for s in stages}
        assert list(by_stage) == ["ingest", "deidentify", "harmonise", "extract", "publish"]
        quarantined = by_stage["ingest"]["reasons"]
        planted = {f.reason for f in truth.sites[site].faults if f.stage == "ingest"}
        assert set(quarantined) == planted
        assert by_stage["extract"]["counts"].get("ok", 0) > 0
        assert by_stage["publish"]["created"] is True
        version = Path(by_stage["publish"]["url"])
        verify = subprocess.run(
            [str(BIN / "oncoflow"), "verify", str(version)], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stderr
        # nothing planted in this site's source appears in what it published
        site_truth = truth.sites[site]
        planted_values = [
            v
            for v in [*site_truth.planted_values]
            + [v for p in site_truth.patients for v in p.planted_values]
            if len(v) >= 6
        ]
        assert len(planted_values) > 100
        for path in version.rglob("*"):
            if path.is_file():
                data = searchable_bytes(path)
                leaked = [v for v in planted_values if v.encode() in data]
                assert not leaked, f"{path.relative_to(out)} holds a planted value"
    catalogue = json.loads((out / "hub" / "catalogue.json").read_text())
    assert catalogue["k"] == 10
    assert catalogue["tables"]["modality"]["total"] == sum(
        1 for _ in (out / "publication").glob("*/demo-ct/v1/images/*.nii.gz")
    )

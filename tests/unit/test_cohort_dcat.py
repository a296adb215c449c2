"""HealthDCAT-AP records of published versions, validated with pySHACL against the official shapes.

Shapes (tests/shapes/, with their licence): DCAT-AP 3.0.0 core and range shapes (SEMICeu/DCAT-AP)
and the HealthDCAT-AP release 8 NON_PUBLIC shapes (healthdataeu/healthdcat-ap), which extend the
DCAT-AP node shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pyshacl
import pytest
import yaml
from rdflib import Graph, Literal, URIRef
from rdflib.namespace import DCTERMS, RDF, SH

from tasks.cohort.dcat import DCAT, HEALTH, SPDX
from tasks.cohort.manifest import parse_sha256sums
from tasks.cohort.publish import publish_cohort
from tasks.cohort.spec import parse_spec
from tasks.cohort.storage import RetryPolicy
from tasks.cohort.verify import verify_url
from tests.unit.test_cohort_fixture import PARAMS_HASH, build_site

SHAPES = Path(__file__).resolve().parent.parent / "shapes"
DEMO_SPEC = Path(__file__).resolve().parents[2] / "deployments" / "cohorts" / "demo.yaml"
FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, seed=1)


@cache
def shapes() -> Graph:
    g = Graph()
    for name in (
        "dcat-ap-3.0.0/shapes.ttl",
        "dcat-ap-3.0.0/range.ttl",
        "healthdcat-ap-r8/non-public-shapes.ttl",
    ):
        g.parse(SHAPES / name)
    # HealthDCAT-AP's Dataset_Shape lists its "hasStructuredData implies hasVariables" rule as
    # an sh:property without sh:path, which SHACL (and pySHACL) rejects as a property shape;
    # the validator it ships with applies it to the dataset node, so attach it with sh:node.
    for shape, rule in list(g.subject_objects(SH.property)):
        if (rule, SH.path, None) not in g:
            g.remove((shape, SH.property, rule))
            g.add((shape, SH.node, rule))
    return g


def validate(data: Graph) -> tuple[bool, str]:
    conforms, _, text = pyshacl.validate(data, shacl_graph=shapes(), advanced=True)
    return conforms, text


def values(g: Graph) -> set:
    """Triples with literals by value (Turtle writes decimal 7918 as 7918.0)."""
    return {(s, p, o.toPython() if isinstance(o, Literal) else o) for s, p, o in g}


def demo_spec(**changes) -> dict:
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    spec["features"] = PARAMS_HASH
    spec["selection"] = {"modality": ["CT", "MR"]}
    spec.update(changes)
    return spec


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dcat")
    store = build_site(str(root / "store"))
    out = root / "pub"
    for title in ("Demo cohort", "Demo cohort, revised"):
        publish_cohort(
            store, parse_spec(demo_spec(title=title)), str(out), policy=FAST,
            date_published="2026-03-04",
        )  # fmt: skip
    return out / "demo-ct"


def test_demo_records_validate_and_agree_with_the_release(published: Path) -> None:
    v2 = published / "v2"
    assert verify_url(str(v2)).ok
    g = Graph().parse(v2 / "dcat.ttl")
    conforms, text = validate(g)
    assert conforms, text
    ds = URIRef(f"file://{v2}")
    assert (ds, RDF.type, DCAT.Dataset) in g
    assert g.value(ds, DCAT.previousVersion) == URIRef(f"file://{published / 'v1'}")
    assert str(g.value(ds, DCAT.version)) == "2"
    assert str(g.value(ds, DCTERMS.title)) == "Demo cohort, revised"
    # checksums of the distributions are those of SHA256SUMS (an independent reader)
    sums = parse_sha256sums((v2 / "SHA256SUMS").read_bytes())
    seen = {}
    for dist in g.objects(ds, DCAT.distribution):
        name = str(dist).rsplit("/", 1)[-1]
        checksum = g.value(dist, SPDX.checksum)
        seen[name] = str(g.value(checksum, SPDX.checksumValue))
        assert int(g.value(dist, DCAT.byteSize).toPython()) == (v2 / name).stat().st_size
    tables = (
        "features.parquet",
        "manifest.json",
        "report.html",
        "risk-report.json",
        "series.parquet",
    )
    assert seen == {n: sums[n] for n in tables}
    # the fixture's 3 selected patients are below k = 10: the counts are left out
    assert g.value(ds, HEALTH.numberOfUniqueIndividuals) is None
    assert g.value(ds, HEALTH.numberOfRecords) is None
    manifest = json.loads((v2 / "manifest.json").read_text())
    assert manifest["counts"]["patients"] < 10
    # the JSON-LD serialisation is the same graph
    assert values(Graph().parse(v2 / "dcat.jsonld", format="json-ld")) == values(g)
    v1 = Graph().parse(published / "v1" / "dcat.ttl")
    assert v1.value(URIRef(f"file://{published / 'v1'}"), DCAT.previousVersion) is None


@pytest.mark.parametrize(
    ("prop", "needle"),
    [(DCTERMS.description, "description"), (HEALTH.healthCategory, "healthCategory")],
)
def test_a_mandatory_property_removed_fails_validation(published: Path, prop, needle) -> None:
    g = Graph().parse(published / "v2" / "dcat.ttl")
    g.remove((None, prop, None))
    conforms, text = validate(g)
    assert not conforms
    assert needle in text


def test_counts_at_or_above_k_are_published(tmp_path: Path) -> None:
    store = build_site(str(tmp_path / "store"))
    spec = demo_spec()
    spec["catalogue"] = {**spec["catalogue"], "k": 2}
    publish_cohort(store, parse_spec(spec), str(tmp_path / "pub"), policy=FAST)
    g = Graph().parse(tmp_path / "pub" / "demo-ct" / "v1" / "dcat.ttl")
    manifest = json.loads((tmp_path / "pub" / "demo-ct" / "v1" / "manifest.json").read_text())
    ds = next(g.subjects(RDF.type, DCAT.Dataset))
    assert int(g.value(ds, HEALTH.numberOfUniqueIndividuals)) == manifest["counts"]["patients"]
    assert int(g.value(ds, HEALTH.numberOfRecords)) == manifest["counts"]["series"]
    assert validate(g)[0]


def test_a_spec_without_catalogue_settings_makes_a_record_that_fails(tmp_path: Path) -> None:
    store = build_site(str(tmp_path / "store"))
    spec = demo_spec()
    del spec["catalogue"]
    publish_cohort(store, parse_spec(spec), str(tmp_path / "pub"), policy=FAST)
    g = Graph().parse(tmp_path / "pub" / "demo-ct" / "v1" / "dcat.ttl")
    conforms, text = validate(g)
    assert not conforms
    assert "hdab" in text and "contactPoint" in text


_RECORD_IN_A_NEW_PROCESS = """
import sys
from rdflib import Graph
from tasks.cohort.dcat import record_bytes
graph = Graph().parse(data=sys.stdin.read(), format="turtle")
sys.stdout.buffer.write(record_bytes(graph)[1])
"""


def test_jsonld_bytes_do_not_depend_on_the_process(published: Path) -> None:
    # rdflib emits JSON-LD in set order; a version's checksums must not change with the hash seed
    ttl = (published / "v1" / "dcat.ttl").read_text()
    outputs = {
        subprocess.run(
            [sys.executable, "-c", _RECORD_IN_A_NEW_PROCESS],
            input=ttl.encode(),
            capture_output=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2, 3)
    }
    assert len(outputs) == 1
    assert Graph().parse(data=outputs.pop(), format="json-ld").isomorphic(
        Graph().parse(data=ttl, format="turtle")
    )

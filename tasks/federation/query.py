"""Count queries over a site's published cohorts, answered under the site's policy.

The site answers questions such as "how many patients have a CT of the chest with a GTV, aged
60-69?" from the series tables it has *published* (the latest committed version of each of its
cohorts, checked against their checksums), never from its private zone. A query fixes some of
the fields in :data:`FIELDS` to one value each; the answer is the number of patients and of
series that match, obfuscated by :func:`tasks.federation.noise.obfuscate` (k-suppression,
Laplace noise keyed by the query, the releases and the site secret, rounding).

Refused with a one-line reason: unknown fields, fields that are identifiers (patient, study,
series keys, UIDs, names, dates of birth, ...), several values for one field, empty values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from tasks.cohort.storage import Retrier, RetryPolicy
from tasks.errors import OncoflowError
from tasks.federation.noise import NoisePolicy, canonical_query, obfuscate, release_budget
from tasks.federation.sources import read_checked, read_version, version_paths
from tasks.store import read_parquet

#: Fields a query may fix, and how their values are normalised.
FIELDS = ("cohort", "modality", "body_part", "roi", "age_band", "sex")
#: Fields that name or point at individuals: a query over them is refused, not just unknown.
IDENTIFIERS = frozenset(
    {
        "patient", "patient_id", "patient_name", "patients", "study", "study_uid", "series",
        "series_uid", "sop_instance_uid", "uid", "image", "image_sha256", "accession",
        "accession_number", "mrn", "name", "birth_date", "date_of_birth", "acquisition_date",
        "study_date", "dicom", "masks", "seg_series",
    }
)  # fmt: skip
VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}$")
AGE_BAND = re.compile(r"^([0-9]{1,3})-([0-9]{1,3})$|^([0-9]{1,3})\+$")
AGE = re.compile(r"^([0-9]{3})([DWMY])$")
OPEN_BAND = 90


def age_band(age: str | None) -> str | None:
    """Ten-year band of a DICOM age string (``063Y`` -> ``60-69``; 90 and over: ``90+``)."""
    match = AGE.match(age or "")
    if not match:
        return None
    years = int(match.group(1)) if match.group(2) == "Y" else 0
    if years >= OPEN_BAND:
        return f"{OPEN_BAND}+"
    low = 10 * (years // 10)
    return f"{low}-{low + 9}"


@dataclass(frozen=True)
class Row:
    """One published series, reduced to what queries can ask about (plus its patient key)."""

    patient: str
    cohort: str
    modality: str
    body_part: str
    rois: frozenset[str]
    age_band: str
    sex: str

    def matches(self, query: Mapping[str, str]) -> bool:
        """Whether the series satisfies every condition of the query."""
        for key, value in query.items():
            if key == "roi":
                if value not in self.rois:
                    return False
            elif getattr(self, key) != value:
                return False
        return True


def parse_query(params: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Validate and normalise a query (``{field: [values]}`` as sent over HTTP).

    Raises
    ------
    OncoflowError
        One line naming the first field refused and why.
    """
    query: dict[str, str] = {}
    for key in sorted(params):
        name = key.strip().lower()
        if name in IDENTIFIERS or name.endswith(("_uid", "_id", "_name")):
            raise OncoflowError(f"{key}: queries over identifiers are refused")
        if name not in FIELDS:
            raise OncoflowError(f"{key}: unknown field (known: {', '.join(FIELDS)})")
        values = list(params[key])
        if len(values) != 1:
            raise OncoflowError(f"{key}: give exactly one value")
        value = values[0].strip()
        if not VALUE.match(value):
            raise OncoflowError(f"{key}: not a valid value")
        if name in ("modality", "body_part", "sex"):
            value = value.upper()
        elif name in ("roi", "cohort"):
            value = value.lower()
        elif name == "age_band" and not AGE_BAND.match(value):
            raise OncoflowError(f"{key}: write an age band as 60-69 or 90+")
        query[name] = value
    return query


@dataclass
class SiteCounts:
    """The published series of one site, ready to answer count queries."""

    site: str
    rows: list[Row]
    releases: list[str] = field(default_factory=list)

    @property
    def release_key(self) -> str:
        """Identifies the published content answered (noise changes with every new release)."""
        return ",".join(sorted(self.releases))

    def categories(self) -> dict[str, list[str]]:
        """Distinct values of each field in the published series."""
        out: dict[str, set[str]] = {f: set() for f in FIELDS}
        for row in self.rows:
            for name in FIELDS:
                if name == "roi":
                    out["roi"].update(row.rois)
                else:
                    out[name].add(getattr(row, name))
        return {k: sorted(v) for k, v in out.items()}

    def count(self, query: Mapping[str, str]) -> tuple[int, int]:
        """Exact (patients, series) matching a parsed query (never leaves the site)."""
        matched = [r for r in self.rows if r.matches(query)]
        return len({(r.cohort, r.patient) for r in matched}), len(matched)

    def answer(
        self, query: Mapping[str, str], policy: NoisePolicy, secret: bytes, series_cap: int = 10
    ) -> dict[str, Any]:
        """Answer a parsed query under the policy (safe to send)."""
        patients, series = self.count(query)
        canonical = canonical_query(query)
        series_policy = replace(policy, sensitivity=float(series_cap))
        return {
            "site": self.site,
            "query": dict(sorted(query.items())),
            "patients": obfuscate(
                patients, policy, secret=secret, query=canonical, version=self.release_key,
                measure="patients",
            ),
            "series": obfuscate(
                series, series_policy, secret=secret, query=canonical, version=self.release_key,
                measure="series",
            ),
            "policy": {"k": policy.k, "epsilon": policy.epsilon, "rounding": policy.rounding},
        }  # fmt: skip

    def budget(self, policy: NoisePolicy) -> dict[str, float | int]:
        """Worst-case privacy budget of the releases answered (see ``release_budget``)."""
        return release_budget(policy, {k: len(v) for k, v in self.categories().items()})


def load_site_counts(site: str, to: str, policy: RetryPolicy | None = None) -> SiteCounts:
    """Read the latest committed version of every cohort the site published under ``to``.

    Parameters
    ----------
    site
        Site code; versions published by other sites under the same root are skipped.
    to
        Publication root (or one cohort, or one version).
    policy
        Retry policy for storage calls.

    Raises
    ------
    OncoflowError
        When the site has no committed version there, or a table fails its checksum.
    """
    retry = Retrier(policy or RetryPolicy())
    fs, paths = version_paths(to, retry)
    rows: list[Row] = []
    releases = []
    for path in paths:
        version = read_version(fs, path, retry)
        manifest = version.manifest
        if manifest.get("site") != site:
            continue
        sums = {d.get("contentUrl"): d.get("sha256") for d in manifest.get("distribution", [])}
        if "series.parquet" not in sums:
            continue
        data = read_checked(fs, f"{path}/series.parquet", str(sums["series.parquet"]), retry)
        table = read_parquet(pa.BufferReader(data))
        cohort = str(manifest.get("cohort"))
        releases.append(f"{cohort}:{manifest.get('contentHash')}")
        for rec in table.select(
            ["patient", "modality", "body_part", "rois", "age_at_study", "sex"]
        ).to_pylist():
            rows.append(
                Row(
                    patient=str(rec["patient"]),
                    cohort=cohort,
                    modality=(rec["modality"] or "UNKNOWN").upper(),
                    body_part=(rec["body_part"] or "UNKNOWN").upper(),
                    rois=frozenset(r.lower() for r in rec["rois"] or []),
                    age_band=age_band(rec["age_at_study"]) or "UNKNOWN",
                    sex=(rec["sex"] or "UNKNOWN").upper(),
                )
            )
    if not releases:
        raise OncoflowError(f"site {site} has no committed cohort version at {to}")
    return SiteCounts(site=site, rows=rows, releases=releases)

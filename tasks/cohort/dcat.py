"""HealthDCAT-AP record of a published cohort version (``dcat.ttl`` and ``dcat.jsonld``).

The record is made from the Croissant manifest of the same version (so the two never
disagree): one ``dcat:Dataset`` per version, with

* title, description, keywords, identifier, issue date, version and the links to the previous
  version and to the cohort as a whole (``dcat:previousVersion``, ``dct:isVersionOf``);
* one ``dcat:Distribution`` per published table and for the Croissant manifest, each with its
  SHA-256 as an ``spdx:Checksum``, size, media type and licence (the manifest lists the
  checksum of every other file, so every published object is covered);
* temporal coverage (first and last year of the shifted acquisition dates), access rights,
  applicable legislation (the EHDS regulation), publisher (the site), contact point, the
  health data access body;
* the HealthDCAT-AP health properties: number of records (series) and of unique individuals
  (patients), each left out when it is below the suppression threshold ``k``; health category;
  coding system (DICOM controlled terminology); the published table columns as a CSVW table
  group (``healthdcatap:hasVariables``).

The site's catalogue settings (contact, access body) come from the ``catalogue`` block of the
cohort spec; a record without them is still written, and fails validation, naming what is
missing. Everything here is counts, coded values and URLs: no identifier.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from rdflib import Graph, Literal, Namespace, URIRef
from rdflib.namespace import DCTERMS, FOAF, RDF, RDFS, SKOS, XSD

from tasks.cohort.catalogue import Agent, CatalogueSpec

DCAT_TTL = "dcat.ttl"
DCAT_JSONLD = "dcat.jsonld"

#: DCAT 3 (rdflib's closed namespace lacks dcat:version and dcat:previousVersion).
DCAT = Namespace("http://www.w3.org/ns/dcat#")
VCARD = Namespace("http://www.w3.org/2006/vcard/ns#")
SPDX = Namespace("http://spdx.org/rdf/terms#")
DCATAP = Namespace("http://data.europa.eu/r5r/")
HEALTH = Namespace("http://healthdataportal.eu/ns/health#")
CSVW = Namespace("http://www.w3.org/ns/csvw#")
CV = Namespace("http://data.europa.eu/m8g/")
ADMS = Namespace("http://www.w3.org/ns/adms#")
ELI = Namespace("http://data.europa.eu/eli/ontology#")

EU = "http://publications.europa.eu/resource/authority/"
HDEU = "https://hdeu-dcat.data.health.europa.eu/resource/authority/"
#: Regulation (EU) 2025/327 on the European Health Data Space.
EHDS = URIRef("http://data.europa.eu/eli/reg/2025/327/oj")
CROISSANT = URIRef("http://mlcommons.org/croissant/1.0")
FILE_TYPES = {
    "application/x-parquet": "PARQUET",
    "application/json": "JSON",
    "application/ld+json": "JSON_LD",
}


def as_iri(url: str) -> URIRef:
    """Return a URL as an IRI (a local path becomes a ``file://`` IRI)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        return URIRef(url)
    return URIRef("file://" + ("" if url.startswith("/") else "/") + url)


def _contact_point(g: Graph, node: URIRef, contact: str, name: str) -> URIRef:
    """Add a ``cv:ContactPoint`` (mail address literal or contact page IRI)."""
    g.add((node, RDF.type, CV.ContactPoint))
    if contact.startswith("mailto:"):
        g.add((node, CV.email, Literal(contact.removeprefix("mailto:"))))
    else:
        g.add((node, CV.contactPage, URIRef(contact)))
    g.add((node, RDFS.label, Literal(name)))
    return node


def _agent(g: Graph, node: URIRef, agent: Agent) -> URIRef:
    g.add((node, RDF.type, FOAF.Agent))
    g.add((node, RDF.type, FOAF.Organization))
    g.add((node, FOAF.name, Literal(agent.name)))
    contact = URIRef(f"{node}-contact")
    g.add((node, CV.contactPoint, _contact_point(g, contact, agent.contact, agent.name)))
    return node


def _checksum(g: Graph, node: URIRef, sha256: str) -> URIRef:
    g.add((node, RDF.type, SPDX.Checksum))
    g.add((node, SPDX.algorithm, SPDX.checksumAlgorithm_sha256))
    g.add((node, SPDX.checksumValue, Literal(sha256, datatype=XSD.hexBinary)))
    return node


def _columns(g: Graph, table: URIRef, record_set: Mapping[str, Any]) -> None:
    for i, field in enumerate(record_set.get("field", [])):
        name = str(field.get("name", ""))
        dtype = str(field.get("dataType", "sc:Text")).split(":")[-1].lower()
        col = URIRef(f"{table}-column-{i}")
        g.add((table, CSVW.column, col))
        g.add((col, RDF.type, CSVW.Column))
        g.add((col, CSVW.name, Literal(name)))
        g.add((col, CSVW.title, Literal(name)))
        g.add(
            (col, CSVW.datatype, Literal({"text": "string", "float": "double"}.get(dtype, dtype)))
        )
        repeated = " (a list)" if field.get("repeated") else ""
        g.add(
            (col, DCTERMS.description, Literal(f"Column {name} of {record_set['name']}{repeated}."))
        )


def build_record(
    manifest: Mapping[str, Any],
    catalogue: CatalogueSpec,
    *,
    version_url: str,
    previous_url: str | None,
    sizes: Mapping[str, int],
    manifest_sha256: str,
) -> Graph:
    """Build the HealthDCAT-AP graph of one published version from its Croissant manifest.

    Parameters
    ----------
    manifest
        The version's Croissant manifest (as written to ``manifest.json``).
    catalogue
        Catalogue settings of the cohort (contact, access body, access rights, k).
    version_url
        URL of the version (``<TO>/<cohort>/v<N>``): the dataset IRI.
    previous_url
        URL of the previous committed version, if any.
    sizes
        Object sizes in bytes, by name (tables and ``manifest.json``).
    manifest_sha256
        SHA-256 of the serialised manifest.

    Returns
    -------
    rdflib.Graph
        The record (serialise with :func:`record_bytes`).
    """
    g = Graph()
    for prefix, ns in {
        "dcat": DCAT, "dct": DCTERMS, "foaf": FOAF, "vcard": VCARD, "spdx": SPDX,
        "dcatap": DCATAP, "healthdcatap": HEALTH, "csvw": CSVW, "cv": CV, "adms": ADMS,
    }.items():  # fmt: skip
        g.bind(prefix, ns)
    site = str(manifest["site"])
    cohort = str(manifest["cohort"])
    number = str(manifest["version"]).split(".", 1)[0]
    base = version_url.rstrip("/")
    ds = as_iri(base)

    def node(fragment: str) -> URIRef:
        """Name a node of the record inside the version (no random blank-node labels)."""
        return URIRef(f"{ds}#{fragment}")

    g.add((ds, RDF.type, DCAT.Dataset))
    g.add((ds, DCTERMS.title, Literal(str(manifest["name"]), lang="en")))
    g.add((ds, DCTERMS.description, Literal(str(manifest["description"]).strip(), lang="en")))
    g.add((ds, DCTERMS.identifier, Literal(f"{site}/{cohort}/v{number}")))
    g.add((ds, DCTERMS.alternative, Literal(cohort)))
    g.add((ds, DCAT.version, Literal(number)))
    g.add((ds, DCTERMS.issued, Literal(str(manifest["datePublished"]), datatype=XSD.date)))
    g.add((ds, DCTERMS.isVersionOf, as_iri(base.rsplit("/", 1)[0])))
    if previous_url:
        g.add((ds, DCAT.previousVersion, as_iri(previous_url)))
    for keyword in manifest.get("keywords", []):
        g.add((ds, DCAT.keyword, Literal(str(keyword), lang="en")))
    theme = URIRef(EU + "data-theme/HEAL")
    kind = URIRef(EU + "dataset-type/" + catalogue.dataset_type)
    g.add((ds, DCAT.theme, theme))
    g.add((ds, DCTERMS.type, kind))
    for concept, label in ((theme, "Health"), (kind, catalogue.dataset_type)):
        g.add((concept, RDF.type, SKOS.Concept))
        g.add((concept, SKOS.prefLabel, Literal(label, lang="en")))
    rights = URIRef(EU + "access-right/" + catalogue.access_rights)
    g.add((ds, DCTERMS.accessRights, rights))
    g.add((rights, RDF.type, DCTERMS.RightsStatement))
    g.add((ds, DCATAP.applicableLegislation, EHDS))
    g.add((EHDS, RDF.type, ELI.LegalResource))
    g.add((ds, DCTERMS.conformsTo, CROISSANT))
    g.add((CROISSANT, RDF.type, DCTERMS.Standard))

    publisher = catalogue.publisher
    if publisher is not None:
        g.add((ds, DCTERMS.publisher, _agent(g, node("publisher"), publisher)))
    else:  # the site, without contact details: the record names it but fails validation
        agent = node("publisher")
        g.add((agent, RDF.type, FOAF.Agent))
        g.add((agent, FOAF.name, Literal(site)))
        g.add((ds, DCTERMS.publisher, agent))
    if catalogue.contact:
        kind = node("contact")
        g.add((kind, RDF.type, VCARD.Kind))
        g.add((kind, VCARD.fn, Literal(publisher.name if publisher else site)))
        prop = VCARD.hasEmail if catalogue.contact.startswith("mailto:") else VCARD.hasURL
        g.add((kind, prop, URIRef(catalogue.contact)))
        g.add((ds, DCAT.contactPoint, kind))
    if catalogue.hdab is not None:
        g.add((ds, HEALTH.hdab, _agent(g, node("hdab"), catalogue.hdab)))

    provenance = node("provenance")
    g.add((provenance, RDF.type, DCTERMS.ProvenanceStatement))
    g.add(
        (
            provenance,
            RDFS.label,
            Literal(
                "De-identified at the site (DICOM PS3.15 profile, keyed pseudonyms, shifted "
                "dates), harmonised and published by oncoflow as an immutable, checksummed "
                "version.",
                lang="en",
            ),
        )
    )
    g.add((ds, DCTERMS.provenance, provenance))

    if manifest.get("dct:temporal"):
        period = node("temporal")
        g.add((period, RDF.type, DCTERMS.PeriodOfTime))
        start = manifest["dct:temporal"]["dcat:startDate"]
        end = manifest["dct:temporal"]["dcat:endDate"]
        g.add((period, DCAT.startDate, Literal(start, datatype=XSD.date)))
        g.add((period, DCAT.endDate, Literal(end, datatype=XSD.date)))
        g.add((ds, DCTERMS.temporal, period))

    counts = manifest.get("counts", {})
    for prop, value in ((HEALTH.numberOfRecords, counts.get("series")),
                        (HEALTH.numberOfUniqueIndividuals, counts.get("patients"))):  # fmt: skip
        if isinstance(value, int) and (value == 0 or value >= catalogue.k):
            g.add((ds, prop, Literal(value, datatype=XSD.nonNegativeInteger)))
    for category in catalogue.health_category:
        g.add((ds, HEALTH.healthCategory, URIRef(HDEU + "healthcategories/" + category)))
    g.add((ds, HEALTH.hasCodingSystem, URIRef(HDEU + "coding-system/DICOM-CT")))

    licence = URIRef(str(manifest["license"]))
    g.add((licence, RDF.type, DCTERMS.LicenseDocument))
    sums = {d["contentUrl"]: d["sha256"] for d in manifest.get("distribution", [])}
    tables = {n: sums[n] for n in sorted(sums) if not n.endswith((".nii.gz", ".dcm"))}
    tables["manifest.json"] = manifest_sha256
    for name, sha in tables.items():
        dist = as_iri(f"{base}/{name}")
        media = "application/ld+json" if name == "manifest.json" else _media(name)
        g.add((ds, DCAT.distribution, dist))
        g.add((dist, RDF.type, DCAT.Distribution))
        g.add((dist, DCTERMS.title, Literal(name, lang="en")))
        g.add((dist, DCAT.accessURL, dist))
        g.add((dist, DCAT.downloadURL, dist))
        g.add((dist, DCTERMS.license, licence))
        g.add((dist, DCATAP.applicableLegislation, EHDS))
        media_iri = URIRef(f"https://www.iana.org/assignments/media-types/{media}")
        g.add((dist, DCAT.mediaType, media_iri))
        g.add((media_iri, RDF.type, DCTERMS.MediaType))
        if media in FILE_TYPES:
            file_type = URIRef(EU + "file-type/" + FILE_TYPES[media])
            g.add((dist, DCTERMS.format, file_type))
            g.add((file_type, RDF.type, DCTERMS.MediaTypeOrExtent))
        if name in sizes:
            g.add((dist, DCAT.byteSize, Literal(str(int(sizes[name])), datatype=XSD.decimal)))
        g.add((dist, SPDX.checksum, _checksum(g, node(f"checksum-{name}"), sha)))
        if name == "manifest.json":
            g.add((dist, DCTERMS.conformsTo, CROISSANT))

    record_sets = manifest.get("recordSet", [])
    g.add((ds, HEALTH.hasStructuredData, Literal(bool(record_sets))))
    if record_sets:
        group = node("variables")
        g.add((ds, HEALTH.hasVariables, group))
        g.add((group, RDF.type, CSVW.TableGroup))
        g.add((group, DCTERMS.title, Literal(f"Published tables of {cohort}", lang="en")))
        for record_set in record_sets:
            table = node(f"table-{record_set['name']}")
            g.add((group, CSVW.table, table))
            g.add((table, RDF.type, CSVW.Table))
            g.add((table, DCTERMS.title, Literal(str(record_set["name"]), lang="en")))
            g.add((table, CSVW.url, as_iri(f"{base}/{record_set['name']}.parquet")))
            _columns(g, table, record_set)
    return g


def _media(name: str) -> str:
    from tasks.cohort.manifest import encoding_of

    return encoding_of(name)


def record_bytes(graph: Graph) -> tuple[bytes, bytes]:
    """Serialise a record as Turtle and as JSON-LD (UTF-8)."""
    ttl = graph.serialize(format="turtle").encode()
    context = {prefix: str(ns) for prefix, ns in graph.namespaces() if prefix}
    jsonld = graph.serialize(format="json-ld", context=context)
    # rdflib writes JSON-LD nodes and values in set order, which changes from one process to
    # the next: sorted here, so a version's bytes (and its checksums) are reproducible
    canonical = _sorted_json(json.loads(jsonld))
    return ttl, (json.dumps(canonical, indent=2, ensure_ascii=False) + "\n").encode()


def _sorted_json(value: Any, ordered: bool = False) -> Any:
    """Sort JSON-LD objects' keys and unordered arrays (an ``@list`` keeps its order)."""
    if isinstance(value, dict):
        return {k: _sorted_json(v, ordered=k == "@list") for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [_sorted_json(v) for v in value]
        if ordered:
            return items
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False))
    return value

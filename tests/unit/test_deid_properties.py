"""Property-based tests on random headers: no planted identifier survives, UIDs stay valid."""

from __future__ import annotations

import io
import string
from datetime import date, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.deid.dataset import DeidContext, deidentify_dataset, encode_dataset
from tasks.deid.profile import DeidOptions
from tasks.deid.pseudonyms import SiteKeys

KEYS = SiteKeys.derive(b"property-test-secret-0123456789-abcdef", "site-p")

#: (keyword, VR) of attributes an identifier may be typed into by an operator or a device.
PLACES = [
    ("SeriesDescription", "LO"),
    ("StudyDescription", "LO"),
    ("ProtocolName", "LO"),
    ("ImageComments", "LT"),
    ("PatientComments", "LT"),
    ("InstitutionName", "LO"),
    ("InstitutionalDepartmentName", "LO"),
    ("OperatorsName", "PN"),
    ("ReferringPhysicianName", "PN"),
    ("PerformingPhysicianName", "PN"),
    ("OtherPatientIDs", "LO"),
    ("AdmissionID", "LO"),
    ("StationName", "SH"),
    ("PositionReferenceIndicator", "LO"),
    ("BodyPartExamined", "CS"),
    ("Manufacturer", "LO"),
    ("SoftwareVersions", "LO"),
    ("SequenceName", "SH"),
    ("DerivationDescription", "ST"),
    ("AdditionalPatientHistory", "LT"),
    ("RequestedProcedureDescription", "LO"),
    ("PerformedProcedureStepDescription", "LO"),
    ("ContrastBolusAgent", "LO"),
    ("ConvolutionKernel", "SH"),
]
WORDS = ["CT", "THORAX", "axial", "contrast", "T1", "5mm", "Lung", "GTV", "post", ""]

# Distinctive names: a planted "Option" would match the fixed code meaning "Clean Graphics
# Option" that de-identification itself writes, a false positive rather than a leak.
names = st.text(alphabet=string.ascii_letters, min_size=6, max_size=10).map(
    lambda s: "Zq" + s.lower()
)
uids = st.integers(min_value=1, max_value=10**20).map(lambda n: f"1.3.6.1.4.1.99999.{n}")


@st.composite
def identities(draw):
    family, given = draw(names), draw(names)
    birth = date(1930, 1, 1) + timedelta(days=draw(st.integers(0, 25000)))
    return {
        "family": family,
        "given": given,
        "patient_id": draw(st.sampled_from(["ID", "MRN-", "", "P"]))
        + str(draw(st.integers(10**6, 10**9))),
        "birth": birth.strftime("%Y%m%d"),
        "accession": str(draw(st.integers(10**8, 10**10))),
    }


@st.composite
def placements(draw, identity):
    values = [
        identity["family"],
        identity["given"],
        identity["patient_id"],
        identity["birth"],
        identity["accession"],
    ]
    out = []
    for _ in range(draw(st.integers(1, 8))):
        keyword, vr = draw(st.sampled_from(PLACES))
        value = draw(st.sampled_from(values))
        if vr == "PN":
            text = f"{value}^{draw(st.sampled_from(values))}"
        else:
            text = " ".join(
                w for w in (draw(st.sampled_from(WORDS)), value, draw(st.sampled_from(WORDS))) if w
            )
        if vr == "CS":
            text = text.upper()[:16]
        where = draw(st.sampled_from(["top", "sequence", "private", "deep"]))
        out.append((keyword, vr, text, where))
    return out


def _dataset(identity, places, uid_list, implicit) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uid_list
    ds.PatientName = f"{identity['family']}^{identity['given']}"
    ds.PatientID = identity["patient_id"]
    ds.PatientBirthDate = identity["birth"]
    ds.AccessionNumber = identity["accession"]
    ds.StudyDate, ds.StudyTime = "20200102", "101010"
    private = ds.private_block(0x0011, "RANDOM HIS", create=True)
    for n, (keyword, vr, text, where) in enumerate(places):
        if where == "top":
            setattr(ds, keyword, text)
        elif where == "private":
            private.add_new(0x10 + n, vr if vr != "CS" else "LO", text)
        else:
            item = Dataset()
            item.CodingSchemeDesignator = "99LOCAL"
            setattr(item, keyword, text)
            if where == "deep":
                outer = Dataset()
                outer.RequestAttributesSequence = Sequence([item])
                ref = Dataset()
                ref.ReferencedSOPClassUID = CTImageStorage
                ref.ReferencedSOPInstanceUID = uid_list[0]
                outer.ReferencedImageSequence = Sequence([ref])
                ds.ProcedureCodeSequence = Sequence([outer])
            else:
                ds.ProcedureCodeSequence = Sequence([item])
    return ds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), implicit=st.booleans())
def test_no_planted_identifier_survives_and_uids_are_valid(data, implicit):
    identity = data.draw(identities())
    places = data.draw(placements(identity))
    uid_list = data.draw(st.lists(uids, min_size=4, max_size=4, unique=True))
    ds = _dataset(identity, places, uid_list, implicit)
    ctx = DeidContext(keys=KEYS, options=DeidOptions(), patient_id=identity["patient_id"])
    deidentify_dataset(ds, ctx)
    encoded = encode_dataset(ds)
    low = encoded.lower()
    for key in ("family", "given", "patient_id", "birth", "accession"):
        assert identity[key].lower().encode() not in low, key
    for uid in uid_list:
        assert uid.encode() not in encoded
    out = dcmread(io.BytesIO(encoded))
    for elem in out.iterall():
        if elem.VR == "UI" and elem.value:
            for value in elem.value if isinstance(elem.value, list) else [elem.value]:
                assert UID(value).is_valid
                assert (
                    value.startswith("2.25.")
                    or value == CTImageStorage
                    or elem.keyword
                    in (
                        "TransferSyntaxUID",
                        "ImplementationClassUID",
                    )
                )
    # references keep pointing at the (remapped) instance
    for elem in out.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            assert elem.value == out.SOPInstanceUID

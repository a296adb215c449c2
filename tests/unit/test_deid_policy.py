"""The one decision table (tasks.deid.policy) and the allow-list derived from the standard."""

from __future__ import annotations

import pytest

from tasks.deid.allowlist import ALLOW_LIST_FILE, allowed_tags, derive, render
from tasks.deid.policy import REMOVALS, decide, valid_value
from tasks.deid.profile import Action, DeidOptions, table

OPTIONS = DeidOptions()


def test_allow_list_file_is_the_list_derived_from_the_standard():
    assert ALLOW_LIST_FILE.read_text(encoding="ascii") == render(derive())
    tags = allowed_tags()
    assert 0x00280030 in tags and 0x00200032 in tags  # PixelSpacing, ImagePositionPatient
    assert 0x00180050 in tags and 0x00181151 in tags  # SliceThickness, XRayTubeCurrent
    assert 0x00620002 in tags  # SegmentSequence
    assert 0x00101030 not in tags or 0x00101030 in table()  # PatientWeight: table decides


@pytest.mark.parametrize(
    ("tag", "vr", "action"),
    [
        (0x00280030, "DS", Action.KEEP),  # PixelSpacing
        (0x00280030, None, Action.KEEP),  # implicit VR: the dictionary's
        (0x00280030, "UN", Action.REMOVE_INVALID_VR),
        (0x00280030, "LO", Action.REMOVE_INVALID_VR),
        (0x00101030, "UT", Action.REMOVE_INVALID_VR),  # a name typed into PatientWeight
        (0x00101030, "DS", Action.KEEP),
        (0x00201020, "LO", Action.REMOVE_RETIRED),  # Reference
        (0x7FE00020, "OW", Action.REMOVE_RETIRED),  # Coefficients SDVN
        (0x00091234, "LO", Action.REMOVE_UNKNOWN),  # (odd groups never reach decide)
        (0x0019FFFE, "LO", Action.REMOVE_UNKNOWN),
        (0x00102297, "PN", Action.REMOVE),  # ResponsiblePerson: E.1-1 X
        (0x00100021, "LO", Action.REMOVE),  # IssuerOfPatientID: E.1-1 X
        (0x00102201, "LO", Action.REMOVE_NOT_ALLOWED),  # PatientSpeciesDescription
        (0x00181000, "LO", Action.REMOVE),  # DeviceSerialNumber
        (0x0008103E, "LO", Action.CLEAN),  # SeriesDescription
        (0x0008103E, "SQ", Action.REMOVE_INVALID_VR),  # a sequence where the dictionary says LO
        (0x00081140, "SQ", Action.RECURSE),
        (0x0040A160, "UT", Action.CLEAN),  # SR TextValue
        (0x00100010, "PN", Action.PSEUDONYM),
    ],
)
def test_decide(tag, vr, action):
    assert decide(tag, vr, OPTIONS) is action


def test_every_listed_or_unknown_attribute_gets_exactly_one_action():
    for tag in list(table())[:200] + sorted(allowed_tags())[:200]:
        assert isinstance(decide(tag, None, OPTIONS), Action)
    assert all(a.value.startswith("remove") for a in REMOVALS)


@pytest.mark.parametrize(
    ("vr", "raw", "ok"),
    [
        ("DS", b"71.5", True),
        ("DS", b" -1.5e3\\2 ", True),
        ("DS", "Müller Jürgen".encode(), False),
        ("DS", b"71,5", False),
        ("IS", b"12 ", True),
        ("IS", b"12a", False),
        ("DA", b"20230517", True),
        ("DA", b"17.05.2023", False),
        ("TM", b"143000.123456", True),
        ("TM", b"14h30", False),
        ("CS", b"ORIGINAL\\PRIMARY\\AXIAL ", True),
        ("CS", b"Mueller", False),
        ("CS", b"ABCDEFGHIJKLMNOPQ", False),
        ("AS", b"063Y", True),
        ("AS", b"63 years", False),
        ("UI", b"1.2.840.10008.5.1.4.1.1.2\x00", True),
        ("UI", b"1.2.Smith", False),
        ("US", b"\x01\x00", True),
        ("US", b"\x01\x00\x02", False),
        ("US or SS", b"\x01\x00", True),
        ("FD", b"\x00" * 16, True),
        ("FD", b"\x00" * 12, False),
        ("LO", "Müller".encode(), True),  # no form: cleaned against the vocabulary instead
        ("DS", b"", True),
    ],
)
def test_valid_value(vr, raw, ok):
    assert valid_value(vr, raw) is ok

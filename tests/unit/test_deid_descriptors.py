"""Clean Descriptors (tasks.deid.descriptors): vocabulary words kept, names and dates go whole."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.deid.descriptors import (
    VOCABULARY,
    clean_descriptor,
    fold,
    identifier_tokens,
    remove_dates,
    site_vocabulary,
    words,
)
from tests.canaries import CANARIES, DATES, TIMES


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("CT THORAX 17.05.2023", "CT THORAX"),
        ("Müller Jürgen", ""),
        ("Müller Jürgen CT THORAX 5mm", "CT THORAX 5mm"),
        ("CT 17/05/2023 14:30", "CT"),
        ("2023.05.17. Kopf nativ", "Kopf nativ"),
        ("5. Mai 2021 Thorax", "Thorax"),
        ("17 maja 2023 klatka piersiowa", "klatka piersiowa"),
        ("17 Μαΐου 2023 θώρακας", "θώρακας"),
        ("ΠΑΠΑΔΟΠΟΥΛΟΥ ΕΛΕΝΗ ΘΩΡΑΚΑΣ", "ΘΩΡΑΚΑΣ"),
        ("Иванова Радосвета AX 5mm 17 май 2023 14:30", "AX 5mm"),
        ("Kontrolle 2023. május 17. mellkas", "mellkas"),
        ("17. května 2023 hrudník", "hrudník"),
        ("SCHADEL nativ 14h30", "SCHADEL nativ"),
        ("THORAX 1.25mm 2.5 Br40 3D 120kV", "THORAX 1.25mm 2.5 Br40 3D 120kV"),
        ("Ó Briain Siobhán", ""),
        ("王 秀英 CT", "CT"),
        ("فاطمة الهاشمي MR", "MR"),
    ],
)
def test_clean_descriptor_in_every_script(text, cleaned):
    assert clean_descriptor(text) == cleaned


def test_unknown_words_go_whole_never_as_residue():
    for canary in CANARIES:
        text = f"{canary.family} {canary.given} CT AX"
        assert clean_descriptor(text) == "CT AX", canary.language


@pytest.mark.parametrize("form", DATES + TIMES)
def test_every_date_and_time_form_is_removed(form):
    assert clean_descriptor(f"CT THORAX {form} 5mm") == "CT THORAX 5mm"
    assert remove_dates(form).strip() == ""


def test_identifier_words_are_removed_even_from_the_vocabulary():
    forbidden = identifier_tokens(["Kopf^Hans", "Thorax-Müller"])
    assert clean_descriptor("Kopf CT THORAX nativ", forbidden) == "CT nativ"
    assert clean_descriptor("KÖPF nativ", identifier_tokens(["Köpf"])) == "nativ"


def test_site_vocabulary_extends_the_reviewed_list():
    assert clean_descriptor("CT Lungenrundherd") == "CT"
    extra = site_vocabulary(("Lungenrundherd",))
    assert clean_descriptor("CT Lungenrundherd", extra=extra) == "CT Lungenrundherd"


def test_vocabulary_holds_no_canary_name_or_month():
    names = identifier_tokens(c.person_name.replace("^", " ") for c in CANARIES)
    assert not names & VOCABULARY
    assert not {"mai", "maja", "may", "μαιου", "januar"} & VOCABULARY


_LETTERS = st.characters(
    categories=("Lu", "Ll"),
    include_characters="äöüßłśźżąęćńóřůěčšžőűăâîșțşţάέήίόύώαβγδεζηθικλμνξπρστυφχψωабвгдежзийклмнопрстуфхцчшщъьюя",
)


KEPT = ["CT", "THORAX", "5mm", "nativ", "θώρακας", "AX", "T1"]


@settings(max_examples=80, deadline=None)
@given(
    names=st.lists(st.text(_LETTERS, min_size=3, max_size=12), min_size=1, max_size=3),
    kept=st.lists(st.sampled_from(KEPT), max_size=3),
)
def test_any_unknown_word_in_any_script_goes_whole(names, kept):
    unknown = {fold(n) for n in names if fold(n) not in VOCABULARY}
    cleaned = words(clean_descriptor(" ".join([*names, *kept])))
    assert not unknown & {fold(w) for w in cleaned}
    assert all(fold(w) in VOCABULARY or w in kept for w in cleaned)

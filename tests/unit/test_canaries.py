"""The multilingual canary corpus (tests/canaries.py) reads back with pydicom as planted."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.canaries import (
    CANARIES,
    CHARSETS,
    DATES,
    DOCUMENTS,
    SYNTAXES,
    find_canaries,
    inflated,
    write_corpus,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return write_corpus(tmp_path_factory.mktemp("canaries"))


def test_corpus_covers_languages_syntaxes_charsets_and_documents(corpus):
    languages = {c.language for f in corpus for c in f.canaries}
    assert {
        "de",
        "fr",
        "pl",
        "cs",
        "hu",
        "ro",
        "el",
        "bg",
        "hr",
        "lt",
        "lv",
        "sv",
        "pt",
        "ga",
        "zh",
        "ar",
    } <= languages
    assert {f.syntax for f in corpus} == set(SYNTAXES)
    assert {f.charset for f in corpus} == set(CHARSETS)
    assert {f.kind for f in corpus} == {"image", *DOCUMENTS}


def test_every_file_reads_back_with_its_names_and_charset(corpus):
    for file in corpus:
        ds = dcmread(file.path)
        assert ds.file_meta.TransferSyntaxUID == SYNTAXES[file.syntax]
        assert ds.SpecificCharacterSet == file.charset
        family = file.canaries[0].family
        assert str(ds.PatientName).startswith(family)
        if file.kind == "image":
            private = ds[0x00111010].value  # implicit VR: read as UN bytes
            if isinstance(private, bytes):
                private = private.decode(CHARSETS[file.charset])
            assert family in private
            assert ds.SeriesDescription.startswith(f"{family} ")
            assert any(d in ds.SeriesDescription for d in DATES)
            assert 0x7FE00020 in ds and 0x7FE11010 in ds  # after Pixel Data
            assert ds.RequestAttributesSequence[0].RequestingPhysician
        else:
            assert family.encode() in ds.EncapsulatedDocument


def test_find_canaries_sees_every_planted_word_in_the_raw_bytes(corpus):
    for file in corpus:
        found = find_canaries(inflated(file.path.read_bytes()), file.canaries, dates=False)
        expected = {w for c in file.canaries for w in c.words}
        assert set(found) == expected, file.path.name


def test_find_canaries_matches_without_diacritics_and_in_utf16():
    assert find_canaries(b"MULLER JURGEN", dates=False) == ["Jürgen", "Müller"]
    assert find_canaries("Παπαδοπούλου".encode("utf-16-le"), dates=False) == ["Παπαδοπούλου"]
    assert find_canaries("Иванова".encode("iso8859_5"), dates=False) == ["Иванова"]
    assert find_canaries(b"CT THORAX 5mm 2.5 B30f") == []
    assert "17.05.2023" in find_canaries(b"CT 17.05.2023")


def test_canary_words_are_distinctive():
    words = [w for c in CANARIES for w in c.words]
    assert len(words) == len(set(words))
    assert all(len(w) >= 2 for w in words)
    assert Path(__file__).exists()

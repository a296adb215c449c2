"""Unicode text handling of the leak gate: normalisation, transliteration, words and decoding.

Identifiers and the text they are looked for in go through the same steps, so that a name
matches whatever form it was written in:

* NFKC normalisation and case folding (``MÜLLER`` = ``müller``, ``ＡＢＣ`` = ``abc``);
* the same without diacritics (``Müller`` = ``Muller`` = ``Mueller``, ``Łukasz`` =
  ``Lukasz``, ``Ţepeş`` = ``Tepes``);
* Greek and Cyrillic transliterated to Latin (``Παπαδόπουλος`` = ``Papadopoulos``,
  ``Иванова`` = ``Ivanova``).

Bytes whose encoding is unknown (binary values, private tags, trailing data) are decoded with
several character sets (:data:`CHARSETS`), and every decoding is searched.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from functools import lru_cache

#: Character sets tried on bytes of unknown encoding (after the declared one, if any).
CHARSETS = ("utf-8", "latin-1", "iso8859-2", "iso8859-7", "iso8859-5", "cp1251", "cp1250")
#: Letters that lose no combining mark when decomposed but have a plain Latin form.
_PLAIN = str.maketrans(
    {"ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th", "ð": "d",
     "ŀ": "l", "ß": "ss", "ŧ": "t", "ŋ": "ng"}
)  # fmt: skip
_GREEK_DIGRAPHS = (
    ("ου", "ou"), ("αυ", "av"), ("ευ", "ev"), ("ηυ", "iv"), ("γγ", "ng"), ("γκ", "gk"),
    ("μπ", "mp"), ("ντ", "nt"), ("τσ", "ts"), ("τζ", "tz"),
)  # fmt: skip
_GREEK = str.maketrans(
    {"α": "a", "β": "v", "γ": "g", "δ": "d", "ε": "e", "ζ": "z", "η": "i", "θ": "th", "ι": "i",
     "κ": "k", "λ": "l", "μ": "m", "ν": "n", "ξ": "x", "ο": "o", "π": "p", "ρ": "r", "σ": "s",
     "ς": "s", "τ": "t", "υ": "y", "φ": "f", "χ": "ch", "ψ": "ps", "ω": "o"}
)  # fmt: skip
_CYRILLIC = str.maketrans(
    {"а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ж": "zh", "з": "z", "и": "i",
     "й": "y", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r", "с": "s",
     "т": "t", "у": "u", "ф": "f", "х": "h", "ц": "ts", "ч": "ch", "ш": "sh", "щ": "sht",
     "ъ": "a", "ь": "y", "ю": "yu", "я": "ya", "ё": "e", "ы": "y", "э": "e", "є": "ye",
     "і": "i", "ї": "yi", "ґ": "g", "ђ": "dj", "ј": "j", "љ": "lj", "њ": "nj", "ћ": "c",
     "џ": "dz", "ѝ": "i"}
)  # fmt: skip
#: Other plain spellings: German umlauts (Müller = Mueller), Croatian đ (Đurđević = Djurdjevic),
#: Scandinavian ø/å (Søren = Soeren, Åse = Aase).
_ALTERNATES = {"ä": "ae", "ö": "oe", "ü": "ue", "đ": "dj", "ø": "oe", "å": "aa"}
_ALTERNATE = str.maketrans(_ALTERNATES)
#: A word: letters and digits of any script with their combining marks (no underscore).
WORD = re.compile(
    r"(?:[^\W_]|[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f])+"
)
_NOT_SPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\u0e00-\u0e7f]")


def fold(text: str) -> str:
    """NFKC-normalise and case-fold ``text`` (composed again: folding may decompose)."""
    if text.isascii():  # NFKC leaves ASCII as it is; case folding is lowering there
        return text.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFKC", text).casefold())


def _strip_marks_slow(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", plain).translate(_PLAIN)


#: Characters below this code point are stripped with one table (Latin, Greek, Cyrillic).
_TABLE_END = 0x0530
_STRIP_TABLE = {
    cp: _strip_marks_slow(chr(cp))
    for cp in range(0x80, _TABLE_END)
    if _strip_marks_slow(chr(cp)) != chr(cp)
}


def strip_marks(text: str) -> str:
    """Remove diacritics (combining marks) and map letters such as ``ł``/``ø`` to plain Latin."""
    if text.isascii():
        return text
    if max(text) < chr(_TABLE_END):  # the common case: one C-speed table lookup per character
        return text.translate(_STRIP_TABLE)
    return _strip_marks_slow(text)


def transliterate(text: str) -> str:
    """Write Greek and Cyrillic letters of folded ``text`` in Latin (other letters unchanged)."""
    if text.isascii():
        return text
    # Greek: remove accents first (tonos, dialytika), then digraphs, then letters.
    out = strip_marks(text) if any("\u0370" <= c <= "\u03ff" for c in text) else text
    for greek, latin in _GREEK_DIGRAPHS:
        out = out.replace(greek, latin)
    return strip_marks(out.translate(_GREEK).translate(_CYRILLIC))


@lru_cache(maxsize=65536)
def variants(word: str) -> tuple[str, ...]:
    """Distinct comparable forms of a folded word: as is, without diacritics, in Latin."""
    if word.isascii():
        return (word,)
    forms = dict.fromkeys((word, strip_marks(word), transliterate(word)))
    if any(c in word for c in _ALTERNATES):
        forms[strip_marks(word.translate(_ALTERNATE))] = None
    return tuple(forms)


def words(text: str) -> list[str]:
    """Folded words of ``text`` (letters and digits of any script)."""
    return WORD.findall(fold(text))


def not_spaced(text: str) -> bool:
    """Whether ``text`` has letters of a script written without spaces (CJK, Thai)."""
    return bool(_NOT_SPACED.search(text))


def decodings(data: bytes, declared: str | None = None) -> Iterator[str]:
    """Yield the distinct text forms of bytes of unknown encoding.

    ASCII bytes decode once. Otherwise the declared encoding first, then :data:`CHARSETS`,
    then UTF-16 (both byte orders, both alignments) when the bytes hold NULs.
    """
    if not data:
        return
    if data.isascii():
        yield data.decode("ascii")
        return
    seen: set[str] = set()
    charsets = ([declared] if declared else []) + list(CHARSETS)
    if b"\x00" in data:
        charsets += ["utf-16-le", "utf-16-be"]
    for charset in charsets:
        try:
            text = data.decode(charset, "ignore")
        except LookupError:
            continue
        if text not in seen:
            seen.add(text)
            yield text
    if b"\x00" in data and len(data) > 1:
        for charset in ("utf-16-le", "utf-16-be"):
            text = data[1:].decode(charset, "ignore")
            if text not in seen:
                seen.add(text)
                yield text


def printable(text: str) -> bool:
    """Whether ``text`` reads as text (no control characters except whitespace, some letters)."""
    stripped = text.strip("\x00 ")
    if len(stripped) < 4:
        return False
    ok = all(c.isprintable() or c in "\r\n\t" for c in stripped)
    return ok and any(c.isalpha() for c in stripped)

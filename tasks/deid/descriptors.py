"""Clean Descriptors: rebuild free text from technical vocabulary words, in every script.

A descriptor such as ``"Müller Jürgen CT THORAX 17.05.2023 5mm"`` becomes ``"CT THORAX 5mm"``:

1. every date and time in a common European form is removed first, whole (``17.05.2023``,
   ``17/05/2023``, ``2023-05-17``, ``2023.05.17.``, ``17 May 2023``, ``5. Mai 2021``,
   ``17 maja 2023``, ``17 Μαΐου 2023``, ``17 май 2023``, ``2023. május 17.``, ``14:30``,
   ``14h30``, ``14.30``...), month names in the data space's languages, declined forms and
   abbreviations included;
2. the rest is split into words at Unicode word boundaries (letters and combining marks of any
   script, digits), and a word is kept only when it is in the reviewed vocabulary
   (``vocabulary.txt``: modality, anatomy, contrast, plane, kernel, sequence, protocol and unit
   words in the data space's languages, plus a site's own words) or is a technical token
   (``5mm``, ``2.5``, ``3D``, ``T1``, ``B30f``, a number of at most three digits);
3. a word of the patient's names or IDs is removed even when it is in the vocabulary.

An unknown word goes whole: ``"Müller"`` never leaves ``"ü"`` behind. The punctuation between
kept words is preserved, so ``"GTV-1"`` stays ``"GTV-1"``. This is an allow-list: a name nobody
listed is removed, at the cost of also removing rare technical words not in the vocabulary.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from functools import cache, lru_cache
from pathlib import Path

import regex

VOCABULARY_FILE = Path(__file__).with_name("vocabulary.txt")


def fold(text: str) -> str:
    """Lowercase ``text`` and strip diacritics, one output character per input character.

    The length is kept so that spans found in the folded text apply to the original.
    """
    return "".join(_fold_char(ch) for ch in text)


@lru_cache(maxsize=4096)
def _fold_char(ch: str) -> str:
    base = unicodedata.normalize("NFD", ch)[0]
    low = base.lower()
    if low == "ς":  # Greek final sigma: the same letter as σ
        return "σ"
    return low if len(low) == 1 else base


@cache
def _vocabulary() -> frozenset[str]:
    words: set[str] = set()
    for line in VOCABULARY_FILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        words.update(fold(unicodedata.normalize("NFC", w)) for w in line.split())
    return frozenset(words)


#: The reviewed vocabulary, folded (lowercase, no diacritics).
VOCABULARY = _vocabulary()

_MONTHS = """
january february march april may june july august september october november december
jan feb mar apr jun jul aug sep sept oct nov dec
januar janner februar marz mai juni juli oktober dezember jan mrz okt dez
janvier fevrier mars avril juin juillet aout septembre octobre novembre decembre janv fevr avr
juil
gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre dicembre genn mag
giu lug ago sett ott dic
enero febrero abril mayo junio julio septiembre setiembre octubre noviembre diciembre ene
janeiro fevereiro marco maio junho julho setembro outubro novembro dezembro fev
januari februari maart mei augustus mrt
styczen stycznia luty lutego marzec marca kwiecien kwietnia maj maja czerwiec czerwca lipiec
lipca sierpien sierpnia wrzesien wrzesnia pazdziernik pazdziernika listopad listopada grudzien
grudnia sty lut kwi cze lip sie wrz paz lis gru
leden ledna unor unora brezen brezna duben dubna kveten kvetna cerven cervna cervenec cervence
srpen srpna zari rijen rijna listopadu prosinec prosince
januara februara aprila maja juna jula augusta septembra oktobra novembra decembra
marcius aprilis majus junius julius augusztus szeptember oktober marc apr maj jun jul szept
ianuarie februarie martie aprilie iunie iulie septembrie octombrie noiembrie decembrie
sijecanj sijecnja veljaca veljace ozujak ozujka travanj travnja svibanj svibnja lipanj lipnja
srpanj srpnja kolovoz kolovoza rujan rujna studeni studenoga prosinac prosinca
junij julij avgust
sausis sausio vasaris vasario kovas kovo balandis balandzio geguze geguzes birzelis birzelio
liepa liepos rugpjutis rugpjucio rugsejis rugsejo spalis spalio lapkritis lapkricio gruodis
gruodzio
janvaris janvari februaris marts aprilis maijs maija junijs julijs augusts septembris oktobris
novembris decembris
jaanuar veebruar marts aprill juuni juuli oktoober detsember
tammikuu tammikuuta helmikuu helmikuuta maaliskuu maaliskuuta huhtikuu huhtikuuta toukokuu
toukokuuta kesakuu kesakuuta heinakuu heinakuuta elokuu elokuuta syyskuu syyskuuta lokakuu
lokakuuta marraskuu marraskuuta joulukuu joulukuuta
augusti maj
ianair eanair feabhra marta aibrean bealtaine meitheamh iuil lunasa samhain nollaig
ιανουαριος ιανουαριου φεβρουαριος φεβρουαριου μαρτιος μαρτιου απριλιος απριλιου μαιος μαιου
ιουνιος ιουνιου ιουλιος ιουλιου αυγουστος αυγουστου σεπτεμβριος σεπτεμβριου οκτωβριος
οκτωβριου νοεμβριος νοεμβριου δεκεμβριος δεκεμβριου ιαν φεβ μαρ απρ μαι ιουν ιουλ αυγ σεπ
οκτ νοε δεκ
януари февруари март април май юни юли август септември октомври ноември декември
января февраля марта апреля мая июня июля августа сентября октября ноября декабря
січня лютого березня квітня травня червня липня серпня вересня жовтня листопада грудня
jannar frar marzu mejju gunju lulju awwissu settembru ottubru novembru dicembru
"""
_MONTH = "|".join(
    sorted({regex.escape(fold(w)) for w in _MONTHS.split()}, key=lambda w: (-len(w), w))
)
_DAY = r"(?:[0-3]?\d)"
_YEAR = r"(?:\d{4}|'?\d{2})"
#: Dates and times (matched on folded text: lowercase, no diacritics).
_DATE_TIME = regex.compile(
    rf"""
    (?<![\p{{L}}\p{{N}}])
    (?:
        \d{{4}}\s?[-./]\s?[01]?\d\s?[-./]\s?[0-3]?\d\.?            # 2023-05-17, 2023.05.17.
      | {_DAY}\s?[-./]\s?[01]?\d\s?[-./]\s?{_YEAR}\.?               # 17.05.2023, 17/5/23
      | {_DAY}\.?\s*(?:de\s+)?(?:{_MONTH})\.?(?:\s*(?:de\s+)?,?\s*{_YEAR})?\.?  # 17 maja 2023
      | \d{{4}}\.?\s*(?:{_MONTH})\.?\s*{_DAY}\.?                   # 2023. majus 17.
      | (?:{_MONTH})\.?\s*{_DAY}(?:st|nd|rd|th)?,?\s*{_YEAR}       # May 17, 2023
      | (?:{_MONTH})\.?\s*\d{{4}}                                   # Mai 2021
      | [0-2]?\d\s?[:h]\s?[0-5]\d(?:\s?[:.]\s?[0-5]\d(?:[.,]\d+)?)?(?:\s?(?:h|uhr|am|pm))?
      | [0-2]\d\.[0-5]\d(?![\p{{L}}\p{{N}}%])                        # 14.30, 17.05
      | [0-2]?\d\s?uhr                                              # 14 Uhr
    )
    (?![\p{{L}}\p{{N}}])
    """,
    regex.VERBOSE,
)
#: One word: a number (with decimals and an attached unit) or a run of letters, marks, digits.
_TOKEN = regex.compile(r"\d+(?:[.,]\d+)?[\p{L}\p{M}%]*|[\p{L}\p{M}\p{N}]+")
#: Technical tokens kept without being in the vocabulary.
_TECHNICAL = regex.compile(
    r"(?:\d{1,3}(?:[.,]\d{1,2})?(?:mm|cm|m|s|ms|kv|kvp|ma|mas|t|d|h|min|sec|x|mbq|ml|kev|%)?"
    r"|[a-z]{1,2}\d{1,3}[a-z]{0,2})",
    regex.IGNORECASE,
)
_DIGIT = regex.compile(r"\d")
_EMPTY_BRACKETS = regex.compile(r"[\(\[\{][\s\W_]*[\)\]\}]")
_SPACES = regex.compile(r"\s{2,}")
_SEPARATOR_RUNS = regex.compile(r"(?:\s*[-_.,;:/\\|+&*#'\"]\s*){2,}")
_EDGE = " \t-_.,;:/\\|+&*#'\""


def words(text: str) -> list[str]:
    """Split ``text`` into words (Unicode letters and marks of any script, digits)."""
    return _TOKEN.findall(text)


def identifier_tokens(values: Iterable[str]) -> frozenset[str]:
    """Split identifying values (names, IDs) into folded word tokens of 2+ characters."""
    tokens: set[str] = set()
    for value in values:
        for word in words(unicodedata.normalize("NFC", str(value))):
            if len(word) >= 2:
                tokens.add(fold(word))
    return frozenset(tokens)


def remove_dates(text: str) -> str:
    """Replace every date and time in ``text`` by a space."""
    if _DIGIT.search(text) is None:  # every date and time form has a digit
        return text
    folded = fold(text)
    spans = [m.span() for m in _DATE_TIME.finditer(folded)]
    if not spans:
        return text
    parts, last = [], 0
    for start, end in spans:
        parts.append(text[last:start])
        parts.append(" ")
        last = end
    parts.append(text[last:])
    return "".join(parts)


def token_allowed(
    word: str, forbidden: frozenset[str] = frozenset(), extra: frozenset[str] = frozenset()
) -> bool:
    """Whether a word may stay in a cleaned descriptor.

    Parameters
    ----------
    word
        One word of :func:`words`.
    forbidden
        Folded identifier tokens of the patient (never kept).
    extra
        Folded site vocabulary words (kept like the reviewed vocabulary).
    """
    low = fold(word)
    if low in forbidden:
        return False
    return low in VOCABULARY or low in extra or _TECHNICAL.fullmatch(word) is not None


def clean_descriptor(
    text: str, forbidden: frozenset[str] = frozenset(), extra: frozenset[str] = frozenset()
) -> str:
    """Remove dates, times and every word that is not vocabulary or a technical token.

    Parameters
    ----------
    text
        Descriptor value (one value of a possibly multi-valued element).
    forbidden
        Folded identifier tokens of the patient (always removed, even if in the vocabulary).
    extra
        Folded site vocabulary words (see :func:`site_vocabulary`).

    Returns
    -------
    str
        The cleaned text (may be empty).
    """
    if not text:
        return ""
    return _clean(text, forbidden, extra)


@lru_cache(maxsize=8192)
def _clean(text: str, forbidden: frozenset[str], extra: frozenset[str]) -> str:
    """:func:`clean_descriptor` (a series repeats its descriptors on every instance)."""
    text = unicodedata.normalize("NFC", text)
    undated = remove_dates(text)
    kept = _TOKEN.sub(
        lambda m: m.group(0) if token_allowed(m.group(0), forbidden, extra) else "", undated
    )
    if kept == text:
        return text.strip()
    previous = None
    while previous != kept:
        previous = kept
        kept = _EMPTY_BRACKETS.sub(" ", kept)
    kept = _SPACES.sub(" ", kept)
    # Collapse runs of separators left behind by removed words ("CT - - 5mm" -> "CT - 5mm").
    kept = _SEPARATOR_RUNS.sub(lambda m: m.group(0).strip()[:1] + " ", kept)
    return kept.strip(_EDGE).strip()


@lru_cache(maxsize=32)
def site_vocabulary(words_: tuple[str, ...]) -> frozenset[str]:
    """Fold a site's extra vocabulary words (configuration) for :func:`clean_descriptor`."""
    return frozenset(fold(unicodedata.normalize("NFC", w)) for w in words_ for w in w.split())


#: Codecs a kept value's raw bytes are read in when looking for identifier words (the file's
#: character set may be wrong or missing; any of them finding a word is enough).
RAW_CODECS = ("utf_8", "latin_1", "iso8859_2", "iso8859_5", "iso8859_7")


@lru_cache(maxsize=4096)
def holds_identifier(value: bytes | str, forbidden: frozenset[str]) -> bool:
    """Whether a kept text value holds one of the patient's identifier words.

    Parameters
    ----------
    value
        The value as read (raw bytes, decoded in every codec of :data:`RAW_CODECS`) or as
        text.
    forbidden
        Folded identifier tokens (see :func:`identifier_tokens`).
    """
    if not forbidden or not value:
        return False
    texts = [value] if isinstance(value, str) else [value.decode(c, "replace") for c in RAW_CODECS]
    return any(
        fold(word) in forbidden
        for text in texts
        for word in words(unicodedata.normalize("NFC", text))
    )


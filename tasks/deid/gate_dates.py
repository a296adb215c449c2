"""Dates in free text, in the forms used across Europe, for the leak gate.

:func:`find_dates` reads text (any case, with or without diacritics) and returns the dates it
holds as :class:`DateMention` values:

* numeric: ``17.05.2023``, ``17/05/2023``, ``17-05-23``, ``17. 5. 2023``, ``2023-05-17``,
  ``2023.05.17.``, ``2023. 05. 17.``, ``20230517``;
* with month names of the EU languages (plus Cyrillic and Greek forms, nominative and genitive,
  common abbreviations): ``17 May 2023``, ``May 17, 2023``, ``5. Mai 2021``, ``17 maja 2023``,
  ``17 Μαΐου 2023``, ``17 май 2023 г.``, ``17 de mayo de 2023``, ``2023. május 17.``,
  ``2023 m. gegužės 17 d.``, ``2023. gada 17. maijs``, ``17 Bealtaine 2023``;
* partial: month and year (``May 2023``, ``05/2023``), day and month (``17.05``, ``17 May``).

A numeric day-month-year whose day is 12 or less is also returned month-first (``05/17/2023``
is read both ways), and a two-digit year as 19xx and 20xx, so a comparison with known dates
misses neither reading.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from tasks.deid.gate_text import fold, strip_marks

_MONTH_NAMES: dict[int, str] = {
    1: """january jan januar jänner jän janvier janv gennaio gen enero ene janeiro januari
          styczeń stycznia sty leden ledna január januára siječanj siječnja ianuarie sausis
          sausio janvāris janvārī jaanuar tammikuu tammikuuta eanáir jannar ιανουάριος
          ιανουαρίου ιαν януари января январь""",
    2: """february feb februar feber février févr fév febbraio febrero fevereiro fev februari
          luty lutego lut únor února február februára veljača veljače februarie vasaris vasario
          februāris februārī veebruar helmikuu helmikuuta feabhra frar φεβρουάριος
          φεβρουαρίου φεβ февруари февраля февраль""",
    3: """march mar märz mär mars marzo março maart mrt marzec marca březen března marec
          ožujak ožujka március márc martie kovas kovo marts martā märts maaliskuu
          maaliskuuta márta marzu μάρτιος μαρτίου μαρ март марта""",
    4: """april apr avril avr aprile abril apr kwiecień kwietnia kwi duben dubna apríl
          apríla travanj travnja április ápr aprilie balandis balandžio aprīlis aprīlī
          aprill huhtikuu huhtikuuta aibreán απρίλιος απριλίου απρ април апреля""",
    5: """may mai maggio mag mayo maio mei maj maja květen května máj mája svibanj svibnja
          május gegužė gegužės maijs maijā toukokuu toukokuuta bealtaine mejju μάιος μαΐου
          μαΐ μαϊ май мая""",
    6: """june jun juni juin giugno giu junio junho juni czerwiec czerwca cze červen června
          jún júna junij lipanj lipnja június iunie birželis birželio jūnijs jūnijā juuni
          kesäkuu kesäkuuta meitheamh ġunju ιούνιος ιουνίου ιουν юни июня июнь""",
    7: """july jul juli juillet juil luglio lug julio julho juli lipiec lipca lip červenec
          července júl júla julij srpanj srpnja július iulie liepa liepos jūlijs jūlijā juuli
          heinäkuu heinäkuuta iúil lulju ιούλιος ιουλίου ιουλ юли июля июль""",
    8: """august aug august août agosto ago agosto augustus sierpień sierpnia sie srpen
          srpna august augusta avgust kolovoz kolovoza augusztus rugpjūtis rugpjūčio
          augusts augustā elokuu elokuuta lúnasa awwissu αύγουστος αυγούστου αυγ август
          августа""",
    9: """september sep sept septembre settembre set septiembre setiembre setembro wrzesień
          września wrz září septembra rujan rujna szeptember szept septembrie rugsėjis
          rugsėjo septembris septembrī syyskuu syyskuuta meán fómhair settembru
          σεπτέμβριος σεπτεμβρίου σεπ септември сентября сентябрь""",
    10: """october oct oktober okt octobre ottobre ott octubre outubro out oktober
           październik października paź říjen října október októbra listopad listopada
           október octombrie spalis spalio oktobris oktobrī oktoober lokakuu lokakuuta
           deireadh fómhair ottubru οκτώβριος οκτωβρίου οκτ октомври октября октябрь""",
    11: """november nov novembre novembre noviembre novembro listopad listopada lis
           listopadu november novembra studeni studenoga novembre noiembrie lapkritis
           lapkričio novembris novembrī marraskuu marraskuuta samhain novembru νοέμβριος
           νοεμβρίου νοε ноември ноября ноябрь""",
    12: """december dec dezember dez décembre déc dicembre dic diciembre dezembro grudzień
           grudnia gru prosinec prosince december decembra prosinac prosinca decembrie
           gruodis gruodžio decembris decembrī detsember joulukuu joulukuuta nollaig
           diċembru δεκέμβριος δεκεμβρίου δεκ декември декабря декабрь""",
}


_TWO_WORDS = ("mean fomhair", "deireadh fomhair")


def _norm(text: str) -> str:
    return " ".join(strip_marks(fold(text)).split()) if "\n" in text else strip_marks(fold(text))


def _month_table() -> dict[str, int]:
    table: dict[str, int] = {}
    for month, names in _MONTH_NAMES.items():
        text = _norm(names)
        for phrase in _TWO_WORDS:  # Irish: meán fómhair (9), deireadh fómhair (10)
            if phrase in text:
                table[phrase] = month
                text = text.replace(phrase, " ")
        for name in text.split():
            table[name] = month
    return table


MONTHS = _month_table()
_MONTH = "|".join(sorted((re.escape(m) for m in MONTHS), key=len, reverse=True))
_Y = r"((?:19|20)\d\d)"
_D = r"(\d{1,2})"
_SEP_D = r"(?:st|nd|rd|th|er|\.)?"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # 2023-05-17, 2023.05.17., 2023. 05. 17., 2023/5/17
    ("ymd", re.compile(rf"(?<![\d.]){_Y}\s?([-/.])\s?(\d{{1,2}})\s?\2\s?(\d{{1,2}})(?!\d)")),
    # 20230517
    ("ymd8", re.compile(rf"(?<![\d.]){_Y}(\d\d)(\d\d)(?![\d.])")),
    # 17.05.2023, 17/05/23, 17. 5. 2023
    ("dmy", re.compile(r"(?<![\d.])(\d{1,2})\s?([./-])\s?(\d{1,2})\s?\2\s?(\d{4}|\d\d)(?![\d])")),
    # 17 May 2023, 5. Mai 2021, 17 de mayo de 2023, 17 Μαΐου 2023, 17 май 2023
    (
        "dMy",
        re.compile(
            rf"(?<!\d){_D}{_SEP_D}\s*(?:de\s+|of\s+|ta\s+)?\b({_MONTH})\b\.?,?\s*"
            rf"(?:de\s+|del\s+)?{_Y}(?!\d)"
        ),
    ),
    # May 17, 2023
    ("Mdy", re.compile(rf"\b({_MONTH})\b\.?\s+{_D}{_SEP_D},?\s+{_Y}(?!\d)")),
    # 2023. május 17., 2023 m. gegužės 17 d.
    ("yMd", re.compile(rf"(?<!\d){_Y}\.?\s*(?:m\.\s*)?\b({_MONTH})\b\.?\s*{_D}(?!\d)")),
    # 2023. gada 17. maijs
    ("ydM", re.compile(rf"(?<!\d){_Y}\.?\s*gada\s+{_D}\.\s*({_MONTH})\b")),
    # May 2023, mai 2023
    ("My", re.compile(rf"\b({_MONTH})\b\.?,?\s*{_Y}(?!\d)")),
    # 05/2023, 05.2023
    ("my", re.compile(rf"(?<![\d./-])(0?[1-9]|1[0-2])[./-]{_Y}(?![\d./-])")),
    # 17 May, 5. Mai
    ("dM", re.compile(rf"(?<!\d){_D}{_SEP_D}\s*\b({_MONTH})\b")),
    # 17.05, 17.05.
    ("dm", re.compile(r"(?<![\w.,/-])(\d{1,2})\.(\d{1,2})\.?(?![\w,/-]|\.\d)")),
)


#: A full date has a year of four digits or is a numeric ``d.m.yy``.
_CANDIDATE = re.compile(
    r"(?<!\d)(?:19|20)\d\d(?!\d)|(?<![\d.])\d{1,2}\s?[./-]\s?\d{1,2}\s?[./-]\s?\d\d(?!\d)"
)
_REACH = 48


def _windows(text: str) -> list[tuple[int, int]]:
    """Return merged spans of ``_REACH`` characters around each place a full date can be."""
    spans: list[tuple[int, int]] = []
    for match in _CANDIDATE.finditer(text):
        start, end = max(0, match.start() - _REACH), match.end() + _REACH
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


@dataclass(frozen=True, order=True)
class DateMention:
    """A date written in text; ``year`` or ``day`` is 0 when the text does not give it."""

    year: int
    month: int
    day: int

    @property
    def full(self) -> bool:
        """Whether year, month and day are all known."""
        return bool(self.year and self.day)


def _valid(year: int, month: int, day: int) -> bool:
    if not 1 <= month <= 12:
        return False
    if not day:
        return True
    try:
        dt.date(year or 2000, month, day)
    except ValueError:
        return False
    return True


def _years(text: str) -> list[int]:
    value = int(text)
    return [value] if len(text) == 4 else [1900 + value, 2000 + value]


def find_dates(text: str) -> set[DateMention]:
    """Return every date (full or partial) written in ``text``.

    Parameters
    ----------
    text
        Any text.

    Returns
    -------
    set of DateMention
        Full dates, month-year and day-month mentions (see the module docstring).
    """
    if not text or not any(c.isdigit() for c in text):
        return set()
    return _find(text)


def find_full_dates(text: str) -> set[DateMention]:
    """Return the full dates (year, month and day) written in ``text``; fast on long text.

    Every full date form holds a year of four digits or a numeric ``d.m.yy``: only the places
    around one are read, so decoded binary data costs one regular expression pass.
    """
    if not text or _CANDIDATE.search(text) is None:
        return set()
    if len(text) <= 2 * _REACH:
        return {d for d in _find(text) if d.full}
    found: set[DateMention] = set()
    for start, end in _windows(text):
        found |= {d for d in _find(text[start:end]) if d.full}
    return found


def _find(text: str) -> set[DateMention]:
    norm = _norm(text)
    found: set[DateMention] = set()

    def add(year: int, month: int, day: int) -> None:
        if _valid(year, month, day):
            found.add(DateMention(year, month, day))

    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(norm):
            g = m.groups()
            if kind in ("ymd", "ymd8"):
                year, month, day = int(g[0]), int(g[-2]), int(g[-1])
                add(year, month, day)
            elif kind == "dmy":
                for year in _years(g[3]):
                    add(year, int(g[2]), int(g[0]))
                    add(year, int(g[0]), int(g[2]))
            elif kind == "dMy":
                add(int(g[2]), MONTHS[g[1]], int(g[0]))
            elif kind == "Mdy":
                add(int(g[2]), MONTHS[g[0]], int(g[1]))
            elif kind == "yMd":
                add(int(g[0]), MONTHS[g[1]], int(g[2]))
            elif kind == "ydM":
                add(int(g[0]), MONTHS[g[2]], int(g[1]))
            elif kind == "My":
                add(int(g[1]), MONTHS[g[0]], 0)
            elif kind == "my":
                add(int(g[1]), int(g[0]), 0)
            elif kind == "dM":
                add(0, MONTHS[g[1]], int(g[0]))
            elif kind == "dm":
                add(0, int(g[1]), int(g[0]))
    return found


def parse_da(value: str) -> DateMention | None:
    """Parse a DICOM DA/DT value or an ISO date (``YYYYMMDD``, ``YYYY-MM-DD``...) as a full date."""
    match = re.match(r"\s*((?:18|19|20)\d\d)[-./]?(\d\d)[-./]?(\d\d)", str(value))
    if match is None:
        return None
    year, month, day = (int(x) for x in match.groups())
    return DateMention(year, month, day) if _valid(year, month, day) else None


def has_date(text: str) -> bool:
    """Whether ``text`` holds a full date or a month with its year (a date in free text)."""
    return any(d.year for d in find_dates(text))

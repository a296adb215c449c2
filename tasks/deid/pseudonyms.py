"""Keyed pseudonyms: patient pseudonym, UID remapping and the per-patient date shift.

Every value is an HMAC-SHA256 under a sub-key derived from the site secret with HKDF-SHA256
(RFC 5869), one sub-key per purpose and per site. The functions are pure: the same secret,
site and input give the same output in any process (Dask workers need no shared state), and
another secret gives unlinkable output. Nothing here logs or returns the secret; ``key_id`` is a
short fingerprint of a derived key that identifies which secret was used.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

#: Length of the patient pseudonym (base32 characters: 26 x 5 = 130 bits).
PSEUDONYM_LENGTH = 26
#: Date shift window: between MIN_SHIFT_DAYS and MIN_SHIFT_DAYS + SHIFT_SPAN_DAYS - 1 days back.
MIN_SHIFT_DAYS = 365
SHIFT_SPAN_DAYS = 3650


def hkdf_sha256(secret: bytes, info: bytes, salt: bytes = b"oncoflow", length: int = 32) -> bytes:
    """Derive ``length`` bytes from ``secret`` with HKDF-SHA256 (RFC 5869).

    Parameters
    ----------
    secret
        Input keying material.
    info
        Context (purpose and site), so every purpose gets an independent key.
    salt
        Extraction salt.
    length
        Output length in bytes (at most 255 x 32).
    """
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _mac(key: bytes, value: str) -> bytes:
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).digest()


def normalise_identifier(value: str) -> str:
    """Normalise an identifier before hashing (strip padding, NULs and surrounding spaces)."""
    return str(value).replace("\x00", "").strip()


#: Prefix of the stand-in key of a patient without PatientID (a NUL never survives
#: :func:`normalise_identifier`, so no real PatientID can produce it).
NO_PATIENT_ID = "\x00no-patient-id:"


def patient_key(patient_id: str, fallback: str = "") -> str:
    """Return the key a patient's pseudonym and date shift derive from.

    Parameters
    ----------
    patient_id
        The original PatientID (or a key this function returned before).
    fallback
        What identifies the patient when PatientID is empty or missing: the study (or series)
        UID. Without it, a random key (one pseudonym per call, never shared).

    Returns
    -------
    str
        The normalised PatientID; for an empty one, a stand-in key from ``fallback`` that no
        PatientID can equal, so patients without an ID never share a pseudonym or a shift.
    """
    if str(patient_id).startswith(NO_PATIENT_ID):
        return str(patient_id)
    clean = normalise_identifier(patient_id)
    if clean:
        return clean
    stand_in = normalise_identifier(fallback) or secrets.token_hex(16)
    return NO_PATIENT_ID + stand_in


@dataclass(frozen=True)
class SiteKeys:
    """Purpose-specific keys of one site (never printed: ``repr`` hides the key bytes).

    Build with :meth:`derive`.
    """

    site: str
    key_id: str
    patient_key: bytes = field(repr=False)
    uid_key: bytes = field(repr=False)
    date_key: bytes = field(repr=False)

    @classmethod
    def derive(cls, secret: bytes, site: str) -> SiteKeys:
        """Derive the sub-keys of ``site`` from the site secret."""

        def sub(purpose: str) -> bytes:
            return hkdf_sha256(secret, f"oncoflow/{purpose}/{site}".encode())

        key_id = hashlib.sha256(sub("key-id")).hexdigest()[:12]
        return cls(
            site=site,
            key_id=key_id,
            patient_key=sub("patient-id"),
            uid_key=sub("uid"),
            date_key=sub("date-shift"),
        )

    def patient_pseudonym(self, patient_id: str) -> str:
        """Return the patient pseudonym: base32 of HMAC(patient key, PatientID), 26 characters.

        An empty PatientID gets a random stand-in (see :func:`patient_key`): pass the key of
        :func:`patient_key` with a fallback for a stable pseudonym.
        """
        digest = _mac(self.patient_key, patient_key(patient_id))
        return base64.b32encode(digest).decode("ascii")[:PSEUDONYM_LENGTH]

    def remap_uid(self, uid: str) -> str:
        """Return ``2.25.<int>``: a UUID (version 8 layout) from HMAC(uid key, UID), as an integer.

        At most 44 characters, valid per PS3.5 B.2; empty input stays empty.
        """
        clean = normalise_identifier(uid)
        if not clean:
            return ""
        raw = bytearray(_mac(self.uid_key, clean)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (custom)
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        return f"2.25.{int.from_bytes(raw, 'big')}"

    def date_shift(self, patient_id: str) -> DateShift:
        """Return the patient's date shift (same for every study of the patient)."""
        digest = _mac(self.date_key, patient_key(patient_id))
        days = MIN_SHIFT_DAYS + int.from_bytes(digest[:8], "big") % SHIFT_SPAN_DAYS
        seconds = 1 + int.from_bytes(digest[8:16], "big") % 86399
        return DateShift(days=days, seconds=seconds)


_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")


@dataclass(frozen=True)
class DateShift:
    """One patient's shift: ``days`` back in time and ``seconds`` forward in the day.

    An instant (a DT value, or a DA value with its paired TM value) moves by
    ``-days + seconds``, so every interval between instants of the patient is kept exactly.
    A DA value on its own moves by ``-days`` (intervals in days kept exactly); a TM value on its
    own moves by ``seconds`` modulo 24 h (time-of-day differences kept modulo 24 h). Values that
    cannot be parsed return ``None`` and are removed by the caller (fail closed).
    """

    days: int
    seconds: int

    @property
    def delta(self) -> timedelta:
        """The shift applied to instants."""
        return timedelta(days=-self.days, seconds=self.seconds)

    def shift_date(self, value: str) -> str | None:
        """Shift a DA value (``YYYYMMDD``; legacy ``YYYY.MM.DD`` accepted)."""
        parsed = _parse_date(value)
        if parsed is None:
            return None
        return (parsed - timedelta(days=self.days)).strftime("%Y%m%d")

    def shift_time(self, value: str) -> str | None:
        """Shift a TM value by :attr:`seconds` modulo 24 h, keeping its precision."""
        parsed = _parse_time(value)
        if parsed is None:
            return None
        seconds_of_day, micros, precision = parsed
        moved = (seconds_of_day + self.seconds) % 86400
        return _format_time(moved, micros, precision)

    def shift_pair(self, date_value: str, time_value: str) -> tuple[str | None, str | None]:
        """Shift a DA value and its paired TM value together as one instant."""
        day = _parse_date(date_value)
        parsed_time = _parse_time(time_value)
        if day is None or parsed_time is None:
            return self.shift_date(date_value), self.shift_time(time_value)
        seconds_of_day, micros, precision = parsed_time
        instant = datetime(day.year, day.month, day.day) + timedelta(seconds=seconds_of_day)
        moved = instant + self.delta
        moved_seconds = moved.hour * 3600 + moved.minute * 60 + moved.second
        return moved.strftime("%Y%m%d"), _format_time(moved_seconds, micros, precision)

    def shift_datetime(self, value: str) -> str | None:
        """Shift a DT value, keeping its precision; a UTC offset suffix is dropped."""
        match = _DT.match(value.strip())
        if match is None:
            return None
        year, month, day, hour, minute, second, fraction, _offset = match.groups()
        try:
            if hour is None:
                base = date(int(year), int(month or 1), int(day or 1))
                moved_date = base - timedelta(days=self.days)
                text = moved_date.strftime("%Y%m%d")
                return text[: 4 + (2 if month else 0) + (2 if day else 0)]
            instant = datetime(
                int(year),
                int(month or 1),
                int(day or 1),
                int(hour),
                int(minute or 0),
                int(second or 0),
            )
        except ValueError:
            return None
        moved = instant + self.delta
        text = moved.strftime("%Y%m%d%H%M%S")
        length = 10 + (2 if minute else 0) + (2 if second else 0)
        text = text[:length]
        if fraction is not None and second is not None:
            text += "." + fraction
        return text


def _parse_date(value: str) -> date | None:
    match = _DA.match(str(value).strip())
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def _parse_time(value: str) -> tuple[int, str | None, int] | None:
    """Return (seconds of day, fraction digits or None, precision 1-3) of a TM value."""
    match = _TM.match(str(value).strip())
    if match is None:
        return None
    hour, minute, second, fraction = match.groups()
    h, m, s = int(hour), int(minute or 0), int(second or 0)
    if h > 23 or m > 59 or s > 60:
        return None
    precision = 1 + (minute is not None) + (second is not None)
    return h * 3600 + m * 60 + min(s, 59), fraction, precision


def _format_time(seconds_of_day: int, fraction: str | None, precision: int) -> str:
    h, rest = divmod(seconds_of_day, 3600)
    m, s = divmod(rest, 60)
    text = f"{h:02d}{m:02d}{s:02d}"[: 2 * precision]
    if fraction is not None and precision == 3:
        text += "." + fraction
    return text

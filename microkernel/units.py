"""Human-friendly sizes and durations: parsing config values and formatting them for people.

Sizes accept binary units (``KiB``, ``MiB``, ``GiB``, ``TiB``) and decimal units (``kB``/``KB``,
``MB``, ``GB``, ``TB``); the trailing ``B`` is optional. Units are case-sensitive as written above,
because ``mb`` (millibits) or ``Mb`` (megabits) are real, different units and silently guessing
would turn a typo into a budget that is off by a factor of eight or a thousand.

Durations accept ``us``/``µs``, ``ms``, ``s``, ``m``, ``h`` and ``d``, optionally compounded
(``"1h 30m"``, ``"2m 03s"``) so that everything :func:`format_duration` prints parses back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

__all__ = [
    "UnitError",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

_KIB = 1024

# Unit suffix -> bytes. The "B" is optional, hence both spellings.
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "Ki": _KIB,
    "KiB": _KIB,
    "Mi": _KIB**2,
    "MiB": _KIB**2,
    "Gi": _KIB**3,
    "GiB": _KIB**3,
    "Ti": _KIB**4,
    "TiB": _KIB**4,
    "k": 1000,
    "kB": 1000,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
}

# Largest first: format_size picks the biggest unit the value reaches.
_BINARY_UNITS: tuple[tuple[str, int], ...] = (
    ("TiB", _KIB**4),
    ("GiB", _KIB**3),
    ("MiB", _KIB**2),
    ("KiB", _KIB),
)

# Unit suffix -> seconds. Both the micro sign (U+00B5) and Greek mu (U+03BC) are accepted
# because keyboards and editors produce either.
_DURATION_UNITS: dict[str, float] = {
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"\s*(?P<number>{_NUMBER})\s*(?P<unit>[A-Za-z]*)\s*")
_DURATION_PART_RE = re.compile(rf"\s*(?P<number>{_NUMBER})\s*(?P<unit>[A-Za-z\u00b5\u03bc]*)\s*")

_SIZE_EXAMPLES = "a size such as 512, '64KiB', '1.5GiB' or '100MB'"
_DURATION_EXAMPLES = "a duration such as 2.5, '250ms', '1.5s', '2m' or '1h'"


class UnitError(ValueError):
    """A size or duration that cannot be parsed.

    ``key`` names the setting, ``value`` is what was given and ``reason`` says what is wrong
    without repeating the key, so callers that prefix the key themselves (the config loader)
    can reuse it.
    """

    def __init__(self, *, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"{key}: {reason}")


def _unit_hint(unit: str, known: Iterable[str]) -> str:
    """Suggest the correctly-cased unit when only the case is wrong."""
    matches = sorted(u for u in known if u and u.lower() == unit.lower())
    if matches:
        return f" (units are case-sensitive: did you mean {' or '.join(repr(m) for m in matches)}?)"
    return ""


def parse_size(value: object, *, key: str) -> int:
    """Parse a byte count: an ``int`` of bytes or a string such as ``"64KiB"`` or ``"1.5GiB"``.

    Fractional amounts are rounded to the nearest byte (``"1.1KiB"`` → 1126); a fractional
    number of plain bytes is rejected. Raises :class:`UnitError` (a ``ValueError``) naming
    ``key`` and the bad value.
    """
    if isinstance(value, bool):
        # bool is an int subclass; ``max_message_size = true`` is a mistake, not 1 byte.
        raise UnitError(key=key, value=value, reason=f"expected {_SIZE_EXAMPLES}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(key=key, value=value, reason=f"size must not be negative, got {value!r}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise UnitError(key=key, value=value, reason=f"expected a whole number of bytes, got {value!r}")
        if value < 0:
            raise UnitError(key=key, value=value, reason=f"size must not be negative, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise UnitError(key=key, value=value, reason=f"expected {_SIZE_EXAMPLES}, got {value!r}")

    stripped = value.strip()
    if stripped.startswith("-"):
        raise UnitError(key=key, value=value, reason=f"size must not be negative, got {value!r}")
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise UnitError(key=key, value=value, reason=f"expected {_SIZE_EXAMPLES}, got {value!r}")
    unit = match["unit"]
    multiplier = _SIZE_UNITS.get(unit)
    if multiplier is None:
        raise UnitError(
            key=key,
            value=value,
            reason=f"unknown size unit {unit!r} in {value!r}{_unit_hint(unit, _SIZE_UNITS)}; "
            "use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB",
        )
    try:
        amount = Decimal(match["number"]) * multiplier
    except InvalidOperation:  # pragma: no cover - the regex only admits valid decimals
        raise UnitError(key=key, value=value, reason=f"expected {_SIZE_EXAMPLES}, got {value!r}") from None
    if multiplier == 1 and amount != amount.to_integral_value():
        raise UnitError(key=key, value=value, reason=f"expected a whole number of bytes, got {value!r}")
    # Decimal keeps "1.5GiB" exact; float arithmetic could land one byte off.
    return int(amount.to_integral_value(rounding=ROUND_HALF_EVEN))


def parse_duration(value: object, *, key: str) -> float:
    """Parse a duration in seconds: a number of seconds or a string such as ``"250ms"`` or ``"1h 30m"``.

    Compound strings must list units from largest to smallest, each at most once. Negative,
    infinite and NaN durations are rejected. Raises :class:`UnitError` (a ``ValueError``)
    naming ``key`` and the bad value.
    """
    if isinstance(value, bool):
        raise UnitError(key=key, value=value, reason=f"expected {_DURATION_EXAMPLES}, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise UnitError(key=key, value=value, reason=f"duration must be finite, got {value!r}")
        if seconds < 0:
            raise UnitError(key=key, value=value, reason=f"duration must not be negative, got {value!r}")
        return seconds
    if not isinstance(value, str):
        raise UnitError(key=key, value=value, reason=f"expected {_DURATION_EXAMPLES}, got {value!r}")

    if value.strip().startswith("-"):
        raise UnitError(key=key, value=value, reason=f"duration must not be negative, got {value!r}")
    if not value.strip():
        raise UnitError(key=key, value=value, reason=f"expected {_DURATION_EXAMPLES}, got {value!r}")

    total = 0.0
    position = 0
    previous_scale = math.inf
    parts = 0
    while position < len(value):
        match = _DURATION_PART_RE.match(value, position)
        if match is None or match.end() == position:
            raise UnitError(key=key, value=value, reason=f"expected {_DURATION_EXAMPLES}, got {value!r}")
        unit = match["unit"]
        parts += 1
        if unit == "":
            # A bare number means seconds, but only on its own: "1m 30" is ambiguous.
            if parts > 1 or match.end() != len(value):
                raise UnitError(
                    key=key, value=value, reason=f"every part of a compound duration needs a unit, got {value!r}"
                )
            scale = 1.0
        else:
            scale_or_none = _DURATION_UNITS.get(unit)
            if scale_or_none is None:
                raise UnitError(
                    key=key,
                    value=value,
                    reason=f"unknown duration unit {unit!r} in {value!r}{_unit_hint(unit, _DURATION_UNITS)}; "
                    "use us, ms, s, m, h or d",
                )
            scale = scale_or_none
        if scale >= previous_scale:
            raise UnitError(
                key=key,
                value=value,
                reason=f"units in a compound duration must go from largest to smallest, got {value!r}",
            )
        previous_scale = scale
        total += float(match["number"]) * scale
        position = match.end()
    return total


def format_size(n: int) -> str:
    """Format a byte count for people, in binary units: ``"512 B"``, ``"64 KiB"``, ``"1.5 GiB"``.

    At most two decimals are shown (trailing zeros dropped), so the result is within 0.5 % of
    ``n`` and parses back with :func:`parse_size`.
    """
    if n < 0:
        return "-" + format_size(-n)
    index = next((i for i, (_, multiplier) in enumerate(_BINARY_UNITS) if n >= multiplier), None)
    if index is None:
        return f"{n} B"
    shown = round(n / _BINARY_UNITS[index][1], 2)
    if shown >= _KIB and index > 0:
        # 1023.999 KiB rounds to 1024 KiB: say 1 MiB instead.
        index -= 1
        shown = round(n / _BINARY_UNITS[index][1], 2)
    return f"{shown:.2f}".rstrip("0").rstrip(".") + f" {_BINARY_UNITS[index][0]}"


def format_duration(seconds: float) -> str:
    """Format a duration for people.

    Examples: ``"500 us"``, ``"850 ms"``, ``"1.5 s"``, ``"2m 03s"``, ``"1h 02m 03s"``,
    ``"3d 04h 05m"``. The output parses back with :func:`parse_duration` (to the precision shown).
    """
    if math.isnan(seconds):
        return "nan"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if math.isinf(seconds):
        return "inf"
    if seconds == 0:
        return "0 s"
    # Each branch rounds first and re-checks the bound, so 59.96 s becomes "1m 00s", not "60.0 s".
    micros = round(seconds * 1e6)
    if micros < 1000:
        return f"{micros} us"
    millis = round(seconds * 1e3)
    if millis < 1000:
        return f"{millis} ms"
    tenths = round(seconds * 10)
    if tenths < 600:
        return f"{tenths / 10:.1f} s"
    total = round(seconds)
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes}m {secs:02d}s"
    if total < 86400:
        hours, rest = divmod(total, 3600)
        minutes, secs = divmod(rest, 60)
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    days, rest = divmod(round(seconds / 60), 24 * 60)
    hours, minutes = divmod(rest, 60)
    return f"{days}d {hours:02d}h {minutes:02d}m"

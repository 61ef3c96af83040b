"""Reading a TOML configuration under validation: typed getters whose errors name the key and line.

The schema lives in ``config.py``; this module knows TOML, dotted key paths, and how to point an
operator at the line that is wrong.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Collection, Iterable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

from microkernel.units import UnitError, parse_duration, parse_size

Path = tuple[str, ...]
_E = TypeVar("_E", bound=StrEnum)
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """An invalid configuration: ``key`` is the dotted path, ``line`` the 1-based line if known."""

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None, source: str = "<string>"):
        super().__init__(message)
        self.message = message
        self.key = key
        self.line = line
        self.source = source

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return ": ".join(part for part in (where, self.key, self.message) if part)


class Reader:
    """Turns a dotted path and a message into a :class:`ConfigError` with the line filled in."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self._locator = _LineLocator(text)

    def error(self, path: Path, message: str) -> ConfigError:
        return ConfigError(message, key=_dotted(path) or None, line=self._locator.find(path), source=self.source)

    def error_at(self, path: tuple[str | int, ...], message: str) -> ConfigError:
        """Like :meth:`error` for a path through arrays of tables: ``("gpu", "device", 1, "memory")``
        is shown as ``gpu.device[1].memory``."""
        key = ""
        for part in path:
            key += f"[{part}]" if isinstance(part, int) else (f".{_dotted((part,))}" if key else _dotted((part,)))
        located = tuple(f"[{p}]" if isinstance(p, int) else p for p in path)
        return ConfigError(message, key=key or None, line=self._locator.find(located), source=self.source)


class Table:
    """One TOML table under validation, with typed getters that raise a :class:`ConfigError`."""

    def __init__(self, reader: Reader, path: Path, data: Mapping[str, Any]) -> None:
        self.reader = reader
        self.path = path
        self.data = data

    def error(self, key: str | None, message: str) -> ConfigError:
        return self.reader.error(self.path if key is None else (*self.path, key), message)

    def check_keys(self, known: Collection[str]) -> None:
        for key in self.data:
            if key not in known:
                raise self.error(key, f"unknown key {_dotted((*self.path, key))}{suggest(key, known)}")

    def table(self, key: str) -> Table | None:
        """The sub-table at ``key``, or ``None`` when absent."""
        if key not in self.data:
            return None
        return self.required_table(key)

    def required_table(self, key: str) -> Table:
        """The sub-table at ``key``, which must exist."""
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {show(value)}")
        return Table(self.reader, (*self.path, key), value)

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"expected an integer >= {minimum}, got {show(value)}")
        return value

    def number(self, key: str, default: float, *, minimum: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
            raise self.error(key, f"expected a number >= {minimum:g}, got {show(value)}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {show(value)}")
        return value

    def string(self, key: str, default: str, *, nonempty: bool = False) -> str:
        value = self.optional_string(key, nonempty=nonempty)
        return default if value is None else value

    def optional_string(self, key: str, *, nonempty: bool = False) -> str | None:
        value = self.data.get(key)
        if value is not None and (not isinstance(value, str) or (nonempty and not value)):
            raise self.error(key, f"expected a {'non-empty ' if nonempty else ''}string, got {show(value)}")
        return value

    def string_list(self, key: str, *, unique: bool = False) -> tuple[str, ...] | None:
        """The array of strings at ``key``, or ``None`` when absent."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.error(key, f"expected an array of strings, got {show(value)}")
        if unique and len(set(value)) != len(value):
            duplicate = next(item for item in value if value.count(item) > 1)
            raise self.error(key, f"{duplicate!r} is listed twice")
        return tuple(value)

    def string_map(self, key: str) -> dict[str, str]:
        table = self.table(key)
        if table is None:
            return {}
        for name, value in table.data.items():
            if not name or "=" in name or "\0" in name:
                raise table.error(name, "environment variable names must be non-empty without '=' or NUL")
            if not isinstance(value, str) or "\0" in value:
                raise table.error(name, f"expected a string (environment values are strings), got {show(value)}")
        return dict(table.data)

    def choice(self, key: str, enum: type[_E], default: _E) -> _E:
        value = self.data.get(key, default)
        allowed = [member.value for member in enum]
        if not isinstance(value, str) or value not in allowed:
            raise self.error(key, f"expected one of {choices(allowed)}, got {show(value)}{suggest(value, allowed)}")
        return enum(value)

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        try:
            seconds = parse_duration(self.data.get(key, default), key=key)
        except UnitError as exc:
            raise self.error(key, exc.reason) from None
        if positive and seconds <= 0:
            raise self.error(key, f"expected a duration > 0, got {show(self.data.get(key, default))}")
        return seconds

    def size(self, key: str, default: int, *, minimum: int) -> int:
        try:
            size = parse_size(self.data.get(key, default), key=key)
        except UnitError as exc:
            raise self.error(key, exc.reason) from None
        if size < minimum:
            raise self.error(key, f"expected a size >= {minimum} bytes, got {show(self.data.get(key, default))}")
        return size


def _dotted(path: Path) -> str:
    return ".".join(part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part) for part in path)


def show(value: object) -> str:
    """A short, TOML-flavoured rendering of a bad value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def choices(options: Iterable[str]) -> str:
    return ", ".join(repr(option) for option in options)


def suggest(word: object, candidates: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_SYNTAX_RE = re.compile(r"(?P<message>.*?) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)")


def syntax_error(exc: tomllib.TOMLDecodeError, source: str, text: str) -> ConfigError:
    # Python 3.11's TOMLDecodeError only carries the position inside its message.
    description = str(exc)
    match = _SYNTAX_RE.fullmatch(description)
    if match is None:
        return ConfigError(f"invalid TOML: {description}", source=source)
    if match["line"]:
        line, column = int(match["line"]), f" (column {match['column']})"
    else:
        line, column = text.count("\n") + 1, " (at end of document)"
    return ConfigError(f"invalid TOML: {match['message']}{column}", line=line, source=source)


# --- line locator ------------------------------------------------------------------------------

# One key segment: bare, "basic" (with escapes) or 'literal', with the spaces TOML allows around it.
_KEY_PART_RE = re.compile(
    r"""[ \t]*(?:(?P<bare>[A-Za-z0-9_-]+)|"(?P<basic>(?:[^"\\]|\\.)*)"|'(?P<literal>[^']*)')[ \t]*"""
)


class _LineLocator:
    """Maps dotted key paths to the line that defines them, by a light scan of the TOML text.

    Good enough for error messages, not a parser: it follows ``[table]`` / ``[[array]]`` headers,
    ``key = value`` lines (dotted and quoted keys included) and skips multi-line strings. A path
    it has not seen resolves to its longest known prefix, so a key inside an inline table points
    at the line of the inline table and a missing key at its table's header.
    """

    def __init__(self, text: str) -> None:
        self._explicit: dict[Path, int] = {}
        self._implicit: dict[Path, int] = {}
        table: Path = ()
        open_string: str | None = None
        arrays: dict[Path, int] = {}  # [[array]] header -> how many seen so far
        # tomllib counts lines by "\n" only; str.splitlines() would also split on \x0b, \u2028, ...
        for number, line in enumerate(text.split("\n"), start=1):
            if open_string is not None:
                if line.count(open_string) % 2 == 1:
                    open_string = None
                continue
            stripped = line.strip()
            if stripped.startswith("["):
                start = 2 if stripped.startswith("[[") else 1
                parsed = _dotted_key(stripped, start)
                closing = "]]" if start == 2 else "]"
                # Require nothing but a comment after the bracket, so a nested array line such as
                # `["a"],` inside a multi-line array is not mistaken for a table header.
                rest = stripped[parsed[1] :] if parsed is not None else ""
                if parsed is not None and rest.startswith(closing) and rest[len(closing) :].lstrip()[:1] in ("", "#"):
                    table = parsed[0]
                    self._record(table, number)
                    if start == 2:  # each element of an array of tables is addressed as "[i]"
                        index = arrays[table] = arrays.get(table, -1) + 1
                        table = (*table, f"[{index}]")
                        self._record(table, number)
                continue
            parsed = _dotted_key(stripped, 0)
            if parsed is None or not stripped[parsed[1] :].startswith("="):
                continue
            self._record((*table, *parsed[0]), number)
            value = stripped[parsed[1] + 1 :]
            for delimiter in ('"""', "'''"):
                if value.count(delimiter) % 2 == 1:
                    open_string = delimiter
                    break

    def _record(self, path: Path, line: int) -> None:
        self._explicit.setdefault(path, line)
        for length in range(1, len(path)):
            self._implicit.setdefault(path[:length], line)

    def find(self, path: Path) -> int | None:
        """The line defining ``path`` or its longest known prefix; ``None`` if nothing matches."""
        for length in range(len(path), 0, -1):
            prefix = path[:length]
            line = self._explicit.get(prefix, self._implicit.get(prefix))
            if line is not None:
                return line
        return None


def _dotted_key(text: str, position: int) -> tuple[Path, int] | None:
    """Parse a (possibly dotted, possibly quoted) TOML key at ``position``: (parts, end) or None."""
    parts: list[str] = []
    while True:
        match = _KEY_PART_RE.match(text, position)
        if match is None:
            return None
        if match["bare"] is not None:
            parts.append(match["bare"])
        elif match["basic"] is not None:
            try:
                parts.append(json.loads(f'"{match["basic"]}"'))  # JSON escapes cover TOML's common ones
            except ValueError:
                parts.append(match["basic"])
        else:
            parts.append(match["literal"])
        position = match.end()
        if not text.startswith(".", position):
            return tuple(parts), position
        position += 1

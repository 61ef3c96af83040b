"""The msg_type <-> message class registry and field validation.

Every message is a frozen dataclass registered under its wire ``msg_type``. Validation is
compiled once per class from the type annotations, so decoding checks every inbound field
without reflection on the hot path.
"""

from __future__ import annotations

import dataclasses
import itertools
import reprlib
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from protocols.errors import ErrorCode, ProtocolError

T = TypeVar("T")

_BY_TYPE: dict[str, type] = {}
_BY_CLASS: dict[type, str] = {}

Checker = Callable[[str, Any], Any]


def message(msg_type: str) -> Callable[[type[T]], type[T]]:
    """Register a dataclass as the body of ``msg_type``."""

    def register(cls: type[T]) -> type[T]:
        if msg_type in _BY_TYPE:
            raise ValueError(f"msg_type {msg_type!r} registered twice")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        _BY_TYPE[msg_type] = cls
        _BY_CLASS[cls] = msg_type
        cls.MSG_TYPE = msg_type  # type: ignore[attr-defined]
        return cls

    return register


def class_for(msg_type: str) -> type | None:
    """The class registered for ``msg_type``, or None."""
    return _BY_TYPE.get(msg_type)


def type_of(message_obj: object) -> str:
    """The registered msg_type of a message instance."""
    try:
        return _BY_CLASS[type(message_obj)]
    except KeyError:
        raise TypeError(f"{type(message_obj).__name__} is not a registered message") from None


def registered_types() -> dict[str, type]:
    """A copy of the whole registry (used by the docs test and the spec generator)."""
    import protocols.messages  # noqa: F401  (the module that registers every type)

    return dict(_BY_TYPE)


# --- compiled validation -------------------------------------------------------------------

_MISSING = object()
_SCHEMAS: dict[type, tuple[tuple[str, Checker, Any], ...]] = {}


def _schema(cls: type) -> tuple[tuple[str, Checker, Any], ...]:
    # Compiled on first use: resolving annotations for every class at import time would add
    # tens of milliseconds to every service's start.
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = _SCHEMAS[cls] = _compile(cls)
    return schema


# Shows an offending value in an error: bounded in depth and size, as inbound values may be
# nested a thousand levels deep (a plain repr would raise RecursionError) or megabytes long.
_SHOW = reprlib.Repr()
_SHOW.maxlevel = 3
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 60


def _fail(path: str, expected: str, value: Any) -> ProtocolError:
    shown = _SHOW.repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ProtocolError(ErrorCode.INVALID_FIELD, f"field {path!r}: expected {expected}, got {shown}")


_STR_ONLY = frozenset({str})
_DICT_ONLY = frozenset({dict})
_join = "".join
_chain = itertools.chain.from_iterable


def _free_map(annotation: Any) -> bool:
    """Whether ``annotation`` is a map with string keys and free-form values (``dict[str, Any]``)."""
    if annotation is dict:
        return True
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) is dict and (len(args) != 2 or args[1] is Any)


def _check_keys(path: str, v: dict[Any, Any]) -> None:
    """Every key of the map ``v`` is a string (their types checked without a Python-level loop)."""
    if not _STR_ONLY.issuperset(map(type, v)):
        for k in v:
            if type(k) is not str:
                raise _fail(f"{path} key", "a string", k)


def _checker(annotation: Any) -> Checker:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or annotation is object:
        return lambda path, v: v
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        checkers = [_checker(a) for a in inner]

        def check_union(path: str, v: Any) -> Any:
            if v is None and optional:
                return None
            errors = []
            for c in checkers:
                try:
                    return c(path, v)
                except ProtocolError as e:
                    errors.append(e)
            raise errors[0] if errors else _fail(path, "null", v)

        return check_union
    if annotation is bool:
        def check_bool(path: str, v: Any) -> Any:
            if type(v) is not bool:
                raise _fail(path, "a boolean", v)
            return v
        return check_bool
    if annotation is int:
        def check_int(path: str, v: Any) -> Any:
            if type(v) is not int:
                raise _fail(path, "an integer", v)
            return v
        return check_int
    if annotation is float:
        def check_float(path: str, v: Any) -> Any:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise _fail(path, "a number", v)
        return check_float
    if annotation is str:
        def check_str(path: str, v: Any) -> Any:
            if type(v) is not str:
                raise _fail(path, "a string", v)
            return v
        return check_str
    if annotation is bytes:
        def check_bytes(path: str, v: Any) -> Any:
            if isinstance(v, bytes):
                return v
            if isinstance(v, memoryview):
                return v
            raise _fail(path, "binary", v)
        return check_bytes
    if origin in (list, tuple) or annotation in (list, tuple):
        item = _checker(args[0]) if args else (lambda p, v: v)
        as_tuple = origin is tuple or annotation is tuple

        def check_seq(path: str, v: Any) -> Any:
            if not isinstance(v, (list, tuple)):
                raise _fail(path, "an array", v)
            try:  # the paths of the items only matter in an error: made only then
                items = [item(path, x) for x in v]
            except ProtocolError:
                items = [item(f"{path}[{i}]", x) for i, x in enumerate(v)]  # raises, naming the item
            return tuple(items) if as_tuple else items
        if args and _free_map(args[0]) and not as_tuple:
            # A list of free-form maps (status rows, service specs): checked without a call per row;
            # anything unusual goes to check_seq, which names the problem.
            def check_rows(path: str, v: Any) -> Any:
                if type(v) is list and _DICT_ONLY.issuperset(map(type, v)):
                    try:
                        # Every key of every row is a string exactly when they can be joined: one
                        # pass in C over all the keys (msgpack allows only str or bytes keys).
                        _join(_chain(v))
                        return v
                    except TypeError:
                        pass
                return check_seq(path, v)
            return check_rows
        return check_seq
    if origin is dict or annotation is dict:
        if len(args) != 2 or args[1] is Any:
            # Values are free-form: check the keys only and keep the decoded map as it is.
            def check_free_map(path: str, v: Any) -> Any:
                if not isinstance(v, dict):
                    raise _fail(path, "a map", v)
                _check_keys(path, v)
                return v
            return check_free_map
        value = _checker(args[1])

        def check_map(path: str, v: Any) -> Any:
            if not isinstance(v, dict):
                raise _fail(path, "a map", v)
            _check_keys(path, v)
            try:  # as in check_seq: the values' paths are made only for an error
                return {k: value(path, x) for k, x in v.items()}
            except ProtocolError:
                return {k: value(f"{path}.{k}", x) for k, x in v.items()}  # raises, naming the value
        return check_map
    raise TypeError(f"unsupported field annotation {annotation!r}")


def _compile(cls: type) -> tuple[tuple[str, Checker, Any], ...]:
    hints = typing.get_type_hints(cls)
    schema = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory
        else:
            default = _MISSING
        schema.append((f.name, _checker(hints[f.name]), default))
    return tuple(schema)


def build(cls: type[T], body: Any) -> T:
    """Validate a decoded msgpack body against ``cls`` and construct it.

    Unknown keys are ignored (a newer minor version may add fields); missing required keys and
    wrongly typed values raise ``ProtocolError(INVALID_FIELD)``.
    """
    builder = _BUILDERS.get(cls)
    if builder is None:
        builder = _BUILDERS[cls] = _compile_builder(cls)
    return builder(body)


def builder_of(cls: type[T]) -> Callable[[Any], T]:
    """``build`` bound to ``cls``: the generated builder itself, for callers on the hot path."""
    builder = _BUILDERS.get(cls)
    if builder is None:
        builder = _BUILDERS[cls] = _compile_builder(cls)
    return builder


def map_builder_of(cls: type) -> Callable[[Any], dict[str, Any]]:
    """A function checking a decoded body as ``build(cls, body)`` does, returning the map that
    ``body_getter(cls)`` would return for the built instance (every field, defaults filled in,
    unknown keys left out), without making the instance: for receivers that want the map."""
    builder = _MAP_BUILDERS.get(cls)
    if builder is None:
        builder = _MAP_BUILDERS[cls] = _compile_builder(cls, into_map=True)
    return builder


def body_getter(cls: type) -> Callable[[Any], dict[str, Any]]:
    """A function returning the msgpack map (field name -> value) of an instance of ``cls``."""
    getter = _GETTERS.get(cls)
    if getter is None:
        names = fields_of(cls)
        source = "def body(o):\n    return {" + ", ".join(f"{n!r}: o.{n}" for n in names) + "}\n"
        namespace: dict[str, Any] = {}
        exec(source, namespace)  # noqa: S102 - generated from dataclass field names only
        getter = _GETTERS[cls] = namespace["body"]
    return getter


_FIELDS: dict[type, tuple[str, ...]] = {}
_BUILDERS: dict[type, Callable[[Any], Any]] = {}
_MAP_BUILDERS: dict[type, Callable[[Any], dict[str, Any]]] = {}
_GETTERS: dict[type, Callable[[Any], dict[str, Any]]] = {}

# Field types checked inline by the generated builders (also as ``T | None``); anything else calls
# its compiled checker. (A float field's checker also takes an integer, converted: only then is it called.)
_INLINE_TYPES = {str: "str", int: "int", bool: "bool", float: "float"}


def _inline(hint: Any) -> tuple[str | None, bool]:
    """(the builtin's name a value of ``hint`` is checked against inline, or None; whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if len(args) == 2 and type(None) in args:
            inner = args[0] if args[1] is type(None) else args[1]
            return _INLINE_TYPES.get(inner), True
        return None, False
    return _INLINE_TYPES.get(hint), False


def _compile_builder(cls: type, into_map: bool = False) -> Callable[[Any], Any]:
    """Generate a builder for ``cls``: one straight-line function per message class.

    It is what ``dataclasses`` does for ``__init__``, for the same reason: a loop over a field table
    costs several times more per message than straight-line code. The instance is made without
    calling ``__init__`` (frozen dataclasses route every field through ``object.__setattr__``
    anyway); every field is set, from the body or from its default. ``into_map``: the checked
    fields go into a new map (in field order) instead of an instance.
    """
    hints = typing.get_type_hints(cls)
    namespace: dict[str, Any] = {
        "cls": cls, "new": object.__new__, "setattr": object.__setattr__, "MISSING": _MISSING,
        "missing": _missing, "not_a_map": _not_a_map,
    }
    lines = ["def build(body):", "    if type(body) is not dict:", "        raise not_a_map(cls, body)",
             "    get = body.get", "    o = {}" if into_map else "    o = new(cls)"]
    for i, (name, check, default) in enumerate(_schema(cls)):
        namespace[f"check{i}"] = check
        lines.append(f"    v = get({name!r}, MISSING)")
        lines.append("    if v is MISSING:")
        if default is _MISSING:
            lines.append(f"        raise missing({name!r})")
        else:
            namespace[f"default{i}"] = default
            factory = callable(default) and _is_factory(cls, name)
            lines.append(f"        v = default{i}()" if factory else f"        v = default{i}")
        inline, optional = _inline(hints[name])
        if hints[name] is Any:
            pass
        elif inline is not None:
            lines.append(f"    elif {'v is not None and ' if optional else ''}type(v) is not {inline}:")
            lines.append(f"        v = check{i}({name!r}, v)")
        else:
            lines.append("    else:")
            lines.append(f"        v = check{i}({name!r}, v)")
        lines.append(f"    o[{name!r}] = v" if into_map else f"    setattr(o, {name!r}, v)")
    lines.append("    return o")
    exec("\n".join(lines) + "\n", namespace)  # noqa: S102 - generated from the dataclass fields only
    return namespace["build"]


def _is_factory(cls: type, name: str) -> bool:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default_factory is not dataclasses.MISSING
    return False


def _missing(name: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, f"missing required field {name!r}")


def _not_a_map(cls: type, body: Any) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED, f"body of {_BY_CLASS.get(cls, cls.__name__)} must be a map")


def fields_of(cls: type) -> tuple[str, ...]:
    """Field names of a registered message class, in declaration order."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(name for name, _, _ in _schema(cls))
    return names

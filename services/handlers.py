"""What a ``Service`` class declares (its ``@rpc`` and ``@subscribe`` handlers) and how calls bind.

Declarations are found by scanning the class MRO once per class (no metaclass, no import-time
registry): the decorators in ``services.base`` only mark functions, and the most derived
definition of an attribute decides whether it is a handler. Argument checking is compiled per
handler so the data-plane hot path only does a set comparison for ordinary signatures.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

RPC_MARK = "__mk_rpc__"
SUBSCRIBE_MARK = "__mk_subscribe__"


@dataclass(frozen=True, slots=True)
class RpcDeclaration:
    """``@rpc`` on attribute ``attr``, served under ``name``."""

    name: str
    attr: str


@dataclass(frozen=True, slots=True)
class SubscriptionDeclaration:
    """``@subscribe(*patterns)`` on attribute ``attr``."""

    attr: str
    patterns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Declarations:
    """All handlers a service class declares."""

    rpcs: tuple[RpcDeclaration, ...]
    subscriptions: tuple[SubscriptionDeclaration, ...]

    @property
    def patterns(self) -> list[str]:
        """Every subscribed topic pattern, deduplicated, in declaration order."""
        seen: dict[str, None] = {}
        for sub in self.subscriptions:
            seen.update(dict.fromkeys(sub.patterns))
        return list(seen)


_DECLARATIONS: dict[type, Declarations] = {}


def declarations_of(cls: type) -> Declarations:
    """The handlers of ``cls`` (computed once per class, then cached)."""
    cached = _DECLARATIONS.get(cls)
    if cached is not None:
        return cached
    resolved: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # base first, so subclasses override
        resolved.update(vars(klass))
    rpcs: dict[str, RpcDeclaration] = {}
    subscriptions: list[SubscriptionDeclaration] = []
    for attr, value in resolved.items():
        rpc_name = getattr(value, RPC_MARK, None)
        if rpc_name is not None:
            if rpc_name in rpcs:
                raise TypeError(
                    f"{cls.__qualname__}: methods {rpcs[rpc_name].attr!r} and {attr!r} are both served as rpc {rpc_name!r}"
                )
            rpcs[rpc_name] = RpcDeclaration(rpc_name, attr)
        patterns = getattr(value, SUBSCRIBE_MARK, None)
        if patterns is not None:
            subscriptions.append(SubscriptionDeclaration(attr, tuple(patterns)))
    result = Declarations(tuple(sorted(rpcs.values(), key=lambda d: d.name)), tuple(subscriptions))
    _DECLARATIONS[cls] = result
    return result


class ArgSpec:
    """Checks RpcRequest.args against a handler's signature before the handler runs.

    Binding first (instead of calling and catching TypeError) keeps a TypeError raised *inside*
    the handler from being misreported as bad arguments.
    """

    __slots__ = ("signature", "names", "required")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.signature = inspect.signature(fn)
        params = self.signature.parameters.values()
        simple = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        # Ordinary signatures get a set comparison; *args/**kwargs/positional-only use bind().
        self.names: frozenset[str] | None = frozenset(p.name for p in params) if simple else None
        self.required = frozenset(p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD
                                  and p.kind is not p.VAR_POSITIONAL)

    def problem(self, args: Mapping[str, Any]) -> str | None:
        """None when ``args`` bind as keyword arguments, else what is wrong."""
        names = self.names
        if names is not None:
            keys = args.keys()
            if keys <= names and self.required <= keys:
                return None
        try:
            self.signature.bind(**args)
        except TypeError as exc:
            return str(exc)
        return None


@dataclass(slots=True)
class RpcHandler:
    """A bound ``@rpc`` method ready to dispatch.

    ``quick``: its last call (a sync one) returned within ``QUICK_NS``; replies made before a call
    of it may wait for that call (``services.dataplane``).
    """

    name: str
    fn: Callable[..., Any]
    is_async: bool
    args: ArgSpec
    quick: bool = False


@dataclass(slots=True)
class SubscriptionHandler:
    """A bound ``@subscribe`` method, called as ``fn(topic, data)``."""

    name: str
    fn: Callable[[str, dict[str, Any]], Any]
    is_async: bool
    patterns: tuple[str, ...]


def bind_rpc_handlers(instance: object) -> dict[str, RpcHandler]:
    """``{rpc name: handler}`` for a service instance."""
    handlers = {}
    for decl in declarations_of(type(instance)).rpcs:
        fn = getattr(instance, decl.attr)
        handlers[decl.name] = RpcHandler(decl.name, fn, inspect.iscoroutinefunction(fn), ArgSpec(fn))
    return handlers


def bind_subscription_handlers(instance: object) -> list[SubscriptionHandler]:
    """The subscription handlers of a service instance, in declaration order."""
    return [
        SubscriptionHandler(decl.attr, fn, inspect.iscoroutinefunction(fn), decl.patterns)
        for decl in declarations_of(type(instance)).subscriptions
        for fn in (getattr(instance, decl.attr),)
    ]


def _is_torch_tensor(obj: Any) -> bool:
    # Duck-typed so that the SDK never imports torch itself.
    return type(obj).__module__ == "torch" and hasattr(obj, "detach")


def portable(obj: Any) -> Any:
    """``obj`` with torch tensors replaced by numpy arrays (recursively through dicts/lists/tuples).

    Only called when a result did not encode as is, so ordinary results pay nothing for it.
    """
    t = type(obj)
    if t is dict:
        return {k: portable(v) for k, v in obj.items()}
    if t is list or t is tuple:
        return [portable(v) for v in obj]
    if _is_torch_tensor(obj):
        return obj.detach().cpu().contiguous().numpy()
    return obj

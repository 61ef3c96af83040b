"""The one module that owns msgpack and the frame layout.

A message on the wire is a ZeroMQ multipart message::

    [*routing_ids, b"MK1", header, body, *buffers]          (request/reply sockets)
    [topic, b"MK1", header, body, *buffers]                 (pub/sub)

``header`` and ``body`` are msgpack maps. Arrays (numpy arrays and scalars) and binaries of
64 KiB or more (``bytes``, ``bytearray``, ``memoryview``) are not copied into the body: they
travel as extra frames, sent with ``copy=False``, and the body holds a msgpack extension that
points at the frame; smaller binaries are inlined as msgpack ``bin``. Decoding gives read-only views of the received frames, never copies. No pickle.

To a same-host peer (an ``ipc://`` or ``inproc://`` socket) the sender may pass ``shm_threshold``:
arrays and binaries of at least that many bytes, and arrays that already live in a shared-memory
segment (``protocols.shm.empty``), are then handed over by shared memory (``EXT_SHM``) instead of
a frame, and the receiver maps them read-only without copying (see ``protocols.handover``).
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import msgpack

from protocols import handover, messages, shm
from protocols.errors import ErrorCode, ProtocolError
from protocols.registry import body_getter, build, builder_of, class_for, map_builder_of, type_of

MAGIC = b"MK1"
PROTOCOL_VERSION = (1, 3)
INLINE_BYTES_LIMIT = 64 * 1024
EXT_BUFFER = 1
EXT_NDARRAY = 2
EXT_SHM = 3
STATUS_OK = "ok"
STATUS_ERROR = "error"

_MSG_ID_PREFIX = os.urandom(8)
_counter = itertools.count(1)
_SCALARS = frozenset({str, int, float, bool, type(None)})


_pack_msg_id = struct.Struct(">8sQ").pack  # one C call instead of int.to_bytes + a concatenation


def new_msg_id() -> bytes:
    """A 16-byte id unique across processes: 8 random bytes per process + a counter."""
    return _pack_msg_id(_MSG_ID_PREFIX, next(_counter))


class Header(NamedTuple):
    """The header frame of every message (a NamedTuple: built once per message on the hot path)."""

    msg_id: bytes
    msg_type: str
    version: tuple[int, int]
    sender: str
    ts_ns: int
    parent_id: bytes | None = None
    deadline_ns: int | None = None
    status: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """An event whose topic has no registered class (e.g. ``train.progress`` from a service)."""

    name: str
    data: dict[str, Any]


@dataclass(slots=True)
class Envelope:
    """A decoded inbound message: routing ids, header, typed body and the raw buffer frames."""

    routing: list[bytes]
    header: Header
    message: Any
    buffers: list[Any]
    topic: str | None = None

    @property
    def msg_type(self) -> str:
        return self.header.msg_type

    @property
    def is_error(self) -> bool:
        return self.header.status == STATUS_ERROR


@dataclass(frozen=True, slots=True)
class RawArray:
    """An n-dimensional array received while numpy is not installed."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview


# --- encoding ----------------------------------------------------------------------------------


def _externalize(obj: Any, buffers: list[Any]) -> Any:
    """Replace binary payloads by extension references to extra frames (recursively)."""
    t = type(obj)
    if t in _SCALARS:
        return obj
    if t is dict:
        out = None
        for k, v in obj.items():
            nv = _externalize(v, buffers)
            if nv is not v:
                if out is None:
                    out = dict(obj)
                out[k] = nv
        return obj if out is None else out
    if t is list or t is tuple:
        items = [_externalize(v, buffers) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return items
    if t is bytes:
        if len(obj) < INLINE_BYTES_LIMIT:
            return obj
        return _shm_binary_ref(obj) or _frame_ref(obj, buffers)
    if t is bytearray or t is memoryview:
        return _shm_binary_ref(obj) or _frame_ref(obj, buffers)
    ref = _array_ref(obj, buffers)
    return obj if ref is None else ref


def _frame_ref(obj: Any, buffers: list[Any]) -> msgpack.ExtType:
    buffers.append(obj)
    return msgpack.ExtType(EXT_BUFFER, msgpack.packb(len(buffers) - 1))


def _array_ref(obj: Any, buffers: list[Any]) -> msgpack.ExtType | None:
    """An NDARRAY reference for an array-like (numpy arrays and scalars), its data queued as a frame
    (or an SHM reference, when shared memory is on for this message and the array qualifies)."""
    if getattr(obj, "__array_interface__", None) is None or not hasattr(obj, "dtype"):
        return None
    if _packers.shm_threshold is not None and obj.ndim:
        ref = _shm_ref(obj, obj.nbytes, [obj.dtype.str, list(obj.shape)])
        if ref is not None:
            return ref
    if not obj.flags["C_CONTIGUOUS"]:
        obj = obj.copy(order="C")  # a frame must be one contiguous buffer
    buffers.append(obj.data if obj.ndim else obj.reshape(1).data)
    return msgpack.ExtType(EXT_NDARRAY, msgpack.packb([len(buffers) - 1, obj.dtype.str, list(obj.shape)]))


def _shm_binary_ref(obj: Any) -> msgpack.ExtType | None:
    if _packers.shm_threshold is None:
        return None
    view = memoryview(obj)
    if not view.c_contiguous:
        return None
    return _shm_ref(obj, view.nbytes, [None, None])


def _shm_ref(obj: Any, nbytes: int, typing: list[Any]) -> msgpack.ExtType | None:
    """``[name, offset, nbytes, dtype, shape]`` for a payload handed over by shared memory, or None
    (below the threshold and not already in a segment, or /dev/shm refused it: a frame then)."""
    p = _packers
    threshold = p.shm_threshold
    assert threshold is not None
    # A body may be packed twice (see _pack_body): the second pass reuses the first's hand-overs.
    ref = p.shm_refs.get(id(obj))
    if ref is not None:
        return ref
    if nbytes < threshold and (nbytes == 0 or shm.mapping_of(obj) is None):
        return None
    data = obj
    if hasattr(obj, "flags") and not obj.flags["C_CONTIGUOUS"]:
        data = obj.copy(order="C")
    try:
        name, offset = handover.export(data, p.shm_links)
    except (OSError, ValueError, BufferError):
        return None
    if p.handoffs is not None and name not in p.handoffs:
        p.handoffs.append(name)
    ref = p.shm_refs[id(obj)] = msgpack.ExtType(EXT_SHM, msgpack.packb([name, offset, nbytes, *typing]))
    return ref


_BINARY_TYPES = frozenset({bytes, bytearray, memoryview})


def _has_large_binary(body: dict[str, Any]) -> bool:
    """Whether a value of ``body``, or of a map or array directly inside it, must become a frame.

    Cheap pre-check for the common shapes (``args``/``result`` holding a blob or a map of blobs).
    Arrays never need it (the packer's ``default`` hook takes them at any depth); a large binary
    nested deeper is caught after packing by the size of the result (see ``_pack_body``). The
    usual container holds no binary at all, which ``isdisjoint`` over the value types tells
    without a Python-level loop.
    """
    for v in body.values():
        t = type(v)
        if t is dict or t is list or t is tuple:
            items = v.values() if t is dict else v
            if _BINARY_TYPES.isdisjoint(map(type, items)):
                continue
            for x in items:
                if type(x) in _BINARY_TYPES and memoryview(x).nbytes >= INLINE_BYTES_LIMIT:
                    return True
        elif t in _BINARY_TYPES and memoryview(v).nbytes >= INLINE_BYTES_LIMIT:
            return True
    return False


class _Packers(threading.local):
    """Per-thread msgpack packers, reused: ``msgpack.packb`` allocates a fresh 1 MiB buffer per call.

    The body packer's ``default`` hook turns arrays (numpy arrays and scalars) into NDARRAY
    references, appending their data to ``buffers`` (reset before every body).
    """

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        # Shared-memory hand-over for the body being packed (None: frames only), the segment
        # links made for it (one per segment per message) and where to report hand-over names.
        self.shm_threshold: int | None = None
        self.shm_links: dict[str, str] = {}
        self.shm_refs: dict[int, msgpack.ExtType] = {}
        self.handoffs: list[str] | None = None
        self.header = msgpack.Packer(use_bin_type=True)
        self.body = msgpack.Packer(use_bin_type=True, default=self._default)

    def _default(self, obj: Any) -> Any:
        ref = _array_ref(obj, self.buffers)
        if ref is None:
            raise TypeError(f"can not serialize {type(obj).__name__!r} object")
        return ref


_packers = _Packers()


def _pack_body_shm(
    body: dict[str, Any], threshold: int, handoffs: list[str] | None, first: tuple[bytes, list[Any]] | None = None,
) -> tuple[bytes, list[Any]]:
    """``_pack_body`` with shared-memory hand-over of large payloads on (same-host peers).

    Packed as usual first (or ``first``, that packing done by the caller): most bodies have no
    frame at all, or only small ones, and then cost nothing more. Only when a frame qualifies is
    the body packed again with hand-over on.
    """
    packed, buffers = _pack_body(body) if first is None else first
    if not buffers:
        return packed, buffers
    threshold = max(threshold, INLINE_BYTES_LIMIT)
    for b in buffers:
        if _nbytes(b) >= threshold or shm.mapping_of(b) is not None:
            break
    else:
        return packed, buffers
    p = _packers
    names: list[str] = [] if handoffs is None else handoffs
    p.shm_threshold, p.shm_links, p.shm_refs, p.handoffs = threshold, {}, {}, names
    try:
        return _pack_body(body)
    except BaseException:
        handover.reclaim(names)  # the message will not be sent: nobody will claim them
        raise
    finally:
        p.shm_threshold, p.shm_links, p.shm_refs, p.handoffs = None, {}, {}, None


def _pack_body(body: dict[str, Any]) -> tuple[bytes, list[Any]]:
    """msgpack bytes of ``body`` and its buffer frames.

    Packing first and walking only when needed: most bodies are small maps of scalars, for which a
    Python-level walk looking for binaries would cost more than the packing itself. Binaries below
    ``INLINE_BYTES_LIMIT`` are inlined as msgpack ``bin`` (allowed by the spec); a packed body that
    reaches the limit may hold a large binary, so it is re-encoded with the walk (one extra copy,
    only for deeply nested large binaries that ``_has_large_binary`` does not see).
    """
    p = _packers
    # Scalars only (most control messages): no binary to look for, and no Python-level walk.
    if _SCALARS.issuperset(map(type, body.values())) or not _has_large_binary(body):
        p.buffers = buffers = []
        packed = p.body.pack(body)
        if len(packed) < INLINE_BYTES_LIMIT:
            return packed, buffers
    p.buffers = buffers = []
    packed = p.body.pack(_externalize(body, buffers))
    return packed, buffers


# Header frames are assembled from pre-packed pieces instead of packing a fresh map per message:
# between two messages of one kind from one sender only msg_id, ts_ns, parent_id and deadline_ns
# change. The bytes are exactly what packing the map would give (same keys, same order, same
# encodings), so peers see no difference; anything unusual goes through the packer.
_U64 = struct.Struct(">BQ").pack  # msgpack uint64: what the packer emits for 2**32 <= n < 2**64
_BIN8 = tuple(b"\xc4" + bytes((n,)) for n in range(256))
_MAP = tuple(bytes((0x80 | n,)) for n in range(16))
_KEY_MSG_ID = b"\xa6msg_id"
_KEY_PARENT_ID = b"\xa9parent_id"
_KEY_DEADLINE_NS = b"\xabdeadline_ns"
_TEMPLATE_LIMIT = 4096
_time_ns = time.time_ns
_templates: dict[tuple[str, str, str | None], tuple[bytes, bytes]] = {}


def _template(msg_type: str, sender: str, status: str | None) -> tuple[bytes, bytes]:
    """The packed pieces of a header that only depend on (msg_type, sender, status).

    ``middle`` runs from the msg_type key to the ts_ns key (its value follows), ``tail`` is the
    status entry (empty without one).
    """
    key = (msg_type, sender, status)
    template = _templates.get(key)
    if template is None:
        pack_one = msgpack.Packer(use_bin_type=True).pack
        middle = b"".join((pack_one("msg_type"), pack_one(msg_type), pack_one("version"), pack_one(PROTOCOL_VERSION),
                           pack_one("sender"), pack_one(sender), pack_one("ts_ns")))
        tail = b"" if status is None else pack_one("status") + pack_one(status)
        template = (middle, tail)
        if len(_templates) < _TEMPLATE_LIMIT:  # event names are open-ended: bound the cache
            _templates[key] = template
    return template


def _pack_header(
    msg_type: str, sender: str, msg_id: bytes | None, parent_id: bytes | None, deadline_ns: int | None,
    status: str | None,
) -> bytes:
    """The header frame; optional keys are omitted rather than sent as nil (spec §3.1)."""
    # Straight-line on purpose: on this path every Python-level call costs as much as the packing.
    # The usual header (ids of 16 bytes, as new_msg_id makes them) is one struct.pack of a layout
    # made once per kind of header; anything else is assembled from its pieces.
    if msg_id is None:
        msg_id = _pack_msg_id(_MSG_ID_PREFIX, next(_counter))
    ts_ns = _time_ns()
    if (type(msg_id) is bytes and len(msg_id) == 16 and ts_ns >= 0x1_0000_0000
            and (parent_id is None or (type(parent_id) is bytes and len(parent_id) == 16))
            and (deadline_ns is None or (type(deadline_ns) is int and 0x1_0000_0000 <= deadline_ns <= _U64_MAX))):
        key = (msg_type, sender, status, parent_id is not None, deadline_ns is not None)
        layout = _layouts.get(key)
        if layout is None:
            layout = _layout(key)
        pack, head, middle, tail = layout
        if parent_id is None:
            if deadline_ns is None:
                return pack(head, msg_id, middle, ts_ns, tail)
            return pack(head, msg_id, middle, ts_ns, _DEADLINE_U64, deadline_ns, tail)
        if deadline_ns is None:
            return pack(head, msg_id, middle, ts_ns, _PARENT_BIN16, parent_id, tail)
        return pack(head, msg_id, middle, ts_ns, _PARENT_BIN16, parent_id, _DEADLINE_U64, deadline_ns, tail)
    return _pack_header_parts(msg_type, sender, msg_id, parent_id, deadline_ns, status, ts_ns)


_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_PARENT_BIN16 = _KEY_PARENT_ID + _BIN8[16]
_DEADLINE_U64 = _KEY_DEADLINE_NS + b"\xcf"
_layouts: dict[tuple[str, str, str | None, bool, bool], tuple[Any, bytes, bytes, bytes]] = {}


def _header_struct(middle: bytes, parent: bool, deadline: bool, tail: bytes) -> tuple[struct.Struct, bytes]:
    """The struct of a canonical header with ids of 16 bytes, and its head (map size to id length).

    Fields: head, msg_id, middle (msg_type up to ts_ns's uint64 marker), ts_ns, then the parent_id
    key and value, the deadline_ns key and value when present, and the tail (status entry or b"").
    """
    head = _MAP[5 + parent + deadline + bool(tail)] + _KEY_MSG_ID + _BIN8[16]
    fmt = f">{len(head)}s16s{len(middle)}sQ"
    if parent:
        fmt += f"{len(_PARENT_BIN16)}s16s"
    if deadline:
        fmt += f"{len(_DEADLINE_U64)}sQ"
    return struct.Struct(fmt + f"{len(tail)}s"), head


def _layout(key: tuple[str, str, str | None, bool, bool]) -> tuple[Any, bytes, bytes, bytes]:
    """``(struct pack, head, middle, tail)`` for headers of one kind: the same bytes as the pieces."""
    msg_type, sender, status, parent, deadline = key
    middle, tail = _template(msg_type, sender, status)
    middle += b"\xcf"  # ts_ns is always a uint64
    layout_struct, head = _header_struct(middle, parent, deadline, tail)
    layout = (layout_struct.pack, head, middle, tail)
    if len(_layouts) < _TEMPLATE_LIMIT:  # event names are open-ended: bound the cache
        _layouts[key] = layout
    return layout


def _pack_header_parts(
    msg_type: str, sender: str, msg_id: bytes | None, parent_id: bytes | None, deadline_ns: int | None,
    status: str | None, ts_ns: int,
) -> bytes:
    """``_pack_header`` from pre-packed pieces: ids of other sizes, deadlines outside uint64."""
    template = _templates.get((msg_type, sender, status))
    middle, tail = template if template is not None else _template(msg_type, sender, status)
    if not msg_id:
        msg_id = _pack_msg_id(_MSG_ID_PREFIX, next(_counter))
    if type(msg_id) is not bytes or len(msg_id) > 255 or ts_ns < 0x1_0000_0000:
        return _pack_header_map(msg_type, sender, msg_id, parent_id, deadline_ns, status, ts_ns)
    parts = [b"", _KEY_MSG_ID, _BIN8[len(msg_id)], msg_id, middle, _U64(0xCF, ts_ns)]
    n = 5
    if parent_id is not None:
        if type(parent_id) is bytes and len(parent_id) < 256:
            parts += (_KEY_PARENT_ID, _BIN8[len(parent_id)], parent_id)
        else:
            parts += (_KEY_PARENT_ID, _packers.header.pack(parent_id))
        n += 1
    if deadline_ns is not None:
        if type(deadline_ns) is int and 0x1_0000_0000 <= deadline_ns <= 0xFFFF_FFFF_FFFF_FFFF:
            parts += (_KEY_DEADLINE_NS, _U64(0xCF, deadline_ns))
        else:
            parts += (_KEY_DEADLINE_NS, _packers.header.pack(deadline_ns))
        n += 1
    if status is not None:
        parts.append(tail)
        n += 1
    parts[0] = _MAP[n]
    return b"".join(parts)


def _pack_header_map(
    msg_type: str, sender: str, msg_id: Any, parent_id: bytes | None, deadline_ns: int | None, status: str | None,
    ts_ns: int,
) -> bytes:
    """``_pack_header`` by packing the map (ids that are not short bytes; a clock below 2**32 ns)."""
    header: dict[str, Any] = {"msg_id": msg_id, "msg_type": msg_type, "version": PROTOCOL_VERSION,
                              "sender": sender, "ts_ns": ts_ns}
    if parent_id is not None:
        header["parent_id"] = parent_id
    if deadline_ns is not None:
        header["deadline_ns"] = deadline_ns
    if status is not None:
        header["status"] = status
    return _packers.header.pack(header)


def pack(obj: Any) -> bytes:
    """msgpack-encode a plain value (no buffers); used for headers and small bodies."""
    return _packers.header.pack(obj)


def body_of(message_obj: Any) -> dict[str, Any]:
    """The msgpack map of a registered message instance (or the data of an ``Event``)."""
    if type(message_obj) is Event:
        return message_obj.data
    return body_getter(type(message_obj))(message_obj)


def msg_type_of(message_obj: Any) -> str:
    """The wire msg_type of a message instance or ``Event``."""
    if type(message_obj) is Event:
        return message_obj.name
    if type(message_obj) is Packed:
        return message_obj.msg_type
    return type_of(message_obj)


@dataclass(frozen=True, slots=True)
class Packed:
    """A message whose body is already packed (see :func:`pack_message`): sent as is, many times.

    For replies a receiver builds once and sends to many requests (the kernel's status); only the
    header (ids, timestamp) is made per send. ``encode`` accepts it wherever it accepts a message.
    """

    msg_type: str
    body: bytes


def pack_message(message_obj: Any) -> Packed:
    """Pack a registered message's body once; raises ``ValueError`` if it needs buffer frames."""
    packed, buffers = _pack_body(body_of(message_obj))
    if buffers:
        raise ValueError(f"{msg_type_of(message_obj)} has binary payloads: it cannot be packed ahead of sending")
    return Packed(msg_type_of(message_obj), packed)


_codecs: dict[type, tuple[str, Any]] = {}


def _codec(message_obj: Any) -> tuple[str, Any]:
    """(msg_type, body getter) of a registered message's class, remembered: one lookup per send."""
    cls = type(message_obj)
    codec = _codecs[cls] = (type_of(message_obj), body_getter(cls))  # TypeError: not a message
    return codec


def encode(
    message_obj: Any,
    *,
    sender: str,
    parent_id: bytes | None = None,
    deadline_ns: int | None = None,
    status: str | None = None,
    msg_id: bytes | None = None,
    routing: Sequence[bytes] = (),
    topic: str | None = None,
    shm_threshold: int | None = None,
    handoffs: list[str] | None = None,
) -> list[Any]:
    """Frames for ``message_obj``: routing ids (or the topic), MAGIC, header, body, buffers.

    ``shm_threshold`` (same-host request/reply peers only, never pub/sub: a hand-over has one
    receiver): payloads of at least that many bytes go by shared memory; the hand-over names
    are appended to ``handoffs`` (to ``protocols.handover.reclaim`` them if the send fails).
    """
    if type(message_obj) is Event:
        msg_type, body = message_obj.name, message_obj.data
    elif type(message_obj) is Packed:
        header = _pack_header(message_obj.msg_type, sender, msg_id, parent_id, deadline_ns, status)
        return [*routing, *((topic.encode(),) if topic is not None else ()), MAGIC, header, message_obj.body]
    else:
        codec = _codecs.get(type(message_obj))
        if codec is None:
            codec = _codec(message_obj)
        msg_type = codec[0]
        body = codec[1](message_obj)
    header = _pack_header(msg_type, sender, msg_id, parent_id, deadline_ns, status)
    if shm_threshold is None or topic is not None:
        packed, buffers = _pack_body(body)
    else:
        packed, buffers = _pack_body_shm(body, shm_threshold, handoffs)
    frames: list[Any] = list(routing)
    if topic is not None:
        frames.append(topic.encode())
    frames.append(MAGIC)
    frames.append(header)
    frames.append(packed)
    if buffers:
        frames.extend(buffers)
    return frames


def encode_rpc_request(
    method: str, args: dict[str, Any], *, sender: str, msg_id: bytes | None = None, deadline_ns: int | None = None,
    shm_threshold: int | None = None, handoffs: list[str] | None = None,
) -> list[Any]:
    """``encode(RpcRequest(method=method, args=args), ...)`` for a DEALER, for the callers' hot path.

    The same frames, without building the message instance and looking up its class.
    """
    body = {"method": method, "args": args}
    header = _pack_header("rpc_request", sender, msg_id, None, deadline_ns, None)
    if shm_threshold is None:
        packed, buffers = _pack_body(body)
    else:
        packed, buffers = _pack_body_shm(body, shm_threshold, handoffs)
    if buffers:
        return [MAGIC, header, packed, *buffers]
    return [MAGIC, header, packed]


class _NotInline(Exception):
    """Raised by the RPC encoders' packer for a value it leaves to the general encoder."""


def _not_inline(obj: Any) -> Any:
    raise _NotInline


def _inline_packer() -> Callable[[Any], bytes]:
    """The ``pack`` of an RPC encoder's own packer: msgpack's types only (``_NotInline`` for an
    array or any other value, which the general encoder then takes). An encoder belongs to one
    socket's owner (a thread, or a loop), so its packer is never shared between threads."""
    return msgpack.Packer(use_bin_type=True, default=_not_inline).pack


class RpcRequestEncoder:
    """``encode_rpc_request`` for one sender, with a deadline: the callers' hot path (``SyncRequester.call``).

    The usual request (arguments without binaries or arrays, a small body) is built from the
    sender's header layout and one packing; anything else goes through ``encode_rpc_request``.
    Both give the same bytes. ``encode`` is a closure over the layout: reading it from cells
    instead of slots saves a fifth of the call.
    """

    __slots__ = ("sender", "encode")

    def __init__(self, sender: str) -> None:
        self.sender = sender
        key = ("rpc_request", sender, None, False, True)
        pack, head, middle, tail = _layouts.get(key) or _layout(key)
        pack_body = _inline_packer()

        def encode(method: str, args: dict[str, Any], msg_id: bytes, deadline_ns: int,
                   shm_threshold: int | None = None, handoffs: list[str] | None = None) -> list[Any]:
            if type(args) is dict and len(msg_id) == 16 and 0x1_0000_0000 <= deadline_ns <= _U64_MAX:
                for value in args.values():
                    if type(value) in _BINARY_TYPES:
                        break  # a binary argument: the general encoder decides where it goes
                else:
                    try:
                        packed = pack_body({"method": method, "args": args})
                    except _NotInline:
                        pass  # an array (or a value msgpack cannot take) further in: the general encoder's
                    else:
                        if len(packed) < INLINE_BYTES_LIMIT:
                            return [MAGIC, pack(head, msg_id, middle, _time_ns(), _DEADLINE_U64, deadline_ns, tail),
                                    packed]
            return encode_rpc_request(method, args, sender=sender, msg_id=msg_id, deadline_ns=deadline_ns,
                                      shm_threshold=shm_threshold, handoffs=handoffs)

        self.encode = encode


class RpcReplyEncoder:
    """``encode_result`` for one sender: the data plane's hot path.

    The usual result (a scalar, or a map without binaries or arrays, packing small) is built from
    the sender's header layout and one packing; for anything else (including a value msgpack
    cannot take) ``encode`` returns None and the caller takes ``encode_result``. Both give the
    same bytes. ``encode`` is a closure over the layout, as ``RpcRequestEncoder``'s is.
    """

    __slots__ = ("sender", "encode")

    def __init__(self, sender: str) -> None:
        self.sender = sender
        key = ("rpc_reply", sender, STATUS_OK, True, False)
        pack, head, middle, tail = _layouts.get(key) or _layout(key)
        pack_body = _inline_packer()

        def encode(routing_id: bytes, request_id: bytes, result: Any) -> list[Any] | None:
            t = type(result)
            if t is dict:
                for value in result.values():
                    if type(value) in _BINARY_TYPES:
                        return None
            elif t not in _SCALARS:
                return None
            if len(request_id) != 16:
                return None
            try:
                packed = pack_body({"result": result})
            except _NotInline:
                return None
            if len(packed) >= INLINE_BYTES_LIMIT:
                return None
            return [routing_id, MAGIC, pack(head, _pack_msg_id(_MSG_ID_PREFIX, next(_counter)), middle, _time_ns(),
                                            _PARENT_BIN16, request_id, tail), packed]

        self.encode = encode


class EventEncoder:
    """``encode(Event(topic, data), sender=sender, topic=topic)`` for one sender: the publishers' hot path.

    The usual event (data a map without binaries or arrays, packing small) is built from the
    header layout of its topic and one packing; for anything else ``encode`` returns None and the
    caller takes the general encoder. Both give the same bytes. Like the RPC encoders, an encoder
    belongs to one thread (its packer is its own); topics are remembered up to ``TOPICS``.
    """

    __slots__ = ("sender", "_topics", "_pack_body")

    TOPICS = 256

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self._topics: dict[str, tuple[bytes, Any, bytes, bytes, bytes]] = {}
        self._pack_body = _inline_packer()

    def encode(self, topic: str, data: dict[str, Any]) -> list[Any] | None:
        entry = self._topics.get(topic)
        if entry is None:
            if type(topic) is not str or len(self._topics) >= self.TOPICS:
                return None
            pack, head, middle, tail = _layouts.get((topic, self.sender, None, False, False)) or _layout(
                (topic, self.sender, None, False, False))
            entry = self._topics[topic] = (topic.encode(), pack, head, middle, tail)
        if type(data) is not dict or not _BINARY_TYPES.isdisjoint(map(type, data.values())):
            return None
        try:
            packed = self._pack_body(data)
        except _NotInline:
            return None
        if len(packed) >= INLINE_BYTES_LIMIT:
            return None
        name, pack, head, middle, tail = entry
        return [name, MAGIC, pack(head, _pack_msg_id(_MSG_ID_PREFIX, next(_counter)), middle, _time_ns(), tail), packed]


def _usual_reply(rpc: bool, frames: Sequence[Any], max_size: int | None) -> tuple[Any, ...] | None:
    """The usual reply: an ok reply on a DEALER (``[MK1, header, body]``) without buffer frames, in
    the canonical header layout, whose body unpacks to a map. ``rpc``: ``(parent_id, result)`` of
    such an ``rpc_reply`` whose body is exactly ``{result: value}``; else ``(parent_id, msg_type,
    body)`` of one of any type. None for anything else.

    The header's parts are checked as :func:`_decode_canonical_header` checks them; for the usual
    layout of a reply (a parent id, no deadline) without building the ``Header``, which the
    callers do not need: they match the parent id and take the body.
    """
    if len(frames) != 3:
        return None
    magic, raw_header, raw_body = frames
    if (type(raw_header) is not bytes or type(raw_body) is not bytes or magic != MAGIC
            or (max_size is not None and 3 + len(raw_header) + len(raw_body) > max_size)):
        return None
    layout = _ok_replies.get(len(raw_header))
    fields = None
    if layout is not None:
        unpack, head, tail = layout
        h, _, middle, _, k, parent_id, t = unpack(raw_header)
        if h == head and t == tail and k == _PARENT_BIN16:
            fields = _middles.get(middle)
    if fields is not None:
        msg_type = fields[0]
    else:  # another layout, or one not learned yet
        header = _decode_canonical_header(raw_header)
        if header is None or header.status != STATUS_OK:
            return None
        parent_id, msg_type = header.parent_id, header.msg_type
    try:
        body = _unpackb(raw_body, raw=False, ext_hook=_no_buffers_hook)
    except Exception:
        return None
    if type(body) is not dict:
        return None
    if not rpc:
        return parent_id, msg_type, body
    if msg_type != "rpc_reply" or len(body) != 1 or "result" not in body:
        return None
    return parent_id, body["result"]


# ``decode_rpc_reply(frames, max_size)``: ``(parent_id, result)`` of a caller's usual reply, else
# None. The usual reply is an ok ``rpc_reply`` on a DEALER (``[MK1, header, body]``), without
# buffer frames, in the canonical header layout, whose body is exactly ``{result: value}``. It is
# checked here as :func:`decode` would check it, without building the ``Header``, the ``RpcReply``
# and the ``Envelope``. None means "not the usual reply" only: ``decode`` then decides (errors,
# other types, buffers, shared memory, and anything invalid take that path).
decode_rpc_reply: Callable[[Sequence[Any], int | None], tuple[bytes | None, Any] | None] = functools.partial(
    _usual_reply, True)


def decode_reply_map(frames: Sequence[Any], max_size: int | None) -> tuple[bytes | None, dict[str, Any]] | None:
    """``(parent_id, body map)`` of a caller's usual reply of a registered type, else None.

    The usual reply is as for :func:`decode_rpc_reply` (an ok reply on a DEALER, no buffer frames,
    the canonical header) of any registered type. Its body is checked as :func:`decode` checks it
    and returned as the map ``body_of`` would give for the decoded message, without building the
    message and the ``Envelope``: what the clients return. None means "not the usual reply" only:
    ``decode`` then decides, and explains what is wrong if anything is.
    """
    usual = _usual_reply(False, frames, max_size)
    if usual is None:
        return None
    parent_id, msg_type, body = usual
    builder = _map_builders[msg_type]
    if builder is None:
        return None
    try:
        return parent_id, builder(body)
    except ProtocolError:
        return None


def reply_type(request_type: str) -> str:
    """``start_request`` -> ``start_reply``."""
    if request_type.endswith("_request"):
        return request_type[: -len("_request")] + "_reply"
    return "error_reply"


def encode_reply(request: Header, message_obj: Any, *, sender: str, routing: Sequence[bytes] = ()) -> list[Any]:
    """An ``ok`` reply correlated to ``request`` (parent_id = the request's msg_id)."""
    if type(message_obj) is Packed:  # the cached status and the like: encode()'s branch, one call less
        return [*routing, MAGIC, _pack_header(message_obj.msg_type, sender, None, request.msg_id, None, STATUS_OK),
                message_obj.body]
    return encode(message_obj, sender=sender, parent_id=request.msg_id, status=STATUS_OK, routing=routing)


def packed_request(message: Packed, sender: str, msg_id: bytes | None, deadline_ns: int | None) -> list[Any]:
    """``encode(message, sender=sender, msg_id=msg_id, deadline_ns=deadline_ns)`` of a request packed
    once (``pack_message``): only the header is made (the requesters' path for monitoring loops)."""
    return [MAGIC, _pack_header(message.msg_type, sender, msg_id, None, deadline_ns, None), message.body]


def encode_result(
    request: Header, result: Any, *, sender: str, routing: Sequence[bytes] = (), shm_threshold: int | None = None,
    handoffs: list[str] | None = None,
) -> list[Any]:
    """``encode_reply(request, RpcReply(result=result), ...)``, for the data plane's hot path.

    ``shm_threshold`` and ``handoffs`` as for ``encode``.
    """
    body = {"result": result}
    packed, buffers = _pack_body(body)
    if buffers and shm_threshold is not None:  # only then can anything go by shared memory
        packed, buffers = _pack_body_shm(body, shm_threshold, handoffs, (packed, buffers))
    header = _pack_header("rpc_reply", sender, None, request.msg_id, None, STATUS_OK)
    if buffers:
        return [*routing, MAGIC, header, packed, *buffers]
    return [*routing, MAGIC, header, packed]


def encode_error(
    request: Header | None,
    code: ErrorCode | str,
    reason: str,
    *,
    sender: str,
    details: dict[str, Any] | None = None,
    routing: Sequence[bytes] = (),
) -> list[Any]:
    """An ``error`` reply. msg_type is the request's reply type when known, else ``error_reply``."""
    if request is None:
        header = _pack_header("error_reply", sender, None, None, None, STATUS_ERROR)
    else:
        header = _pack_header(reply_type(request.msg_type), sender, None, request.msg_id, None, STATUS_ERROR)
    body = {"code": str(ErrorCode(code).value), "reason": reason, "details": details or {}}
    return [*routing, MAGIC, header, pack(body)]


# --- decoding ----------------------------------------------------------------------------------


def _nbytes(frame: Any) -> int:
    if type(frame) is bytes:
        return len(frame)
    return memoryview(frame).nbytes


def _as_bytes(frame: Any) -> bytes:
    return frame if type(frame) is bytes else bytes(frame)


def _view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame received with copy=False
    view = buf if buf is not None else memoryview(frame)
    return view.toreadonly() if not view.readonly else view


_new_header = tuple.__new__
_STATUSES = (STATUS_OK, STATUS_ERROR)
_MAJOR = PROTOCOL_VERSION[0]


# Parsing the canonical header layout (what ``_pack_header`` writes: the keys in spec order, the
# integers as uint64, binaries as bin8) straight from the bytes skips building a map whose keys
# msgpack hashes and interns one by one. The part from the msg_type key to the ts_ns key repeats
# for every message of one kind from one sender: it is validated once (by the packer's own
# decoder) and remembered. Anything else, including every invalid header, takes the general path.
_TS_KEY = b"\xa5ts_ns\xcf"
_STATUS_OK_ENTRY = b"\xa6status\xa2ok"
_STATUS_ERROR_ENTRY = b"\xa6status\xa5error"
_middles: dict[bytes, tuple[str, tuple[int, int], str]] = {}
_from_u64 = struct.Struct(">Q").unpack_from


def _middle(middle: bytes) -> tuple[str, tuple[int, int], str] | None:
    """(msg_type, version, sender) of a header's msg_type..ts_ns section, when it is valid."""
    known = _middles.get(middle)
    if known is not None:
        return known
    try:
        m = msgpack.unpackb(b"\x83" + middle[:-len(_TS_KEY)], raw=False, use_list=False)
    except Exception:  # truncated or not msgpack at all: the general path explains it
        return None
    # Exactly these three keys in this order (a repeated key would leave fewer), valid values.
    if type(m) is not dict or list(m) != ["msg_type", "version", "sender"]:
        return None
    msg_type, version, sender = m["msg_type"], m["version"], m["sender"]
    if not (type(msg_type) is str and msg_type and type(sender) is str and type(version) is tuple
            and len(version) == 2 and type(version[0]) is int and type(version[1]) is int and version[0] == _MAJOR):
        return None
    known = (msg_type, version, sender)
    if len(_middles) < _TEMPLATE_LIMIT:
        _middles[middle] = known
    return known


def _decode_canonical_header(raw: bytes) -> Header | None:
    """The header when ``raw`` is in the canonical layout, else None (not necessarily invalid).

    Headers of one kind from one peer have one length and one layout: the last layout seen at a
    length is tried first, as one ``struct`` unpack whose constant parts are then compared (the
    bytes are exactly that layout or the scan below decides). Layouts come from :func:`_scan_header`.
    """
    layout = _parsers.get(len(raw))
    if layout is not None:
        variant, unpack, head, tail, status = layout
        parent_id = deadline_ns = None
        if variant == 0:
            h, msg_id, middle, ts_ns, t = unpack(raw)
            ok = True
        elif variant == 1:
            h, msg_id, middle, ts_ns, k, parent_id, t = unpack(raw)
            ok = k == _PARENT_BIN16
        elif variant == 2:
            h, msg_id, middle, ts_ns, k, deadline_ns, t = unpack(raw)
            ok = k == _DEADLINE_U64
        else:
            h, msg_id, middle, ts_ns, k, parent_id, k2, deadline_ns, t = unpack(raw)
            ok = k == _PARENT_BIN16 and k2 == _DEADLINE_U64
        if ok and h == head and t == tail:
            fields = _middles.get(middle)
            if fields is not None:
                msg_type, version, sender = fields
                return _new_header(Header, (msg_id, msg_type, version, sender, ts_ns, parent_id, deadline_ns, status))
    return _scan_header(raw)


_parsers: dict[int, tuple[int, Any, bytes, bytes, str | None]] = {}
# The usual reply's layouts (a parent id, no deadline, status ok) by length, apart: (unpack, head, tail).
_ok_replies: dict[int, tuple[Any, bytes, bytes]] = {}


def _learn_layout(n: int, middle: bytes, parent: bool, deadline: bool, status: str | None) -> None:
    """Remember the layout of a valid canonical header of ``n`` bytes with ids of 16 bytes."""
    tail = b"" if status is None else (_STATUS_OK_ENTRY if status == STATUS_OK else _STATUS_ERROR_ENTRY)
    layout, head = _header_struct(middle, parent, deadline, tail)
    if layout.size == n and (n in _parsers or len(_parsers) < _TEMPLATE_LIMIT):
        _parsers[n] = (parent + 2 * deadline, layout.unpack, head, tail, status)
        if parent and not deadline and status == STATUS_OK and (n in _ok_replies or len(_ok_replies) < _TEMPLATE_LIMIT):
            _ok_replies[n] = (layout.unpack, head, tail)


def _scan_header(raw: bytes) -> Header | None:
    """``_decode_canonical_header`` by scanning the bytes (and learning their layout)."""
    n = len(raw)
    if n < 40 or raw[1:9] != b"\xa6msg_id\xc4":
        return None
    entries = raw[0] - 0x85
    if not 0 <= entries <= 3:
        return None
    size = raw[9]
    p = 10 + size
    msg_id = raw[10:p]
    q = raw.find(_TS_KEY, p)
    if size == 0 or size > 64 or q < 0:
        return None
    q += 7
    middle = raw[p:q]
    fields = _middles.get(middle) or _middle(middle)
    if fields is None or q + 8 > n:
        return None
    ts_ns = _from_u64(raw, q)[0]
    p = q + 8
    parent_id = deadline_ns = status = None
    if entries and raw[p:p + 11] == b"\xa9parent_id\xc4":
        if p + 12 > n:
            return None
        size = raw[p + 11]
        parent_id = raw[p + 12:p + 12 + size]
        if len(parent_id) != size:
            return None
        p += 12 + size
        entries -= 1
    if entries and raw[p:p + 13] == b"\xabdeadline_ns\xcf":
        if p + 21 > n:
            return None
        deadline_ns = _from_u64(raw, p + 13)[0]
        p += 21
        entries -= 1
    if entries:
        tail = raw[p:]
        if tail == _STATUS_OK_ENTRY:
            status = STATUS_OK
        elif tail == _STATUS_ERROR_ENTRY:
            status = STATUS_ERROR
        else:
            return None
        p = n
        entries -= 1
    if entries or p != n:
        return None
    if len(msg_id) == 16 and (parent_id is None or len(parent_id) == 16) and middle in _middles:
        _learn_layout(n, middle, parent_id is not None, deadline_ns is not None, status)
    msg_type, version, sender = fields
    return _new_header(Header, (msg_id, msg_type, version, sender, ts_ns, parent_id, deadline_ns, status))


def _decode_header(raw: Any) -> Header:
    if type(raw) is bytes:
        header = _decode_canonical_header(raw)
        if header is not None:
            return header
    try:
        h = msgpack.unpackb(raw, raw=False, use_list=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.MALFORMED, f"header is not valid msgpack: {exc}") from None
    if type(h) is dict:
        # The common case in one expression; any doubt goes to the checks that explain the problem.
        get = h.get
        msg_id, msg_type, version, sender, ts_ns = get("msg_id"), get("msg_type"), get("version"), get("sender"), get("ts_ns")
        parent_id, deadline_ns, status = get("parent_id"), get("deadline_ns"), get("status")
        if (
            type(msg_id) is bytes and 0 < len(msg_id) <= 64 and type(msg_type) is str and msg_type
            and type(sender) is str and type(ts_ns) is int
            and type(version) is tuple and len(version) == 2 and version[0] == _MAJOR
            and type(version[0]) is int and type(version[1]) is int
            and (parent_id is None or type(parent_id) is bytes)
            and (deadline_ns is None or type(deadline_ns) is int)
            and (status is None or status in _STATUSES)
        ):
            return _new_header(Header, (msg_id, msg_type, version, sender, ts_ns, parent_id, deadline_ns, status))
    return _check_header(h)


def _check_header(h: Any) -> Header:
    """The header checks one by one, raising the error that names the problem."""
    if not isinstance(h, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "header must be a map")
    version = h.get("version")
    if not isinstance(version, (list, tuple)) or len(version) != 2 or type(version[0]) is not int or type(version[1]) is not int:
        raise ProtocolError(ErrorCode.MALFORMED, "header.version must be [major, minor]")
    if version[0] != PROTOCOL_VERSION[0]:
        err = ProtocolError(
            ErrorCode.VERSION_MISMATCH,
            f"protocol major version {version[0]} is not supported (this peer speaks {PROTOCOL_VERSION[0]}.x)",
        )
        err.header = _loose_header(h)  # type: ignore[attr-defined]
        raise err
    msg_id, msg_type, sender, ts_ns = h.get("msg_id"), h.get("msg_type"), h.get("sender"), h.get("ts_ns")
    if not isinstance(msg_id, bytes) or not 1 <= len(msg_id) <= 64:
        raise ProtocolError(ErrorCode.MALFORMED, "header.msg_id must be 1..64 bytes")
    if type(msg_type) is not str or not msg_type:
        raise ProtocolError(ErrorCode.MALFORMED, "header.msg_type must be a non-empty string")
    if type(sender) is not str:
        raise ProtocolError(ErrorCode.MALFORMED, "header.sender must be a string")
    if type(ts_ns) is not int:
        raise ProtocolError(ErrorCode.MALFORMED, "header.ts_ns must be an integer")
    parent_id, deadline_ns, status = h.get("parent_id"), h.get("deadline_ns"), h.get("status")
    if parent_id is not None and not isinstance(parent_id, bytes):
        raise ProtocolError(ErrorCode.MALFORMED, "header.parent_id must be binary")
    if deadline_ns is not None and type(deadline_ns) is not int:
        raise ProtocolError(ErrorCode.MALFORMED, "header.deadline_ns must be an integer")
    if status is not None and status not in (STATUS_OK, STATUS_ERROR):
        raise ProtocolError(ErrorCode.MALFORMED, "header.status must be 'ok' or 'error'")
    return Header(msg_id, msg_type, (version[0], version[1]), sender, ts_ns, parent_id, deadline_ns, status)


def _loose_header(h: dict[str, Any]) -> Header | None:
    """A best-effort header for correlating an error reply to an unusable request."""
    msg_id = h.get("msg_id")
    msg_type = h.get("msg_type")
    if not isinstance(msg_id, bytes) or type(msg_type) is not str:
        return None
    return Header(msg_id=msg_id, msg_type=msg_type, version=PROTOCOL_VERSION, sender=str(h.get("sender", "")), ts_ns=0)


class _ShmSeen(Exception):
    """A shared-memory reference in a message decoded without claims bookkeeping: decode again."""


def _no_buffers_hook(code: int, data: bytes) -> Any:
    """The ext hook of a message without buffer frames: a reference can only be malformed."""
    if code == EXT_BUFFER or code == EXT_NDARRAY:
        raise ProtocolError(ErrorCode.MALFORMED, "buffer reference with no buffer frames in the message")
    if code == EXT_SHM:
        raise _ShmSeen()
    return msgpack.ExtType(code, data)


def _shm_value(data: bytes, claims: dict[str, memoryview], allowed: bool) -> Any:
    """The array (or read-only memoryview) a valid ``[name, offset, nbytes, dtype, shape]`` names."""
    if not allowed:
        raise ProtocolError(ErrorCode.FORBIDDEN, "shared-memory references are accepted only from same-host peers")
    try:
        ref = msgpack.unpackb(data, raw=False)
    except Exception:
        ref = None
    if not (type(ref) is list and len(ref) == 5 and shm.valid_name(ref[0])
            and type(ref[1]) is int and ref[1] >= 0 and type(ref[2]) is int and ref[2] >= 0
            and ((ref[3] is None and ref[4] is None) or (type(ref[3]) is str and type(ref[4]) is list
                 and all(type(d) is int and d >= 0 for d in ref[4])))):
        raise ProtocolError(ErrorCode.MALFORMED, "shm reference must be [segment name, offset, nbytes, dtype, shape]")
    name, offset, nbytes, dtype, shape = ref
    view = claims.get(name)
    if view is None:
        try:
            view = claims[name] = handover.claim(name)
        except handover.ClaimError as exc:
            raise ProtocolError(ErrorCode.NOT_FOUND if exc.missing else ErrorCode.MALFORMED, str(exc)) from None
    if offset + nbytes > view.nbytes:
        raise ProtocolError(ErrorCode.MALFORMED, f"shm reference [{offset}, +{nbytes}) exceeds segment {name} of {view.nbytes} bytes")
    part = view[offset:offset + nbytes]
    return part if dtype is None else _array(part, dtype, tuple(shape))


def _ext_hook_for(buffers: list[Any], shm_allowed: bool = True):
    claims: dict[str, memoryview] = {}  # one claim per hand-over name per message

    def hook(code: int, data: bytes) -> Any:
        if code == EXT_SHM:
            return _shm_value(data, claims, shm_allowed)
        if code == EXT_BUFFER:
            index = msgpack.unpackb(data)
            if type(index) is not int or not 0 <= index < len(buffers):
                raise ProtocolError(ErrorCode.MALFORMED, f"buffer reference {index!r} has no frame")
            return _view(buffers[index])
        if code == EXT_NDARRAY:
            ref = msgpack.unpackb(data, raw=False)
            if not (isinstance(ref, list) and len(ref) == 3 and type(ref[0]) is int and type(ref[1]) is str
                    and isinstance(ref[2], list) and all(type(d) is int and d >= 0 for d in ref[2])):
                raise ProtocolError(ErrorCode.MALFORMED, "ndarray reference must be [index, dtype, shape]")
            index, dtype, shape = ref
            if not 0 <= index < len(buffers):
                raise ProtocolError(ErrorCode.MALFORMED, f"ndarray reference {index} has no frame")
            return _array(_view(buffers[index]), dtype, tuple(shape))
        return msgpack.ExtType(code, data)

    return hook


def _array(view: memoryview, dtype: str, shape: tuple[int, ...]) -> Any:
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the daemon
        return RawArray(dtype, shape, view)
    try:
        arr = np.frombuffer(view, dtype=np.dtype(dtype))
        return arr.reshape(shape) if shape else arr.reshape(())
    except (TypeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"ndarray frame does not match dtype {dtype} shape {list(shape)}: {exc}") from None


def _locate(frames: Sequence[Any], topic: bool) -> tuple[int, list[bytes], str | None]:
    """Index of the MK1 frame, the routing ids before it, and the topic on pub/sub."""
    n = len(frames)
    if topic:
        if n < 4:
            raise ProtocolError(ErrorCode.MALFORMED, f"expected at least 4 frames (topic, MK1, header, body), got {n}")
        if _as_bytes(frames[1]) != MAGIC:
            raise ProtocolError(ErrorCode.MALFORMED, "frame after the topic must be b'MK1'")
        return 1, [], _as_bytes(frames[0]).decode("utf-8", "replace")
    # Fast paths: a DEALER sees MK1 first, a ROUTER sees one routing id then MK1.
    if n > 1:
        first = frames[0]
        if type(first) is bytes:
            if first == MAGIC:
                return 0, [], None
            if frames[1] == MAGIC:
                return 1, [first], None
    routing: list[bytes] = []
    for i in range(min(n, 8)):
        f = frames[i]
        if _nbytes(f) == 3 and _as_bytes(f) == MAGIC:
            return i, routing, None
        routing.append(_as_bytes(f))
    err = ProtocolError(ErrorCode.MALFORMED, "no b'MK1' protocol frame in the message")
    err.routing = routing[:1]  # type: ignore[attr-defined]
    raise err


def decode(frames: Sequence[Any], *, topic: bool = False, max_size: int | None = None, shm: bool = True) -> Envelope:
    """Parse and validate one inbound multipart message.

    Shared-memory references are claimed (mapped read-only, their names unlinked) unless ``shm``
    is False (a socket open to other hosts) or the message is an event (``topic``): then they
    are refused. ``max_size`` counts frames only.

    Raises ``ProtocolError``; when the header could be read the exception carries it as
    ``.header`` (and the routing ids as ``.routing``) so the caller can address an error reply.
    """
    n = len(frames)
    # The common shapes without a call: a DEALER sees [MK1, header, body], a ROUTER [id, MK1, ...].
    first = frames[0] if n > 2 else None
    start = -1
    if not topic and type(first) is bytes:
        if first == MAGIC:
            start, routing, topic_name, size = 0, [], None, 3
        elif frames[1] == MAGIC:
            start, routing, topic_name, size = 1, [first], None, 3 + len(first)
    if start >= 0 and n == start + 3:
        # No buffer frames: decode inline; any problem is left to the general path below, which
        # decodes again and raises the error that names it.
        raw_header, raw_body = frames[start + 1], frames[start + 2]
        if (type(raw_header) is bytes and type(raw_body) is bytes
                and (max_size is None or size + len(raw_header) + len(raw_body) <= max_size)):
            header = _decode_canonical_header(raw_header)
            if header is not None and header.status != STATUS_ERROR:
                builder = _builders[header.msg_type]
                if builder is not None:
                    try:
                        body = _unpackb(raw_body, raw=False, ext_hook=_no_buffers_hook)
                        return Envelope(routing, header, builder(body), [], topic_name)
                    except Exception:
                        pass
    if start < 0:
        start, routing, topic_name = _locate(frames, topic)
    if n - start < 3:
        err = ProtocolError(ErrorCode.MALFORMED, "message ends before the header and body frames")
        err.routing = routing  # type: ignore[attr-defined]
        raise err
    if max_size is not None:
        total = 0
        for f in frames:
            total += len(f) if type(f) is bytes else _nbytes(f)
        if total > max_size:
            err = ProtocolError(ErrorCode.TOO_LARGE, f"message of {total} bytes exceeds the limit of {max_size} bytes")
            err.routing = routing  # type: ignore[attr-defined]
            try:
                err.header = _decode_header(frames[start + 1])  # type: ignore[attr-defined]
            except ProtocolError:
                pass
            raise err
    try:
        header = _decode_header(frames[start + 1])
    except ProtocolError as err:
        err.routing = routing  # type: ignore[attr-defined]
        raise
    buffers = list(frames[start + 3:]) if n > start + 3 else []
    try:
        message_obj = _decode_body(frames[start + 2], header, buffers, topic_name, shm and not topic)
    except ProtocolError as err:
        err.routing = routing  # type: ignore[attr-defined]
        err.header = header  # type: ignore[attr-defined]
        raise
    return Envelope(routing, header, message_obj, buffers, topic_name)


_unpackb = msgpack.unpackb


def decode_rpc_request(frames: Sequence[Any], max_size: int | None) -> tuple[list[bytes], Header, str, dict[str, Any]] | None:
    """``(routing, header, method, args)`` of the data plane's usual message, else None.

    The usual message is an ``rpc_request`` from one DEALER, without buffer frames, in the
    canonical header layout, whose body is exactly ``{method: str, args: map}``: what every SDK
    caller sends. It is checked here as :func:`decode` would check it, without building the
    ``RpcRequest`` and the ``Envelope`` (each message costs the server a few microseconds of
    Python; this is a good share of them). None means "not the usual message" only: ``decode``
    then decides, and explains what is wrong if anything is.
    """
    if len(frames) != 4:
        return None
    routing_id, magic, raw_header, raw_body = frames
    if (type(raw_body) is not bytes or type(raw_header) is not bytes or type(routing_id) is not bytes
            or magic != MAGIC or (max_size is not None and 3 + len(routing_id) + len(raw_header) + len(raw_body) > max_size)):
        return None
    header = _decode_canonical_header(raw_header)
    if header is None or header.msg_type != "rpc_request" or header.status is not None:
        return None
    try:
        body = _unpackb(raw_body, raw=False, ext_hook=_no_buffers_hook)
    except Exception:
        return None
    if type(body) is not dict or len(body) != 2:
        return None
    method = body.get("method")
    args = body.get("args")
    if type(method) is not str or type(args) is not dict:
        return None
    for key in args:
        if type(key) is not str:  # decode's check of the args map, for its error reply
            return None
    return [routing_id], header, method, args


class _Builders(dict):  # type: ignore[type-arg]
    """msg_type -> ``make(cls)`` of its registered class (None for unregistered types), filled on use."""

    def __init__(self, make: Callable[[type], Any]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, msg_type: str) -> Any:
        cls = class_for(msg_type)
        builder = None if cls is None else self.make(cls)
        if len(self) < _TEMPLATE_LIMIT:
            self[msg_type] = builder
        return builder


_builders = _Builders(builder_of)
_map_builders = _Builders(map_builder_of)


def _decode_body(raw: Any, header: Header, buffers: list[Any], topic_name: str | None, shm_allowed: bool = True) -> Any:
    try:
        try:
            body = msgpack.unpackb(raw, raw=False, ext_hook=_ext_hook_for(buffers, shm_allowed) if buffers else _no_buffers_hook)
        except _ShmSeen:
            body = msgpack.unpackb(raw, raw=False, ext_hook=_ext_hook_for(buffers, shm_allowed))
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"body of {header.msg_type} is not valid msgpack: {exc}") from None
    if header.status == STATUS_ERROR:
        return build(messages.ErrorReply, body)
    cls = class_for(header.msg_type)
    if cls is not None:
        return build(cls, body)
    if topic_name is not None or "." in header.msg_type:
        if type(body) is not dict:
            raise ProtocolError(ErrorCode.MALFORMED, f"body of event {header.msg_type} must be a map")
        return Event(header.msg_type, body)
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown msg_type {header.msg_type!r}")

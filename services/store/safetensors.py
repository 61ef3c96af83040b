"""Our codec of the safetensors file format, numpy in and out.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header
length ``N``, ``N`` bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}`` (padded with spaces), then the raw little-endian tensor data; the
offsets are relative to the end of the header, and the tensors tile the data with no holes.

Encoding never concatenates tensor data: :func:`encode` returns the header and the arrays in file
order, so a writer streams each array's own buffer. Decoding builds every array as a view of the
buffer it is given (``np.frombuffer``), never a copy. We pad the header so the data starts on an
8-byte boundary and order tensors by decreasing item size, so every view is aligned.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DTYPES", "Encoded", "SafetensorsError", "decode", "dumps", "encode", "read_header"]

# safetensors dtype name -> numpy dtype (little-endian). BF16 and the FP8 types have no numpy
# dtype: files holding them are refused with a clear error rather than misread.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("|b1"),
    "U8": np.dtype("|u1"),
    "I8": np.dtype("|i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
_NAME_OF = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}
_METADATA = "__metadata__"
_ALIGN = 8
# The reference implementation refuses headers above 100 MB; so do we (a corrupt length field
# must not make us allocate gigabytes).
MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """The bytes are not a valid safetensors file, or the tensors cannot be encoded as one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Encoded:
    """A safetensors file ready to be streamed: ``header`` then each of ``arrays``' buffers."""

    header: bytes  # the 8-byte length prefix and the padded JSON header
    arrays: tuple[np.ndarray, ...]  # C-contiguous, little-endian, in file order
    size: int  # total file size in bytes

    def buffers(self) -> list[memoryview]:
        """The file's content as a list of buffers (no copies), in order."""
        return [memoryview(self.header), *(_bytes_of(a) for a in self.arrays if a.nbytes)]


def _bytes_of(array: np.ndarray) -> memoryview:
    # A flat unsigned-byte view: the buffer of a 0-d or bool array, as writers expect.
    return memoryview(array.reshape(-1).view(np.uint8))


def _dtype_name(name: str, dtype: np.dtype[Any]) -> str:
    found = _NAME_OF.get((dtype.kind, dtype.itemsize))
    if found is None:
        supported = ", ".join(DTYPES)
        raise SafetensorsError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold here (supported: {supported})")
    return found


def encode(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Encoded:
    """Lay out ``tensors`` (name -> numpy array) as a safetensors file; see :class:`Encoded`."""
    arrays: list[tuple[str, str, np.ndarray]] = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == _METADATA:
            raise SafetensorsError(f"tensor name {name!r} is not allowed (a non-empty string other than {_METADATA!r})")
        array = np.asarray(value)
        dtype_name = _dtype_name(name, array.dtype)
        # Little-endian and C-contiguous; both are no-ops (no copy) for the usual arrays.
        array = np.asarray(array, dtype=DTYPES[dtype_name], order="C")
        arrays.append((name, dtype_name, array))
    # Larger items first keeps every tensor aligned to its item size (the data starts 8-aligned).
    arrays.sort(key=lambda item: (-item[2].itemsize, item[0]))
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise SafetensorsError(f"safetensors metadata maps strings to strings; bad entries: {bad!r}")
        header[_METADATA] = dict(metadata)
    offset = 0
    for name, dtype_name, array in arrays:
        header[name] = {"dtype": dtype_name, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    prefix = struct.pack("<Q", len(text)) + text
    return Encoded(header=prefix, arrays=tuple(a for _, _, a in arrays), size=len(prefix) + offset)


def dumps(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The whole file as one ``bytes`` (a copy; prefer :func:`encode` for large tensors)."""
    return b"".join(encode(tensors, metadata).buffers())


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorInfo:
    """One tensor's entry in the header; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """A parsed, validated header: where each tensor lies in the file, and the metadata."""

    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    data_start: int
    size: int  # the file size the header implies


def read_header(buffer: Any, file_size: int | None = None) -> Header:
    """Parse and validate the header at the start of ``buffer``.

    ``buffer`` may hold just the start of the file when ``file_size`` gives the whole size
    (enough to check an upload without reading its data). Raises :class:`SafetensorsError`.
    """
    view = memoryview(buffer).cast("B")
    total = len(view) if file_size is None else file_size
    if len(view) < 8:
        raise SafetensorsError(f"a safetensors file starts with an 8-byte header length; got {len(view)} bytes")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > MAX_HEADER or 8 + n > total:
        raise SafetensorsError(f"header length {n} does not fit a file of {total} bytes (limit {MAX_HEADER})")
    if 8 + n > len(view):
        raise SafetensorsError(f"need the first {8 + n} bytes to read the header, got {len(view)}")
    try:
        parsed = json.loads(bytes(view[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise SafetensorsError(f"header must be a JSON object, got {type(parsed).__name__}")
    metadata = parsed.pop(_METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError("__metadata__ must map strings to strings")
    data_start = 8 + n
    infos = [_tensor_info(name, entry, data_start) for name, entry in parsed.items()]
    infos.sort(key=lambda t: (t.begin, t.end))
    cursor = data_start
    for info in infos:
        if info.begin != cursor:
            raise SafetensorsError(f"tensor {info.name!r} starts at data offset {info.begin - data_start}, "
                                   f"expected {cursor - data_start} (tensors must tile the data without holes or overlaps)")
        cursor = info.end
    if cursor != total:
        raise SafetensorsError(f"the tensors cover {cursor - data_start} data bytes but the file holds {total - data_start}")
    return Header(tensors=tuple(infos), metadata=dict(metadata), data_start=data_start, size=total)


def _tensor_info(name: str, entry: Any, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"tensor {name!r}: an entry is {{dtype, shape, data_offsets}}, got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise SafetensorsError(f"tensor {name!r} has dtype {dtype!r}, not supported (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SafetensorsError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsError(f"tensor {name!r}: {dtype} {shape} needs {expected} bytes, data_offsets give {offsets[1] - offsets[0]}")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=data_start + offsets[0], end=data_start + offsets[1])


def decode(buffer: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` from a whole file in ``buffer``; the arrays are views of it."""
    header = read_header(buffer)
    tensors: dict[str, np.ndarray] = {}
    for info in header.tensors:
        dtype = DTYPES[info.dtype]
        count = (info.end - info.begin) // dtype.itemsize
        tensors[info.name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=info.begin).reshape(info.shape)
    return tensors, header.metadata

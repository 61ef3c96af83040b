"""The safetensors codec: round trips of every supported dtype, the published layout, bad files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.store import safetensors
from services.store.safetensors import DTYPES, SafetensorsError

names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda n: n != "__metadata__")
arrays = st.sampled_from(sorted(DTYPES)).flatmap(
    lambda d: hnp.arrays(DTYPES[d].newbyteorder("=") if DTYPES[d].itemsize > 1 else DTYPES[d],
                         hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
metadata = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


@settings(max_examples=150, deadline=None)
@given(tensors=st.dictionaries(names, arrays, max_size=5), meta=metadata)
def test_round_trip_of_every_dtype_shape_and_metadata(tensors: dict[str, np.ndarray], meta: dict[str, str] | None) -> None:
    raw = safetensors.dumps(tensors, meta)
    decoded, decoded_meta = safetensors.decode(raw)
    assert decoded_meta == (meta or {})
    assert set(decoded) == set(tensors)
    for name, array in tensors.items():
        got = decoded[name]
        assert got.shape == array.shape and got.dtype == array.dtype.newbyteorder("<")
        assert got.tobytes() == array.astype(got.dtype).tobytes()  # bit-exact, NaNs included
    assert len(raw) == safetensors.encode(tensors, meta).size


def test_decoded_arrays_are_aligned_views_of_the_buffer() -> None:
    buffer = bytearray(safetensors.dumps({"a": np.arange(3, dtype=np.int8), "b": np.ones((2, 2), np.float64),
                                          "c": np.zeros(5, np.float16)}))
    decoded, _ = safetensors.decode(buffer)
    base = np.frombuffer(buffer, dtype=np.uint8)
    for array in decoded.values():
        assert np.shares_memory(array, base)
        assert array.ctypes.data % array.itemsize == 0
    assert (8 + struct.unpack_from("<Q", buffer)[0]) % 8 == 0


def test_a_file_written_by_hand_after_the_published_spec_decodes() -> None:
    header = {"weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "ids": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
              "__metadata__": {"format": "pt"}}
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", len(text)) + text + struct.pack("<2f", 1.5, -2.0) + struct.pack("<q", 7)
    tensors, meta = safetensors.decode(raw)
    assert tensors["weight"].tolist() == [1.5, -2.0] and tensors["ids"].tolist() == [7]
    assert meta == {"format": "pt"}


def test_big_endian_and_non_contiguous_input_is_written_little_endian() -> None:
    array = np.arange(12, dtype=">i4").reshape(3, 4).T
    decoded, _ = safetensors.decode(safetensors.dumps({"x": array}))
    assert decoded["x"].dtype == np.dtype("<i4") and decoded["x"].tolist() == array.tolist()


def _file(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(("raw", "message"), [
    (b"\x01\x02", "8-byte header length"),
    (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
    (struct.pack("<Q", 3) + b"{x}", "not UTF-8 JSON"),
    (_file([]), "must be a JSON object"),
    (_file({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0"), "BF16"),
    (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8 bytes"),
    (_file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\0\0"), "without holes"),
    (_file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0\0"), "file holds 2"),
    (_file({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}), "non-negative"),
    (_file({"__metadata__": {"k": 1}}), "strings to strings"),
])
def test_malformed_files_are_refused_with_the_reason(raw: bytes, message: str) -> None:
    with pytest.raises(SafetensorsError, match=message):
        safetensors.decode(raw)


def test_unsupported_arrays_and_names_are_refused() -> None:
    with pytest.raises(SafetensorsError, match="complex"):
        safetensors.encode({"z": np.zeros(2, np.complex64)})
    with pytest.raises(SafetensorsError, match="not allowed"):
        safetensors.encode({"__metadata__": np.zeros(1)})

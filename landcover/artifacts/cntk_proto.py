"""A reader for CNTK v2 `.model` files, written from CNTK's public `CNTK.proto` (proto3).

A saved CNTK function is one `Dictionary` message: string keys to `DictionaryValue`s, which hold
scalars, strings, shapes, axes, nested vectors and dictionaries, and tensors (`NDArrayView`).
This module decodes the protobuf wire format itself (varints, length-delimited fields, packed
floats) so the project needs neither CNTK (Python 3.6-only wheels) nor generated protobuf code.

Layout conventions kept from CNTK: an NDShape lists dimensions fastest-first (column-major, the
reverse of NumPy's order), and a tensor's values are stored in that order; `NDArray.array`
returns them in NumPy order (the shape reversed), which is also CNTK's Python-API order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landcover.errors import LandcoverError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
# A model file is hostile until proven otherwise: every length is checked against the bytes
# left before anything is sliced or allocated, nesting is capped (a deep file must not exhaust
# the stack), and tensors must hold finite numbers.
MAX_DEPTH = 64
MAX_DIMS = 16


class CntkFormatError(LandcoverError):
    """The file is not a CNTK v2 model (or is damaged)."""


@dataclass(frozen=True)
class Axis:
    """A CNTK dynamic axis (batch or sequence), kept only to check the input's layout."""

    static_axis_idx: int
    name: str
    is_ordered_dynamic_axis: bool


@dataclass(frozen=True)
class NDArray:
    """An `NDArrayView`: its CNTK shape (fastest-first) and its values."""

    shape: tuple[int, ...]
    values: np.ndarray

    @property
    def array(self) -> np.ndarray:
        """NumPy order: CNTK's shape reversed (CNTK's Python API order)."""
        return self.values.reshape(tuple(reversed(self.shape)) or ())


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CntkFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise CntkFormatError("varint longer than 10 bytes")


def _bytes(value: Any) -> bytes:
    """A length-delimited field's bytes; a number where bytes belong is a damaged file (and
    `bytes(number)` would allocate that many zeros)."""
    if not isinstance(value, memoryview):
        raise CntkFormatError("a number where a string, message or tensor belongs")
    return bytes(value)


def fields(buf: memoryview) -> list[tuple[int, int, Any]]:
    """(field number, wire type, raw value) for each field of one message."""
    if not isinstance(buf, memoryview):
        raise CntkFormatError("a number where a message belongs")
    out: list[tuple[int, int, Any]] = []
    value: int | memoryview
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise CntkFormatError("field number 0")
        if wire == VARINT:
            value, pos = _varint(buf, pos)
            size = 0
        elif wire == FIXED64:
            size = 8
        elif wire == LENGTH:
            size, pos = _varint(buf, pos)
        elif wire == FIXED32:
            size = 4
        else:
            raise CntkFormatError(f"unsupported wire type {wire} (field {number})")
        if size > end - pos:
            raise CntkFormatError(
                f"field {number} claims {size} bytes but only {end - pos} are left"
            )
        if wire != VARINT:
            value, pos = buf[pos : pos + size], pos + size
        out.append((number, wire, value))
    return out


def _packed_varints(value: Any, wire: int) -> list[int]:
    if wire == VARINT:
        return [value]
    if not isinstance(value, memoryview):
        raise CntkFormatError("a fixed-width number where packed integers belong")
    items, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        items.append(item)
    return items


def decode_shape(buf: memoryview) -> tuple[int, ...]:
    """A CNTK NDShape message as a tuple of dimensions."""
    dims: list[int] = []
    for number, wire, value in fields(buf):
        if number == 1:
            dims += _packed_varints(value, wire)
    if len(dims) > MAX_DIMS:
        raise CntkFormatError(f"a shape with {len(dims)} dimensions")
    # CNTK writes "inferred" / "free" dimensions as huge sentinels; keep them visible as -1
    return tuple(d if d < 2**62 else -1 for d in dims)


def decode_axis(buf: memoryview) -> Axis:
    """A CNTK Axis message."""
    index, name, ordered = 0, "", False
    for number, _, value in fields(buf):
        if number == 1:
            index = value - (1 << 64) if value >= 1 << 63 else value
            index = index - (1 << 32) if index >= 1 << 31 else index
        elif number == 2:
            name = _bytes(value).decode()
        elif number == 3:
            ordered = bool(value)
    return Axis(index, name, ordered)


NDARRAY_DTYPES = {1: np.float32, 2: np.float64, 4: np.float16}


def decode_ndarray(buf: memoryview) -> NDArray:
    """A CNTK NDArrayView as a numpy array, its size checked against its shape (crafted files are
    refused)."""
    data_type, storage = 0, 0
    shape: tuple[int, ...] = ()
    values: np.ndarray | None = None
    for number, _wire, value in fields(buf):
        if number == 1:
            data_type = value
        elif number == 2:
            storage = value
        elif number == 3:
            shape = decode_shape(value)
        elif number in (4, 5):  # FloatValues / DoubleValues: field 1 packed
            dtype = "<f4" if number == 4 else "<f8"
            chunks = [_bytes(v) for n, _, v in fields(value) if n == 1]
            values = np.frombuffer(b"".join(chunks), dtype=dtype).copy()
        elif number == 6:  # BytesValue (float16 and int8 tensors)
            raw = b"".join(_bytes(v) for n, _, v in fields(value) if n == 1)
            values = np.frombuffer(raw, dtype=NDARRAY_DTYPES.get(data_type, np.int8)).copy()
    if storage != 0:
        raise CntkFormatError(f"sparse NDArrayView (storage format {storage}) is not supported")
    if values is None:
        values = np.zeros(0, dtype=NDARRAY_DTYPES.get(data_type, np.float32))
    expected = 1
    for dim in shape:  # Python ints: a crafted shape cannot overflow into a match
        expected *= dim
    if values.size != expected:
        raise CntkFormatError(f"tensor of shape {shape} holds {values.size} values")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise CntkFormatError(f"tensor of shape {shape} holds NaN or infinite values")
    return NDArray(shape, values)


def decode_value(buf: memoryview, depth: int = 0) -> Any:
    """One DictionaryValue -> a Python value (None for the None type)."""
    if depth > MAX_DEPTH:
        raise CntkFormatError(f"values nested deeper than {MAX_DEPTH}")
    for number, _wire, value in fields(buf):
        if number in (1, 2):  # version, value_type
            continue
        if number == 3:
            return bool(value)
        if number == 4:
            value = value & 0xFFFFFFFF
            return value - (1 << 32) if value >= 1 << 31 else value
        if number == 5:
            return int(value)
        if number == 6:
            return struct.unpack("<f", _bytes(value))[0]
        if number == 7:
            return struct.unpack("<d", _bytes(value))[0]
        if number == 8:
            return _bytes(value).decode()
        if number == 9:
            return decode_shape(value)
        if number == 10:
            return decode_axis(value)
        if number == 11:
            return [decode_value(v, depth + 1) for n, _, v in fields(value) if n == 1]
        if number == 12:
            return decode_dictionary(value, depth + 1)
        if number == 13:
            return decode_ndarray(value)
    return None


def decode_dictionary(buf: memoryview, depth: int = 0) -> dict[str, Any]:
    """A CNTK Dictionary message (the model file's root) as Python values, depth-bounded."""
    if depth > MAX_DEPTH:
        raise CntkFormatError(f"values nested deeper than {MAX_DEPTH}")
    out: dict[str, Any] = {}
    for number, _, entry in fields(buf):
        if number != 2:
            continue
        key, item = "", None
        for n, _, v in fields(entry):  # a map entry: key = 1, value = 2
            if n == 1:
                key = _bytes(v).decode()
            elif n == 2:
                item = decode_value(v, depth + 1)
        out[key] = item
    return out


def read_model_dictionary(path: Path) -> dict[str, Any]:
    """The whole saved function as nested Python values."""
    data = Path(path).read_bytes()
    try:
        dictionary = decode_dictionary(memoryview(data))
    except (CntkFormatError, UnicodeDecodeError, struct.error, ValueError, TypeError) as err:
        raise CntkFormatError(f"{path}: not a CNTK v2 model file ({err})") from err
    if "primitive_functions" not in dictionary and "type" not in dictionary:
        raise CntkFormatError(
            f"{path}: a protobuf message, but not a saved CNTK function (keys: "
            f"{sorted(dictionary)[:10]})"
        )
    return dictionary

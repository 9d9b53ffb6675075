"""Reading one numeric array from a MATLAB v5 ``.mat`` file, without SciPy.

Oxford 102 Flowers ships its labels as ``imagelabels.mat`` (a 1 x 8189 array
``labels``); a loader needs that one array, and SciPy is not a dependency of
metarun. The v5 format (MathWorks, "MAT-File Format", 2019) is a 128-byte
header followed by tagged data elements; an array is a ``miMATRIX`` element
(possibly inside a zlib-compressed ``miCOMPRESSED`` one) holding its flags,
dimensions, name and real part, which MATLAB may store in a smaller integer
type than its class. Only what numeric arrays need is read: complex, sparse,
cell, struct and object arrays are refused.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from metarun.errors import DataError

MI_MATRIX, MI_COMPRESSED = 14, 15
#: the storage types of numeric data (miINT8 ... miUINT64)
STORAGE = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
NUMERIC_CLASSES = set(range(6, 16))  # mxDOUBLE_CLASS ... mxUINT64_CLASS
COMPLEX_FLAG = 0x0800


def read_array(path: Path, name: str) -> np.ndarray:
    """The numeric array called ``name`` in the v5 MAT-file ``path``, with its MATLAB shape."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        raise DataError(f"{path} is not a MATLAB v5 .mat file: replace it with the official file")
    order = "<" if data[126:128] == b"IM" else ">"
    try:
        for kind, body in _elements(data, 128, order):
            if kind == MI_COMPRESSED:
                inner = zlib.decompress(body)
                kind, body = next(_elements(inner, 0, order))
            if kind == MI_MATRIX:
                array_name, array = _matrix(body, order)
                if array_name == name:
                    return array
    except (struct.error, zlib.error, ValueError, StopIteration) as e:
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e}): replace it with the official file") from None
    raise DataError(f"{path} holds no array '{name}': replace it with the official file")


def _elements(data: bytes, start: int, order: str):
    """``(type, body)`` of each data element from ``start``: tags of 8 bytes, or 4 in the small element format."""
    pos = start
    while pos + 8 <= len(data):
        kind, size = struct.unpack_from(order + "II", data, pos)
        if kind >> 16:  # small element: size in the upper half, data in the tag's second word
            yield kind & 0xFFFF, data[pos + 4 : pos + 4 + (kind >> 16)]
            pos += 8
            continue
        if pos + 8 + size > len(data):
            raise ValueError(f"an element of {size} bytes at byte {pos} runs past the end")
        yield kind, data[pos + 8 : pos + 8 + size]
        pos += 8 + (size if kind == MI_COMPRESSED else -(-size // 8) * 8)


def _matrix(body: bytes, order: str) -> tuple[str, np.ndarray | None]:
    """The name of an miMATRIX element and its numeric array (None for arrays of other classes)."""
    parts = list(_elements(body, 0, order))
    if len(parts) < 3:
        raise ValueError("an array element without flags, dimensions and name")
    (_, flags), (_, dims), (_, name) = parts[:3]
    array_class = struct.unpack_from(order + "I", flags)[0]
    dims = struct.unpack(order + f"{len(dims) // 4}i", dims)
    if (array_class & 0xFF) not in NUMERIC_CLASSES or array_class & COMPLEX_FLAG or len(parts) < 4:
        return name.decode("latin-1"), None
    kind, real = parts[3]
    if kind not in STORAGE:
        raise ValueError(f"numeric data of storage type {kind}")
    values = np.frombuffer(real, dtype=np.dtype(order + STORAGE[kind]), count=int(np.prod(dims)))
    return name.decode("latin-1"), values.reshape(dims, order="F")

"""A fast reader for the MAT files 300W-LP and AFLW2000-3D ship: MAT v5, little-endian, every
variable a zlib-compressed real numeric matrix.

``scipy.io.loadmat`` reads such a file in ~0.2 ms, mostly Python bookkeeping around eight small
arrays: about 15% of a ``--detector gt`` build's time per sample. :func:`read_numeric_mat` parses
the same bytes in a fraction of that and gives what ``loadmat`` gives for them (same keys, dtypes,
shapes and values; tested against it on our sample files and on the real ones). Anything else (a
v7.3/HDF5 file, big-endian, text, cells, structs, sparse or complex data, a checksum that fails, a
byte out of place) returns None, and the caller falls back to ``loadmat``, whose answer (or error)
stands: this path never accepts a file ``loadmat`` would refuse for the parts it reads.

Layout (MathWorks, "MAT-File Format", v5): a 128-byte header (text, subsystem offset, version
0x0100, endian mark ``IM``), then data elements, each an 8-byte tag (type, byte count) or a
"small" 4-byte tag with its data packed in the next 4 bytes. A ``miCOMPRESSED`` element holds one
zlib stream that inflates to a ``miMATRIX`` element: array flags (class), dimensions, name, real
part. Numbers are stored column-major, in the type the writer chose (MATLAB may store a double array of
small integers as ``miUINT8``): like ``loadmat`` (``mat_dtype=False``), the array keeps that type.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np

_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
#: storage types of numeric data (miINT8 ... miUINT64)
_MI_DTYPES = {k: np.dtype(v) for k, v in {1: "<i1", 2: "<u1", 3: "<i2", 4: "<u2", 5: "<i4", 6: "<u4", 7: "<f4",
                                             9: "<f8", 12: "<i8", 13: "<u8"}.items()}
#: numeric array classes (mxDOUBLE_CLASS ... mxUINT64_CLASS)
_MX_NUMERIC = frozenset(range(6, 16))
_MX_COMPLEX, _MX_GLOBAL, _MX_LOGICAL = 0x0800, 0x0400, 0x0200
_TAG = struct.Struct("<II")
_WORD = struct.Struct("<I")


class _NotSimple(Exception):
    """The file is not one this reader handles: ``loadmat`` decides."""


def _element(buf: bytes, pos: int) -> tuple[int, int, int, int]:
    """The data element at ``pos``: ``(type, data start, data end, next element's position)``
    (elements are 8-byte aligned; a "small" element packs type, size and data in 8 bytes)."""
    first, second = _TAG.unpack_from(buf, pos)
    if first >> 16:
        size = first >> 16
        if size > 4:
            raise _NotSimple
        return first & 0xFFFF, pos + 4, pos + 4 + size, pos + 8
    return first, pos + 8, pos + 8 + second, pos + 8 + ((second + 7) & ~7)


def _matrix(body: bytes) -> tuple[str, np.ndarray]:
    """A ``miMATRIX`` element's contents -> (name, array as ``loadmat`` gives it)."""
    kind, start, stop, pos = _element(body, 0)
    if kind != _MI_UINT32 or stop - start != 8:
        raise _NotSimple
    word = _WORD.unpack_from(body, start)[0]
    if word & 0xFF not in _MX_NUMERIC or word & (_MX_COMPLEX | _MX_GLOBAL | _MX_LOGICAL):
        raise _NotSimple
    kind, start, stop, pos = _element(body, pos)
    ndims = (stop - start) // 4
    if kind != _MI_INT32 or ndims < 2 or (stop - start) % 4:
        raise _NotSimple
    shape = struct.unpack_from(f"<{ndims}i", body, start)
    kind, start, stop, pos = _element(body, pos)
    if kind != _MI_INT8 or stop <= start:
        raise _NotSimple
    name = body[start:stop].decode("ascii")
    kind, start, stop, pos = _element(body, pos)
    stored = _MI_DTYPES.get(kind)
    if stored is None or min(shape) < 0 or stop - start != math.prod(shape) * stored.itemsize \
            or pos != (len(body) + 7) & ~7:
        raise _NotSimple
    values = np.frombuffer(body, stored, math.prod(shape), start).copy()  # loadmat keeps the stored type
    return name, values.reshape(shape, order="F")


def read_numeric_mat(data: bytes) -> dict[str, np.ndarray] | None:
    """The variables of a MAT v5 file of compressed real numeric matrices, as
    ``scipy.io.loadmat(...)`` gives them (without its ``__header__`` / ``__version__`` /
    ``__globals__`` entries); None for any other file (see the module's notes)."""
    if len(data) < 128 or data[124:128] != b"\x00\x01IM":
        return None
    out: dict[str, np.ndarray] = {}
    pos, end = 128, len(data)
    try:
        while pos < end:
            if pos + 8 > end:
                return None
            kind, size = _TAG.unpack_from(data, pos)
            if kind != _MI_COMPRESSED or pos + 8 + size > end:
                return None
            inflater = zlib.decompressobj()
            inner = inflater.decompress(data[pos + 8:pos + 8 + size])
            if not inflater.eof or inflater.unused_data or len(inner) < 8:  # cut or padded: loadmat decides
                return None
            kind, start, stop, _ = _element(inner, 0)
            if kind != _MI_MATRIX or start != 8 or stop != len(inner):
                return None
            name, array = _matrix(inner[8:])
            if name in out:
                return None
            out[name] = array
            pos += 8 + size
    except (_NotSimple, zlib.error, struct.error, UnicodeDecodeError, ValueError):
        return None
    return out

"""openpi's wire format: msgpack maps whose numpy values use openpi's msgpack-numpy encoding.

Encoding (byte-for-byte what ``openpi_client.msgpack_numpy`` writes, so either side can talk to the other)::

    ndarray      -> {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}
    numpy scalar -> {b"__npgeneric__": True, b"data": scalar.item(), b"dtype": scalar.dtype.str}

Object, void (structured) and complex dtypes are refused in both directions. Nothing is ever pickled.

Decoding is hardened for a server that faces untrusted clients. Before msgpack builds a single object,
:func:`scan` walks the message's headers and checks :class:`DecodeLimits` (objects in the whole message,
elements per list or map, keys of the top-level map, nesting depth, string length). Its work is bounded by
those limits, not by the frame size: bin and str payloads are skipped by their declared length, and a
header that declares more elements than the limits allow is refused as soon as it is read. So a frame of
tens of millions of empty lists (a "msgpack bomb") is refused in microseconds instead of holding the GIL
for seconds and costing gigabytes. Then every declared array shape is checked against the bytes actually
sent (``prod(shape) * itemsize == len(data)``), dims must be non-negative ints, the total array bytes are
capped and msgpack extension types are refused. Every failure raises :class:`ProtocolError` with a
message that names what was wrong.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

# dtype kinds we accept on the wire: bool, signed/unsigned int, float, and fixed-width strings.
# (O = object: would need pickle; V = void/structured; c = complex; M/m = datetimes: no robot sends them.)
ALLOWED_KINDS = frozenset("biufUS")
MAX_NDIM = 8  # an observation array with more dims than this is a client bug, not data


@dataclass(frozen=True)
class DecodeLimits:
    """What one request may contain. A request is a small map of arrays (each array is a 4-key map whose
    payload is one bin), a prompt and perhaps a state list of up to 1,024 numbers: a few dozen objects.
    The limits leave ample room for extra client fields and refuse anything shaped like a bomb."""

    max_objects: int = 10_000  # msgpack objects in the whole message (keys and values, containers too)
    max_container_len: int = 4096  # elements of one list, or keys of one map
    max_top_level_keys: int = 256  # keys of the request map itself
    max_depth: int = 32  # lists / maps inside each other
    max_str_bytes: int = 1 << 20  # one msgpack str (a prompt is at most a few kB); bin payloads: max_bytes


REQUEST_LIMITS = DecodeLimits()


class ProtocolError(ValueError):
    """A message that is not valid msgpack-numpy (or breaks a size/type limit)."""


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in ALLOWED_KINDS:
        raise ProtocolError(
            f"{where}: dtype {dtype.str!r} (kind {dtype.kind!r}) is not allowed; "
            "send bool, int, uint, float or string arrays (object/void/complex dtypes are refused)"
        )


def _encode_default(obj: Any) -> Any:
    """msgpack ``default`` hook: numpy arrays and scalars become openpi's tagged maps."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype, "encode")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype, "encode")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot msgpack-encode {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, str, numbers, numpy arrays/scalars) as one msgpack message."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def _get(obj: dict, key: str) -> Any:
    # openpi writes bytes keys (msgpack bin); a client written in another language may send str keys.
    if key.encode() in obj:
        return obj[key.encode()]
    return obj.get(key)


def _parse_dtype(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError as e:
            raise ProtocolError("array dtype is not ASCII") from e
    if not isinstance(raw, str) or not 0 < len(raw) <= 16:
        raise ProtocolError(f"array dtype must be a short numpy dtype string like '<f4', got {raw!r:.60}")
    try:
        dtype = np.dtype(raw)
    except Exception as e:  # numpy raises TypeError / ValueError / SyntaxError-like for junk
        raise ProtocolError(f"array dtype {raw!r} is not a numpy dtype") from e
    _check_dtype(dtype, "array")
    return dtype


class _Decoder:
    """Stateful msgpack ``object_hook``: tracks the total array bytes of one message."""

    def __init__(self, max_array_bytes: int) -> None:
        self.max_array_bytes = max_array_bytes
        self.array_bytes = 0

    def __call__(self, obj: dict) -> Any:
        if _get(obj, "__ndarray__") is True:
            return self._ndarray(obj)
        if _get(obj, "__npgeneric__") is True:
            return self._npgeneric(obj)
        return obj

    def _ndarray(self, obj: dict) -> np.ndarray:
        data, shape = _get(obj, "data"), _get(obj, "shape")
        dtype = _parse_dtype(_get(obj, "dtype"))
        if not isinstance(data, bytes):
            raise ProtocolError(f"array data must be bytes (msgpack bin), got {type(data).__name__}")
        if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
            raise ProtocolError(f"array shape must be a list of at most {MAX_NDIM} ints, got {shape!r:.80}")
        if not all(type(d) is int and d >= 0 for d in shape):  # type() excludes bool
            raise ProtocolError(f"array shape must hold non-negative ints, got {shape!r:.80}")
        # Python ints: no overflow, so a declared shape of (10**12, 10**12) is caught here, never allocated.
        expected = math.prod(shape) * dtype.itemsize
        if expected != len(data):
            raise ProtocolError(
                f"array shape {tuple(shape)} with dtype {dtype.str} needs {expected} bytes, data has {len(data)}"
            )
        self.array_bytes += len(data)
        if self.array_bytes > self.max_array_bytes:
            raise ProtocolError(f"arrays in one message exceed {self.max_array_bytes} bytes")
        # Zero-copy, read-only view of the received bytes; callers copy what they keep.
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def _npgeneric(self, obj: dict) -> np.generic:
        dtype = _parse_dtype(_get(obj, "dtype"))
        data = _get(obj, "data")
        if not isinstance(data, (bool, int, float, str, bytes)):
            raise ProtocolError(f"numpy scalar data must be a number or string, got {type(data).__name__}")
        try:
            return dtype.type(data)
        except Exception as e:  # e.g. int too large for int8, "abc" as float
            raise ProtocolError(f"numpy scalar {data!r:.40} does not fit dtype {dtype.str}") from e


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not part of the protocol")


# msgpack first bytes -> how to skip the value: ("fixed", n) n payload bytes follow; ("len", k) a k-byte
# big-endian length, then that many bytes; ("array"|"map", k) a k-byte element count; "ext"/"bad" refused.
_HEADS: dict[int, tuple[str, int]] = {
    0xC0: ("fixed", 0), 0xC2: ("fixed", 0), 0xC3: ("fixed", 0),  # nil, false, true
    0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
    0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4),
    0xCA: ("fixed", 4), 0xCB: ("fixed", 8),  # float32/64
    0xCC: ("fixed", 1), 0xCD: ("fixed", 2), 0xCE: ("fixed", 4), 0xCF: ("fixed", 8),  # uint
    0xD0: ("fixed", 1), 0xD1: ("fixed", 2), 0xD2: ("fixed", 4), 0xD3: ("fixed", 8),  # int
    0xD4: ("ext", 0), 0xD5: ("ext", 0), 0xD6: ("ext", 0), 0xD7: ("ext", 0), 0xD8: ("ext", 0),
    0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4),
    0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
}
_UINT = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}


def scan(data: bytes | bytearray | memoryview, limits: DecodeLimits = REQUEST_LIMITS) -> int:
    """Walk the msgpack headers of one message without building anything; return its object count.

    Raises :class:`ProtocolError` when the message breaks ``limits``, is truncated, has trailing bytes,
    or holds an extension type. The loop runs at most ``limits.max_objects`` times: every header's
    declared element count is added to the total *before* its elements are read, so a header that
    announces a bomb is refused at once, and str/bin payloads are skipped by their length.
    """
    n = len(data)
    pos = 0
    declared = 1  # objects announced so far (the message itself is one)
    remaining = [1]  # per open container: how many objects are still to come
    while remaining:
        if remaining[-1] == 0:
            remaining.pop()
            continue
        remaining[-1] -= 1
        if pos >= n:
            raise ProtocolError(f"msgpack message is truncated at byte {pos}")
        b = data[pos]
        pos += 1
        if b <= 0x7F or b >= 0xE0:  # positive / negative fixint
            continue
        if 0xA0 <= b <= 0xBF:  # fixstr
            pos += b & 0x1F
            continue
        if b <= 0x9F:  # fixmap 0x80-0x8f, fixarray 0x90-0x9f
            kind, count = ("map" if b <= 0x8F else "array"), b & 0x0F
        else:
            kind, size = _HEADS.get(b, ("bad", 0))
            if kind == "bad":
                raise ProtocolError(f"byte {pos - 1}: 0x{b:02x} is not a msgpack type")
            if kind == "ext":
                raise ProtocolError("msgpack extension types are not part of the protocol")
            if kind == "fixed":
                pos += size
                continue
            if pos + size > n:
                raise ProtocolError(f"msgpack message is truncated at byte {pos}")
            length = _UINT[size].unpack_from(data, pos)[0]
            pos += size
            if kind in ("bin", "str"):
                if kind == "str" and length > limits.max_str_bytes:
                    raise ProtocolError(f"a msgpack str of {length} bytes; the limit is {limits.max_str_bytes}")
                pos += length
                continue
            count = length
        # a list or a map of `count` entries
        if count > limits.max_container_len:
            what = f"map of {count} keys" if kind == "map" else f"list of {count} elements"
            raise ProtocolError(f"a msgpack {what}; the limit is {limits.max_container_len} elements per list or map")
        if kind == "map" and len(remaining) == 1 and remaining[0] == 0 and count > limits.max_top_level_keys:
            raise ProtocolError(f"the request map has {count} keys; the limit is {limits.max_top_level_keys}")
        items = 2 * count if kind == "map" else count
        declared += items
        if declared > limits.max_objects:
            raise ProtocolError(f"the message holds more than {limits.max_objects} msgpack objects "
                                "(lists, maps, keys and values); a request is a small map of arrays")  # fmt: skip
        if len(remaining) > limits.max_depth:
            raise ProtocolError(f"msgpack message is nested too deeply (more than {limits.max_depth} levels)")
        remaining.append(items)
    if pos > n:
        raise ProtocolError(f"msgpack message is truncated: {pos} bytes declared, {n} sent")
    if pos < n:
        raise ProtocolError(f"{n - pos} trailing bytes after the msgpack message")
    return declared


def unpackb(data: bytes, *, max_bytes: int = 32 * 2**20, limits: DecodeLimits | None = REQUEST_LIMITS) -> Any:
    """Decode one msgpack-numpy message of at most ``max_bytes`` bytes.

    ``limits`` bound the message's structure (:func:`scan` checks them before decoding); ``None`` skips
    that check, for a client reading its own server's replies. Raises :class:`ProtocolError` on anything
    malformed: garbage bytes, trailing data, ext types, too-deep nesting, too many objects, disallowed
    dtypes, shapes that disagree with the data, or oversize payloads.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary message, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"message is {len(data)} bytes, the limit is {max_bytes}")
    bounds: dict[str, int] = {}
    if limits is not None:
        scan(data, limits)
        # the same limits again inside msgpack, in case the scan and msgpack ever disagree
        bounds = {"max_array_len": limits.max_container_len, "max_map_len": limits.max_container_len,
                  "max_str_len": limits.max_str_bytes}  # fmt: skip
    try:
        return msgpack.unpackb(
            data,
            object_hook=_Decoder(max_bytes),
            ext_hook=_refuse_ext,
            raw=False,
            strict_map_key=True,  # only str/bytes keys: int/float/nil keys are junk in this protocol
            **bounds,
        )
    except ProtocolError:
        raise
    except msgpack.StackError as e:
        raise ProtocolError("msgpack message is nested too deeply") from e
    except Exception as e:  # ExtraData, FormatError, ValueError, UnicodeDecodeError, ...
        raise ProtocolError(f"not a valid msgpack message: {type(e).__name__}: {e}"[:300]) from e

"""openpi's wire format: msgpack maps whose numpy values use openpi's msgpack-numpy encoding.

Encoding (byte-for-byte what ``openpi_client.msgpack_numpy`` writes, so either side can talk to the other)::

    ndarray      -> {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}
    numpy scalar -> {b"__npgeneric__": True, b"data": scalar.item(), b"dtype": scalar.dtype.str}

Object, void (structured) and complex dtypes are refused in both directions. Nothing is ever pickled.

Decoding is hardened for a server that faces untrusted clients: every declared shape is checked against
the bytes actually sent (``prod(shape) * itemsize == len(data)``), dims must be non-negative ints, the
total array bytes are capped, nesting is bounded and msgpack extension types are refused. Every failure
raises :class:`ProtocolError` with a message that names what was wrong.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

# dtype kinds we accept on the wire: bool, signed/unsigned int, float, and fixed-width strings.
# (O = object: would need pickle; V = void/structured; c = complex; M/m = datetimes: no robot sends them.)
ALLOWED_KINDS = frozenset("biufUS")
MAX_NDIM = 8  # an observation array with more dims than this is a client bug, not data
MAX_CONTAINER_LEN = 100_000  # msgpack list/map length cap: requests are small maps of arrays


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


def unpackb(data: bytes, *, max_bytes: int = 32 * 2**20) -> Any:
    """Decode one msgpack-numpy message of at most ``max_bytes`` bytes.

    Raises :class:`ProtocolError` on anything malformed: garbage bytes, trailing data, ext types,
    too-deep nesting, disallowed dtypes, shapes that disagree with the data, or oversize payloads.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary message, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"message is {len(data)} bytes, the limit is {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            object_hook=_Decoder(max_bytes),
            ext_hook=_refuse_ext,
            raw=False,
            strict_map_key=True,  # only str/bytes keys: int/float/nil keys are junk in this protocol
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
        )
    except ProtocolError:
        raise
    except msgpack.StackError as e:
        raise ProtocolError("msgpack message is nested too deeply") from e
    except Exception as e:  # ExtraData, FormatError, ValueError, UnicodeDecodeError, ...
        raise ProtocolError(f"not a valid msgpack message: {type(e).__name__}: {e}"[:300]) from e

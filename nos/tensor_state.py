"""A pickle-free format for state dicts: nested plain data and tensors, as bytes nos stores in its database.

    blob = to_bytes({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epochs": 3})
    state = from_bytes(blob)          # TensorStateError if the bytes are not such a state

Nothing read from the database is unpickled (docs/security.md), not even by
torch's restricted unpickler, so the searcher's checkpoints and the transfer
snapshots are written in this format instead of `torch.save`'s:

    MAGIC (8 bytes) | header length (8 bytes, little-endian) | header (UTF-8 JSON) | tensor bytes

The header is `{"byteorder": "little", "root": NODE}`, where a NODE is a JSON
string, number, true, false or null (Python's str, int, float (inf and nan
too), bool, None), or an object of one key:

    {"list": [NODE, ...]}              {"tuple": [NODE, ...]}
    {"dict": [[KEY, NODE], ...]}       KEY a string or an integer, in the dict's order
    {"tensor": {"dtype": "float32", "shape": [2, 3], "offset": 0, "length": 24}}

A tensor's bytes are `length` bytes from `offset` of the part after the
header, in C order; no two tensors' bytes overlap. Reading checks all of it
(the magic, the JSON, the dtypes against an allow-list, every offset and
length against the blob, that no bytes are shared, each shape against its
length, at most MAX_NODES values and keys of at most MAX_KEY characters) and
raises TensorStateError on the first fault, so what it allocates is at most
the blob's size and its time is linear in it;
every tensor read is a CPU tensor with storage of its own, not a view of the
blob. A dict comes back as a plain dict (an OrderedDict's order is kept, not
its type, nor the `_metadata` of a module's state dict).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from typing import Any

import torch

MAGIC = b"NOSTATE1"
# Every version of this format starts so; the digit after it is the version.
_FAMILY = MAGIC[:-1]
# torch.save writes a zip archive: what nos stored before this format.
_ZIP = b"PK"
_LENGTH = struct.Struct("<Q")
# Deeper nesting than any state dict needs: a bound for the recursive reader.
MAX_DEPTH = 64
# More values than any state nos writes holds (a checkpoint's are its searcher's, a snapshot's a model's and an
# optimizer's state dicts: thousands): a bound on the time a hostile header can take.
MAX_NODES = 1_000_000
# Longer than any key nos writes (an optimizer's, a module's or a searcher's names); keys are never data.
MAX_KEY = 1_000
_NAMES = ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
          "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
          "float8_e4m3fn", "float8_e5m2")
# The dtypes a blob may hold, by name; those this torch lacks are left out.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _NAMES
                                  if isinstance(getattr(torch, name, None), torch.dtype)}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorStateError(ValueError):
    """The bytes are not a state this format can read (damaged, truncated, or another format)."""


class PickledState(TensorStateError):
    """The bytes were written by torch.save (an earlier nos): reading them would mean unpickling them."""


# -- writing ------------------------------------------------------------------------------------------------
def to_bytes(state: Any) -> bytes:
    """`state` (dicts with str or int keys, lists, tuples, str, int, float, bool, None, tensors) as bytes.

    TypeError names the first value of another type, by its path in `state`.
    """
    tensors = _Tensors()
    root = _encode(state, tensors, "state", 0)
    header = json.dumps({"byteorder": sys.byteorder, "root": root}, separators=(",", ":")).encode()
    return b"".join((MAGIC, _LENGTH.pack(len(header)), header, tensors.payload()))


class _Tensors:
    """The tensors met so far while writing, each at its offset in the bytes after the header (and a count of
    all the values met, which reading bounds by MAX_NODES)."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.size = 0
        self.values = 0

    def add(self, tensor: torch.Tensor) -> tuple[int, int]:
        """Its offset and length."""
        offset, length = self.size, tensor.numel() * tensor.dtype.itemsize
        self.tensors.append(tensor)
        self.size += length
        return offset, length

    def payload(self) -> bytearray:
        """The tensors' bytes one after another, copied straight into one buffer (no numpy needed)."""
        if not self.size:   # torch.frombuffer refuses an empty buffer
            return bytearray()
        payload = bytearray(self.size)
        flat = torch.frombuffer(payload, dtype=torch.uint8)
        start = 0
        for tensor in self.tensors:
            size = tensor.numel() * tensor.dtype.itemsize
            if size:
                # resolve_* applies a lazy conjugation or negation; reshape(-1) lets a 0-dim tensor be viewed as bytes
                plain = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
                flat[start:start + size].copy_(plain.view(torch.uint8))
            start += size
        return payload


def _encode(value: Any, tensors: _Tensors, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TypeError(f"{path} is nested more than {MAX_DEPTH} deep")
    tensors.values += 1
    if tensors.values > MAX_NODES:
        raise TypeError(f"{path}: the state holds more than {MAX_NODES} values, more than can be read back")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": _tensor_entry(value, tensors, path)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        return {"list" if isinstance(value, list) else "tuple": items}
    if isinstance(value, dict):
        for key in value:
            # bool is an int, but a key's type must come back exactly
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{path} has a key of type {type(key).__name__} ({key!r}); keys must be str or int")
            if isinstance(key, str) and len(key) > MAX_KEY:
                raise TypeError(f"{path} has a key of {len(key)} characters; keys are at most {MAX_KEY}")
        return {"dict": [[k, _encode(v, tensors, f"{path}[{k!r}]", depth + 1)] for k, v in value.items()]}
    raise TypeError(f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be stored")


def _tensor_entry(tensor: torch.Tensor, tensors: _Tensors, path: str) -> dict[str, Any]:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        raise TypeError(f"{path} is a {tensor.layout} {tensor.device.type} tensor; only dense ones can be stored")
    if tensor.dtype not in _DTYPE_NAMES:
        raise TypeError(f"{path} is a tensor of dtype {tensor.dtype}, which cannot be stored")
    offset, length = tensors.add(tensor)
    return {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "offset": offset, "length": length}


# -- reading ------------------------------------------------------------------------------------------------
def from_bytes(data: bytes) -> Any:
    """The state `to_bytes` wrote; TensorStateError (PickledState for torch.save's zip) if `data` is not one.

    Every tensor has bytes of its own in the blob (no two overlap, as `to_bytes` writes them), so what is
    allocated is at most the blob's size.
    """
    try:
        return _read(bytes(data))
    except MemoryError:
        raise TensorStateError("it is too large to read into memory") from None


def _read(data: bytes) -> Any:
    header, payload = _split(data)
    if set(header) != {"byteorder", "root"}:
        raise TensorStateError(f"its header holds {', '.join(sorted(header)) or 'nothing'}, not byteorder and root")
    if header["byteorder"] != sys.byteorder:
        raise TensorStateError(f"its tensors' byte order is {header['byteorder']!r}, this machine's is "
                               f"{sys.byteorder!r}")
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    reader = _Reader(flat)
    state = reader.decode(header["root"])
    reader.check_overlaps()
    return state


def _split(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """The parsed header and the tensor bytes after it."""
    if data.startswith(_ZIP):
        raise PickledState("it was written by torch.save (an earlier nos), and reading it would mean unpickling it")
    if not data.startswith(MAGIC):
        if data.startswith(_FAMILY):
            raise TensorStateError(f"it is version {data[len(_FAMILY):len(MAGIC)]!r} of the format, "
                                   f"written by a newer nos; this one reads version 1")
        raise TensorStateError(f"it does not start with {MAGIC!r} (it starts with {data[:8]!r})")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise TensorStateError("it is cut off before its header")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > len(data) - start:
        raise TensorStateError(f"its header of {length} bytes runs past its end ({len(data)} bytes)")
    try:
        header = json.loads(data[start:start + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TensorStateError(f"its header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise TensorStateError("its header is not a JSON object")
    return header, memoryview(data)[start + length:]


class _Reader:
    """One reading of a blob: the tensor bytes, where in the state it is, and what it has read so far.

    The path to the value being read is a stack of keys, formatted only for an error: building it for every
    value would cost its length each time (quadratic in the header's size).
    """

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat
        self.keys: list[str | int] = []
        self.nodes = 0
        self.total = 0   # the bytes of the tensors read so far
        self.spans: list[tuple[int, int, tuple[str | int, ...]]] = []   # offset, length, keys of each tensor

    def path(self, keys: tuple[str | int, ...] | list[str | int] | None = None) -> str:
        return "state" + "".join(f"[{_clip(key)}]" for key in (self.keys if keys is None else keys))

    def decode(self, node: Any) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise TensorStateError(f"it holds more than {MAX_NODES} values (at {self.path()})")
        if len(self.keys) > MAX_DEPTH:
            raise TensorStateError(f"{self.path()} is nested more than {MAX_DEPTH} deep")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if not isinstance(node, dict) or len(node) != 1:
            raise TensorStateError(f"{self.path()} is neither a value nor a one-key object")
        (kind, body), = node.items()
        if kind in ("list", "tuple"):
            if not isinstance(body, list):
                raise TensorStateError(f"{self.path()}: a {kind} must hold a JSON array")
            items = []
            keys = self.keys
            for i, value in enumerate(body):
                keys.append(i)
                items.append(self.decode(value))
                keys.pop()
            return items if kind == "list" else tuple(items)
        if kind == "dict":
            return self.decode_dict(body)
        if kind == "tensor":
            return self.decode_tensor(body)
        raise TensorStateError(f"{self.path()} is of unknown kind {kind!r}")

    def decode_dict(self, body: Any) -> dict[str | int, Any]:
        if not isinstance(body, list):
            raise TensorStateError(f"{self.path()}: a dict must hold a JSON array of [key, value] pairs")
        result: dict[str | int, Any] = {}
        keys = self.keys
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise TensorStateError(f"{self.path()}: a dict entry is not a [key, value] pair")
            key, value = pair
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TensorStateError(f"{self.path()} has a key {_clip(key)}; keys are strings or integers")
            if isinstance(key, str) and len(key) > MAX_KEY:
                raise TensorStateError(f"{self.path()} has a key of {len(key)} characters ({_clip(key)}); "
                                       f"keys are at most {MAX_KEY}")
            if key in result:
                raise TensorStateError(f"{self.path()} has the key {_clip(key)} twice")
            keys.append(key)
            result[key] = self.decode(value)
            keys.pop()
        return result

    def decode_tensor(self, entry: Any) -> torch.Tensor:
        path, flat = self.path, self.flat
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "offset", "length"}:
            raise TensorStateError(f"{path()}: a tensor is described by exactly dtype, shape, offset and length")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise TensorStateError(f"{path()} has dtype {_clip(entry['dtype'])}; this nos reads {', '.join(DTYPES)}")
        shape, offset, length = entry["shape"], entry["offset"], entry["length"]
        # A size of 2**63 or more passes the byte count when another size is 0, then overflows torch's reshape.
        if not (isinstance(shape, list) and len(shape) <= MAX_DEPTH
                and all(_natural(n) and n < 2**62 for n in shape)):
            raise TensorStateError(f"{path()} has shape {_clip(shape)}, not a list of sizes")
        if not (_natural(offset) and _natural(length)) or offset + length > flat.numel():
            raise TensorStateError(f"{path()}'s bytes {_clip(offset)}+{_clip(length)} are not within the "
                                   f"{flat.numel()} bytes after the header")
        if math.prod(shape) * dtype.itemsize != length:
            raise TensorStateError(f"{path()} has shape {shape} of {entry['dtype']}, which is not {length} bytes")
        # Checked before anything is allocated: tensors whose bytes overlap could add up to far more than the blob.
        self.total += length
        if self.total > flat.numel():
            raise TensorStateError(f"{path()}'s bytes {offset}+{length} overlap another tensor's: the tensors "
                                   f"add up to more than the {flat.numel()} bytes after the header")
        if length:
            self.spans.append((offset, length, tuple(self.keys)))
        try:
            raw = flat[offset:offset + length].clone()   # storage of its own: no view of the blob
            if dtype == torch.bool and bool((raw > 1).any()):
                raise TensorStateError(f"{path()} is a bool tensor with bytes other than 0 and 1")
            return raw.view(dtype).reshape(shape)
        except (RuntimeError, MemoryError) as exc:
            raise TensorStateError(f"{path()}'s {length} bytes cannot be read into a tensor "
                                   f"({type(exc).__name__}: {str(exc)[:200]})") from None

    def check_overlaps(self) -> None:
        """TensorStateError if two tensors share bytes (`to_bytes` gives each its own, one after another)."""
        end, last = 0, None
        for offset, length, keys in sorted(self.spans, key=lambda span: span[0]):
            if offset < end and last is not None:
                raise TensorStateError(f"{self.path(keys)}'s bytes {offset}+{length} overlap those of "
                                       f"{self.path(last[2])} ({last[0]}+{last[1]}); each tensor has bytes of its own")
            if offset + length > end:
                end, last = offset + length, (offset, length, keys)


def _clip(value: Any, limit: int = 100) -> str:
    """`value`'s repr, cut to about `limit` characters (a hostile blob's values can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


__all__ = ["DTYPES", "MAGIC", "MAX_KEY", "MAX_NODES", "PickledState", "TensorStateError", "from_bytes", "to_bytes"]

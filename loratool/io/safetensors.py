"""A bounds-checked safetensors reader that trusts nothing in the file.

The header is parsed and validated in pure Python before anything else touches the
file; tensor data is memory-mapped and read only when asked for. Torch is imported
only by :meth:`SafetensorsFile.get`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from loratool.errors import InputError, LayoutError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1000 * 1000  # safetensors' own cap
MAX_DEPTH = 127  # deepest JSON nesting the reference library (serde_json) accepts
# More tensors than any real checkpoint has: refused before parsing, so that a header's
# memory stays bounded (~0.5 KB per tensor). The reference library has no such limit.
MAX_TENSORS = 1_000_000
U64 = 1 << 64  # shapes and offsets are usize in the reference library: they must fit 64 bits

# Every dtype the reference library (safetensors 0.8) accepts -> bits per element.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

# dtype -> bytes per element, for the dtypes whose elements are whole bytes.
DTYPE_SIZES: dict[str, int] = {k: bits // 8 for k, bits in DTYPE_BITS.items() if bits % 8 == 0}

# dtype -> torch dtype name (looked up lazily on torch; sub-byte dtypes have none).
TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
    "I64": "int64", "U64": "uint64", "F64": "float64",
}


class TensorInfo(NamedTuple):
    """Where one tensor lives in the file: dtype, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsHeader:
    """A validated header: tensor table, metadata and where the data area begins."""

    path: str
    header_len: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        """Bytes of tensor data the header describes (the data area is exactly this long)."""
        return max((t.end for t in self.tensors.values()), default=self.data_start) - self.data_start

    @property
    def complete(self) -> bool:
        """True when every tensor's bytes are present in the file."""
        return self.data_start + self.data_size <= self.file_size


def _fail(path: str | os.PathLike[str], message: str) -> InputError:
    return InputError(path, message)


def parse_header_bytes(
    path: str | os.PathLike[str], prefix: bytes, file_size: int
) -> SafetensorsHeader:
    """Validate a safetensors header from the file's first bytes (``prefix``).

    Accepts exactly what the reference ``safetensors`` library accepts (its JSON rules
    included: no duplicate ``__metadata__`` or tensor fields, no lone surrogates, no
    NaN, nesting ≤ 127, shapes and offsets that fit 64 bits, tensors that tile the data
    area from 0 with no gap, overlap or trailing bytes), with two exceptions: data cut
    short is not an error here (:attr:`SafetensorsHeader.complete` tells), so that a
    truncated download can still be described, and more than :data:`MAX_TENSORS`
    tensors are refused. Time and memory are linear in the header's size: nothing is
    multiplied past 64 bits, and each tensor entry becomes a compact record as soon as
    the JSON parser has read it.
    """
    if file_size == 0:
        raise _fail(path, "file is empty")
    if file_size < 8 or len(prefix) < 8:
        raise _fail(path, f"not a safetensors file: only {file_size} bytes")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"not a safetensors file: header length {n} exceeds the 100 MB limit")
    if 8 + n > file_size:
        raise _fail(
            path, f"not a safetensors file: header length {n} runs past the end of the file ({file_size} bytes)"
        )
    if len(prefix) < 8 + n:
        raise _fail(path, "header could not be read in full")
    if prefix.count(b'"data_offsets"', 8, 8 + n) > MAX_TENSORS:  # an upper bound of the tensor count
        raise _fail(path, f"header describes more than {MAX_TENSORS} tensors (loratool's limit)")
    root = _HeaderJSON(prefix, 8, 8 + n).parse(path)
    data_start = 8 + n
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    for name in list(root):
        entry = root.pop(name)  # each record is released as soon as its TensorInfo exists
        if name == "__metadata__":
            metadata = _check_metadata(path, entry)
        elif type(entry) is _Entry:
            tensors[name] = TensorInfo(name, entry.dtype, entry.shape, data_start + entry.begin, data_start + entry.end)
        else:
            why = entry.why if type(entry) is _BadEntry else "entry is not an object"
            raise _fail(path, f"tensor {_brief(name)}: {why}")
    header = SafetensorsHeader(str(path), n, file_size, tensors, metadata)
    _check_layout(path, header)
    return header


def _check_metadata(path: str | os.PathLike[str], meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if type(meta) is _BadEntry:  # a map that happens to have "dtype"/"shape"/… keys
        pairs = meta.pairs
    elif type(meta) is _Object:
        pairs = meta.repeated or meta.items()
    else:
        raise _fail(path, "__metadata__ must map strings to strings")
    if not all(type(v) is str for _, v in pairs):
        raise _fail(path, "__metadata__ must map strings to strings")
    return dict(pairs)


def _check_layout(path: str | os.PathLike[str], header: SafetensorsHeader) -> None:
    """Tensors, in offset order, must tile the data area from 0 with no gap or overlap,
    and nothing may follow the last one."""
    pos, prev = header.data_start, None
    for t in sorted(header.tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != pos:
            where = f"tensors {_brief(prev)} and {_brief(t.name)} overlap" if t.start < pos else (
                f"a gap of {t.start - pos} bytes lies before tensor {_brief(t.name)}")
            raise LayoutError(path, f"{where} in the data area (safetensors refuses this layout)")
        pos, prev = t.end, t.name
    if pos < header.file_size:
        raise LayoutError(path, f"{header.file_size - pos} bytes follow the last tensor's data (safetensors refuses such files)")


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object that is not a tensor entry: its depth, and all its pairs when a key
    repeats (the last value wins, as in serde_json, but every value must still be valid)."""

    __slots__ = ("depth", "repeated")


class _Entry(NamedTuple):
    """A well-formed tensor entry, offsets relative to the data area."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    depth: int


class _BadEntry(NamedTuple):
    """An object with tensor-entry fields that is not a valid entry (an error only where
    a tensor entry is expected; the pairs serve a metadata map that looks like one)."""

    why: str
    pairs: list[tuple[str, Any]]
    depth: int


ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
# Cheap scans that tell when the exact (slower) decoding rules must be applied.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_MINUS_ZERO = re.compile(rb"[\[,:][ \t\n\r]*-0(?![0-9.eE])")


class _HeaderJSON:
    """Decode header JSON as the reference library's serde_json does, with Python's C
    parser: an ``object_pairs_hook`` validates each object as it is built (tensor entries
    become compact :class:`_Entry` records, so their dicts and lists never pile up)."""

    def __init__(self, buf: bytes, start: int, end: int) -> None:
        """The header is ``buf[start:end]`` (read in place: never copied as bytes)."""
        self.buf, self.start, self.end = buf, start, end
        self.check_strings = _SURROGATE_ESCAPE.search(buf, start, end) is not None
        self.minus_zero = buf.find(b"-0", start, end) >= 0 and _MINUS_ZERO.search(buf, start, end) is not None

    def parse(self, path: str | os.PathLike[str]) -> _Object:
        try:
            kwargs: dict[str, Any] = {"object_pairs_hook": self._object, "parse_constant": _no_constant,
                                      "parse_float": _float}
            if self.minus_zero:
                kwargs["parse_int"] = _minus_zero_as_float
            root = json.loads(str(memoryview(self.buf)[self.start : self.end], "utf-8"), **kwargs)
        except (ValueError, RecursionError, OverflowError) as exc:  # UnicodeDecodeError, JSONDecodeError
            raise _fail(path, f"not a safetensors file: header is not valid JSON ({_json_error(exc)})") from None
        if type(root) is _BadEntry and not any(type(v) is str for k, v in root.pairs if k == "dtype"):
            root = _generic(root.pairs)  # tensors named "dtype", "shape"… (a root, not an entry)
        if type(root) is not _Object:
            raise _fail(path, "not a safetensors file: header is not a JSON object")
        if root.depth > MAX_DEPTH:
            raise _fail(path, f"not a safetensors file: header JSON is nested more than {MAX_DEPTH} levels deep")
        if root.repeated:
            names = [k for k, _ in root.repeated]
            if names.count("__metadata__") > 1:
                raise _fail(path, "not a safetensors file: header has __metadata__ twice")
            bad = next(((k, v) for k, v in root.repeated if k != "__metadata__" and type(v) is not _Entry), None)
            if bad:  # a repeated name whose overridden entry is invalid
                raise _fail(path, f"tensor {_brief(bad[0])}: {getattr(bad[1], 'why', 'entry is not an object')}")
        return root

    def _object(self, pairs: list[tuple[str, Any]]) -> _Object | _Entry | _BadEntry:
        if self.check_strings:
            self._strings(pairs)
        if len(pairs) == 3 and (pairs[0][0], pairs[1][0], pairs[2][0]) == ENTRY_FIELDS:  # the usual layout
            entry = _entry(pairs[0][1], pairs[1][1], pairs[2][1])
            return entry if type(entry) is _Entry else _BadEntry(entry, pairs, _object_depth(pairs))
        keys = [k for k, _ in pairs]
        if any(k in ENTRY_FIELDS for k in keys):
            return self._entry_with_extras(pairs, keys)
        return _generic(pairs)

    @staticmethod
    def _entry_with_extras(pairs: list[tuple[str, Any]], keys: list[str]) -> _Entry | _BadEntry:
        depth = _object_depth(pairs)
        for name in ENTRY_FIELDS:
            count = keys.count(name)
            if count != 1:
                return _BadEntry(f"{'missing' if count == 0 else 'duplicate'} field {name!r}", pairs, depth)
        fields = dict(pairs)
        entry = _entry(fields["dtype"], fields["shape"], fields["data_offsets"])
        return entry._replace(depth=depth) if type(entry) is _Entry else _BadEntry(entry, pairs, depth)

    @staticmethod
    def _strings(pairs: list[tuple[str, Any]]) -> None:
        """Refuse a lone surrogate (serde_json does) in any key or string value here."""
        stack: list[Any] = [pairs]
        while stack:
            item = stack.pop()
            if type(item) is str:
                if not item.isascii():
                    item.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
            elif type(item) in (list, tuple):
                stack.extend(item)


def _generic(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    obj.depth = _object_depth(pairs)
    obj.repeated = pairs if len(obj) < len(pairs) else None
    return obj


def _object_depth(pairs: list[tuple[str, Any]]) -> int:
    return 1 + max((_depth(v) for _, v in pairs), default=0)


def _entry(dtype: Any, shape: Any, offsets: Any) -> _Entry | str:
    """One tensor entry's fields checked as the reference library does: the entry, or why not."""
    bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
    if bits is None:
        return f"unknown dtype {_brief(dtype)}"
    if type(shape) is not list:
        return "shape must be a list of non-negative integers"
    numel = 1
    for d in shape:
        if type(d) is not int or not 0 <= d < U64:
            return "shape must be a list of non-negative integers below 2**64"
        numel *= d
        if numel >= U64:  # checked multiplication, as the reference library: never a huge int
            return f"the element count of shape {_brief(shape)} overflows 64 bits"
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int and 0 <= o < U64 for o in offsets):
        return "data_offsets must be two non-negative integers below 2**64"
    begin, end = offsets
    if end < begin:
        return f"data_offsets {_brief(offsets)} end before they begin"
    nbits = numel * bits
    if nbits >= U64:
        return f"the byte size of {dtype}{_brief(shape)} overflows 64 bits"
    if nbits % 8:
        return f"{dtype}{_brief(shape)} does not fill whole bytes"
    if end - begin != nbits // 8:
        return f"data_offsets span {end - begin} bytes, but {dtype}{_brief(shape)} needs {nbits // 8}"
    return _Entry(dtype, tuple(shape), begin, end, 2)


def _brief(value: Any, limit: int = 60) -> str:
    """A repr short enough for a one-line message (a header may hold huge values)."""
    if type(value) is list and len(value) > 8:
        value = [*value[:8], ...]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (objects were measured when they were built); also
    refuses an integer out of serde_json's range on the way (see :func:`_check_number`)."""
    kind = type(value)
    if kind is list:
        best, stack = 0, [(value, 1)]
        while stack:
            items, level = stack.pop()
            best = max(best, level)
            for v in items:
                kind = type(v)
                if kind is list:
                    stack.append((v, level + 1))
                elif kind is int:
                    _check_number(v)
                elif kind in (_Object, _Entry, _BadEntry):
                    best = max(best, level + v.depth)
        return best
    if kind is int:
        _check_number(value)
    return value.depth if kind in (_Object, _Entry, _BadEntry) else 0


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _minus_zero_as_float(text: str) -> int | float:
    """serde_json reads the integer ``-0`` as a float (which no shape or offset accepts)."""
    return -0.0 if text == "-0" else int(text)


def _check_number(value: int) -> None:
    """serde_json reads an integer beyond 64 bits as a double: out of range past the
    largest one. Such integers only matter in ignored fields (none is a valid shape,
    offset or metadata value), which is where this is called."""
    if not -(1 << 63) <= value < U64:
        float(value)  # OverflowError


def _json_error(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeError):
        return "not UTF-8" if isinstance(exc, UnicodeDecodeError) else "a lone surrogate escape"
    return type(exc).__name__ if not isinstance(exc, json.JSONDecodeError) else f"{exc.msg} at byte {exc.pos}"


def open_input(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading (see :func:`open_regular`)."""
    return os.fdopen(open_regular(path), "rb")


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of a regular file; a missing, unreadable or special path
    (folder, FIFO, device) is an InputError. Opened non-blocking, so that a FIFO is
    refused rather than waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _read_error(path, exc) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _fail(path, "is a directory" if stat.S_ISDIR(mode) else "is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_error(path: str | os.PathLike[str], exc: OSError) -> InputError:
    reasons = {FileNotFoundError: "no such file", IsADirectoryError: "is a directory", PermissionError: "permission denied"}
    if exc.errno == errno.ELOOP:
        return _fail(path, "symlink loop (too many levels of symbolic links)")
    return _fail(path, reasons.get(type(exc)) or f"cannot read: {exc.strerror or exc}")


def truncation_message(header: SafetensorsHeader) -> str:
    end = max(t.end for t in header.tensors.values())
    return f"truncated: tensor data needs {end} bytes but the file has {header.file_size}"


def read_header(path: str | os.PathLike[str], *, allow_truncated: bool = False) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file, touching only its first bytes.

    A file cut short after its header is an error unless ``allow_truncated`` (for
    describing a broken download from its header: :attr:`SafetensorsHeader.complete`
    is then False, and reading a tensor whose bytes are missing still fails)."""
    with open_input(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER_BYTES and 8 + n <= size:
                    head += fh.read(n)
        except OSError as exc:
            raise _read_error(path, exc) from None
    header = parse_header_bytes(path, head, size)
    if not header.complete and not allow_truncated:
        raise _fail(path, truncation_message(header))
    return header


def decode_scalar(raw: bytes, dtype: str) -> float:
    """Decode the first element of a tensor's raw bytes as a Python float, without torch."""
    if dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + raw[:2])[0]
    if dtype == "F8_E5M2":  # the high byte of an IEEE half
        return struct.unpack("<e", b"\x00" + raw[:1])[0]
    if dtype == "F8_E4M3":  # e4m3fn: bias 7, no infinities, S.1111.111 is NaN
        sign, exp, man = -1.0 if raw[0] & 0x80 else 1.0, (raw[0] >> 3) & 0xF, raw[0] & 0x7
        if exp == 0xF and man == 0x7:
            return float("nan")
        return sign * (man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    fmt = {"F16": "<e", "F32": "<f", "F64": "<d", "I8": "<b", "U8": "<B", "I16": "<h",
           "U16": "<H", "I32": "<i", "U32": "<I", "I64": "<q", "U64": "<Q", "BOOL": "<?"}.get(dtype)
    if fmt is None:
        raise ValueError(f"cannot decode a {dtype} scalar")
    return float(struct.unpack(fmt, raw[: struct.calcsize(fmt)])[0])


class SafetensorsFile:
    """A validated safetensors file whose tensors are read only when asked for.

    Tensor bytes are read with ``pread`` into a fresh buffer per tensor, so a process that
    streams a checkpoint holds one tensor at a time (a memory map would make every page
    it touched count toward its resident size).
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_truncated: bool = False) -> None:
        self._fd: int | None = None
        self.path = str(path)
        self.header = read_header(path, allow_truncated=allow_truncated)

    def missing(self) -> frozenset[str]:
        """Tensors whose bytes run past the end of the file (a truncated file)."""
        size = self.header.file_size
        return frozenset(n for n, t in self.header.tensors.items() if t.end > size)

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def _handle(self) -> int:
        if self._fd is None:
            self._fd = open_regular(self.path)
        return self._fd

    def _pread(self, n: int, offset: int, name: str) -> bytes:
        try:
            data = os.pread(self._handle(), n, offset)
        except OSError as exc:
            raise _read_error(self.path, exc) from None
        if len(data) < n:  # regular files return short reads only at EOF
            raise InputError(self.path, f"truncated while reading tensor {name!r}")
        return data

    def read_bytes(self, name: str) -> bytes:
        """The tensor's raw little-endian bytes, exactly as stored."""
        info = self.header.tensors[name]
        return self._pread(info.nbytes, info.start, name)

    def scalar(self, name: str) -> float:
        """First element of a small tensor as float (alpha values), without torch."""
        info = self.header.tensors[name]
        if info.numel == 0:
            raise InputError(self.path, f"tensor {name!r} is empty")
        try:
            return decode_scalar(self._pread(DTYPE_SIZES.get(info.dtype, 1), info.start, name), info.dtype)
        except ValueError as exc:
            raise InputError(self.path, f"tensor {name!r}: {exc}") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a torch tensor that owns its memory (read straight into it)."""
        import torch

        info = self.header.tensors[name]
        dtype = getattr(torch, TORCH_DTYPES.get(info.dtype, ""), None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(self.path, f"tensor {name!r}: this torch cannot hold {info.dtype} data")
        if any(d >= 1 << 63 for d in info.shape):  # valid in the file (0 elements), not in torch
            raise InputError(self.path, f"tensor {name!r}: torch cannot hold a dimension of 2**63 or more")
        tensor = torch.empty(info.shape, dtype=dtype)
        if info.numel:
            view = tensor_memory(tensor)
            done = 0
            while done < info.nbytes:
                try:
                    n = os.preadv(self._handle(), [view[done:]], info.start + done)
                except OSError as exc:
                    raise _read_error(self.path, exc) from None
                if n == 0:
                    raise InputError(self.path, f"truncated while reading tensor {name!r}")
                done += n
        return tensor

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a safety net for callers that never close
        self.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_memory(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, without copying.

    Built with :mod:`ctypes` rather than ``tensor.numpy()``: numpy is not a dependency
    (the CPU torch wheel does not bring it). The view keeps the tensor alive."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("tensor_memory needs a contiguous CPU tensor")
    n = tensor.numel() * tensor.element_size()
    if n == 0:
        return memoryview(bytearray())
    buffer = (ctypes.c_ubyte * n).from_address(tensor.data_ptr())
    buffer._owner = tensor  # type: ignore[attr-defined]  # the memory lives as long as the view
    return memoryview(buffer).cast("B")


def is_safetensors_prefix(prefix: bytes, total_size: int | None = None) -> bool:
    """Cheap check that bytes look like the start of a safetensors file (for downloads)."""
    if len(prefix) < 9:
        return False
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER_BYTES or (total_size is not None and 8 + n > total_size):
        return False
    return prefix[8:9] == b"{"

"""A bounds-checked safetensors reader that trusts nothing in the file.

The header is parsed and validated in pure Python before anything else touches the
file; tensor data is memory-mapped and read only when asked for. Torch is imported
only by :meth:`SafetensorsFile.get`.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from loratool.errors import InputError

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100 * 1000 * 1000  # safetensors' own cap

# safetensors dtype -> bytes per element (F8 variants included).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

# dtype -> torch dtype name (looked up lazily on torch).
TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64",
}


@dataclass(frozen=True)
class TensorInfo:
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
    def complete(self) -> bool:
        """True when every tensor's bytes are present in the file."""
        end = max((t.end for t in self.tensors.values()), default=self.data_start)
        return end <= self.file_size


def _fail(path: str | os.PathLike[str], message: str) -> InputError:
    return InputError(path, message)


def parse_header_bytes(
    path: str | os.PathLike[str], prefix: bytes, file_size: int
) -> SafetensorsHeader:
    """Validate a safetensors header from the file's first bytes (``prefix``).

    ``prefix`` must hold at least the 8-byte length and the JSON header. Truncated data
    is not an error here; :attr:`SafetensorsHeader.complete` tells.
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
    raw = prefix[8 : 8 + n]
    if len(raw) < n:
        raise _fail(path, "header could not be read in full")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not a safetensors file: header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file: header is not a JSON object")
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_start)
    _check_layout(path, tensors)
    return SafetensorsHeader(str(path), n, file_size, tensors, metadata)


def _check_metadata(path: str | os.PathLike[str], meta: Any) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    return dict(meta)


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def _check_entry(path: str | os.PathLike[str], name: str, entry: Any, data_start: int) -> TensorInfo:
    if type(entry) is not dict:
        raise _fail(path, f"tensor {name!r}: entry is not an object")
    dtype = entry.get("dtype")
    size = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
    if size is None:
        raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if type(shape) is not list or not all(map(_is_count, shape)):
        raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if type(offsets) is not list or len(offsets) != 2 or not all(map(_is_count, offsets)) or offsets[0] > offsets[1]:
        raise _fail(path, f"tensor {name!r}: data_offsets must be two ordered non-negative integers")
    numel = 1
    for d in shape:
        numel *= d
    begin, end = offsets
    if end - begin != numel * size:
        raise _fail(path, f"tensor {name!r}: data_offsets span {end - begin} bytes, but {dtype}{shape} needs {numel * size}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path: str | os.PathLike[str], tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end0, name0), (start1, _, name1) in zip(spans, spans[1:]):
        if start1 < end0:
            raise _fail(path, f"tensors {name0!r} and {name1!r} overlap in the data area")


def open_input(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file for reading; a missing, unreadable or folder path is an InputError."""
    try:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise _read_error(path, exc) from None


def _read_error(path: str | os.PathLike[str], exc: OSError) -> InputError:
    reasons = {FileNotFoundError: "no such file", IsADirectoryError: "is a directory", PermissionError: "permission denied"}
    return _fail(path, reasons.get(type(exc)) or f"cannot read: {exc.strerror or exc}")


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file, touching only its first bytes."""
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
    if not header.complete:
        end = max(t.end for t in header.tensors.values())
        raise _fail(path, f"truncated: tensor data needs {end} bytes but the file has {size}")
    return header


def decode_scalar(raw: bytes, dtype: str) -> float:
    """Decode the first element of a tensor's raw bytes as a Python float, without torch."""
    if dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + raw[:2])[0]
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

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.header = read_header(path)
        self._fd: int | None = None

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
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read_bytes(self, name: str) -> bytes:
        """The tensor's raw little-endian bytes, exactly as stored."""
        info = self.header.tensors[name]
        data = os.pread(self._handle(), info.nbytes, info.start)
        if len(data) < info.nbytes:  # regular files return short reads only at EOF
            raise InputError(self.path, f"truncated while reading tensor {name!r}")
        return data

    def scalar(self, name: str) -> float:
        """First element of a small tensor as float (alpha values), without torch."""
        info = self.header.tensors[name]
        if info.numel == 0:
            raise InputError(self.path, f"tensor {name!r} is empty")
        raw = os.pread(self._handle(), DTYPE_SIZES[info.dtype], info.start)
        return decode_scalar(raw, info.dtype)

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a torch tensor that owns its memory (read straight into it)."""
        import torch

        info = self.header.tensors[name]
        tensor = torch.empty(info.shape, dtype=getattr(torch, TORCH_DTYPES[info.dtype]))
        if info.numel:
            view = tensor_memory(tensor)
            done = 0
            while done < info.nbytes:
                n = os.preadv(self._handle(), [view[done:]], info.start + done)
                if n == 0:
                    raise InputError(self.path, f"truncated while reading tensor {name!r}")
                done += n
        return tensor

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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

"""Open a LoRA file or folder as a :class:`TensorSource`: tensor table, metadata, config.

Safetensors files are validated by :mod:`loratool.io.safetensors` and read lazily.
Pickle-based files (``.pt/.bin/.ckpt``) are only ever read through
``torch.load(weights_only=True)``; anything that needs more is refused.
PEFT adapter folders (``adapter_model.safetensors|.bin`` + ``adapter_config.json``),
diffusers folders (``pytorch_lora_weights.safetensors``) and loratool's per-component
PEFT output (``unet/``, ``text_encoder/``… subfolders) are recognised.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import InputError, NotAnAdapterError, UnsafeInputError
from loratool.io.safetensors import SafetensorsFile, truncation_message

if TYPE_CHECKING:
    import torch

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# Subfolders of a multi-component PEFT export, each a PEFT adapter folder.
COMPONENT_DIRS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # zip-based torch.save, raw pickle protocol ≥ 2


@dataclass(frozen=True)
class TensorEntry:
    """A tensor as listed by its source: dtype (safetensors spelling) and shape."""

    dtype: str
    shape: tuple[int, ...]
    offset: int | None = None  # absolute byte offset in the file (safetensors only)


@dataclass
class Part:
    """One weights file inside a source, with its component when the folder names one."""

    path: str
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    config: dict[str, Any] | None
    component: str | None
    get: Callable[[str], torch.Tensor] = field(repr=False)
    scalar: Callable[[str], float] = field(repr=False)
    close: Callable[[], None] = field(repr=False, default=lambda: None)
    raw: Callable[[str], bytes] | None = field(repr=False, default=None)  # bytes as stored
    truncated: str | None = None  # opened with allow_truncated and cut short: what is missing
    missing: frozenset[str] = frozenset()  # tensors whose bytes lie beyond the end of the file


@dataclass
class TensorSource:
    """Everything read from a path: one or more parts (several for per-component folders)."""

    path: str
    kind: str  # "safetensors", "pickle", "peft-dir", "peft-components", "diffusers-dir"
    parts: list[Part]

    def close(self) -> None:
        for part in self.parts:
            part.close()

    @property
    def truncated(self) -> Part | None:
        """The first part cut short (only when opened with ``allow_truncated``)."""
        return next((p for p in self.parts if p.truncated), None)


def open_source(path: str | os.PathLike[str], *, allow_truncated: bool = False) -> TensorSource:
    """Open ``path`` (file or folder) for reading; raises :class:`InputError` with a reason.

    ``allow_truncated`` opens a safetensors file whose data was cut short after an intact
    header, for describing it from the header (inspect); its ``Part.truncated`` says so,
    and reading a tensor whose bytes are missing still raises."""
    p = Path(path)
    if check_entry(p):
        return _open_dir(p, allow_truncated)
    part = _open_file(p, config=None, component=None, allow_truncated=allow_truncated)
    return TensorSource(str(p), "pickle" if part.raw is None else "safetensors", [part])


def open_weights_file(path: str | os.PathLike[str]) -> Part:
    """One weights file (safetensors: header only; pickle: ``weights_only`` load) as a Part."""
    return _open_file(Path(path), config=None, component=None)


SPECIAL_FILES = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket",
                 stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def check_entry(p: Path) -> bool:
    """True for a folder, False for a regular file; anything else (missing, a broken
    link, a symlink loop, a FIFO or device that would block or never end) is an
    :class:`InputError`. Only ``stat`` is used: nothing is opened."""
    try:
        st = os.stat(p)
    except OSError as exc:
        raise InputError(p, stat_failure(p, exc)) from None
    if stat.S_ISDIR(st.st_mode):
        return True
    if not stat.S_ISREG(st.st_mode):
        raise InputError(p, not_regular(st))
    return False


def not_regular(st: os.stat_result) -> str:
    """Why a file that is neither a folder nor a regular file cannot be read."""
    return f"is {SPECIAL_FILES.get(stat.S_IFMT(st.st_mode), 'a special file')}, not a regular file"


def stat_failure(p: Path | str, exc: OSError) -> str:
    """Why ``os.stat(p)`` failed, in words (symlink loop, broken symlink, missing…)."""
    if exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT and os.path.islink(p):
        return f"broken symlink (to {os.readlink(p)})"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "no such file or directory"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return f"cannot read: {exc.strerror or exc}"


def is_adapter_dir(p: Path) -> bool:
    """Whether a folder is one adapter (PEFT, diffusers or per-component PEFT layout)."""
    names = (*PEFT_WEIGHTS, *DIFFUSERS_WEIGHTS)
    return any((p / n).is_file() for n in names) or any(
        _first_existing(p / c, PEFT_WEIGHTS) for c in COMPONENT_DIRS if (p / c).is_dir()
    )


def _open_dir(p: Path, allow_truncated: bool = False) -> TensorSource:
    config_path = p / PEFT_CONFIG
    weights = _first_existing(p, PEFT_WEIGHTS)
    if weights is not None:
        config = _read_config(config_path) if config_path.exists() else None
        if config is None:
            raise InputError(p, f"{weights.name} has no {PEFT_CONFIG} beside it")
        return TensorSource(str(p), "peft-dir", [_open_file(weights, config, None, allow_truncated=allow_truncated)])
    diffusers = _first_existing(p, DIFFUSERS_WEIGHTS)
    if diffusers is not None:
        return TensorSource(str(p), "diffusers-dir", [_open_file(diffusers, None, None, allow_truncated=allow_truncated)])
    parts = []
    for name in COMPONENT_DIRS:
        sub = p / name
        sub_weights = _first_existing(sub, PEFT_WEIGHTS) if sub.is_dir() else None
        if sub_weights is None:
            continue
        if not (sub / PEFT_CONFIG).exists():
            raise InputError(sub, f"{sub_weights.name} has no {PEFT_CONFIG} beside it")
        parts.append(_open_file(sub_weights, _read_config(sub / PEFT_CONFIG), name, allow_truncated=allow_truncated))
    if parts:
        return TensorSource(str(p), "peft-components", parts)
    raise NotAnAdapterError(
        p,
        "directory holds no adapter (expected adapter_model.safetensors + adapter_config.json, "
        "pytorch_lora_weights.safetensors, or unet/ and text_encoder/ PEFT subfolders)",
    )


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _read_config(path: Path) -> dict[str, Any]:
    if check_entry(path):
        raise InputError(path, "is a directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON
        raise InputError(path, f"cannot read adapter config: {exc.__class__.__name__}") from None
    if not isinstance(config, dict):
        raise InputError(path, "adapter config is not a JSON object")
    return config


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _is_pickle_path(p: Path) -> bool:
    """Pickle-based by extension; for unusual names, a zip-based ``torch.save`` by magic.

    A raw pickle's ``0x80`` first byte is also a valid low byte of a safetensors header
    length, so files with other extensions are read as safetensors first
    (:func:`_open_file` falls back to pickle when that fails).
    """
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return True
    if p.suffix.lower() == ".safetensors":
        return False
    return _is_zip(p)


def _open_file(p: Path, config: dict[str, Any] | None, component: str | None, *, allow_truncated: bool = False) -> Part:
    if _is_pickle_path(p):
        return _open_pickle(p, config, component)
    try:
        st = SafetensorsFile(p, allow_truncated=allow_truncated)
    except InputError:
        if p.suffix.lower() != ".safetensors" and _starts_with(p, PICKLE_MAGIC):
            return _open_pickle(p, config, component)
        raise
    tensors = {k: TensorEntry(v.dtype, v.shape, v.start) for k, v in st.tensors.items()}
    part = Part(str(p), tensors, st.metadata, config, component, st.get, st.scalar, st.close, st.read_bytes)
    if not st.header.complete:
        part.truncated, part.missing = truncation_message(st.header), st.missing()
    return part


def _open_pickle(p: Path, config: dict[str, Any] | None, component: str | None) -> Part:
    """Load a pickle-based file with ``weights_only=True``; refuse anything else."""
    import pickle

    import torch

    from loratool.io.safetensors import TORCH_DTYPES

    if p.stat().st_size == 0:
        raise InputError(p, "file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=_is_zip(p))
    except pickle.UnpicklingError as exc:
        raise UnsafeInputError(
            p, f"refused to unpickle: the file needs more than plain tensors ({_refusal(exc)})"
        ) from None
    except Exception as exc:  # weights_only unpickling of a damaged file can fail in any way
        raise InputError(p, f"not a readable torch file ({_first_line(exc)}); truncated or damaged?") from None
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        # an A1111 textual-inversion .pt: keep its vectors, so that decoding can name it
        obj = {f"string_to_param.{k}": v for k, v in obj["string_to_param"].items()}
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(p, "torch file does not hold a flat dict of tensors")
    names = {v: k for k, v in TORCH_DTYPES.items()}
    tensors = {}
    for k, v in state.items():
        tensors[k] = TensorEntry(_pickled_dtype(p, k, v, names, torch.strided), tuple(v.shape))
    return Part(
        str(p), tensors, {}, config, component,
        get=state.__getitem__,
        scalar=lambda k: float(state[k].flatten()[0].float().item()),
    )


def _pickled_dtype(p: Path, key: str, t: torch.Tensor, names: dict[str, str], dense: Any) -> str:
    """The safetensors dtype of a pickled tensor; refuse what a safetensors file cannot hold."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(p, f"tensor key {key!r} is not valid Unicode") from None
    dtype = names.get(str(t.dtype).removeprefix("torch."))
    if dtype is None or t.layout != dense or t.is_quantized or t.device.type != "cpu":
        raise InputError(p, f"tensor {key!r} is a {t.dtype} {t.layout} tensor; only dense tensors of safetensors dtypes are supported")
    return dtype


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0][:160] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _refusal(exc: Exception) -> str:
    """The line of torch's refusal that names what the pickle wanted to load."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Unsupported" in ln or "global" in ln.lower()]
    return (named or lines or ["unsupported content"])[0][:200]


def _starts_with(p: Path, magics: tuple[bytes, ...]) -> bool:
    try:
        with open(p, "rb") as fh:
            return fh.read(4).startswith(magics)
    except OSError:
        return False


def _is_zip(p: Path) -> bool:
    return _starts_with(p, (b"PK\x03\x04",))

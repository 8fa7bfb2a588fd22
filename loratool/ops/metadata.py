"""``metadata``: read and edit a safetensors file's ``__metadata__`` without touching its tensors.

Only the header is rewritten. The tensor table keeps its order and its offsets relative to
the data area, and the data area is copied as one byte range (``copy_file_range``), so the
tensor data — and with it AutoV3 / ``sshs_model_hash`` — is identical before and after.
Output goes through a temp file beside the target, fsynced and renamed (``--in-place``
included: a crash leaves the original as it was).

``fix_hashes`` writes:

* ``sshs_model_hash`` — SHA-256 of the data area, 64 lowercase hex, as kohya writes it;
* ``modelspec.hash_sha256`` — ``"0x"`` + the same digest, the SAI model-spec reference
  implementation's definition (OneTrainer hashes the tensors in sorted-key order, which is
  the same bytes for files written by the safetensors library with one dtype);
* ``sshs_legacy_hash`` — SHA-256 of the final file's bytes at [1 MiB, 1 MiB + 64 KiB),
  first 8 hex digits: what A1111 computes as the old model hash of this very file (kohya
  computes it on an in-memory copy with a different header, so its value rarely matches
  the file). When the new header itself reaches 1 MiB the value would depend on itself:
  the key is dropped and a note says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.errors import InputError, UsageError
from loratool.io.hashing import AUTOV1_LENGTH, AUTOV1_OFFSET, data_sha256, legacy_hash
from loratool.io.safetensors import SafetensorsHeader, read_header
from loratool.io.writer import atomic_path, copy_range
from loratool.ops.privacy import strip_private
from loratool.ops.validate import is_pickle_file

# What loaders read from metadata; ``strip --all`` keeps these and nothing else.
LOADER_KEYS: dict[str, str] = {
    "format": "framework tag written by safetensors' torch API; transformers checks it",
    "lora_adapter_metadata": "diffusers: the LoraConfig (r, lora_alpha, patterns) — the alpha of diffusers files",
    "ss_network_module": "kohya minimum set (its --no_metadata keeps it): network type",
    "ss_network_dim": "kohya minimum set: rank",
    "ss_network_alpha": "kohya minimum set: alpha",
    "ss_network_args": "kohya minimum set: conv_dim/conv_alpha, LyCORIS algo",
    "ss_base_model_version": "kohya minimum set; A1111 filters LoRAs by SD version with it",
    "ss_v2": "kohya minimum set; A1111's SD2 test",
    "modelspec.sai_model_spec": "model spec version (MUST)",
    "modelspec.architecture": "what the file is for (MUST); model-class detection reads it",
    "modelspec.implementation": "model spec MUST field",
    "modelspec.title": "model spec MUST field: the name UIs show",
    "modelspec.resolution": "model spec MUST field",
    "sshs_model_hash": "A1111 and Civitai identify the file by it",
    "sshs_legacy_hash": "old A1111 hash",
    "modelspec.hash_sha256": "model spec hash",
}
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
_LEGACY_PLACEHOLDER = "0" * 8


@dataclass
class MetadataView:
    """The metadata of one file (``metadata show``)."""

    path: str
    metadata: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "metadata": self.metadata}


@dataclass
class MetadataEdit:
    """What a ``set``/``strip`` wrote: the output and the keys it added, changed, removed
    or redacted (privacy: paths cut to their last component)."""

    path: str
    output: str
    metadata: dict[str, str]
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    redacted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "output": self.output, "added": self.added, "changed": self.changed,
                "removed": self.removed, "redacted": self.redacted, "notes": self.notes, "metadata": self.metadata}


def _source_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """The validated header of a safetensors input; anything else is refused in one line."""
    p = Path(path)
    if p.is_dir():
        raise InputError(p, "is a directory; metadata lives in a .safetensors file's header "
                         "(for a PEFT folder: its adapter_model.safetensors)")
    if p.is_file() and is_pickle_file(p):
        raise InputError(p, "pickle-based files have no header metadata; only .safetensors files can be edited")
    return read_header(p)


def show(path: str | os.PathLike[str]) -> MetadataView:
    """The ``__metadata__`` of a safetensors file (header only)."""
    return MetadataView(str(path), dict(_source_header(path).metadata))


def set_metadata(
    path: str | os.PathLike[str],
    values: dict[str, str | None],
    *,
    output: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    force: bool = False,
    fix_hashes: bool = False,
) -> MetadataEdit:
    """Set keys (a ``None`` value removes the key) and write to ``output`` or in place."""
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise UsageError(None, f"metadata keys must be non-empty strings, got {key!r}")
        if value is not None and not isinstance(value, str):
            raise UsageError(None, f"{key}: metadata values are strings, got {type(value).__name__}")
    header = _source_header(path)
    new = dict(header.metadata)
    for key, value in values.items():
        if value is None:
            new.pop(key, None)
        else:
            new[key] = value
    return _rewrite(path, header, new, output, in_place, force, fix_hashes)


def strip(
    path: str | os.PathLike[str],
    *,
    privacy: bool = False,
    everything: bool = False,
    output: str | os.PathLike[str] | None = None,
    in_place: bool = False,
    force: bool = False,
    fix_hashes: bool = False,
) -> MetadataEdit:
    """``privacy``: remove what ``validate`` flags as private (paths redacted to their last
    component, dataset-folder keys removed). ``everything``: keep only :data:`LOADER_KEYS`."""
    if privacy == everything:
        raise UsageError(None, "choose one of --privacy or --all")
    header = _source_header(path)
    redacted: list[str] = []
    if privacy:
        new, redacted, _ = strip_private(header.metadata)
    else:
        new = {k: v for k, v in header.metadata.items() if k in LOADER_KEYS}
    edit = _rewrite(path, header, new, output, in_place, force, fix_hashes)
    edit.redacted = redacted
    edit.changed = [k for k in edit.changed if k not in redacted]
    return edit


def _target(path: str | os.PathLike[str], output: str | os.PathLike[str] | None, in_place: bool, force: bool) -> Path:
    if in_place == (output is not None):
        raise UsageError(None, "give an output (-o OUT) or --in-place")
    if in_place:
        return Path(os.path.realpath(path))  # through a symlink: rewrite the file it names
    out = Path(output)  # type: ignore[arg-type]
    if out.is_dir():
        raise UsageError(out, "is a directory; give the output file's name")
    if out.exists():
        if os.path.samefile(out, path):
            raise UsageError(out, "the output is the input; use --in-place to rewrite it")
        if not force:
            raise UsageError(out, "exists; pass --force to replace it")
    return out


def header_json(header: SafetensorsHeader, metadata: dict[str, str]) -> bytes:
    """A header for the same tensor table (order and data offsets kept) with new metadata,
    padded with spaces to a multiple of 8 bytes."""
    table: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    for name, t in header.tensors.items():
        table[name] = {"dtype": t.dtype, "shape": list(t.shape),
                       "data_offsets": [t.start - header.data_start, t.end - header.data_start]}
    try:
        raw = json.dumps(table, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(None, "metadata must be valid Unicode text (a key or value holds a lone surrogate)") from None
    return raw + b" " * (-len(raw) % 8)


def _rewrite(
    path: str | os.PathLike[str], header: SafetensorsHeader, metadata: dict[str, str],
    output: str | os.PathLike[str] | None, in_place: bool, force: bool, fix_hashes: bool,
) -> MetadataEdit:
    final = _target(path, output, in_place, force)
    notes: list[str] = []
    if fix_hashes:
        digest = data_sha256(path, header.data_start)
        metadata = {**metadata, "sshs_model_hash": digest, "modelspec.hash_sha256": "0x" + digest,
                    "sshs_legacy_hash": _LEGACY_PLACEHOLDER}
    raw = header_json(header, metadata)
    if fix_hashes:
        raw, metadata, note = _with_legacy_hash(path, header, metadata, raw)
        notes += [note] if note else []
    elif "sshs_legacy_hash" in metadata and metadata["sshs_legacy_hash"] != _legacy_of(path, header, raw):
        notes.append("sshs_legacy_hash does not match the rewritten file (the header length sets what it covers); "
                     "--fix-hashes recomputes it")
    mode = os.stat(final).st_mode & 0o7777 if in_place else None
    data_len = header.file_size - header.data_start
    with atomic_path(final, mode=mode) as tmp:
        with open(tmp, "r+b") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.flush()
            sources: dict[str, int] = {}
            try:
                copy_range(sources, (str(path), header.data_start, data_len), fh.fileno(), 8 + len(raw))
            finally:
                for fd in sources.values():
                    os.close(fd)
        written = read_header(tmp)
        if written.file_size - written.data_start != data_len or written.metadata != metadata:
            raise InputError(final, "internal: the rewritten file does not read back as written")
    old = header.metadata
    return MetadataEdit(
        path=str(path), output=str(path) if in_place else str(final), metadata=metadata,
        added=sorted(metadata.keys() - old.keys()), removed=sorted(old.keys() - metadata.keys()),
        changed=sorted(k for k in metadata.keys() & old.keys() if metadata[k] != old[k]), notes=notes,
    )


def _legacy_of(path: str | os.PathLike[str], header: SafetensorsHeader, raw: bytes) -> str | None:
    """The legacy hash of the file that ``raw`` + the unchanged data area make (None when
    the window would overlap the header)."""
    new_data_start = 8 + len(raw)
    if new_data_start > AUTOV1_OFFSET:
        return None
    src = header.data_start + (AUTOV1_OFFSET - new_data_start)
    with open(path, "rb") as fh:
        window = os.pread(fh.fileno(), AUTOV1_LENGTH, src) if src < header.file_size else b""
    return legacy_hash(window)


def _with_legacy_hash(
    path: str | os.PathLike[str], header: SafetensorsHeader, metadata: dict[str, str], raw: bytes
) -> tuple[bytes, dict[str, str], str | None]:
    """Fill the legacy-hash placeholder with the hash of the final file's window, which
    lies in the (unchanged) data area when the header ends before 1 MiB."""
    new_data_start = 8 + len(raw)
    if new_data_start > AUTOV1_OFFSET:
        metadata = {k: v for k, v in metadata.items() if k != "sshs_legacy_hash"}
        return header_json(header, metadata), metadata, (
            "sshs_legacy_hash dropped: the header reaches past 1 MiB, so the old hash would cover itself")
    value = _legacy_of(path, header, raw)
    assert value is not None  # the window lies in the data area
    metadata = {**metadata, "sshs_legacy_hash": value}
    patched = header_json(header, metadata)
    assert len(patched) == len(raw)  # same length: the window did not move
    return patched, metadata, None

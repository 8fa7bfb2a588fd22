"""Choosing the right file of a version, and safe local names for it."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from loratool.errors import RegistryError
from loratool.terminal import safe, strip_unsafe

MAX_NAME_BYTES = 240  # leaves room for ".part" / ".civitai.info" under a 255-byte limit
MODEL_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin",
                    ".onnx", ".zip", ".yaml", ".json")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
PICKLE_FORMATS = ("PickleTensor",)
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                    *(f"LPT{i}" for i in range(1, 10))}
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]")


def sanitize_filename(raw: str) -> str:
    """A registry-supplied file name made safe: basename only, no separators, no escape
    sequences, control characters or bidi overrides (stripped, so that what is listed is
    what is on disk).

    Raises :class:`RegistryError` when nothing usable is left or the extension is not a
    model/asset extension we expect.
    """
    name = strip_unsafe(unicodedata.normalize("NFC", raw or ""))
    name = re.split(r"[/\\]", name)[-1]  # basename, whichever separator was used
    name = _UNSAFE.sub("_", name).strip().lstrip(".").rstrip(". ")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    if stem.split(".")[0].upper() in WINDOWS_RESERVED:
        stem = "_" + stem
    while len(f"{stem}.{ext}".encode()) > MAX_NAME_BYTES and stem:
        stem = stem[:-1]
    name = f"{stem}.{ext}" if ext else stem
    if not stem or not name or name in (".", ".."):
        raise RegistryError(safe(raw), "registry gave an unusable file name")
    if not name.lower().endswith(MODEL_EXTENSIONS):
        raise RegistryError(safe(raw), f"unexpected file extension (expected one of {', '.join(MODEL_EXTENSIONS)})")
    return name


def filename_from_disposition(value: str | None) -> str | None:
    """The file name in a Content-Disposition header (RFC 6266), before sanitising.

    ``filename*=UTF-8''…`` wins; a plain quoted ``filename=`` that arrived as UTF-8 bytes
    decoded as Latin-1 (Civitai sends raw UTF-8) is re-decoded.
    """
    if not value:
        return None
    star = re.search(r"filename\*\s*=\s*([\w-]+)'[^']*'([^;]+)", value, re.IGNORECASE)
    if star:
        return unquote(star.group(2).strip().strip('"'), encoding=star.group(1) or "utf-8", errors="replace")
    plain = re.search(r'filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]+))', value, re.IGNORECASE)
    if not plain:
        return None
    name = plain.group(1) if plain.group(1) is not None else plain.group(2).strip()
    try:
        return name.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return name


def inside(dest_dir: Path, name: str) -> Path:
    """``dest_dir / name``, refusing anything that would resolve outside ``dest_dir``."""
    root = dest_dir.resolve()
    target = (root / name).resolve()
    if target.parent != root:
        raise RegistryError(safe(name), f"file name would escape {dest_dir}")
    return target


def is_pickle(file: dict[str, Any], name: str | None = None) -> bool:
    """Pickle-based by the registry's format, its listed name, or the name the file will
    be saved under (``name``: e.g. from a Content-Disposition when the API lists none)."""
    fmt = (file.get("metadata") or {}).get("format")
    names = (str(file.get("name") or ""), name or "")
    return fmt in PICKLE_FORMATS or any(n.lower().endswith(PICKLE_EXTENSIONS) for n in names)


def scan_warnings(file: dict[str, Any]) -> list[str]:
    """One warning per registry scan result that is not ``Success``."""
    out = []
    for key, label in (("pickleScanResult", "pickle scan"), ("virusScanResult", "virus scan")):
        value = file.get(key)
        if value is not None and value != "Success":
            out.append(f"registry {label} result is {safe(repr(value))}")
    return out


@dataclass(frozen=True)
class FileChoice:
    """How to pick a file of a version (defaults: the primary Model file)."""

    file_type: str = "Model"
    format: str | None = None
    fp: str | None = None
    size: str | None = None

    def matches(self, file: dict[str, Any]) -> bool:
        meta = file.get("metadata") or {}
        wanted = {"format": self.format, "fp": self.fp, "size": self.size}
        return file.get("type") == self.file_type and all(
            v is None or str(meta.get(k, "")).lower() == v.lower() for k, v in wanted.items()
        )


def select_file(version: dict[str, Any], choice: FileChoice) -> dict[str, Any]:
    """The file of ``version`` that ``choice`` asks for: the primary one among matches."""
    files = version.get("files") or []
    matches = [f for f in files if choice.matches(f)]
    if not matches:
        listing = "; ".join(_describe(f) for f in files) or "none listed"
        raise RegistryError(f"version {version.get('id')}",
                            f"no {choice.file_type} file matches (files: {listing})")
    return next((f for f in matches if f.get("primary")), matches[0])


def _describe(f: dict[str, Any]) -> str:
    meta = f.get("metadata") or {}
    extra = "/".join(str(meta[k]) for k in ("format", "fp", "size") if meta.get(k))
    return safe(f"{f.get('name')} [{f.get('type')}{', ' + extra if extra else ''}]")

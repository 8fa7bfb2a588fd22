"""``validate``: check a LoRA before publishing it — structure, numbers, metadata, privacy,
safety and the traps loaders fall into.

:func:`validate` is a pure function of a path and options (path → :class:`ValidationReport`),
so a process pool can map it over a library. It never raises for what is wrong with the
file: that is what the findings are for (codes in :mod:`loratool.ops.findings`).

Order of work: open (pickles only with ``allow_pickle``) → decode with the normal reader
→ header checks (no tensor data; torch is not imported) → one streamed pass over the data
(:mod:`loratool.ops.tensor_stats`) for NaN/Inf, norms and the data hash.
"""

from __future__ import annotations

import math
import os
import statistics
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.errors import InputError, LayoutError, NotAnAdapterError, UnsafeInputError
from loratool.formats.decode import decode
from loratool.io.safetensors import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    decode_scalar,
    parse_header_bytes,
    read_header,
)
from loratool.io.sources import (
    COMPONENT_DIRS,
    DIFFUSERS_WEIGHTS,
    PEFT_WEIGHTS,
    PICKLE_SUFFIXES,
    Part,
    TensorEntry,
    TensorSource,
    open_source,
)
from loratool.jsonstrict import finite_or_none
from loratool.library.walk import walk
from loratool.model import Adapter, ModuleKey
from loratool.ops import validate_checks as checks
from loratool.ops.findings import SEVERITIES, Collector, Finding
from loratool.ops.inspect import summarize
from loratool.ops.tensor_stats import DataStats, scan_loaded, scan_safetensors, sorted_keys_sha256

# Numbers: documented thresholds (README).
OUTLIER_Z = 5.0  # robust z-score of log‖ΔW‖ (0.6745·(x − median)/MAD) above this…
OUTLIER_RATIO = 10.0  # …and at least this many times the median norm
OUTLIER_MAD_FLOOR = 0.1  # MAD of the log norms never counts as less than this
OUTLIER_MIN_MODULES = 8  # fewer modules with a norm: no statistics


@dataclass
class ValidationReport:
    """What ``loratool validate`` says about one path. ``adapter`` describes the file
    (format, family, modules… as ``inspect`` does; for a truncated file, from its
    header); ``data_sha256`` is the SHA-256 of the tensor data (kohya's
    ``sshs_model_hash``; AutoV3 is its first 12 hex digits) when the data was read."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    adapter: dict[str, Any] | None = None
    data_checked: bool = False
    data_sha256: str | dict[str, str] | None = None

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(f.severity for f in self.findings)
        return {s: c.get(s, 0) for s in SEVERITIES}

    @property
    def codes(self) -> list[str]:
        return sorted({f.code for f in self.findings})

    def failed(self, strict: bool = False) -> bool:
        """Errors, or with ``strict`` also warnings (the CLI's exit status 1)."""
        counts = self.counts
        return counts["error"] > 0 or (strict and counts["warning"] > 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.counts["error"] == 0,
            "counts": self.counts,
            "findings": [f.to_json() for f in self.findings],
            "adapter": self.adapter,
            "data_checked": self.data_checked,
            "data_sha256": self.data_sha256,
        }


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def adapter_paths(folder: Path) -> list[Path]:
    """The LoRA files and adapter folders under ``folder``, recursively (the shared
    library walk: adapter folders are one entry, each folder is entered once)."""
    return [Path(e.path) for e in walk([folder]) if e.is_adapter]


def _weights_files(p: Path) -> list[Path]:
    """The weights file(s) :func:`open_source` would read for ``p``."""
    if p.is_file():
        return [p]
    first = next((p / n for n in (*PEFT_WEIGHTS, *DIFFUSERS_WEIGHTS) if (p / n).is_file()), None)
    if first is not None:
        return [first]
    subs = [p / c for c in COMPONENT_DIRS if (p / c).is_dir()]
    return [f for s in subs for f in [next((s / n for n in PEFT_WEIGHTS if (s / n).is_file()), None)] if f]


def is_pickle_file(p: Path) -> bool:
    """Pickle-based: by suffix, or for other names by content (zip or a raw pickle that is
    not a safetensors header)."""
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return True
    if suffix == ".safetensors":
        return False
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if head.startswith(b"PK\x03\x04"):
        return True
    if head[:1] == b"\x80":
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        return not (0 < n <= MAX_HEADER_BYTES and head[8:9] == b"{")
    return False


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def validate(
    path: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    family: str | None = None,
    read_data: bool = True,
) -> ValidationReport:
    """Validate one LoRA file or adapter folder (see the module docstring).

    ``read_data=False`` skips the pass over the tensor data (NaN/Inf, norms, hashes):
    header, metadata and alpha checks only. ``family`` overrides detection."""
    report = ValidationReport(str(path))
    found = Collector()
    p = Path(path)
    try:
        source = _open(p, allow_pickle, found, report)
        if source is not None:
            try:
                _check_source(source, p, family, read_data, found, report)
            finally:
                source.close()
    finally:
        report.findings = found.findings()
    return report


def _open(p: Path, allow_pickle: bool, found: Collector, report: ValidationReport) -> TensorSource | None:
    if not os.path.exists(p):
        found.add("unreadable", "no such file or directory")
        return None
    if not (p.is_file() or p.is_dir()) or not os.access(p, os.R_OK):
        found.add("unreadable", "not a readable file or folder")
        return None
    pickles = [f for f in _weights_files(p) if is_pickle_file(f)]
    if pickles and not allow_pickle:
        found.add("pickle-refused", f"{pickles[0].name} is pickle-based; not opened (pass --allow-pickle to read it weights-only)", str(pickles[0]))
        return None
    try:
        source = open_source(p)
    except UnsafeInputError as err:
        found.add("pickle-unsafe", err.message, err.path)
        return None
    except NotAnAdapterError as err:
        found.add("not-an-adapter", err.message)
        return None
    except InputError as err:
        _describe_broken(p, err, found, report)
        return None
    if pickles:
        found.add("pickle-file", f"{pickles[0].name} is pickle-based (read weights-only here); loaders that unpickle it could run code — publish safetensors", str(pickles[0]))
    return source


def _describe_broken(p: Path, err: InputError, found: Collector, report: ValidationReport) -> None:
    """A file the reader refused: truncated (described from its header) or invalid."""
    header = _header_despite_truncation(p) if p.is_file() else None
    if header is None or header.complete:
        code = ("unreadable" if err.message in ("permission denied", "is a directory")
                else "layout-invalid" if isinstance(err, LayoutError) else "header-invalid")
        found.add(code, err.message, err.path)
        return
    end = max(t.end for t in header.tensors.values())
    what = ""
    try:
        adapter = decode(_header_only_source(header))
        report.adapter = _summary(adapter)
        report.adapter["complete"] = False
        s = report.adapter
        what = (f"; the header describes a {s['format']} {s['family']} adapter "
                f"({', '.join(s['network_types'])}, {s['modules']} modules, rank {_span(s['rank'])})")
    except (InputError, NotAnAdapterError):
        what = f"; the header lists {len(header.tensors)} tensors but no adapter"
    found.add("truncated", f"tensor data needs {end} bytes but the file has {header.file_size}{what}")


def _header_despite_truncation(p: Path) -> SafetensorsHeader | None:
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) == 8:
                n = struct.unpack("<Q", head)[0]
                if n <= MAX_HEADER_BYTES:
                    head += fh.read(n)
        return parse_header_bytes(p, head, size)
    except (OSError, InputError):
        return None


def _header_only_source(header: SafetensorsHeader) -> TensorSource:
    """A source over a header whose data may be cut short: alphas read when present."""

    def no_data(key: str) -> Any:
        raise InputError(header.path, f"truncated: tensor {key!r} is not in the file")

    def scalar(key: str) -> float:
        info = header.tensors[key]
        if info.numel == 0 or info.end > header.file_size:
            return 0.0  # absent: described as alpha = rank
        with open(header.path, "rb") as fh:
            return decode_scalar(os.pread(fh.fileno(), 8, info.start), info.dtype)

    tensors = {k: TensorEntry(v.dtype, v.shape, v.start) for k, v in header.tensors.items()}
    part = Part(header.path, tensors, header.metadata, None, None, no_data, scalar)
    return TensorSource(header.path, "safetensors", [part])


def _summary(adapter: Adapter) -> dict[str, Any]:
    s = summarize(adapter).to_json()
    keep = ("format", "variant", "family", "network_types", "components", "modules", "rank", "alpha", "dtypes", "complete")
    return {k: finite_or_none(s[k]) for k in keep}


def _span(d: dict[str, Any]) -> str:
    lo, hi = d.get("min"), d.get("max")
    return "-" if lo is None else str(lo) if lo == hi else f"{lo}–{hi}"


# --------------------------------------------------------------------------------------
# Checks on an opened source
# --------------------------------------------------------------------------------------


def _check_source(
    source: TensorSource, p: Path, family: str | None, read_data: bool, found: Collector, report: ValidationReport
) -> None:
    try:
        adapter = decode(source, family=family)
    except NotAnAdapterError as err:
        found.add("not-an-adapter", err.message)
        return
    except InputError as err:
        found.add("header-invalid", err.message, err.path)
        return
    report.adapter = _summary(adapter)
    headers = {part.path: read_header(part.path) for part in source.parts if part.raw is not None}
    modules = list(adapter.modules.values())
    checks.check_unknown_keys(adapter, found)
    checks.check_resolution(adapter, found)
    checks.check_invalid(adapter, found)
    checks.check_factors(modules, found)
    checks.check_dtypes(modules, found)
    checks.check_alphas(source, adapter, found)
    checks.check_meta_network(adapter, found)
    checks.check_meta_family(adapter, source, found)
    if source.kind == "safetensors":
        checks.check_modelspec(adapter.metadata, found)
    checks.check_privacy(source, found)
    checks.check_interop(adapter, found)
    if read_data:
        _check_data(source, adapter, headers, found, report)


# --------------------------------------------------------------------------------------
# The data pass
# --------------------------------------------------------------------------------------


def _check_data(
    source: TensorSource, adapter: Adapter, headers: dict[str, SafetensorsHeader], found: Collector, report: ValidationReport
) -> None:
    modules = list(adapter.modules.values())
    stats = DataStats()
    hashes: dict[str, str] = {}
    try:
        for part in source.parts:
            if part.path in headers:
                mine = [m for m in modules if any(r.location and r.location[0] == part.path for r in m.params.values())]
                s = scan_safetensors(headers[part.path], mine)
                hashes[part.path] = s.data_sha256 or ""
                _check_hashes(headers[part.path], s, found)
            else:  # weights-only pickle: tensors are in memory already
                mine = [m for m in modules if all(r.location is None and r.key in part.tensors for r in m.params.values())]
                s = scan_loaded(mine)
            stats.nonfinite.update(s.nonfinite)
            stats.norms.update(s.norms)
            stats.failed.update(s.failed)
    except InputError as err:
        found.add("truncated", err.message, err.path)
        return
    report.data_checked = True
    if hashes:
        report.data_sha256 = next(iter(hashes.values())) if len(hashes) == 1 else {
            os.path.relpath(k, source.path): v for k, v in hashes.items()}
    for key, n in stats.nonfinite.items():
        found.add("non-finite", f"{key}: {n} NaN/Inf value(s)", key)
    for key, why in stats.failed.items():
        name = adapter.modules[key].source_name
        found.add("factor-shape-mismatch", f"{name}: ΔW cannot be computed ({why})", name)
    bad = {m.key for m in modules if not math.isfinite(m.scale) or any(r.key in stats.nonfinite for r in m.params.values())}
    norms = {k: n for k, n in stats.norms.items() if k not in bad}
    found.group("zero-module", "module(s) change nothing (ΔW = 0)", [adapter.modules[k].source_name for k, n in norms.items() if n == 0.0])
    _check_outliers(norms, adapter, found)


def _check_outliers(norms: dict[ModuleKey, float | None], adapter: Adapter, found: Collector) -> None:
    """Robust z-score of log‖ΔW‖·scale against the file's own modules (see thresholds)."""
    logs = {k: math.log(n) for k, n in norms.items() if n is not None and n > 0 and math.isfinite(n)}
    if len(logs) < OUTLIER_MIN_MODULES:
        return
    med = statistics.median(logs.values())
    mad = max(statistics.median(abs(x - med) for x in logs.values()), OUTLIER_MAD_FLOOR)
    for k, x in sorted(logs.items(), key=lambda kv: -kv[1]):
        z = 0.6745 * (x - med) / mad
        if z > OUTLIER_Z and x - med >= math.log(OUTLIER_RATIO):
            m = adapter.modules[k]
            found.add("outlier-module", f"{m.source_name}: ‖ΔW‖·scale = {math.exp(x):.3g}, {math.exp(x - med):.0f}× the median "
                      f"module's {math.exp(med):.3g} (robust z = {z:.1f})", m.source_name)
    for k, n in norms.items():
        if n is not None and math.isinf(n):
            found.add("outlier-module", f"{adapter.modules[k].source_name}: ‖ΔW‖·scale overflows float32", adapter.modules[k].source_name)


def _check_hashes(header: SafetensorsHeader, stats: DataStats, found: Collector) -> None:
    """Embedded hashes against the data: kohya's sshs_model_hash (SHA-256 of the data area,
    64 hex) and modelspec.hash_sha256 ("0x" + the same, as the SAI reference
    implementation defines it; OneTrainer hashes the tensors in sorted-key order, which is
    the same for single-dtype files and is accepted too)."""
    meta = header.metadata
    actual = {stats.data_sha256, stats.autov3}
    value = meta.get("sshs_model_hash", "").strip().lower()
    if value and value not in actual:
        found.add("hash-mismatch", f"sshs_model_hash {value[:12]}… is not the SHA-256 of the tensor data ({stats.data_sha256[:12]}…); "
                  "A1111 and Civitai trust the embedded value (fix: loratool metadata set --fix-hashes)", "sshs_model_hash")
    spec = meta.get("modelspec.hash_sha256", "").strip().lower().removeprefix("0x")
    if spec and spec not in actual and spec != sorted_keys_sha256(header):
        found.add("hash-mismatch", f"modelspec.hash_sha256 {spec[:12]}… is not the SHA-256 of the tensor data ({stats.data_sha256[:12]}…) "
                  "(fix: loratool metadata set --fix-hashes)", "modelspec.hash_sha256")


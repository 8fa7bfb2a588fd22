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

import json
import math
import os
import re
import statistics
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool import arch
from loratool.errors import InputError, NotAnAdapterError, UnsafeInputError
from loratool.formats.decode import decode
from loratool.formats.family import SD_FAMILIES, metadata_families
from loratool.formats.keys import kohya_prefix, parse_dotted, parse_kohya
from loratool.formats.weight_shape import weight_io
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
    is_adapter_dir,
    open_source,
)
from loratool.model import Adapter, AdapterModule, ModuleKey
from loratool.networks import NETWORK_TYPES, classify
from loratool.ops.findings import CODES, SEVERITIES, Finding
from loratool.ops.inspect import ADAPTER_SUFFIXES, summarize
from loratool.ops.privacy import privacy_hits
from loratool.ops.tensor_stats import DataStats, scan_loaded, scan_safetensors, sorted_keys_sha256

# Numbers: documented thresholds (README).
ALPHA_SCALE_RANGE = (1 / 1024, 16.0)  # alpha/rank outside this is "absurd"
OUTLIER_Z = 5.0  # robust z-score of log‖ΔW‖ (0.6745·(x − median)/MAD) above this…
OUTLIER_RATIO = 10.0  # …and at least this many times the median norm
OUTLIER_MAD_FLOOR = 0.1  # MAD of the log norms never counts as less than this
OUTLIER_MIN_MODULES = 8  # fewer modules with a norm: no statistics
MAX_PER_CODE = 10  # findings listed per code; the rest are counted in one more line

MODELSPEC_FIELDS = (  # SAI model spec: MUST, then SHOULD
    "sai_model_spec", "architecture", "implementation", "title", "resolution",
    "description", "author", "date", "hash_sha256",
)
# Parameters that make a group of keys a module even when incomplete.
FACTOR_PARAMS = frozenset({
    "lora_down", "lora_up", "lora_mid", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
    "lokr_w2_b", "lokr_t2", "a1", "a2", "b1", "b2", "bm", "oft_blocks", "oft_r", "ia3_l",
})
SGM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
DIFFUSERS_UNET = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")
CLIP_WITHOUT_TEXT_MODEL = re.compile(r"^(encoder\.layers\.\d+|embeddings|final_layer_norm)\b")
DIFFUSERS_LOADS = frozenset({"lora", "locon"})
COMFYUI_MISSING = frozenset({"ia3"})


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


class _Collector:
    """Findings, at most :data:`MAX_PER_CODE` per code plus one line counting the rest."""

    def __init__(self) -> None:
        self.items: list[Finding] = []
        self.extra: Counter[str] = Counter()

    def add(self, code: str, message: str, key: str | None = None) -> None:
        assert code in CODES, code
        if sum(f.code == code for f in self.items) >= MAX_PER_CODE:
            self.extra[code] += 1
        else:
            self.items.append(Finding(code, message, key))

    def group(self, code: str, what: str, names: list[str], key: str | None = None) -> None:
        """One finding for many items: ``N what: a, b, c, …``."""
        if names:
            shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
            self.add(code, f"{len(names)} {what}: {shown}", key or names[0])

    def findings(self) -> list[Finding]:
        out = list(self.items)
        for code, n in self.extra.items():
            out.append(Finding(code, f"… and {n} more {code} finding(s)"))
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return sorted(out, key=lambda f: order[f.severity])  # stable: checks' order kept


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def adapter_paths(folder: Path) -> list[Path]:
    """The LoRA files and adapter folders under ``folder``, recursively, in path order.

    A simple listing by file suffix (adapter folders count as one entry and are not
    entered); ``scan``'s library walk will replace it."""
    if is_adapter_dir(folder):
        return [folder]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames.sort()
        for name in list(dirnames):
            if is_adapter_dir(here / name):
                found.append(here / name)
                dirnames.remove(name)
        found += [here / f for f in filenames if Path(f).suffix.lower() in ADAPTER_SUFFIXES]
    return sorted(found)


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
    found = _Collector()
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


def _open(p: Path, allow_pickle: bool, found: _Collector, report: ValidationReport) -> TensorSource | None:
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


def _describe_broken(p: Path, err: InputError, found: _Collector, report: ValidationReport) -> None:
    """A file the reader refused: truncated (described from its header) or invalid."""
    header = _header_despite_truncation(p) if p.is_file() else None
    if header is None or header.complete:
        code = "unreadable" if err.message in ("permission denied", "is a directory") else "header-invalid"
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
    return {k: _finite(s[k]) for k in keep}


def _finite(value: Any) -> Any:
    """NaN/Inf as None, so the report is strict JSON (the finding says what was wrong)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _span(d: dict[str, Any]) -> str:
    lo, hi = d.get("min"), d.get("max")
    return "-" if lo is None else str(lo) if lo == hi else f"{lo}–{hi}"


# --------------------------------------------------------------------------------------
# Checks on an opened source
# --------------------------------------------------------------------------------------


def _check_source(
    source: TensorSource, p: Path, family: str | None, read_data: bool, found: _Collector, report: ValidationReport
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
    _check_layout(headers, found)
    _check_unknown_keys(adapter, found)
    _check_resolution(adapter, found)
    _check_factors(modules, found)
    _check_dtypes(modules, found)
    _check_alphas(source, adapter, found)
    _check_meta_network(adapter, found)
    _check_meta_family(adapter, source, found)
    if source.kind == "safetensors":
        _check_modelspec(adapter.metadata, found)
    _check_privacy(source, found)
    _check_interop(adapter, found)
    if read_data:
        _check_data(source, adapter, headers, found, report)


def _check_layout(headers: dict[str, SafetensorsHeader], found: _Collector) -> None:
    for header in headers.values():
        spans = sorted((t.start, t.end) for t in header.tensors.values() if t.end > t.start)
        pos, gaps = header.data_start, 0
        for start, end in spans:
            gaps += start > pos
            pos = max(pos, end)
        trailing = header.file_size - pos
        if gaps or trailing:
            found.add("layout-invalid", f"{gaps} gap(s) between tensors and {trailing} byte(s) after the last one; "
                      "the safetensors library refuses such a file", header.path)


def _parse_any(key: str) -> tuple[str | None, str, str] | None:
    parsed = parse_kohya(key) or parse_dotted(key.removeprefix("base_model.model."))
    return None if parsed is None else (parsed.component, parsed.module, parsed.param)


def _check_unknown_keys(adapter: Adapter, found: _Collector) -> None:
    """Keys outside every module: a module spelled twice, an incomplete module, or junk."""
    by_name = {m.source_name: m for m in adapter.modules.values()}
    groups: dict[tuple[str | None, str], dict[str, str]] = {}
    junk: list[str] = []
    for key in adapter.unknown_keys:
        parsed = _parse_any(key)
        if parsed is None:
            junk.append(key)
            continue
        component, module, param = parsed
        groups.setdefault((component, module), {})[param] = key
    incomplete: list[str] = []
    for (_, module), params in groups.items():
        example = next(iter(params.values()))
        if module in by_name:  # the kept module has these parameters already
            found.add("duplicate-module", f"{module}: {', '.join(sorted(params))} spelled twice (e.g. {example})", module)
        elif classify(set(params), {}) is not None:  # a whole module the decoder dropped
            other = _same_module(adapter, module)
            also = f" and {other} are the same module" if other else " duplicates another module"
            found.add("duplicate-module", f"{module}{also}; only one was kept", module)
        elif set(params) & FACTOR_PARAMS:
            incomplete.append(f"{module} (has {', '.join(sorted(params))})")
        else:
            junk.extend(params.values())
    found.group("incomplete-module", "module(s) with missing factors", incomplete)
    found.group("unknown-keys", "key(s) belong to no recognised module", sorted(junk))


def _same_module(adapter: Adapter, name: str) -> str | None:
    """The spelling the decoder kept for the module a dropped name refers to."""
    if adapter.family not in arch.FAMILIES:
        return None
    catalog = arch.get_catalog(adapter.family)
    spec = _catalog_entry(catalog, name, None)
    kept = adapter.modules.get(ModuleKey(spec.component, spec.path)) if spec else None
    return kept.source_name if kept else None


def _catalog_entry(catalog: arch.Catalog, name: str, component: str | None) -> arch.ModuleSpec | None:
    """A catalog entry by name alone (no shape check)."""
    if kohya_prefix(name):
        return catalog.resolve_kohya(name)
    if name.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.")):
        return catalog.resolve_ldm(name)
    for comp in dict.fromkeys([component, "unet", "text_encoder", "text_encoder_2"]):
        spec = catalog.get(comp, name) if comp else None
        if spec is not None:
            return spec
    return None


def _check_resolution(adapter: Adapter, found: _Collector) -> None:
    if adapter.family not in arch.FAMILIES:
        if adapter.family == "unknown":
            why = next((e for e in adapter.family_evidence if e.startswith("ambiguous")), "no structural or metadata evidence")
            found.add("family-unknown", f"base-model family not determined ({why}); modules were not checked against a catalog")
        return
    catalog = arch.get_catalog(adapter.family)
    unresolved: list[str] = []
    for m in adapter.modules.values():
        if m.resolved or _clip_without_text_model(m):
            continue
        spec = _catalog_entry(catalog, m.source_name, m.key.component)
        if spec is None:
            unresolved.append(m.source_name)
            continue
        out_f, in_f = weight_io(m.network_type, {k: v.shape for k, v in m.params.items()})
        found.add("target-shape-mismatch", f"{m.source_name}: the adapter's weight is {out_f}×{in_f}, the {adapter.family} layer "
                  f"{spec.component}.{spec.path} is {'×'.join(map(str, spec.shape))}", m.source_name)
    found.group("unresolved-module", f"module(s) match no {adapter.family} layer (loaders skip them)", unresolved)


def _clip_without_text_model(m: AdapterModule) -> bool:
    return m.key.component.startswith("text_encoder") and bool(CLIP_WITHOUT_TEXT_MODEL.match(m.source_name))


def _factor_problem(ntype: str, s: dict[str, tuple[int, ...]]) -> str | None:
    """Why a module's factor shapes cannot multiply, or None."""
    def dim(name: str, axis: int) -> int | None:
        shape = s.get(name)
        return shape[axis] if shape is not None and len(shape) > axis else None

    pairs: list[tuple[str, int, str, int]] = []
    if ntype in ("lora", "locon"):
        pairs = [("lora_up", 1, "lora_down", 0)]
        if "lora_mid" in s:
            pairs += [("lora_mid", 0, "lora_down", 0), ("lora_mid", 1, "lora_down", 0)]
    elif ntype == "loha":
        for i in (1, 2):
            pairs += ([(f"hada_t{i}", 0, f"hada_w{i}_a", 0), (f"hada_t{i}", 1, f"hada_w{i}_b", 0)] if f"hada_t{i}" in s
                      else [(f"hada_w{i}_a", 1, f"hada_w{i}_b", 0)])
        pairs += [("hada_w1_a", 0 if "hada_t1" not in s else 1, "hada_w2_a", 0 if "hada_t2" not in s else 1)]
    elif ntype == "lokr":
        if "lokr_w1_a" in s:
            pairs.append(("lokr_w1_a", 1, "lokr_w1_b", 0))
        if "lokr_w2_a" in s:
            pairs += ([("lokr_t2", 0, "lokr_w2_a", 0), ("lokr_t2", 1, "lokr_w2_b", 0)] if "lokr_t2" in s
                      else [("lokr_w2_a", 1, "lokr_w2_b", 0)])
    for a, i, b, j in pairs:
        da, db = dim(a, i), dim(b, j)
        if da is None or db is None:
            return f"{a} {list(s.get(a, ()))} / {b} {list(s.get(b, ()))}: not matrices"
        if da != db:
            return f"{a} {list(s[a])} and {b} {list(s[b])} disagree ({da} vs {db})"
    return None


def _check_factors(modules: list[AdapterModule], found: _Collector) -> None:
    for m in modules:
        problem = _factor_problem(m.network_type, {k: v.shape for k, v in m.params.items()})
        if problem:
            found.add("factor-shape-mismatch", f"{m.source_name}: {problem}", m.source_name)


def _check_dtypes(modules: list[AdapterModule], found: _Collector) -> None:
    dtypes = Counter(ref.dtype for m in modules for ref in m.params.values())
    if len(dtypes) > 1:
        found.add("mixed-dtypes", "weights stored as " + ", ".join(f"{d} ({n} tensors)" for d, n in dtypes.most_common()))


def _check_alphas(source: TensorSource, adapter: Adapter, found: _Collector) -> None:
    """Alpha values as stored (the decoder reads 0 as "absent"), and the scale they give."""
    owners = _alpha_owners(adapter)
    flagged: set[ModuleKey] = set()
    for part in source.parts:
        for key, entry in part.tensors.items():
            if not (key.endswith(".alpha") or key == "alpha"):
                continue
            n = math.prod(entry.shape)
            if n != 1:
                found.add("factor-shape-mismatch", f"{key}: alpha must hold one value, it holds {n}", key)
                continue
            try:
                value = part.scalar(key)
            except (InputError, ValueError, struct.error):
                continue
            if not math.isfinite(value):
                found.add("non-finite", f"{key} = {value}", key)
            elif value <= 0:
                found.add("alpha-nonpositive", f"{key} = {value:g}: " + ("negative alpha flips the module's effect" if value < 0 else
                          "kohya and A1111 read 0 as alpha = rank, ComfyUI as scale 0"), key)
            else:
                continue
            if key in owners:
                flagged.add(owners[key])
    absurd: list[str] = []
    for m in adapter.modules.values():
        if m.key in flagged or m.rank is None or not NETWORK_TYPES[m.network_type].uses_alpha:
            continue
        if m.alpha is not None and m.extra.get("alpha_dtype") is None and m.alpha <= 0:
            found.add("alpha-nonpositive", f"{m.source_name}: alpha {m.alpha:g} from the adapter config", m.source_name)
            continue
        scale = m.scale
        lo, hi = ALPHA_SCALE_RANGE
        if math.isfinite(scale) and not lo <= scale <= hi:
            absurd.append(f"{m.source_name} (alpha {m.effective_alpha:g}, rank {m.rank})")
    found.group("alpha-absurd", f"module(s) with alpha/rank outside [1/{round(1 / ALPHA_SCALE_RANGE[0])}, {ALPHA_SCALE_RANGE[1]:g}]", absurd)


def _alpha_owners(adapter: Adapter) -> dict[str, ModuleKey]:
    """alpha tensor key -> module, for formats that store alpha tensors."""
    owners: dict[str, ModuleKey] = {}
    for m in adapter.modules.values():
        for ref in m.params.values():
            parts = ref.key.split(".")
            for i in range(len(parts) - 1, 0, -1):
                owners[".".join(parts[:i]) + ".alpha"] = m.key
    return owners


def _number(value: str | None) -> float | None:
    try:
        x = float(value) if value is not None else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


def _linear_modules(adapter: Adapter) -> list[AdapterModule]:
    """Modules on linear layers and 1×1 convs (kohya's network_dim/alpha; conv_dim/alpha
    cover the rest)."""
    out = []
    for m in adapter.modules.values():
        shape = m.extra.get("shape")
        kernel = math.prod(shape[2:]) if shape and len(shape) == 4 else None
        if kernel is None:
            kernel = 9 if m.network_type == "locon" else 1
        if kernel == 1 and m.rank is not None:
            out.append(m)
    return out


def _check_meta_network(adapter: Adapter, found: _Collector) -> None:
    meta = adapter.metadata
    linear = _linear_modules(adapter)
    if not linear:
        return
    dim = _number(meta.get("ss_network_dim"))
    ranks = sorted({m.rank for m in linear if m.rank is not None})
    if dim is not None and ranks and int(dim) not in ranks:
        found.add("meta-dim-mismatch", f"ss_network_dim = {meta['ss_network_dim']}, but the linear modules have rank "
                  + ", ".join(map(str, ranks)), "ss_network_dim")
    alpha = _number(meta.get("ss_network_alpha"))
    alphas = sorted({m.effective_alpha for m in linear if m.effective_alpha is not None})
    if alpha is not None and alphas and not any(math.isclose(alpha, a, rel_tol=1 / 128, abs_tol=1e-6) for a in alphas):
        found.add("meta-alpha-mismatch", f"ss_network_alpha = {meta['ss_network_alpha']}, but the linear modules have alpha "
                  + ", ".join(f"{a:g}" for a in alphas[:6]), "ss_network_alpha")


def _check_meta_family(adapter: Adapter, source: TensorSource, found: _Collector) -> None:
    if adapter.family == "unknown":
        return
    fields = {k: v for k, v in adapter.metadata.items()}
    for part in source.parts:
        base = (part.config or {}).get("base_model_name_or_path")
        if isinstance(base, str) and base:
            fields["base_model_name_or_path"] = base
    for key, value in fields.items():
        for fam, why in metadata_families({key: value}):
            if fam != adapter.family:
                found.add("meta-family-mismatch", f"{why} says {fam}, but the tensors are {adapter.family}", key)


def _check_modelspec(metadata: dict[str, str], found: _Collector) -> None:
    missing = [f for f in MODELSPEC_FIELDS if not metadata.get(f"modelspec.{f}", "").strip()]
    if len(missing) == len(MODELSPEC_FIELDS):
        found.add("modelspec-missing", "no modelspec metadata (title, architecture, resolution, author, description…); "
                  "set it with `loratool metadata set`")
    elif missing:
        found.add("modelspec-missing", "modelspec fields missing: " + ", ".join(missing), f"modelspec.{missing[0]}")


def _config_strings(part: Part, source: TensorSource) -> dict[str, str]:
    """A PEFT adapter config's fields as metadata-like strings, keyed by file:field."""
    if not part.config:
        return {}
    folder = Path(part.path).parent
    name = str((folder / "adapter_config.json").relative_to(source.path)) if Path(source.path).is_dir() else "adapter_config.json"
    return {f"{name}:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in part.config.items() if v is not None}


def _check_privacy(source: TensorSource, found: _Collector) -> None:
    for part in source.parts:
        for hit in privacy_hits({**part.metadata, **_config_strings(part, source)}):
            if hit.kind == "path":
                who = f", revealing the user name {hit.user!r}" if hit.user else ""
                more = f" (and {hit.count - 1} more)" if hit.count > 1 else ""
                found.add("privacy-path", f"{hit.key} holds an absolute path{who}: {hit.detail}{more}", hit.key)
            else:
                found.add("privacy-dataset-names", f"{hit.key} names {hit.count} dataset folder(s): {_short(hit.detail)}", hit.key)


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_interop(adapter: Adapter, found: _Collector) -> None:
    modules = list(adapter.modules.values())
    te = [m for m in modules if m.key.component.startswith("text_encoder")]
    missing = [m.source_name for m in te if _clip_without_text_model(m)]
    found.group("te-missing-text-model", "text-encoder module(s) lack the text_model. level "
                "(PEFT under transformers 4, diffusers and kohya-format tools match none)", missing)
    if adapter.format == "peft" and any(m.source_name.startswith("text_model.") for m in te):
        found.add("te-transformers5", "PEFT text-encoder adapter with text_model. paths: under transformers 5 "
                  "PeftModel loads none of its keys, silently (use transformers 4.x, or convert to kohya/diffusers)")
    if adapter.format == "kohya" and adapter.family in ("sdxl", "sdxl-refiner"):
        names = [m.source_name for m in modules]
        sgm = [n for n in names if SGM_UNET.match(n)]
        diff = [n for n in names if DIFFUSERS_UNET.match(n)]
        if sgm and diff:
            found.add("mixed-sdxl-names", f"{len(sgm)} UNet module(s) in SGM naming and {len(diff)} in diffusers naming: "
                      "diffusers' SDXL loader drops the SGM ones silently (convert to one naming)", sgm[0])
    types = {m.network_type for m in modules}
    if adapter.format == "kohya" and adapter.family in SD_FAMILIES and types - DIFFUSERS_LOADS:
        found.add("diffusers-unsupported", f"{', '.join(sorted(types - DIFFUSERS_LOADS))} modules: diffusers cannot load "
                  "this file (A1111, Forge and ComfyUI can)")
    if types & COMFYUI_MISSING:
        n = sum(m.network_type in COMFYUI_MISSING for m in modules)
        found.add("comfyui-unsupported", f"{n} IA3 module(s): ComfyUI does not load IA3 (A1111 does)")


# --------------------------------------------------------------------------------------
# The data pass
# --------------------------------------------------------------------------------------


def _check_data(
    source: TensorSource, adapter: Adapter, headers: dict[str, SafetensorsHeader], found: _Collector, report: ValidationReport
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


def _check_outliers(norms: dict[ModuleKey, float | None], adapter: Adapter, found: _Collector) -> None:
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


def _check_hashes(header: SafetensorsHeader, stats: DataStats, found: _Collector) -> None:
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


def codes_of(reports: Iterable[ValidationReport]) -> set[str]:
    """Every code the reports contain."""
    return {f.code for r in reports for f in r.findings}

"""``convert``: rewrite an adapter in another key format, losslessly, and prove it.

load → check every module fits the target (refuse before writing) → encode → stream to a
temp file/folder → re-read the output and compare every module's ΔW (scale included)
with the source → rename into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loratool import arch
from loratool.errors import ConversionError
from loratool.formats.decode import decode
from loratool.formats.encode import (
    DTYPES,
    ENCODERS,
    EncodeOptions,
    OutputFile,
    writes_directory,
)
from loratool.formats.family import metadata_contradictions
from loratool.io.sources import open_source
from loratool.io.writer import atomic_path, start_sync, write_json, write_safetensors
from loratool.model import Adapter, AdapterModule
from loratool.ops.output import by_reason, check_family, check_options, check_output, writable
from loratool.ops.verify import compare_adapters

CONVERTIBLE_FAMILIES = arch.FAMILIES


@dataclass
class ConvertResult:
    """What a conversion wrote and how closely the output matches the source."""

    source: str
    output: str
    target: str
    family: str
    modules: int
    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    max_abs_diff: float | None = None  # None when verification was skipped
    identical_modules: int = 0
    # Source metadata that named another base model than the one written, and what the
    # output holds instead: field -> "'old' (says F) replaced by 'new'" / "… dropped".
    metadata_changes: dict[str, str] = field(default_factory=dict)


def convert(
    src: str | os.PathLike[str],
    target: str,
    output: str | os.PathLike[str],
    *,
    family: str | None = None,
    dtype: str | None = None,
    verify: bool = True,
    skip_unsupported: bool = False,
    force: bool = False,
) -> ConvertResult:
    """Convert ``src`` to ``target`` format at ``output``; see module docstring."""
    check_options(target, dtype)
    out = check_output([src], output, target, force)
    source = open_source(src)
    try:
        adapter = decode(source, family=family)
        check_family(adapter, source, "convert")
        modules, skipped = _select(adapter, target, skip_unsupported)
        catalog = arch.get_catalog(adapter.family)
        contradicted = _drop_contradicting_metadata(adapter)
        plan = ENCODERS[target](adapter, modules, catalog, EncodeOptions(dtype=DTYPES.get(dtype or "")))
        result = ConvertResult(str(src), str(out), target, adapter.family, len(modules), [], skipped)
        result.metadata_changes = _describe_changes(contradicted, plan)
        with atomic_path(out, directory=writes_directory(target)) as tmp:
            for f in plan:
                dest = tmp / f.relpath if f.relpath else tmp
                dest.parent.mkdir(parents=True, exist_ok=True)
                write_safetensors(dest, f.tensors, f.metadata, hash_key=f.hash_key)
                if f.config is not None:
                    write_json(dest.parent / "adapter_config.json", f.config)
                result.files.append(str(out / f.relpath) if f.relpath else str(out))
            syncing = start_sync(tmp)  # flush to disk while the output is re-read
            try:
                if verify:
                    _verify(adapter, modules, tmp, result)
            finally:
                syncing.join()
    finally:
        source.close()
    return result


# The PEFT config field naming a base model (checked like the metadata fields).
BASE_MODEL_CONFIG_FIELD = "base_model_name_or_path"


def _drop_contradicting_metadata(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """Remove from the adapter (before encoding) every field naming another family than
    the one written: field -> (old value, the family it named). Encoders then write the
    written family's own values where their format has one."""
    dropped: dict[str, tuple[str, str]] = {}
    for key, named in metadata_contradictions(adapter.metadata, adapter.family).items():
        dropped[key] = (adapter.metadata.pop(key), named)
    config = adapter.config or {}
    base = config.get(BASE_MODEL_CONFIG_FIELD)
    if isinstance(base, str):
        for key, named in metadata_contradictions({BASE_MODEL_CONFIG_FIELD: base}, adapter.family).items():
            adapter.config = {**config, key: None}
            dropped[key] = (base, named)
    return dropped


def _describe_changes(dropped: dict[str, tuple[str, str]], plan: list[OutputFile]) -> dict[str, str]:
    written: dict[str, str] = {}
    for f in plan:
        written.update(f.metadata)
        written.update({k: v for k, v in (f.config or {}).items() if isinstance(v, str)})
    return {
        key: f"{old!r} (says {named}) " + (f"replaced by {written[key]!r}" if key in written else "dropped")
        for key, (old, named) in dropped.items()
    }


def _select(adapter: Adapter, target: str, skip: bool) -> tuple[list[AdapterModule], dict[str, str]]:
    """Modules the target can hold; the others (and unknown keys) refused unless ``skip``."""
    keep, refused = writable(adapter, adapter.modules.values(), target)
    if refused and not skip:
        raise ConversionError(
            adapter.path,
            f"{target} cannot hold {len(refused)} module(s)/key(s): {by_reason(refused)}; "
            "--skip-unsupported writes the rest",
        )
    if not keep:
        raise ConversionError(adapter.path, f"nothing left to write as {target}")
    return keep, refused


def _verify(adapter: Adapter, modules: list[AdapterModule], written: Path, result: ConvertResult) -> None:
    out_source = open_source(written)
    try:
        out = decode(out_source, family=adapter.family)
        report = compare_adapters(modules, out)
    finally:
        out_source.close()
    result.max_abs_diff = report.max_abs_diff
    result.identical_modules = report.identical
    if report.missing:
        raise ConversionError(result.output, f"verification failed: {len(report.missing)} module(s) missing from the output, e.g. {report.missing[0]}")
    if report.over_tolerance:
        raise ConversionError(
            result.output,
            f"verification failed: ΔW differs beyond rounding in {len(report.over_tolerance)} module(s), "
            f"e.g. {report.over_tolerance[0]}; nothing was written",
        )

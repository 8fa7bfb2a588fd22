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
from loratool.errors import ConversionError, UsageError
from loratool.formats.decode import decode
from loratool.formats.encode import (
    DTYPES,
    ENCODERS,
    TARGETS,
    EncodeOptions,
    OutputFile,
    peft_adapter_conflicts,
    unsupported_reason,
    writes_directory,
)
from loratool.formats.family import metadata_contradictions
from loratool.io.sources import TensorSource, open_source
from loratool.io.writer import atomic_path, start_sync, write_json, write_safetensors
from loratool.model import Adapter, AdapterModule
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
    if target not in TARGETS:
        raise UsageError(None, f"unknown target format {target!r}; choose from {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(None, f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    out = Path(output)
    _check_output(Path(src), out, force)
    if out.is_dir() and not writes_directory(target):
        raise UsageError(out, f"is a folder; {target} output is one file (give a file name)")
    source = open_source(src)
    try:
        adapter = decode(source, family=family)
        _check_family(adapter, source)
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


def _check_output(src: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if src.exists() and (out.resolve() == src.resolve() or _inside(src.resolve(), out.resolve()) or _inside(out.resolve(), src.resolve())):
            raise UsageError(out, "refusing to write onto the input")
        if not force:
            raise UsageError(out, "already exists (use --force to replace it)")
    elif src.exists() and _inside(out.resolve(), src.resolve()) and src.is_dir():
        raise UsageError(out, "refusing to write inside the input folder")


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def _check_family(adapter: Adapter, source: TensorSource) -> None:
    """Refuse an adapter of no convertible family; suggest ``--family`` only for the
    families whose catalog really holds every module (by name and shape)."""
    if adapter.family in CONVERTIBLE_FAMILIES:
        return
    if adapter.family != "unknown":
        raise ConversionError(
            adapter.path, f"convert supports {', '.join(CONVERTIBLE_FAMILIES)}; this adapter is {adapter.family}"
        )
    fits = [f for f in CONVERTIBLE_FAMILIES if _fits_catalog(source, f)]
    if len(fits) > 1:
        raise ConversionError(adapter.path, f"the base model is ambiguous: its modules fit {', '.join(fits)}; pass --family")
    if fits:
        raise ConversionError(
            adapter.path, f"cannot tell the base model family; its modules fit only the {fits[0]} catalog "
            f"(pass --family {fits[0]} if that is its base model)",
        )
    example = next(iter(adapter.modules.values())).source_name
    raise ConversionError(
        adapter.path, f"not an adapter for {', '.join(CONVERTIBLE_FAMILIES)}: its modules are in none of their "
        f"catalogs (e.g. {example!r})",
    )


def _fits_catalog(source: TensorSource, family: str) -> bool:
    adapter = decode(source, family=family)
    return not adapter.unknown_keys and all(m.resolved for m in adapter.modules.values())


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
    """Modules the target can hold, and why each other one (and each unknown key) cannot."""
    keep: list[AdapterModule] = []
    refused: dict[str, str] = {}
    for m in adapter.modules.values():
        reason = unsupported_reason(target, m)
        if reason is None and not m.resolved:  # every target: a kohya name too must be a real module's
            reason = f"no module of the {adapter.family} catalog has this name and shape, so it has no {target} name"
        if reason is None:
            keep.append(m)
        else:
            refused[m.source_name or str(m.key)] = reason
    if target == "peft":
        conflicts = peft_adapter_conflicts(keep)
        keep = [m for m in keep if (m.source_name or str(m.key)) not in conflicts]
        refused.update(conflicts)
    for key in adapter.unknown_keys:
        refused.setdefault(key, "unrecognised key")
    if refused and not skip:
        raise ConversionError(
            adapter.path,
            f"{target} cannot hold {len(refused)} module(s)/key(s): {_by_reason(refused)}; "
            "--skip-unsupported writes the rest",
        )
    if not keep:
        raise ConversionError(adapter.path, f"nothing left to write as {target}")
    return keep, refused


def _by_reason(refused: dict[str, str]) -> str:
    """'reason (N: name, name, …)' per distinct reason."""
    groups: dict[str, list[str]] = {}
    for name, why in refused.items():
        groups.setdefault(why, []).append(name)
    return "; ".join(
        f"{why} ({len(names)}: {', '.join(names[:2])}{', …' if len(names) > 2 else ''})" for why, names in groups.items()
    )


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

"""``convert``: rewrite an adapter in another key format, losslessly, and prove it.

load → check every module fits the target (refuse before writing) → encode → stream to a
temp file/folder → re-read the output and compare every module's ΔW (scale included)
with the source → rename into place.

Nothing non-finite is written: modules whose alpha is NaN/Inf are invalid at decode and
refused by name; modules whose source tensors or ΔW hold NaN/Inf are found by the
verification (which reads every tensor) and refused by name too — with
``--skip-unsupported`` the output is written again without them. ``--no-verify`` copies
tensors unchecked.
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
    folds_alpha,
    peft_adapter_conflicts,
    unsupported_reason,
    writes_directory,
)
from loratool.io.sources import open_source
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
    folded_modules: int = 0  # diffusers: modules whose alpha/rank went into the factors
    bounded_modules: int = 0  # modules whose difference is a rigorous bound from their factors


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
    keep_factors: bool = False,
) -> ConvertResult:
    """Convert ``src`` to ``target`` format at ``output``; see module docstring.

    ``keep_factors`` (diffusers): write the factors bit-identical with alpha only in
    ``lora_adapter_metadata``, instead of folding alpha/rank into them."""
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
        _check_family(adapter)
        modules, skipped = _select(adapter, target, skip_unsupported)
        opts = EncodeOptions(dtype=DTYPES.get(dtype or ""), keep_factors=keep_factors)
        try:
            return _write(adapter, modules, skipped, target, out, opts, verify, src)
        except _NonFiniteSource as exc:
            refused = {name: "invalid: NaN/Inf in its tensors or ΔW" for name in exc.names}
            if not skip_unsupported:
                shown = ", ".join(exc.names[:3]) + (", …" if len(exc.names) > 3 else "")
                raise ConversionError(
                    adapter.path,
                    f"{len(refused)} module(s) hold NaN/Inf in their tensors or ΔW: {shown}; "
                    "--skip-unsupported writes the rest",
                ) from None
            modules = [m for m in modules if (m.source_name or str(m.key)) not in refused]
            if not modules:
                raise ConversionError(adapter.path, f"nothing left to write as {target}") from None
            return _write(adapter, modules, {**skipped, **refused}, target, out, opts, verify, src)
    finally:
        source.close()


class _NonFiniteSource(Exception):
    """Source modules whose tensors or ΔW hold NaN/Inf (found while verifying)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def _write(
    adapter: Adapter, modules: list[AdapterModule], skipped: dict[str, str], target: str, out: Path,
    opts: EncodeOptions, verify: bool, src: str | os.PathLike[str],
) -> ConvertResult:
    """Encode, stream to a temp file/folder, verify, rename into place."""
    catalog = arch.get_catalog(adapter.family)
    plan = ENCODERS[target](adapter, modules, catalog, opts)
    result = ConvertResult(str(src), str(out), target, adapter.family, len(modules), [], skipped)
    result.folded_modules = sum(folds_alpha(target, m, opts) for m in modules)
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


def _check_family(adapter: Adapter) -> None:
    if adapter.family in CONVERTIBLE_FAMILIES:
        return
    fits = next((e.removeprefix("ambiguous: fits ") for e in adapter.family_evidence if e.startswith("ambiguous: fits ")), None)
    if fits:
        raise ConversionError(adapter.path, f"the base model is ambiguous: fits {fits}; pass --family")
    if adapter.family == "unknown":
        raise ConversionError(adapter.path, "cannot tell the base model family; pass --family")
    raise ConversionError(
        adapter.path, f"convert supports {', '.join(CONVERTIBLE_FAMILIES)}; this adapter is {adapter.family}"
    )


def _select(adapter: Adapter, target: str, skip: bool) -> tuple[list[AdapterModule], dict[str, str]]:
    """Modules the target can hold, and why each other one (and each unknown key) cannot."""
    keep: list[AdapterModule] = []
    refused: dict[str, str] = {}
    for m in adapter.modules.values():
        reason = unsupported_reason(target, m)
        if reason is None and not m.resolved and target != "kohya":
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
    # Modules whose values cannot be used (shapes, dtypes, NaN/Inf or out-of-range alpha).
    for name, why in adapter.invalid_modules.items():
        refused.setdefault(name, f"invalid: {why}")
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
    if report.nonfinite_source:
        raise _NonFiniteSource(report.nonfinite_source)
    result.max_abs_diff = report.max_abs_diff
    result.identical_modules = report.identical
    result.bounded_modules = report.bounded
    if report.failures:
        raise ConversionError(
            result.output,
            f"verification failed in {len(report.failures)} module(s), e.g. {report.failures[0]}; nothing was written",
        )
    if report.missing:
        raise ConversionError(result.output, f"verification failed: {len(report.missing)} module(s) missing from the output, e.g. {report.missing[0]}")
    if report.over_tolerance:
        raise ConversionError(
            result.output,
            f"verification failed: ΔW differs beyond rounding in {len(report.over_tolerance)} module(s), "
            f"e.g. {report.over_tolerance[0]}; nothing was written",
        )

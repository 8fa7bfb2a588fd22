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
from loratool.errors import ConversionError
from loratool.formats.decode import decode
from loratool.formats.encode import DTYPES, EncodeOptions, OutputFile, folds_alpha
from loratool.formats.family import metadata_contradictions
from loratool.io.sources import open_source
from loratool.model import Adapter, AdapterModule
from loratool.ops.output import (
    by_reason,
    check_family,
    check_options,
    check_output,
    encode_plan,
    writable,
    write_plan,
)
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
    keep_factors: bool = False,
) -> ConvertResult:
    """Convert ``src`` to ``target`` format at ``output``; see module docstring.

    ``keep_factors`` (diffusers): write the factors bit-identical with alpha only in
    ``lora_adapter_metadata``, instead of folding alpha/rank into them."""
    check_options(target, dtype)
    out = check_output([src], output, target, force)
    source = open_source(src)
    try:
        adapter = decode(source, family=family)
        check_family(adapter, source, "convert")
        modules, skipped = _select(adapter, target, skip_unsupported)
        opts = EncodeOptions(dtype=DTYPES.get(dtype or ""), keep_factors=keep_factors)
        contradicted = _drop_contradicting_metadata(adapter)
        try:
            return _write(adapter, modules, skipped, target, out, opts, verify, src, contradicted)
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
            return _write(adapter, modules, {**skipped, **refused}, target, out, opts, verify, src, contradicted)
    finally:
        source.close()


class _NonFiniteSource(Exception):
    """Source modules whose tensors or ΔW hold NaN/Inf (found while verifying)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def _write(
    adapter: Adapter, modules: list[AdapterModule], skipped: dict[str, str], target: str, out: Path,
    opts: EncodeOptions, verify: bool, src: str | os.PathLike[str], contradicted: dict[str, tuple[str, str]],
) -> ConvertResult:
    """Encode, stream to a temp file/folder, verify, rename into place (:mod:`loratool.ops.output`)."""
    plan = encode_plan(adapter, modules, target, opts)
    result = ConvertResult(str(src), str(out), target, adapter.family, len(modules), [], skipped)
    result.folded_modules = sum(folds_alpha(target, m, opts) for m in modules)
    result.metadata_changes = _describe_changes(contradicted, plan)
    check = (lambda tmp: _verify(adapter, modules, tmp, result)) if verify else None
    result.files = write_plan(plan, target, out, verify=check)
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

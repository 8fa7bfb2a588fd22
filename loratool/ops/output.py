"""Writing an adapter, shared by the operations that write one (convert, resize,
merge-loras, extract): output-path and family checks, what a target format can hold
(modules decode found invalid are refused by name here, for every writer), and
encode → atomic write → verify → rename (:func:`write_adapter`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
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
from loratool.io.sources import TensorSource
from loratool.io.writer import atomic_path, start_sync, write_json, write_safetensors
from loratool.model import Adapter, AdapterModule

WRITABLE_FAMILIES = arch.FAMILIES


def check_options(target: str, dtype: str | None) -> None:
    """Usage errors for an unknown target format or dtype."""
    if target not in TARGETS:
        raise UsageError(None, f"unknown target format {target!r}; choose from {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(None, f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def check_output(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], target: str, force: bool) -> Path:
    """The output path, refused when it is (or lies inside, or holds) an input, exists
    without ``force``, or is a folder where the target writes one file."""
    out = Path(output)
    refuse_onto_inputs(inputs, out)
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(out, "already exists (use --force to replace it)")
    if out.is_dir() and not writes_directory(target):
        raise UsageError(out, f"is a folder; {target} output is one file (give a file name)")
    return out


def refuse_onto_inputs(inputs: Iterable[str | os.PathLike[str]], out: Path) -> None:
    """Refuse an output that is an input (symlinks resolved, hard links by inode), lies
    inside an input folder or holds an input: replacing it would destroy what is read."""
    target = out.resolve()
    for src in map(Path, inputs):
        if not src.exists():
            continue
        real = src.resolve()
        if real in target.parents:
            raise UsageError(out, f"refusing to write inside the input folder ({src})")
        if real == target or target in real.parents or _same_file(src, out):
            raise UsageError(out, f"refusing to write onto the input ({src})")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_family(adapter: Adapter, source: TensorSource, what: str = "loratool") -> None:
    """Refuse an adapter of no writable family; suggest ``--family`` only for the
    families whose catalog really holds every module (by name and shape)."""
    if adapter.family in WRITABLE_FAMILIES:
        return
    if adapter.family != "unknown":
        raise ConversionError(
            adapter.path, f"{what} supports {', '.join(WRITABLE_FAMILIES)}; this adapter is {adapter.family}"
        )
    fits = [f for f in WRITABLE_FAMILIES if _fits_catalog(source, f)]
    if len(fits) > 1:
        raise ConversionError(adapter.path, f"the base model is ambiguous: its modules fit {', '.join(fits)}; pass --family")
    if fits:
        raise ConversionError(
            adapter.path, f"cannot tell the base model family; its modules fit only the {fits[0]} catalog "
            f"(pass --family {fits[0]} if that is its base model)",
        )
    names = [m.source_name for m in adapter.modules.values()] or [*adapter.invalid_modules, *adapter.unknown_keys]
    raise ConversionError(
        adapter.path, f"not an adapter for {', '.join(WRITABLE_FAMILIES)}: its modules are in none of their "
        "catalogs" + (f" (e.g. {names[0]!r})" if names else ""),
    )


def _fits_catalog(source: TensorSource, family: str) -> bool:
    adapter = decode(source, family=family)
    return not adapter.unknown_keys and all(m.resolved for m in adapter.modules.values())


def writable(adapter: Adapter, modules: Iterable[AdapterModule], target: str) -> tuple[list[AdapterModule], dict[str, str]]:
    """The modules ``target`` can hold, and why each other one (and each unknown key and
    invalid module of ``adapter``) cannot."""
    keep: list[AdapterModule] = []
    refused: dict[str, str] = {}
    for m in modules:
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
    for name, why in adapter.invalid_modules.items():  # shapes, dtypes, NaN/Inf or out-of-range alpha
        refused.setdefault(name, f"invalid: {why}")
    return keep, refused


def by_reason(refused: dict[str, str]) -> str:
    """'reason (N: name, name, …)' per distinct reason."""
    groups: dict[str, list[str]] = {}
    for name, why in refused.items():
        groups.setdefault(why, []).append(name)
    return "; ".join(
        f"{why} ({len(names)}: {', '.join(names[:2])}{', …' if len(names) > 2 else ''})" for why, names in groups.items()
    )


def write_adapter(
    adapter: Adapter,
    modules: list[AdapterModule],
    target: str,
    output: Path,
    *,
    dtype: str | None = None,
    extra_metadata: dict[str, str] | None = None,
    verify: Callable[[Path], None] | None = None,
) -> list[str]:
    """Encode ``modules`` as ``target`` and write them atomically at ``output``.

    ``verify(tmp)`` runs on the complete temp output (flushed to disk meanwhile); if it
    raises, nothing appears under ``output``. Returns the written file paths."""
    opts = EncodeOptions(dtype=DTYPES.get(dtype or ""), extra_metadata=dict(extra_metadata or {}))
    return write_plan(encode_plan(adapter, modules, target, opts), target, output, verify=verify)


def encode_plan(adapter: Adapter, modules: list[AdapterModule], target: str, opts: EncodeOptions) -> list[OutputFile]:
    """The files ``target`` writes for ``modules`` (nothing is read or written yet)."""
    return ENCODERS[target](adapter, modules, arch.get_catalog(adapter.family), opts)


def write_plan(
    plan: list[OutputFile], target: str, output: Path, *, verify: Callable[[Path], None] | None = None
) -> list[str]:
    """Stream ``plan`` to a temp file/folder beside ``output``, run ``verify(tmp)`` while it
    is flushed to disk, and rename it into place. Returns the written file paths."""
    files: list[str] = []
    with atomic_path(output, directory=writes_directory(target)) as tmp:
        for f in plan:
            dest = tmp / f.relpath if f.relpath else tmp
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(dest, f.tensors, f.metadata, hash_key=f.hash_key)
            if f.config is not None:
                write_json(dest.parent / "adapter_config.json", f.config)
            files.append(str(output / f.relpath) if f.relpath else str(output))
        syncing = start_sync(tmp)  # flush to disk while the output is re-read
        try:
            if verify is not None:
                verify(tmp)
        finally:
            syncing.join()
    return files


def check_rank_options(rank: int | None, dynamic: str | None, threshold: float | None) -> None:
    """``--rank N``, or ``--dynamic METHOD`` with ``--threshold``: one of the two, valid."""
    from loratool.lowrank.rank import check_threshold

    if rank is not None and rank < 1:
        raise UsageError(None, f"--rank must be ≥ 1, got {rank}")
    if dynamic is None:
        if rank is None:
            raise UsageError(None, "give --rank N, or --dynamic ratio|fro|cumulative with --threshold")
        if threshold is not None:
            raise UsageError(None, "--threshold goes with --dynamic")
        return
    if threshold is None:
        raise UsageError(None, f"--dynamic {dynamic} needs --threshold")
    try:
        check_threshold(dynamic, threshold)
    except ValueError as exc:
        raise UsageError(None, str(exc)) from None

"""``inspect``: everything worth knowing about a LoRA, from its header alone.

:func:`load` returns the normalised :class:`~loratool.model.Adapter`; :func:`inspect`
summarises it as an :class:`InspectReport` whose :meth:`~InspectReport.to_json` field
names are a public contract (documented in the README). No torch is imported here.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loratool.errors import InputError, LoraToolError
from loratool.formats.decode import decode
from loratool.io.sources import open_source
from loratool.library.walk import ERROR, WalkEntry, walk
from loratool.model import Adapter

# Flattened-name suffix -> target label, for modules no catalog resolved (first match wins).
TARGET_SUFFIXES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(attn\d?)_(to_q|to_k|to_v)$"), r"\1.\2"),
    (re.compile(r"(attn\d?)_to_out(_0)?$"), r"\1.to_out.0"),
    (re.compile(r"(attn)_(add_[qkv]_proj|to_add_out)$"), r"\1.\2"),
    (re.compile(r"ff(_context)?_net_0_proj$"), r"ff\1.net.0.proj"),
    (re.compile(r"ff(_context)?_net_2$"), r"ff\1.net.2"),
    (re.compile(r"self_attn_(q|k|v|out)_proj$"), r"\1_proj"),
    (re.compile(r"mlp_(fc1|fc2)$"), r"mlp.\1"),
    (re.compile(r"(proj_in|proj_out|conv1|conv2|time_emb_proj|conv_shortcut|conv_in|conv_out|proj_mlp|text_projection)$"), r"\1"),
    (re.compile(r"in_layers_2$"), "conv1"),
    (re.compile(r"out_layers_3$"), "conv2"),
    (re.compile(r"emb_layers_1$"), "time_emb_proj"),
    (re.compile(r"skip_connection$"), "conv_shortcut"),
    (re.compile(r"(downsamplers_0_conv|_op)$"), "downsamplers.conv"),
    (re.compile(r"upsamplers_0_conv$|output_blocks_\d+_[12]_conv$"), "upsamplers.conv"),
]


# What A1111 and ComfyUI load (read from their code; README "Which format for which loader"):
# both take kohya-named keys and the per-module ``.alpha`` tensor, never safetensors metadata
# or adapter_config.json; A1111 matches no dotted diffusers key of a UNet family; ComfyUI maps
# diffusers UNet attention projections only in the attention-processor spelling.
UNET_FAMILIES = frozenset({"sd1", "sd2", "sdxl", "sdxl-refiner"})
ATTENTION_PROJECTION = re.compile(r"\.attn\d\.(to_q|to_k|to_v|to_out\.0)$")
# Key styles ComfyUI does not map for those modules: UNet attention in D1/D2 spelling, and
# the old processor spelling of text-encoder attention.
COMFY_UNMAPPED_UNET_ATTENTION = frozenset({"peft", "peft-bias", "peft-dora", "diffusers-lora"})
COMFY_UNMAPPED_TE = frozenset({"diffusers-attnproc-te"})
TO_KOHYA = "for A1111/ComfyUI, convert --to kohya (alpha tensors and kohya keys, which both read)"


def load(path: str | os.PathLike[str], family: str | None = None) -> Adapter:
    """Read a LoRA file or folder (any supported format) into a normalised Adapter.

    The adapter keeps its source open for lazy tensor reads: close it (``adapter.close()``
    or ``with load(p) as adapter:``) when done."""
    source = open_source(path)
    try:
        adapter = decode(source, family=family)
    except BaseException:
        source.close()
        raise
    adapter.attach(source.close)
    return adapter


@dataclass
class InspectReport:
    """What ``loratool inspect`` shows for one path."""

    path: str
    format: str
    variant: str
    family: str
    family_evidence: list[str]
    network_types: list[str]
    components: dict[str, int]
    modules: int
    rank: dict[str, int | None]
    alpha: dict[str, float | None]
    targets: dict[str, int]
    dtypes: list[str]
    metadata: dict[str, str]
    complete: bool
    warnings: list[str]
    hashes: dict[str, Any] | None = None
    keys: list[str] | None = None
    unknown_keys: list[str] = field(default_factory=list)
    invalid_modules: dict[str, str] = field(default_factory=dict)
    loader_notes: list[str] = field(default_factory=list)
    # What is wrong with a file that could still be described (a truncated download):
    # the CLI prints it as an error line and exits 1. Not part of the JSON.
    error: LoraToolError | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The public JSON shape (optional ``hashes``/``keys`` only when asked for)."""
        out: dict[str, Any] = {
            "path": self.path, "format": self.format, "variant": self.variant,
            "family": self.family, "family_evidence": self.family_evidence,
            "network_types": self.network_types, "components": self.components,
            "modules": self.modules, "rank": self.rank, "alpha": self.alpha,
            "targets": self.targets, "dtypes": self.dtypes, "metadata": self.metadata,
            "complete": self.complete, "warnings": self.warnings,
            "unknown_keys": self.unknown_keys, "invalid_modules": self.invalid_modules,
            "loader_notes": self.loader_notes,
        }
        if self.hashes is not None:
            out["hashes"] = self.hashes
        if self.keys is not None:
            out["keys"] = self.keys
        return out


def target_label(module_name: str) -> str:
    """A short target kind for a module name (flattened or dotted) no catalog resolved."""
    flat = module_name.replace(".", "_")
    for pattern, label in TARGET_SUFFIXES:
        m = pattern.search(flat)
        if m:
            return m.expand(label)
    return module_name.rsplit(".", 1)[-1].rsplit("_", 1)[-1]


def summarize(adapter: Adapter) -> InspectReport:
    """Summarise a loaded adapter (no tensor data is read)."""
    mods = list(adapter.modules.values())
    ranked = [(m, r) for m in mods if (r := m.rank) is not None]
    ranks = [r for _, r in ranked]
    alphas = [m.alpha if m.alpha is not None else float(r) for m, r in ranked if not m.extra.get("alpha_unknown")]
    types = {m.network_type for m in mods} | ({"dora"} if any(m.dora for m in mods) else set())
    targets = Counter(m.extra.get("target") or target_label(m.source_name) for m in mods)
    dtypes = sorted({ref.dtype for m in mods for ref in m.params.values()} | {m.extra["alpha_dtype"] for m in mods if "alpha_dtype" in m.extra})
    return InspectReport(
        path=adapter.path, format=adapter.format, variant=adapter.variant, family=adapter.family,
        family_evidence=adapter.family_evidence, network_types=sorted(types),
        components=dict(sorted(Counter(m.key.component for m in mods).items())),
        modules=len(mods),
        rank={"min": min(ranks, default=None), "max": max(ranks, default=None)},
        alpha={"min": min(alphas, default=None), "max": max(alphas, default=None)},
        targets=dict(sorted(targets.items())), dtypes=dtypes, metadata=adapter.metadata,
        complete=adapter.complete, warnings=adapter.warnings, unknown_keys=adapter.unknown_keys,
        invalid_modules=dict(adapter.invalid_modules), loader_notes=loader_notes(adapter),
    )


def loader_notes(adapter: Adapter) -> list[str]:
    """Where A1111/ComfyUI would not apply this adapter as diffusers/PEFT do: a strength set
    by metadata they never read, keys they do not load."""
    if adapter.format == "peft":
        return ["a PEFT adapter folder: A1111 and ComfyUI load neither its keys nor the alpha in its adapter_config.json", TO_KOHYA]
    if adapter.format != "diffusers":
        return []
    notes = []
    mods = list(adapter.modules.values())
    by_metadata = [m for m in mods if m.extra.get("alpha_source") == "lora_adapter_metadata" and m.scale != 1.0]
    if by_metadata:
        scales = sorted({m.scale for m in by_metadata})
        shown = f"{scales[0]:g}" if len(scales) == 1 else f"{scales[0]:g}–{scales[-1]:g}"
        notes.append(
            f"the strength of {len(by_metadata)} module(s) is set by lora_adapter_metadata (alpha/rank = {shown}), "
            "which A1111 and ComfyUI never read: ComfyUI applies them at alpha/rank = 1"
        )
    if adapter.family in UNET_FAMILIES:
        notes.append("A1111 loads kohya-named keys only, none of this file's")
        unmapped = [m for m in mods if _comfy_skips(m)]
        if unmapped:
            notes.append(
                f"ComfyUI does not load {len(unmapped)} of {len(mods)} module(s) (diffusers-spelt UNet attention "
                f"projections such as {unmapped[0].key.path}, or old processor-style text-encoder keys)"
            )
    return [*notes, TO_KOHYA] if notes else []


def _comfy_skips(m: Any) -> bool:
    styles = set(m.extra.get("styles", ()))
    if m.key.component == "unet" and ATTENTION_PROJECTION.search(m.key.path):
        return bool(styles & COMFY_UNMAPPED_UNET_ATTENTION)
    return bool(styles & COMFY_UNMAPPED_TE)


def inspect(
    path: str | os.PathLike[str], *, hashes: bool = False, keys: bool = False, family: str | None = None
) -> InspectReport:
    """Inspect one LoRA file or folder; ``hashes`` adds sha256/AutoV1/V2/V3 (streamed).

    A safetensors file cut short after its header is still described from the header
    (``complete`` false, a warning), with ``report.error`` saying it is truncated."""
    source = open_source(path, allow_truncated=True)
    try:
        adapter = decode(source, family=family)
        report = summarize(adapter)
        if keys:
            report.keys = sorted(k for part in source.parts for k in part.tensors)
    finally:
        source.close()
    if hashes:
        report.hashes = _hashes(source)
    cut = source.truncated
    if cut is not None:
        report.error = InputError(cut.path, str(cut.truncated))
    return report


@dataclass
class SurveyItem:
    """One entry of a walk, with its report (adapters) and/or what went wrong."""

    entry: WalkEntry
    report: InspectReport | None = None
    error: Exception | None = None  # a LoraToolError, or a bug (any other exception)


def survey(
    paths: Iterable[str | os.PathLike[str]], *, hashes: bool = False, keys: bool = False, family: str | None = None
) -> Iterator[SurveyItem]:
    """Inspect everything under ``paths`` (folders walked recursively, see
    :func:`loratool.library.walk`), one item per entry as it is reached: adapters with
    their report or error, and the entries that were not adapters with why."""
    for entry in walk(paths):
        if entry.is_adapter:
            try:
                report = inspect(entry.path, hashes=hashes, keys=keys, family=family)
            except Exception as err:  # a bug too is this entry's alone: the survey goes on
                yield SurveyItem(entry, error=err)
                continue
            yield SurveyItem(entry, report=report, error=report.error)
        elif entry.kind == ERROR:
            yield SurveyItem(entry, error=InputError(entry.path, entry.reason))
        else:
            yield SurveyItem(entry)


def _hashes(source: Any) -> dict[str, Any]:
    """The weights file's hashes; for a per-component folder, one entry per weights file."""
    from loratool.io.hashing import compute_hashes

    if len(source.parts) == 1:
        return compute_hashes(source.parts[0].path).as_dict()
    return {
        os.path.relpath(p.path, source.path): compute_hashes(p.path).as_dict() for p in source.parts
    }

"""``check``: will these LoRAs merge into (or load on) this checkpoint? From headers alone.

For each LoRA: its family against the checkpoint's (another family is one line), every
module placed on the checkpoint weight that holds it or listed with the reason it has
none, the dtypes involved, and what the ecosystem's loaders would do to it silently.
:meth:`CheckReport.to_json` is a public contract (README). Reads no tensor data of the
checkpoint and none of the LoRA except its alpha scalars; never imports torch for
safetensors inputs.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loratool.checkpoint import Checkpoint, open_checkpoint
from loratool.errors import InputError, LoraToolError
from loratool.model import Adapter
from loratool.ops.findings import Collector
from loratool.ops.fit import Fit, fit, load_for
from loratool.ops.validate_checks import check_interop

# Traps ``validate`` does not name (it checks a LoRA alone; these concern loaders too):
# (condition on the adapter, what the ecosystem does with it silently). FORMATS.md §3.1, §5.3.
Trap = tuple[Callable[[Adapter], bool], str]
TRAPS: tuple[Trap, ...] = (
    (
        lambda a: any(m.dora for m in a.modules.values()) and a.format != "peft",
        "dora-dropped: diffusers' loaders drop dora_scale with a log line (the LoRA then loads as plain LoRA); "
        "A1111 normalises per input column whatever the file's axis",
    ),
    (
        lambda a: a.family == "sdxl" and any(m.source_name == "lora_unet_up_blocks_0_upsamplers_0_conv" for m in a.modules.values()),
        "a1111-sdxl-upsampler: A1111 maps the diffusers-named lora_unet_up_blocks_0_upsamplers_0_conv to "
        "output_blocks_2_1_conv, which SDXL does not have, and skips it",
    ),
)
FP8 = ("F8_E4M3", "F8_E5M2")


@dataclass
class LoraCheck:
    """One LoRA against the checkpoint."""

    path: str
    format: str
    family: str
    verdict: str  # fits | partial | no-match | wrong-family
    message: str
    placed: dict[str, int]
    unplaced: dict[str, str]
    lora_dtypes: list[str]
    checkpoint_dtypes: list[str]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.verdict == "fits"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path, "format": self.format, "family": self.family, "fits": self.fits,
            "verdict": self.verdict, "message": self.message, "placed": self.placed,
            "unplaced": self.unplaced, "lora_dtypes": self.lora_dtypes,
            "checkpoint_dtypes": self.checkpoint_dtypes, "notes": self.notes, "warnings": self.warnings,
        }


@dataclass
class CheckReport:
    """``check``'s answer: the checkpoint, each LoRA's fit, and the LoRAs that could not be read."""

    checkpoint: dict[str, Any]
    loras: list[LoraCheck]
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.errors and all(x.fits for x in self.loras)

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "loras": [x.to_json() for x in self.loras],
            "errors": self.errors,
            "fits": self.fits,
        }


def check(loras: Sequence[str | os.PathLike[str]], base: str | os.PathLike[str] | Checkpoint) -> CheckReport:
    """Check each LoRA against the checkpoint ``base`` (a path, or an open Checkpoint).

    A checkpoint that cannot be read raises; a LoRA that cannot be read is listed in
    ``errors`` and the others are still checked."""
    ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    try:
        if not ckpt.supported:
            raise InputError(ckpt.path, f"is {ckpt.family}; loratool can check LoRAs against sd1, sd2, sdxl and sdxl-refiner checkpoints")
        report = CheckReport(summarize_checkpoint(ckpt), [])
        for path in loras:
            try:
                adapter, same = load_for(path, ckpt)
            except LoraToolError as err:
                report.errors.append({"path": str(path), "error": err.message})
                continue
            with adapter:
                report.loras.append(_lora_check(fit(adapter, ckpt, same), ckpt))
        return report
    finally:
        if ckpt is not base:
            ckpt.close()


def summarize_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint part of the JSON contract."""
    res = ckpt.resolution
    components: dict[str, Any] = {}
    catalog = ckpt.catalog
    for c in ckpt.components:
        tensors = ckpt.component_tensors(c)
        components[c] = {
            "tensors": len(tensors),
            "modules": sum(1 for k in res.refs if k[0] == c),
            "catalog_modules": len(catalog.of(c)) if catalog is not None else 0,
            "dtypes": sorted({t.dtype for t in tensors}),
        }
    return {
        "path": ckpt.path, "layout": ckpt.layout, "family": ckpt.family,
        "family_evidence": ckpt.family_evidence, "components": components,
        "tensors": sum(len(ckpt.file_tensors(f)) for f in ckpt.files), "warnings": ckpt.warnings,
    }


def _lora_check(f: Fit, ckpt: Checkpoint) -> LoraCheck:
    a = f.adapter
    lora_dtypes = sorted({ref.dtype for m in a.modules.values() for ref in m.params.values()})
    touched = sorted({p.ref.tensor.dtype for p in f.placed})
    if not f.family_ok:
        verdict = "wrong-family"
    elif f.fits:
        verdict = "fits"
    else:
        verdict = "partial" if f.placed else "no-match"
    notes = []
    if f.placed and lora_dtypes != touched:
        notes.append(
            f"LoRA tensors {'/'.join(lora_dtypes)}, checkpoint weights {'/'.join(touched)}: "
            "merge computes ΔW and the sum in fp32 and casts once to each weight's dtype"
        )
    if set(touched) & set(FP8):
        notes.append("fp8 checkpoint weights: a merged change is rounded to fp8 (merge --dtype fp16/bf16 keeps it)")
    return LoraCheck(
        path=a.path, format=a.format, family=a.family, verdict=verdict, message=f.message,
        placed=dict(sorted(Counter(p.module.key.component for p in f.placed).items())),
        unplaced=f.unplaced, lora_dtypes=lora_dtypes, checkpoint_dtypes=touched, notes=notes,
        warnings=[*a.warnings, *(_traps(a) if f.family_ok else [])],
    )


def _traps(adapter: Adapter) -> list[str]:
    """What loaders do to this LoRA silently: validate's interop findings (``code: message``)
    and the loader traps above."""
    found = Collector()
    check_interop(adapter, found)
    return [f"{x.code}: {x.message}" for x in found.findings()] + [msg for cond, msg in TRAPS if cond(adapter)]

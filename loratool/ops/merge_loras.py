"""``merge-loras``: several LoRAs into one, each with its own weight, and prove it.

For every module, the target is ``Σ wᵢ · ΔWᵢ`` (each ΔW with its own scale; modules
present in only some inputs merge what is there):

* ``concat`` (exact): the ranks are stacked, ``up = [u₁ u₂ …]``, ``down = [d₁; d₂; …]``,
  each pair carrying its ``wᵢ·scaleᵢ`` (√|·| on each side, the sign on up, so negative
  weights stay exact and fp16 keeps precision), and alpha = the new rank (scale 1). kohya's
  ``--concat`` keeps the first alpha while the rank grows, which squares every ratio
  (PEERS-kohya.md §2); here the result is the weighted sum, to rounding. Needs LoRA/LoCon
  factors (Tucker cores are folded into down, exactly).
* ``svd``: the sum is re-factored to ``rank`` — the best rank-k approximation (Eckart–
  Young). When every input of a module is LoRA/LoCon, by QR of the stacked factors and an
  SVD of the small core (never the full ΔW); otherwise LoHa/LoKr/full ΔW are formed
  (:func:`loratool.networks.delta_weight`), summed and truncated by a randomized SVD.
  alpha = rank; factors split √S.
* Refused by name (``skip_unsupported`` leaves the module out): DoRA, IA3, OFT, BOFT and
  GLoRA (their effect depends on the base weight, so it cannot be summed into a LoRA),
  norm modules, bias diffs; in ``concat`` mode also LoHa/LoKr/full (no factors to stack).
* Inputs may mix formats (kohya, diffusers, PEFT) and ranks; they must be of one family.
* Verification: the output is re-read and each module's ‖Σ wᵢΔWᵢ − ΔW_out‖_F must be 0
  (concat) or the discarded part of the spectrum (svd), within rounding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import ConversionError, UsageError
from loratool.formats.decode import decode
from loratool.io.sources import TensorSource, open_source
from loratool.model import Adapter, AdapterModule, ModuleKey
from loratool.ops.factored import (
    Check,
    Layout,
    LazyTensors,
    Term,
    layout,
    lora_module,
    no_matrix_reason,
    shape_factors,
    target_bias,
    target_dense,
    target_factors,
    verify_written,
)
from loratool.ops.output import (
    by_reason,
    check_family,
    check_options,
    check_output,
    writable,
    write_adapter,
)

if TYPE_CHECKING:
    from torch import Tensor

MODES = ("concat", "svd")
MERGE_METADATA_KEY = "loratool.merge_loras"


@dataclass
class MergeInput:
    path: str
    weight: float
    format: str
    family: str
    modules: int


@dataclass
class MergedModule:
    """One output module: how many inputs it sums, and what the re-factoring kept."""

    name: str
    sources: int
    network_types: list[str]
    rank_out: int
    alpha_out: float
    retained: float = 1.0  # ‖ΔW_out‖_F / ‖Σ wᵢΔWᵢ‖_F (svd mode)
    error: float = 0.0  # ‖Σ wᵢΔWᵢ − ΔW_out‖_F / ‖Σ wᵢΔWᵢ‖_F


@dataclass
class MergeLorasResult:
    inputs: list[MergeInput]
    output: str
    target: str
    family: str
    mode: str
    rank: int | None
    files: list[str] = field(default_factory=list)
    modules: list[MergedModule] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    max_deviation: float | None = None  # None when not verified

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [asdict(i) for i in self.inputs], "output": self.output, "target": self.target,
            "family": self.family, "mode": self.mode, "rank": self.rank, "files": self.files,
            "modules": [asdict(m) for m in self.modules], "refused": self.refused,
            "verified": self.max_deviation is not None, "max_deviation": self.max_deviation,
        }


def parse_input(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` → (path, weight); a suffix that is not a number is part of the path."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def merge_loras(
    inputs: Sequence[str | os.PathLike[str] | tuple[str | os.PathLike[str], float]],
    output: str | os.PathLike[str],
    *,
    mode: str = "concat",
    rank: int | None = None,
    target: str = "kohya",
    dtype: str | None = None,
    family: str | None = None,
    skip_unsupported: bool = False,
    force: bool = False,
    verify: bool = True,
    device: str | None = None,
) -> MergeLorasResult:
    """Merge ``inputs`` (``"PATH[:W]"`` strings, paths, or ``(path, weight)``) into one adapter at
    ``output``; see the module docstring. ``dtype`` defaults to the inputs' own when they
    agree, else fp32."""
    pairs = [_input(i) for i in inputs]
    _check_options(pairs, mode, rank)
    check_options(target, dtype)
    out = check_output([p for p, _ in pairs], output, target, force)
    sources: list[TensorSource] = []
    try:
        adapters = []
        for path, _ in pairs:
            sources.append(open_source(path))
            adapters.append(decode(sources[-1], family=family))
        fam = _common_family(adapters, sources)
        merged = _merged_adapter(out, fam, adapters)
        terms = _terms(adapters, [w for _, w in pairs])
        plans, refused = _plan_all(terms, mode, rank, _default_dtype(adapters), device)
        modules, unwritable = writable(merged, [p[0] for p in plans], target)
        refused.update(unwritable)
        if refused and not skip_unsupported:
            raise ConversionError(
                None,
                f"{len(refused)} module(s)/key(s) cannot be merged into {target}: {by_reason(refused)}; "
                "--skip-unsupported writes the rest",
            )
        kept = {id(m) for m in modules}
        plans = [p for p in plans if id(p[0]) in kept]
        if not plans:
            raise ConversionError(None, "nothing left to write")
        result = MergeLorasResult(
            [MergeInput(str(p), w, a.format, a.family, len(a.modules)) for (p, w), a in zip(pairs, adapters)],
            str(out), target, fam, mode, rank, refused=refused, modules=[p[1] for p in plans],
        )
        checks = [p[2] for p in plans]

        def check(tmp: Path) -> None:
            result.max_deviation = verify_written(tmp, fam, checks, device)

        result.files = write_adapter(
            merged, [p[0] for p in plans], target, out, dtype=dtype,
            extra_metadata={MERGE_METADATA_KEY: _record(pairs, mode, rank), "modelspec.title": out.stem},
            verify=check if verify else None,
        )
    finally:
        for s in sources:
            s.close()
    return result


def _input(item: str | os.PathLike[str] | tuple[str | os.PathLike[str], float]) -> tuple[str, float]:
    if isinstance(item, str):
        return parse_input(item)
    if isinstance(item, os.PathLike):
        return os.fspath(item), 1.0
    return os.fspath(item[0]), float(item[1])


def _check_options(pairs: list[tuple[str, float]], mode: str, rank: int | None) -> None:
    if not pairs:
        raise UsageError(None, "give at least one LoRA to merge")
    if mode not in MODES:
        raise UsageError(None, f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "svd" and (rank is None or rank < 1):
        raise UsageError(None, "--mode svd needs --rank N (N ≥ 1)")
    if mode == "concat" and rank is not None:
        raise UsageError(None, "--rank goes with --mode svd (concat keeps every input's rank)")


def _common_family(adapters: list[Adapter], sources: list[TensorSource]) -> str:
    for a, s in zip(adapters, sources):
        check_family(a, s, "merge-loras")
    first = adapters[0]
    for a in adapters[1:]:
        if a.family != first.family:
            raise ConversionError(a.path, f"is {a.family}, but {first.path} is {first.family}; LoRAs of different families cannot be merged")
    return first.family


def _merged_adapter(out: Path, family: str, adapters: list[Adapter]) -> Adapter:
    """The adapter the encoders write: no stale training metadata from any one input."""
    unknown = [f"{Path(a.path).name}: {k}" for a in adapters for k in a.unknown_keys]
    return Adapter(path=str(out), format="merged", variant="", family=family, family_evidence=[],
                   modules={}, unknown_keys=unknown)


def _terms(adapters: list[Adapter], weights: list[float]) -> dict[ModuleKey, list[tuple[str, Term]]]:
    """Per module key (first-seen order): (input name, weighted term) of each input holding it."""
    terms: dict[ModuleKey, list[tuple[str, Term]]] = {}
    for a, w in zip(adapters, weights):
        for key, m in a.modules.items():
            terms.setdefault(key, []).append((Path(a.path).name, Term(m, w)))
    return terms


def _default_dtype(adapters: list[Adapter]) -> str:
    floats = {r.dtype for a in adapters for m in a.modules.values() for r in m.params.values()
              if r.dtype in ("F16", "BF16", "F32", "F64")}
    return floats.pop() if len(floats) == 1 else "F32"


def _refusal(name: str, t: Term, mode: str) -> str | None:
    m = t.module
    why = no_matrix_reason(m)
    if why is None and m.dora:
        why = "DoRA: its effect renormalises W0 + ΔW, so it depends on the base weight"
    if why is None and mode == "concat" and not t.factored:
        why = f"{m.network_type.upper()} has no LoRA factors to concatenate (--mode svd re-factors it)"
    return None if why is None else f"{why} (in {name})"


_Plan = tuple[AdapterModule, MergedModule, Check]


def _plan_all(
    terms: dict[ModuleKey, list[tuple[str, Term]]], mode: str, rank: int | None, dtype: str, device: str | None,
) -> tuple[list[_Plan], dict[str, str]]:
    plans: list[_Plan] = []
    refused: dict[str, str] = {}
    for key, named in terms.items():
        why = next((r for n, t in named if (r := _refusal(n, t, mode)) is not None), None)
        group = [t for _, t in named]
        lay = _layout(group) if why is None else None
        if lay is None:
            refused[str(key)] = why or "its shape differs between inputs (" + ", ".join(
                f"{n}: {layout(t.module).out}×{layout(t.module).in_flat}" for n, t in named) + ")"
            continue
        plans.append(_plan(key, group, lay, mode, rank, dtype, device))
    return plans, refused


def _layout(group: list[Term]) -> Layout | None:
    """The shared matrix layout of the inputs (None when they disagree); the kernel from
    the catalog shape or the first input that carries one."""
    lays = [layout(t.module) for t in group]
    if len({(lay.out, lay.in_flat) for lay in lays}) != 1:
        return None
    shape = next((tuple(t.module.extra["shape"]) for t in group if t.module.extra.get("shape")), None)
    kernels = [lay.kernel for lay in lays if lay.kernel]
    if shape is not None and len(shape) == 4:
        kernel = shape[2:]
    else:
        kernel = max(kernels, key=prod, default=())
    return Layout(lays[0].out, lays[0].in_flat, tuple(kernel))


def _plan(key: ModuleKey, group: list[Term], lay: Layout, mode: str, rank: int | None, dtype: str, device: str | None) -> _Plan:
    factored = all(t.factored for t in group)
    total = sum(t.module.rank or 0 for t in group)
    if mode == "concat":
        k = total
    else:
        assert rank is not None
        k = min(rank, lay.out, lay.in_flat, total if factored else lay.in_flat)
    record = MergedModule(str(key), len(group), sorted({t.module.network_type for t in group}), k, float(k))
    check = Check(key, str(key), group)
    lazy = LazyTensors(lambda: _compute(group, lay, k, mode, record, check, device))
    bias = any("lora_up_bias" in t.module.params for t in group)
    carried = {"lora_up_bias": lazy.ref("lora_up_bias", dtype, (lay.out,))} if bias else {}
    return lora_module(group[0].module, key, lay, k, float(k), dtype, lazy, carried), record, check


def _compute(group: list[Term], lay: Layout, k: int, mode: str, record: MergedModule, check: Check, device: str | None) -> dict[str, Tensor]:
    import torch

    from loratool.lowrank import product_svd, retention, split_factors, truncated_svd

    if mode == "concat":
        up, down = target_factors(group, device)
    elif all(t.factored for t in group):
        svd = product_svd(*target_factors(group, device))
        kept = retention(svd.S, k)
        record.retained, record.error, check.expected, check.norm = kept.fro, kept.error, kept.tail, kept.norm
        up, down = split_factors(svd, k)
    else:
        dense = target_dense(group, device)
        svd = truncated_svd(dense, k, "randomized")
        up, down = split_factors(svd, k)
        norm, tail = torch.linalg.norm(dense).item(), torch.linalg.norm(dense - up @ down).item()
        kept_norm = torch.linalg.norm(svd.S).item()
        record.retained, record.error = (min(kept_norm / norm, 1.0), tail / norm) if norm else (1.0, 0.0)
        check.expected = tail
    tensors = shape_factors(up, down, lay)
    bias = target_bias(group, device)
    if bias is not None:
        tensors["lora_up_bias"] = bias.cpu()
    return tensors


def _record(pairs: list[tuple[str, float]], mode: str, rank: int | None) -> str:
    """What was merged: input names, weights and AutoV3 hashes (single files)."""
    from loratool.io.hashing import compute_hashes

    sources = []
    for path, weight in pairs:
        autov3 = compute_hashes(path).autov3 if Path(path).is_file() else None
        sources.append({"name": Path(path).name, "weight": weight, "autov3": autov3})
    return json.dumps({"mode": mode, "rank": rank, "sources": sources}, sort_keys=True, allow_nan=False)



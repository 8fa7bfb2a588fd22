"""``resize``: change a LoRA's ranks, exactly and cheaply, and prove it.

* LoRA/LoCon modules (Tucker cores folded into down): QR of up and of downᵀ and an SVD of
  the small r×r core (:func:`loratool.lowrank.product_svd`) give the best rank-k
  approximation of ΔW (Eckart–Young) without forming ΔW or running a large SVD.
* Rank: fixed (``rank``) or per module from the singular values (``dynamic`` =
  ``ratio``/``fro``/``cumulative`` with ``threshold``, capped by ``rank`` when given;
  :mod:`loratool.lowrank.rank`, no +1 off-by-one).
* Strength: each module keeps its alpha/rank ratio (alpha is rescaled to scale·k), so
  ``ΔW_out·scale_out`` is the rank-k truncation of ``ΔW_in·scale_in``; the factors split
  √S on each side (fp16 keeps precision).
* Modules whose rank is already ≤ the target are copied unchanged (byte for byte when
  the dtype and format allow).
* LoHa, LoKr and full diffs have no factors to truncate: refused by name unless
  ``svd_full``, which forms their ΔW (:func:`loratool.networks.delta_weight`), truncates
  it by SVD (randomized for a fixed rank, exact economy SVD for a dynamic one) and writes
  a LoRA with the scale folded in (alpha = k).
* DoRA: the merged weight is M·V/‖V‖ with V = W0 + s·ΔW, so truncating ΔW is not a
  truncation of the module's effect, and the best one needs W0. Refused by name unless
  ``svd_full``, which truncates ΔW and keeps the magnitude M unchanged: the merged
  weight keeps its per-row norms M exactly and takes the direction of W0 + truncated ΔW.
* IA3/OFT/BOFT/GLoRA (ΔW depends on W0) and norm modules are refused; ``skip_unsupported``
  leaves refused modules out and lists them.
* Verification: the output is re-read and each module's ‖ΔW_in − ΔW_out‖_F must equal the
  discarded part of the spectrum (0 for unchanged modules) within rounding.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool import jsonstrict
from loratool.errors import ConversionError
from loratool.formats.decode import decode
from loratool.formats.encode import TARGETS
from loratool.io.sources import open_source
from loratool.model import Adapter, AdapterModule
from loratool.ops.factored import (
    FACTORED_TYPES,
    Check,
    LazyTensors,
    Term,
    layout,
    lora_module,
    no_matrix_reason,
    shape_factors,
    verify_written,
)
from loratool.ops.output import (
    by_reason,
    check_family,
    check_options,
    check_output,
    check_rank_options,
    writable,
    write_adapter,
)

if TYPE_CHECKING:
    from torch import Tensor

    from loratool.lowrank import SVD

RESIZE_METADATA_KEY = "loratool.resize"


@dataclass
class ModuleResize:
    """One module of a resize: what it was, what it became, what the truncation kept."""

    name: str
    network_type: str
    action: str  # "resized" | "unchanged" | "refactored" (ΔW formed: --svd-full)
    rank_in: int | None
    rank_out: int
    alpha_out: float | None
    retained: float = 1.0  # ‖ΔW_k‖_F / ‖ΔW‖_F
    error: float = 0.0  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F


@dataclass
class ResizeResult:
    """What ``resize`` wrote, per module, and how the output checked out."""

    source: str
    output: str
    target: str
    family: str
    method: str  # "rank" (fixed) or a dynamic method
    threshold: float | None
    rank: int | None
    files: list[str] = field(default_factory=list)
    modules: list[ModuleResize] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    max_deviation: float | None = None  # None when not verified

    def counts(self) -> dict[str, int]:
        c = Counter(m.action for m in self.modules)
        return {a: c.get(a, 0) for a in ("resized", "unchanged", "refactored")}

    def to_json(self) -> dict[str, Any]:
        changed = [m for m in self.modules if m.action != "unchanged"]
        worst = min(changed, key=lambda m: m.retained, default=None)
        return {
            "source": self.source, "output": self.output, "target": self.target, "family": self.family,
            "files": self.files, "method": self.method, "threshold": self.threshold, "rank": self.rank,
            "summary": {
                **self.counts(), "refused": len(self.refused),
                "mean_retained": sum(m.retained for m in changed) / len(changed) if changed else 1.0,
                "min_retained": worst.retained if worst else 1.0,
                "min_retained_module": worst.name if worst else None,
            },
            "modules": [asdict(m) for m in self.modules],
            "refused": self.refused, "verified": self.max_deviation is not None,
            "max_deviation": self.max_deviation,
        }


@dataclass
class _Plan:
    module: AdapterModule
    record: ModuleResize
    check: Check
    out: AdapterModule


def resize(
    src: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    threshold: float | None = None,
    target: str | None = None,
    dtype: str | None = None,
    family: str | None = None,
    svd_full: bool = False,
    skip_unsupported: bool = False,
    force: bool = False,
    verify: bool = True,
    device: str | None = None,
) -> ResizeResult:
    """Resize ``src`` to ``rank`` (or per module by ``dynamic``/``threshold``) at ``output``;
    see the module docstring. ``target`` defaults to the input's format (kohya for
    ComfyUI-style inputs); ``device`` runs the linear algebra there (default CPU)."""
    check_rank_options(rank, dynamic, threshold)
    check_options(target or "kohya", dtype)
    source = open_source(src)
    try:
        adapter = decode(source, family=family)
        check_family(adapter, source, "resize")
        target = target or (adapter.format if adapter.format in TARGETS else "kohya")
        out = check_output([src], output, target, force)
        result = ResizeResult(str(src), str(out), target, adapter.family, dynamic or "rank", threshold, rank)
        plans, refused = _plan_all(adapter, rank, dynamic, threshold, svd_full, device)
        modules, unwritable = writable(adapter, [p.out for p in plans], target)
        refused.update(unwritable)
        if refused and not skip_unsupported:
            raise ConversionError(
                adapter.path,
                f"{len(refused)} module(s)/key(s) cannot be resized into {target}: {by_reason(refused)}; "
                "--skip-unsupported writes the rest",
            )
        kept = {id(m) for m in modules}
        plans = [p for p in plans if id(p.out) in kept]
        if not plans:
            raise ConversionError(adapter.path, "nothing left to write")
        result.refused = refused
        result.modules = [p.record for p in plans]
        checks = [p.check for p in plans]

        def check(tmp: Path) -> None:
            result.max_deviation = verify_written(tmp, adapter.family, checks, device)

        result.files = write_adapter(
            replace(adapter, metadata=_metadata(adapter, plans)), [p.out for p in plans], target, out,
            dtype=dtype, extra_metadata={RESIZE_METADATA_KEY: _record(src, result)},
            verify=check if verify else None,
        )
    finally:
        source.close()
    return result


def _refusal(m: AdapterModule, svd_full: bool) -> str | None:
    why = no_matrix_reason(m)
    if why is not None:
        return why
    if m.network_type not in FACTORED_TYPES and not svd_full:
        return f"{m.network_type.upper()} has no LoRA factors to truncate exactly (--svd-full re-factors its ΔW as a LoRA)"
    if m.dora and not svd_full:
        return ("DoRA renormalises W0 + ΔW, so truncating ΔW is not a truncation of its effect "
                "(--svd-full truncates ΔW and keeps the magnitude)")
    return None


def _plan_all(
    adapter: Adapter, rank: int | None, dynamic: str | None, threshold: float | None, svd_full: bool, device: str | None,
) -> tuple[list[_Plan], dict[str, str]]:
    plans: list[_Plan] = []
    refused: dict[str, str] = {}
    for m in adapter.modules.values():
        name = m.source_name or str(m.key)
        why = _refusal(m, svd_full)
        if why is not None:
            refused[name] = why
            continue
        plans.append(_plan(m, name, rank, dynamic, threshold, device))
    return plans, refused


def _plan(m: AdapterModule, name: str, rank: int | None, dynamic: str | None, threshold: float | None, device: str | None) -> _Plan:
    from loratool.lowrank import retention, select_rank

    factored = m.network_type in FACTORED_TYPES
    lay = layout(m)
    r_in = m.rank if factored else None
    n_sv = min(lay.out, lay.in_flat, r_in or lay.in_flat)
    check = Check(m.key, name, [Term(m)], magnitude=m.params.get("dora_scale"))
    spectrum, dense_svd = None, None
    if dynamic is not None:
        spectrum, dense_svd = _spectrum(m, device)
        k = select_rank(spectrum, dynamic, threshold, rank)
    else:
        assert rank is not None
        k = min(rank, n_sv)
    unchanged = r_in is not None and (k >= r_in if dynamic is not None else r_in <= (rank or 0))
    if unchanged:
        record = ModuleResize(name, m.network_type, "unchanged", r_in, r_in or 0, m.effective_alpha)
        if spectrum is not None:
            kept = retention(spectrum, r_in)
            record.retained, record.error = kept.fro, kept.error
        return _Plan(m, record, check, m)
    scale = m.scale
    alpha = scale * k if factored else float(k)
    record = ModuleResize(name, m.network_type, "resized" if factored else "refactored", r_in, k, alpha)
    if dense_svd is not None:  # computed whole for the rank choice: keep only the factors
        ready = _dense_factors(m, dense_svd, k, record, check, device)
        lazy = LazyTensors(lambda: dict(ready))
    else:
        lazy = LazyTensors(lambda: _compute(m, k, record, check, device))
    carried = {p: m.params[p] for p in ("dora_scale", "lora_up_bias") if p in m.params}
    out = lora_module(m, m.key, lay, k, alpha, _factor_dtype(m), lazy, carried)
    return _Plan(m, record, check, out)


def _spectrum(m: AdapterModule, device: str | None) -> tuple[Tensor, SVD | None]:
    """Singular values of ΔW/scale (LoRA: from the small core only), and the whole SVD
    when ΔW had to be formed (--svd-full: not computed twice)."""
    from loratool.lowrank import exact_svd, product_svdvals

    if m.network_type in FACTORED_TYPES:
        return product_svdvals(*Term(m).stored_factors(device)), None
    svd = exact_svd(Term(m).dense(device))
    return svd.S, svd


def _compute(m: AdapterModule, k: int, record: ModuleResize, check: Check, device: str | None) -> dict[str, Tensor]:
    """The new factors of one module; fills in its record and expected verification error."""
    from loratool.lowrank import product_svd, retention, split_factors, truncated_svd

    lay = layout(m)
    if m.network_type not in FACTORED_TYPES:  # --svd-full, fixed rank
        svd = truncated_svd(Term(m).dense(device), k, "randomized")
        return _dense_factors(m, svd, k, record, check, device)
    svd = product_svd(*Term(m).stored_factors(device))  # ΔW / scale: the ratio alpha/rank is kept
    kept = retention(svd.S, k)
    record.retained, record.error = kept.fro, kept.error
    check.expected, check.norm = kept.tail * abs(m.scale), kept.norm * abs(m.scale)
    return shape_factors(*split_factors(svd, k), lay)


def _dense_factors(m: AdapterModule, svd: SVD, k: int, record: ModuleResize, check: Check, device: str | None) -> dict[str, Tensor]:
    """Factors of a formed ΔW (scale included: alpha = k) truncated to ``k``. The tail is
    measured directly (‖ΔW‖² − Σσ² would cancel when it is tiny)."""
    import torch

    from loratool.lowrank import split_factors

    dense = Term(m).dense(device)
    up, down = split_factors(svd, k)
    norm, tail = torch.linalg.norm(dense).item(), torch.linalg.norm(dense - up @ down).item()
    kept = torch.linalg.norm(svd.S[:k]).item()
    record.retained, record.error = (min(kept / norm, 1.0), tail / norm) if norm else (1.0, 0.0)
    check.expected = tail
    return shape_factors(up, down, layout(m))


def _factor_dtype(m: AdapterModule) -> str:
    """The dtype new factors are written in (unless --dtype): the module's own."""
    floats = [r.dtype for r in m.params.values() if r.dtype in ("F16", "BF16", "F32", "F64")]
    return Counter(floats).most_common(1)[0][0] if floats else "F32"


def _metadata(adapter: Adapter, plans: list[_Plan]) -> dict[str, str]:
    """The input's metadata with kohya's rank/alpha fields describing the output."""
    meta = dict(adapter.metadata)
    linear = [p.out for p in plans if p.out.network_type == "lora"]
    conv = [p.out for p in plans if p.out.network_type == "locon"]
    if "ss_network_dim" in meta and linear:
        meta["ss_network_dim"] = _common(m.rank for m in linear)
        meta["ss_network_alpha"] = _common(m.effective_alpha for m in linear)
    args = meta.get("ss_network_args")
    if args and conv:
        try:
            parsed = jsonstrict.loads(args)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "conv_dim" in parsed:
            parsed["conv_dim"] = _common(m.rank for m in conv)
            parsed["conv_alpha"] = _common(m.effective_alpha for m in conv)
            meta["ss_network_args"] = json.dumps(parsed, allow_nan=False)
    return meta


def _common(values: Any) -> str:
    """One value as kohya writes it, or "Dynamic" when modules differ."""
    distinct = set(values)
    return str(distinct.pop()) if len(distinct) == 1 else "Dynamic"


def _record(src: str | os.PathLike[str], result: ResizeResult) -> str:
    return json.dumps({
        "source": Path(src).name, "method": result.method, "threshold": result.threshold, "rank": result.rank,
    }, sort_keys=True, allow_nan=False)

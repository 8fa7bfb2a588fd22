"""Compare two adapters module by module: ΔW (scale included), DoRA magnitude and bias.

Where a module's tensors are byte-identical and its scale is equal, its ΔW is identical
by construction (ΔW is a deterministic function of them), so no matrix product is
needed; otherwise ΔW is recomputed from both sides in float32 and compared.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loratool.model import Adapter, AdapterModule

if TYPE_CHECKING:
    from torch import Tensor

# Unit roundoff per safetensors float dtype: the tolerance of a recomputed module is
# 8·u·max(ΔW of |factors|), a bound on what rounding the factors to u can change.
UNIT_ROUNDOFF: dict[str, float] = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}


@dataclass
class CompareReport:
    max_abs_diff: float = 0.0
    worst: str = ""
    identical: int = 0
    recomputed: int = 0
    missing: list[str] = field(default_factory=list)
    over_tolerance: list[str] = field(default_factory=list)


def compare_adapters(source_modules: list[AdapterModule], out: Adapter) -> CompareReport:
    """How far ``out`` is from ``source_modules``; fills ``missing`` for absent modules."""
    report = CompareReport()
    pairs = [(m, out.modules.get(m.key)) for m in source_modules]
    # Byte comparison is reading (pread releases the GIL): two threads keep both CPUs busy.
    with ThreadPoolExecutor(2) as pool:
        same = list(pool.map(lambda pair: pair[1] is not None and _same_bytes(*pair), pairs))
    for (m, o), identical in zip(pairs, same):
        # A DoRA magnitude read on the other axis is another module, even with the same
        # bytes (a square layer's [1, n] and [n, 1] hold the same data).
        if o is None or o.network_type != m.network_type or o.dora_axis != m.dora_axis:
            report.missing.append(str(m.key))
            continue
        if identical:
            report.identical += 1
            continue
        diff, tolerance = _recompute(m, o)
        report.recomputed += 1
        if diff > tolerance:
            report.over_tolerance.append(f"{m.key} (|ΔW diff| {diff:.3g} > {tolerance:.3g})")
        if diff > report.max_abs_diff:
            report.max_abs_diff, report.worst = diff, str(m.key)
    return report


def _same_bytes(a: AdapterModule, b: AdapterModule) -> bool:
    if set(a.params) != set(b.params) or a.scale != b.scale:
        return False
    for name, ref in a.params.items():
        other = b.params[name]
        if ref.dtype != other.dtype:
            return False
        ra, rb = ref.raw(), other.raw()
        if ra is None or rb is None or ra != rb:
            return False
    return True


def _recompute(a: AdapterModule, b: AdapterModule) -> tuple[float, float]:
    """(max |ΔW_a − ΔW_b| over weight, magnitude and bias; the rounding tolerance)."""
    from loratool.networks import NETWORK_TYPES, delta_bias, delta_weight

    ta = {k: v.load() for k, v in a.params.items()}
    tb = {k: v.load() for k, v in b.params.items()}
    u = max(UNIT_ROUNDOFF.get(v.dtype, 0.0) for v in [*a.params.values(), *b.params.values()])
    shape = tuple(a.extra.get("shape") or ())
    if NETWORK_TYPES[a.network_type].needs_base:  # compare the parameters themselves
        diffs = [_maxdiff(ta[k], tb[k]) for k in ta if k in tb]
        bound = max((t.float().abs().max().item() for t in ta.values()), default=0.0)
        return max(diffs, default=0.0), 2 * u * bound
    dwa = delta_weight(a.network_type, _core(ta), a.alpha, shape or None, scale=a.scale)
    dwb = delta_weight(b.network_type, _core(tb), b.alpha, tuple(dwa.shape), scale=b.scale)
    diff = _maxdiff(dwa, dwb)
    bound = delta_weight(a.network_type, {k: t.abs() for k, t in _core(ta).items()}, a.alpha, tuple(dwa.shape), scale=abs(a.scale))
    tolerance = 8 * u * bound.abs().max().item()
    del dwa, dwb, bound
    if "dora_scale" in ta:
        diff = max(diff, _maxdiff(ta["dora_scale"], tb["dora_scale"]))
        tolerance = max(tolerance, 2 * u * ta["dora_scale"].float().abs().max().item())
    ba, bb = delta_bias(a.network_type, ta, a.alpha), delta_bias(b.network_type, tb, b.alpha)
    if ba is not None and bb is not None:
        diff = max(diff, _maxdiff(ba, bb))
        tolerance = max(tolerance, 8 * u * ba.abs().max().item())
    return diff, tolerance


def _maxdiff(x: Tensor, y: Tensor) -> float:
    return (x.float().flatten() - y.float().flatten()).abs().max().item() if x.numel() else 0.0


def _core(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k != "dora_scale"}

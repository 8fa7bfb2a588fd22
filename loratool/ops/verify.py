"""Compare two adapters module by module: ΔW (scale included), DoRA magnitude and bias.

Where a module's tensors are byte-identical and its scale is equal, its ΔW is identical
by construction (ΔW is a deterministic function of them), so no matrix product is
needed; otherwise ΔW is recomputed from both sides in float32 and compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loratool.model import Adapter, AdapterModule


@dataclass
class CompareReport:
    max_abs_diff: float = 0.0
    worst: str = ""
    identical: int = 0
    recomputed: int = 0
    missing: list[str] = field(default_factory=list)
    tolerance: float = 0.0


def compare_adapters(source_modules: list[AdapterModule], out: Adapter) -> CompareReport:
    """How far ``out`` is from ``source_modules``; fills ``missing`` for absent modules."""
    report = CompareReport()
    for m in source_modules:
        o = out.modules.get(m.key)
        # A DoRA magnitude read on the other axis is another module, even with the same
        # bytes (a square layer's [1, n] and [n, 1] hold the same data).
        if o is None or o.network_type != m.network_type or o.dora_axis != m.dora_axis:
            report.missing.append(str(m.key))
            continue
        if _same_bytes(m, o):
            report.identical += 1
            continue
        diff, scale_of_dw = _recompute(m, o)
        report.recomputed += 1
        report.tolerance = max(report.tolerance, 1e-6 * scale_of_dw)
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
    """(max |ΔW_a − ΔW_b| over weight, magnitude and bias; max |ΔW_a|)."""
    import torch

    from loratool.networks import NETWORK_TYPES, delta_bias, delta_weight

    ta = {k: v.load() for k, v in a.params.items()}
    tb = {k: v.load() for k, v in b.params.items()}
    shape = tuple(a.extra.get("shape") or ())
    if NETWORK_TYPES[a.network_type].needs_base:  # compare the parameters themselves
        diffs = [(ta[k].float().flatten() - tb[k].float().flatten()).abs().max().item() for k in ta if k in tb]
        return max(diffs, default=0.0), max((t.float().abs().max().item() for t in ta.values()), default=0.0)
    dwa = delta_weight(a.network_type, _core(ta), a.alpha, shape or None)
    dwb = delta_weight(b.network_type, _core(tb), b.alpha, tuple(dwa.shape))
    diff = (dwa - dwb).abs().max().item()
    if "dora_scale" in ta:
        diff = max(diff, (ta["dora_scale"].float().flatten() - tb["dora_scale"].float().flatten()).abs().max().item())
    ba, bb = delta_bias(a.network_type, ta, a.alpha), delta_bias(b.network_type, tb, b.alpha)
    if ba is not None and bb is not None:
        diff = max(diff, (ba - bb).abs().max().item())
    del torch
    return diff, dwa.abs().max().item()


def _core(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k != "dora_scale"}

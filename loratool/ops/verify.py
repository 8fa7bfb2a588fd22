"""Compare two adapters module by module: ΔW (scale included), DoRA magnitude and bias.

Where a module's tensors are byte-identical and its scale is equal, its ΔW is identical
by construction (ΔW is a deterministic function of them), so no matrix product is
needed; otherwise ΔW is recomputed from both sides in float32 and compared.

A plain LoRA module whose output factors are the source's times constants (a ``--dtype``
cast, alpha/rank folded into the factors) is checked factor by factor: each output factor
must be the scaled source factor rounded to its dtype, and a rigorous bound on
max |ΔW difference| follows from the measured factor errors in O(parameters) — no out×in
product is formed. Other modules (or factors that are not such a rescale) get ΔW
recomputed.

Nothing non-finite passes: a source module whose tensors or ΔW hold NaN/Inf is listed in
``nonfinite_source`` (the byte-identical shortcut checks the stored bytes too), and a
NaN/Inf that appears in the output, or a comparison that cannot be made (parameters or
element counts that differ), is listed in ``failures``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loratool.model import Adapter, AdapterModule

if TYPE_CHECKING:
    from torch import Tensor

# Unit roundoff per safetensors float dtype: the tolerance of a recomputed module is
# 8·u·max(ΔW of |factors|), a bound on what rounding the factors to u can change.
UNIT_ROUNDOFF: dict[str, float] = {
    "F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8, "F8_E4M3": 2.0**-4, "F8_E5M2": 2.0**-3,
}
# LoRA factors: checked for NaN/Inf where they are used (the factor comparison refuses them).
FACTORS = ("lora_up", "lora_down")
# Half the spacing of subnormals per dtype: the absolute rounding error near zero.
SUBNORMAL_ROUNDING: dict[str, float] = {
    "F64": 2.0**-1075, "F32": 2.0**-150, "F16": 2.0**-25, "BF16": 2.0**-134, "F8_E4M3": 2.0**-10, "F8_E5M2": 2.0**-17,
}




def _screen(step: int, offset: int, suspect: Callable[[int], bool], exact: bool) -> tuple[int, int, bytes, bool]:
    return step, offset, bytes(b for b in range(256) if not suspect(b)), exact


# Per float dtype: (bytes per value, offset of the byte holding the sign and the exponent's
# top bits, the byte values that cannot belong to a NaN/Inf, whether the others always do).
NONFINITE_SCREEN: dict[str, tuple[int, int, bytes, bool]] = {
    "F16": _screen(2, 1, lambda b: b & 0x7C == 0x7C, True),
    "F8_E5M2": _screen(1, 0, lambda b: b & 0x7C == 0x7C, True),
    "F8_E4M3": _screen(1, 0, lambda b: b & 0x7F == 0x7F, True),  # no Inf; NaN is S.1111.111
    "BF16": _screen(2, 1, lambda b: b & 0x7F == 0x7F, False),
    "F32": _screen(4, 3, lambda b: b & 0x7F == 0x7F, False),
    "F64": _screen(8, 7, lambda b: b & 0x7F == 0x7F, False),
}


@dataclass
class CompareReport:
    max_abs_diff: float = 0.0
    worst: str = ""
    identical: int = 0
    recomputed: int = 0
    missing: list[str] = field(default_factory=list)
    over_tolerance: list[str] = field(default_factory=list)
    nonfinite_source: list[str] = field(default_factory=list)  # source module names
    failures: list[str] = field(default_factory=list)  # NaN/Inf in the output, comparisons not made
    by_factors: int = 0  # modules compared factor by factor (a rescale within rounding)
    bounded: int = 0  # of those, with a non-zero bound (the difference is a bound, not measured)


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
        if identical == "nonfinite":
            report.nonfinite_source.append(m.source_name or str(m.key))
            continue
        if identical:
            report.identical += 1
            continue
        report.recomputed += 1
        try:
            diff, tolerance, bounded = _recompute(m, o)
        except _NotFinite:
            report.nonfinite_source.append(m.source_name or str(m.key))
            continue
        except (_Incomparable, ValueError, RuntimeError) as exc:
            report.failures.append(f"{m.key} (cannot compare: {exc})")
            continue
        if not math.isfinite(diff):
            report.failures.append(f"{m.key} (NaN/Inf in the output's ΔW)")
            continue
        report.by_factors += bounded
        report.bounded += bounded and diff > 0  # a bound of 0 is proven equality
        if diff > tolerance:
            report.over_tolerance.append(f"{m.key} (|ΔW diff| {diff:.3g} > {tolerance:.3g})")
        if diff > report.max_abs_diff:
            report.max_abs_diff, report.worst = diff, str(m.key)
    return report


class _NotFinite(Exception):
    """The source module's tensors or ΔW hold NaN/Inf."""


class _Incomparable(Exception):
    """The two modules cannot be compared (message: why)."""


def _same_bytes(a: AdapterModule, b: AdapterModule) -> bool | str:
    """True when every tensor is stored byte for byte alike and the scale is equal;
    "nonfinite" when so but the (source) bytes hold NaN/Inf."""
    if set(a.params) != set(b.params) or a.scale != b.scale:
        return False
    raws = []
    for name, ref in a.params.items():
        other = b.params[name]
        if ref.dtype != other.dtype:
            return False
        ra, rb = ref.raw(), other.raw()
        if ra is None or rb is None or ra != rb:
            return False
        raws.append((ra, ref.dtype))
    return True if all(_finite_bytes(raw, dtype) for raw, dtype in raws) else "nonfinite"


def _finite_bytes(raw: bytes, dtype: str) -> bool:
    """Whether stored little-endian values of ``dtype`` are all finite (ints always are).

    Screened without torch: a NaN/Inf has its exponent all ones, so the byte holding the
    exponent's top bits takes one of a few values (:data:`NONFINITE_SCREEN`). Where none
    occurs every value is finite; where one does, torch decides (for F16/F8 such a byte
    is a NaN/Inf; for BF16/F32/F64 it may also be a huge finite value)."""
    screen = NONFINITE_SCREEN.get(dtype)
    if screen is None or not raw:
        return True
    step, offset, keep, exact = screen
    if not (raw[offset::step] if step > 1 else raw).translate(None, keep):
        return True
    if exact:
        return False
    import torch

    from loratool.io.safetensors import TORCH_DTYPES

    return _all_finite(torch.frombuffer(bytearray(raw), dtype=getattr(torch, TORCH_DTYPES[dtype])))


def _all_finite(t: Tensor) -> bool:
    """No NaN/Inf in ``t``: its max and min are finite (max/min propagate NaN), which is
    one reduction pass, ~10× faster on CPU than ``isfinite(t).all()`` for half floats."""
    import torch

    if not t.is_floating_point() or not t.numel():
        return True
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no F8 reduction kernels
        t = t.float()
    return math.isfinite(t.amax().item()) and math.isfinite(t.amin().item())


def _recompute(a: AdapterModule, b: AdapterModule) -> tuple[float, float, bool]:
    """(max |ΔW_a − ΔW_b| over weight, magnitude and bias; the rounding tolerance; whether
    the first is a bound from the factors rather than measured on ΔW).

    Raises :class:`_NotFinite` when ``a`` (the source) holds NaN/Inf, :class:`_Incomparable`
    when the two cannot be compared."""
    from loratool.networks import delta_bias, delta_weight, depends_on_base

    ta = {k: v.load() for k, v in a.params.items()}
    if not all(_all_finite(t) for k, t in ta.items() if k not in FACTORS):
        raise _NotFinite
    tb = {k: v.load() for k, v in b.params.items()}
    if set(ta) != set(tb):
        raise _Incomparable(f"parameters {sorted(ta)} vs {sorted(tb)}")
    u = max(UNIT_ROUNDOFF.get(v.dtype, 0.0) for v in [*a.params.values(), *b.params.values()])
    shape = tuple(a.extra.get("shape") or ())
    if depends_on_base(a.network_type, set(_core(ta))):  # ΔW needs W0: compare the parameters
        if not all(_all_finite(t) for t in ta.values()):
            raise _NotFinite
        bound = max((t.float().abs().max().item() for t in ta.values()), default=0.0)
        return _worst(*(_maxdiff(ta[k], tb[k]) for k in ta)), 2 * u * bound, False
    by_factors = _rescaled_factors(a, ta, b, tb)  # never accepts NaN/Inf factors
    if by_factors is not None:
        diff, tolerance = by_factors
    else:
        if not all(_all_finite(ta[k]) for k in FACTORS if k in ta):
            raise _NotFinite
        dwa = delta_weight(a.network_type, _core(ta), a.alpha, shape or None, scale=a.scale)
        if not _all_finite(dwa):
            raise _NotFinite
        dwb = delta_weight(b.network_type, _core(tb), b.alpha, tuple(dwa.shape), scale=b.scale)
        diff = _maxdiff(dwa, dwb)
        bound = delta_weight(a.network_type, {k: t.abs() for k, t in _core(ta).items()}, a.alpha, tuple(dwa.shape), scale=abs(a.scale))
        tolerance = 8 * u * bound.abs().max().item()
        del dwa, dwb, bound
    if "dora_scale" in ta:
        diff = _worst(diff, _maxdiff(ta["dora_scale"], tb["dora_scale"]))
        tolerance = max(tolerance, 2 * u * ta["dora_scale"].float().abs().max().item())
    ba, bb = delta_bias(a.network_type, ta, a.alpha), delta_bias(b.network_type, tb, b.alpha)
    if ba is not None and bb is not None:
        diff = _worst(diff, _maxdiff(ba, bb))
        tolerance = max(tolerance, 8 * u * ba.abs().max().item())
    return diff, tolerance, by_factors is not None


def _rescaled_factors(a: AdapterModule, ta: dict, b: AdapterModule, tb: dict) -> tuple[float, float] | None:
    """(bound on max |ΔW_b − ΔW_a|, tolerance) for plain LoRA modules whose output factors
    are the source's times constants α, β with α·β = scale_a/scale_b, each rounded to its
    output dtype; None when they are not (the caller then recomputes ΔW).

    With U' = αU + E_U and D' = βD + E_D: ΔW_b − ΔW_a = s_b·(αU·E_D + E_U·D'), so
    |ΔW_b − ΔW_a| ≤ |s_b|·Σ_k (max_i |αU_ik|·max_j |E_D,kj| + max_i |E_U,ik|·max_j |D'_kj|)."""
    from loratool.formats.encode import split_scale
    from loratool.networks.base import mat

    if a.network_type not in ("lora", "locon") or "lora_mid" in ta or not b.scale:
        return None
    up_a, down_a, up_b, down_b = (mat(t[name]) for t in (ta, tb) for name in ("lora_up", "lora_down"))
    if up_a.shape != up_b.shape or down_a.shape != down_b.shape:
        return None
    ratio = a.scale / b.scale
    down, up = split_scale(ratio)  # how loratool splits it; other writers may have swapped it
    for beta, alpha in ((down, up), (up, down)):
        if alpha * beta != ratio:
            continue
        e_up = _factor_errors(up_b, up_a, alpha, b.params["lora_up"].dtype, rank_axis=1)
        e_down = None if e_up is None else _factor_errors(down_b, down_a, beta, b.params["lora_down"].dtype, rank_axis=0)
        if e_down is not None:
            break
    else:
        return None
    col_up = _absmax(up_a, dim=0)  # max_i |U_ik| per k
    bound = abs(b.scale) * float((col_up * abs(alpha) * e_down).sum() + (e_up * _absmax(down_b, dim=1)).sum())
    reach = abs(a.scale) * float((col_up * _absmax(down_a, dim=1)).sum())  # ≥ max |ΔW_a|
    if not (math.isfinite(bound) and math.isfinite(reach)):
        return None
    u = max(UNIT_ROUNDOFF.get(ref.dtype, 0.0) for ref in (*a.params.values(), *b.params.values()))
    return bound * (1 + 1e-9), 8 * u * reach


def _factor_errors(new: Tensor, old: Tensor, factor: float, dtype: str, rank_axis: int) -> Tensor | None:
    """Upper bounds on max |new − factor·old| per rank index (float64; NaN/Inf when either
    side holds NaN/Inf), or None where the elements are not that rescale up to rounding.

    When both are stored alike and ``factor`` is a power of two, the difference is taken
    in that dtype, the smaller side scaled up (exact: no bits are lost, overflow gives Inf),
    and its rounding covered by a factor 1 + 2u: four passes over the factors, no float32
    copies. Otherwise every element is measured in float32/64 and must be within rounding
    to ``dtype`` of the rescaled source."""
    import torch

    u = UNIT_ROUNDOFF.get(dtype, 0.0)
    other = 1 - rank_axis
    if new.dtype == old.dtype and new.itemsize > 1 and abs(math.frexp(factor)[0]) == 0.5:
        scale_up = abs(factor) >= 1
        diff = old * factor - new if scale_up else old - new * (1 / factor)
        per_rank = diff.abs_().amax(dim=other).double() * (1 + 2 * u)
        return per_rank if scale_up else per_rank * abs(factor)
    wide = torch.float64 if torch.float64 in (new.dtype, old.dtype) else torch.float32
    want, got = old.to(wide) * factor, new.to(wide)
    error = (got - want).abs_()
    allowed = want.abs_().mul_(u).add_(SUBNORMAL_ROUNDING.get(dtype, 0.0))
    if not bool((error <= allowed).all()):  # also False for NaN/Inf
        return None
    return error.amax(dim=other).double()


def _absmax(t: Tensor, dim: int) -> Tensor:
    """max |t| along ``dim``, as float64 (abs and max are exact in any float dtype)."""
    import torch

    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()
    return t.abs().amax(dim=dim).double()


def _worst(*diffs: float) -> float:
    """The largest difference, NaN if any is NaN (Python's ``max`` may skip a NaN)."""
    return math.nan if any(math.isnan(d) for d in diffs) else max(diffs, default=0.0)


def _maxdiff(x: Tensor, y: Tensor) -> float:
    """max |x − y| over the elements; NaN when either side holds NaN."""
    if x.numel() != y.numel():
        raise _Incomparable(f"{x.numel()} vs {y.numel()} elements")
    if not x.numel():
        return 0.0
    d = (x.float().flatten() - y.float().flatten()).abs()
    return math.nan if bool(d.isnan().any()) else d.max().item()


def _core(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k != "dora_scale"}

"""Adapter modules as matrices ΔW = up @ down (or dense), new LoRA modules whose tensors
are computed on demand, and the check that a written module lies as far from its target
ΔW as it should. Shared by ``resize`` and ``merge-loras``.

A module's ΔW is taken as a matrix ``[out, in·kh·kw]`` with the module's own scale
applied. A *target* is ``Σ coefᵢ · ΔWᵢ`` over input modules (:class:`Term`). New tensors
are produced when the writer asks for them (:class:`LazyTensors`), so memory stays
bounded by one module's tensors whatever the adapter size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from loratool.errors import ConversionError
from loratool.formats.weight_shape import weight_io
from loratool.model import AdapterModule, ModuleKey, TensorRef
from loratool.networks import NETWORK_TYPES

if TYPE_CHECKING:
    from torch import Tensor

#: Types whose ΔW is a stored product ``up @ down`` (Tucker folded): refactored exactly.
FACTORED_TYPES = frozenset({"lora", "locon"})
#: Parameters a new LoRA module may carry over from the module it replaces, unchanged.
CARRIED_PARAMS = ("dora_scale", "lora_up_bias")


def no_matrix_reason(m: AdapterModule) -> str | None:
    """Why ``m`` has no ΔW matrix of its own (one that needs no base weight), or None."""
    t = NETWORK_TYPES[m.network_type]
    if t.needs_base or t.merge is not None:
        return f"{m.network_type.upper()}: its ΔW depends on the base weight"
    if m.network_type == "norm":
        return "NORM: a norm-layer change, not a weight matrix"
    if "diff_b" in m.params:
        return "full diff with a bias diff (diff_b), which a LoRA cannot hold"
    return None


@dataclass(frozen=True)
class Layout:
    """The matrix view of a module's ΔW: ``[out, in·kh·kw]`` and the kernel dims."""

    out: int
    in_flat: int
    kernel: tuple[int, ...]

    @property
    def in_dim(self) -> int:
        return self.in_flat // prod(self.kernel) if self.kernel else self.in_flat


def layout(m: AdapterModule) -> Layout:
    """The module's :class:`Layout`, from shapes alone."""
    shapes = {k: v.shape for k, v in m.params.items()}
    if m.network_type in FACTORED_TYPES:
        down = shapes["lora_down"]
        kernel = tuple(shapes["lora_mid"][2:]) if "lora_mid" in shapes else tuple(down[2:])
        return Layout(shapes["lora_up"][0], down[1] * prod(kernel), kernel)
    shape = m.extra.get("shape")
    if shape and len(shape) >= 2:
        return Layout(shape[0], prod(shape[1:]), tuple(shape[2:]))
    out, in_flat = weight_io(m.network_type, shapes)
    if out is None or in_flat is None:
        raise ValueError(f"{m.key}: cannot tell the shape of its ΔW")
    return Layout(out, in_flat, ())


@dataclass
class Term:
    """``coef · ΔW(module)``, ΔW with the module's own scale."""

    module: AdapterModule
    coef: float = 1.0

    @property
    def name(self) -> str:
        return self.module.source_name or str(self.module.key)

    @property
    def factored(self) -> bool:
        return self.module.network_type in FACTORED_TYPES

    def load(self, device: str | None = None) -> dict[str, Tensor]:
        return {k: v.load().to(device) if device else v.load() for k, v in self.module.params.items()}

    def factors(self, device: str | None = None) -> tuple[Tensor, Tensor]:
        """``(up, down)`` with ``up @ down = coef · ΔW`` (√ of the scale on each side)."""
        from loratool.lowrank import fold_scale

        return fold_scale(*self.stored_factors(device), self.coef * self.module.scale)

    def stored_factors(self, device: str | None = None) -> tuple[Tensor, Tensor]:
        """``(up [out, r], down [r, in·k·k])`` as stored: ``up @ down = ΔW / scale``."""
        from loratool.networks.lora import factors

        up, down, _ = factors(self.load(device))
        return require_finite(up, self.name), require_finite(down, self.name)

    def dense(self, device: str | None = None) -> Tensor:
        """``coef · ΔW`` as a float32 matrix ``[out, in·kh·kw]``."""
        from loratool.networks import delta_weight

        m = self.module
        tensors = {k: v for k, v in self.load(device).items() if k != "dora_scale"}
        shape = m.extra.get("shape")
        dw = delta_weight(m.network_type, tensors, m.alpha, tuple(shape) if shape else None, scale=m.scale)
        return require_finite(dw.reshape(dw.shape[0], -1) * self.coef, self.name).float()

    def bias(self, device: str | None = None) -> Tensor | None:
        from loratool.networks import delta_bias

        db = delta_bias(self.module.network_type, self.load(device), self.module.alpha)
        return None if db is None else db * self.coef


def require_finite(t: Tensor, name: str) -> Tensor:
    """``t``, or a :class:`ConversionError` naming the module when it holds NaN/Inf (a
    module with unusable values must never be written, nor pass verification)."""
    import torch

    if not bool(torch.isfinite(t).all()):
        raise ConversionError(None, f"{name}: its tensors hold NaN/Inf, so its ΔW cannot be re-factored")
    return t


def target_factors(terms: Sequence[Term], device: str | None = None) -> tuple[Tensor, Tensor]:
    """``Σ coefᵢ·ΔWᵢ`` as one product ``up @ down`` (all terms factored)."""
    from loratool.lowrank import stack_factors

    return stack_factors([t.factors(device) for t in terms])


def target_dense(terms: Sequence[Term], device: str | None = None) -> Tensor:
    total = terms[0].dense(device)
    for t in terms[1:]:
        total = total + t.dense(device)
    return total


def target_bias(terms: Sequence[Term], device: str | None = None) -> Tensor | None:
    biases = [b for b in (t.bias(device) for t in terms) if b is not None]
    return sum(biases[1:], biases[0]) if biases else None


class LazyTensors:
    """One new module's tensors: computed together on first request, each released once
    taken (the writer asks for a module's tensors one after another)."""

    def __init__(self, compute: Callable[[], dict[str, Tensor]]) -> None:
        self._compute = compute
        self._cache: dict[str, Tensor] | None = None

    def take(self, name: str) -> Tensor:
        if self._cache is None or name not in self._cache:
            self._cache = self._compute()
        tensor = self._cache.pop(name)
        if not self._cache:
            self._cache = None
        return tensor

    def ref(self, name: str, dtype: str, shape: tuple[int, ...]) -> TensorRef:
        return TensorRef(name, dtype, shape, self.take)


def lora_module(
    like: AdapterModule, key: ModuleKey, lay: Layout, rank: int, alpha: float, dtype: str,
    lazy: LazyTensors, carried: dict[str, TensorRef] | None = None,
) -> AdapterModule:
    """A LoRA/LoCon module with ``lora_down``/``lora_up`` from ``lazy``, the names and
    catalog facts of ``like``, and ``carried`` parameters (refs, e.g. an unchanged
    ``dora_scale``)."""
    conv = bool(lay.kernel)
    params = {
        "lora_down": lazy.ref("lora_down", dtype, (rank, lay.in_dim, *lay.kernel)),
        "lora_up": lazy.ref("lora_up", dtype, (lay.out, rank, *((1, 1) if conv else ()))),
        **(carried or {}),
    }
    return AdapterModule(
        key=key, params=params, network_type="locon" if prod(lay.kernel) > 1 else "lora", alpha=alpha,
        source_name=like.source_name, resolved=like.resolved,
        dora_axis=like.dora_axis if "dora_scale" in params else None,
        extra={k: v for k, v in like.extra.items() if k in ("target", "shape")},
    )


def shape_factors(up: Tensor, down: Tensor, lay: Layout) -> dict[str, Tensor]:
    """Matrices ``up [out, k]``, ``down [k, in·kh·kw]`` in the layout :func:`lora_module`
    declares, on the CPU."""
    conv = bool(lay.kernel)
    k = up.shape[1]
    return {
        "lora_down": down.reshape(k, lay.in_dim, *lay.kernel).contiguous().cpu(),
        "lora_up": up.reshape(lay.out, k, *((1, 1) if conv else ())).contiguous().cpu(),
    }


# --------------------------------------------------------------------------- verification

# Relative slack for float32 arithmetic in the check itself (QR/SVD of the stacked factors).
F32_SLACK = 1e-5


@dataclass
class Check:
    """What a written module must be: ``terms`` summed, within ``expected`` (the
    truncation error ‖target − out‖_F; 0 for an exact result) plus rounding."""

    key: ModuleKey
    name: str
    terms: list[Term]
    expected: float = 0.0
    norm: float | None = None  # ‖target‖_F when already known (saves recomputing it)
    magnitude: TensorRef | None = None  # DoRA magnitude carried unchanged
    deviation: float | None = field(default=None)  # |measured − expected| / ‖target‖


def verify_written(path: Path, family: str, checks: Sequence[Check], device: str | None = None) -> float:
    """Re-read the adapter written at ``path`` and hold every module to its check.

    Returns the largest relative deviation; raises :class:`ConversionError` naming the
    modules that are missing or off by more than rounding (nothing is renamed into place)."""
    from loratool.formats.decode import decode
    from loratool.io.sources import open_source

    source = open_source(path)
    missing: list[str] = []
    off: list[str] = []
    worst = 0.0
    try:
        out = decode(source, family=family)
        for c in checks:
            o = out.modules.get(c.key)
            if o is None or o.network_type not in FACTORED_TYPES:
                missing.append(c.name)
                continue
            measured, norm, tol = _distance(c, o, device)
            if not math.isfinite(measured) or not math.isfinite(norm):
                off.append(f"{c.name} (NaN/Inf)")
                continue
            c.deviation = abs(measured - c.expected) / norm if norm else 0.0
            worst = max(worst, c.deviation)
            if abs(measured - c.expected) > tol or not _same_extras(c, o, device):
                off.append(f"{c.name} (‖ΔW − target‖ {measured:.4g}, expected {c.expected:.4g} ± {tol:.2g})")
    finally:
        source.close()
    if missing:
        raise ConversionError(path, f"verification failed: {len(missing)} module(s) missing from the output, e.g. {missing[0]}")
    if off:
        raise ConversionError(path, f"verification failed in {len(off)} module(s), e.g. {off[0]}; nothing was written")
    return worst


def _unit_roundoff(m: AdapterModule) -> float:
    from loratool.ops.verify import UNIT_ROUNDOFF

    return max(UNIT_ROUNDOFF.get(r.dtype, 0.0) for r in m.params.values())


def _distance(c: Check, o: AdapterModule, device: str | None) -> tuple[float, float, float]:
    """(‖target − out‖_F, ‖target‖_F, tolerance)."""
    import torch

    from loratool.lowrank import product_norm, stack_factors

    out = Term(o, -1.0)
    out_up, out_down = out.factors(device)
    out_size = (torch.linalg.norm(out_up) * torch.linalg.norm(out_down)).item()
    if all(t.factored for t in c.terms):
        pairs = [t.factors(device) for t in c.terms]
        measured = product_norm(*stack_factors([*pairs, (out_up, out_down)])).item()
        norm = c.norm if c.norm is not None else product_norm(*stack_factors(pairs)).item()
        size = sum((torch.linalg.norm(u) * torch.linalg.norm(d)).item() for u, d in pairs)
    else:
        target = target_dense(c.terms, device)
        norm = torch.linalg.norm(target).item()
        measured = torch.linalg.norm(target + out_up @ out_down).item()
        size = norm
    # Rounding the written factors to their dtype moves ΔW by at most 2u·‖up‖_F·‖down‖_F.
    tol = 2 * _unit_roundoff(o) * out_size + F32_SLACK * (size + out_size)
    return measured, norm, tol


def _same_extras(c: Check, o: AdapterModule, device: str | None) -> bool:
    """DoRA magnitude and bias change as the target has them."""
    if c.magnitude is not None:
        want, got = c.magnitude.load().float().reshape(-1), o.params.get("dora_scale")
        if got is None or not bool((got.load().float().reshape(-1) - want).abs().max() <= 2 * _unit_roundoff(o) * want.abs().max()):
            return False
    want_b, got_b = target_bias(c.terms, device), Term(o).bias(device)
    if want_b is None or got_b is None:
        return want_b is None and got_b is None
    return bool((want_b - got_b).abs().max() <= 4 * _unit_roundoff(o) * want_b.abs().max() + F32_SLACK * want_b.abs().max())

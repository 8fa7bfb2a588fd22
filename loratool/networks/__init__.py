"""Network types: recognise a module's parameters, read rank and scale, compute ΔW.

One small module per type, registered in :data:`NETWORK_TYPES` (a new type is one new
file plus one line here). Parameter names are the canonical ones of
:mod:`loratool.model` (kohya/LyCORIS spellings without ``.weight``).

Importing this package does not import torch: :func:`classify`, :func:`rank_of` and
:func:`scale_of` work on shapes; the functions that take tensors import torch lazily.

Conventions
-----------
* Scale (kohya): ``alpha / rank``; alpha None or 0 → 1.0; LoKr with both factors full
  (no rank) → 1.0; ``full``/``norm``/``ia3``/``oft``/``boft`` → 1.0 (OFT's alpha is a
  constraint, passed to the math as such). PEFT ``lora_alpha`` and rsLoRA are folded into
  the kohya alpha by the decoders (rsLoRA: ``lora_alpha·√r``).
* "locon" = LoRA parameters with a spatial kernel > 1 or a Tucker ``lora_mid``; LoRA on
  linear layers and 1×1 convs is "lora".
* All tensors are computed in float32 whatever their dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod
from typing import TYPE_CHECKING, Any

from loratool.networks.base import SIDE_PARAMS, NetworkType, ShapeError, as_alpha, reshape_to
from loratool.networks.boft import BOFT
from loratool.networks.dora import apply_dora, dora_axis
from loratool.networks.dora import dora_axis as _detect_axis
from loratool.networks.full import FULL
from loratool.networks.glora import GLORA
from loratool.networks.ia3 import IA3
from loratool.networks.loha import LOHA
from loratool.networks.lokr import LOKR
from loratool.networks.lora import LOCON, LORA
from loratool.networks.norm import NORM
from loratool.networks.oft import OFT

if TYPE_CHECKING:
    import torch

#: Every known type, by name, in recognition order.
NETWORK_TYPES: dict[str, NetworkType] = {
    t.name: t for t in (LORA, LOCON, LOHA, LOKR, IA3, FULL, NORM, GLORA, OFT, BOFT)
}

__all__ = [
    "NETWORK_TYPES",
    "NetworkType",
    "ShapeError",
    "add_delta",
    "apply_dora",
    "classify",
    "delta_bias",
    "delta_weight",
    "depends_on_base",
    "dora_axis",
    "fits_weight",
    "invalid_shapes",
    "merged_bias",
    "merged_weight",
    "rank_of",
    "scale_of",
]


def _type(network_type: str) -> NetworkType:
    try:
        return NETWORK_TYPES[network_type]
    except KeyError:
        raise ValueError(f"unknown network type {network_type!r}") from None


def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def classify(param_names: set[str], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The type whose parameter set this is (``alpha``/``dora_scale`` ignored), else None."""
    names = set(param_names) - SIDE_PARAMS
    shp = {k: tuple(v) for k, v in shapes.items() if k in names}
    for t in NETWORK_TYPES.values():
        if t.recognises(names, shp):
            return t.name
    return None


def invalid_shapes(network_type: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why these parameter shapes cannot be one module of the type (None when they can):
    empty tensors, wrong dims, factors that do not join. Modules that pass compute ΔW
    (and rank, scale, weight_io) without error."""
    shp = {k: tuple(v) for k, v in shapes.items() if k not in SIDE_PARAMS}
    for name, shape in shp.items():
        if len(shape) > 4 or 0 in shape:
            return f"{name} has shape {list(shape)}" + (", an empty tensor" if 0 in shape else "")
    try:
        _type(network_type).delta_shape(shp, None)
    except ShapeError as exc:
        return str(exc)
    return None


def fits_weight(network_type: str, shapes: Mapping[str, tuple[int, ...]], weight_shape: tuple[int, ...]) -> bool:
    """Whether the module's ΔW fits a weight of ``weight_shape``: same rows and element
    count (1×1 conv ↔ linear, flattened conv factors), or the type's own rule where ΔW
    follows W0. Assumes :func:`invalid_shapes` passed."""
    shp = {k: tuple(v) for k, v in shapes.items() if k not in SIDE_PARAMS}
    try:
        out = _type(network_type).delta_shape(shp, tuple(weight_shape))
    except ShapeError:
        return False
    return out is not None and len(out) >= 1 and len(weight_shape) >= 1 and out[0] == weight_shape[0] and prod(out) == prod(weight_shape)


def depends_on_base(network_type: str, param_names: set[str] | frozenset[str]) -> bool:
    """Whether ΔW needs W0: IA3/GLoRA/OFT/BOFT, and bias-only full/norm modules (zero ΔW)."""
    t = _type(network_type)
    return t.needs_base or (t.weight_params is not None and not (set(param_names) & t.weight_params))


def rank_of(network_type: str, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The module's rank (None for types without one, and for LoKr with both factors full)."""
    return _type(network_type).rank({k: tuple(v) for k, v in shapes.items()})


def scale_of(
    network_type: str, shapes: Mapping[str, tuple[int, ...]], alpha: float | None
) -> float:
    """kohya scale ``alpha / rank``; 1.0 when alpha is absent/0, there is no rank, or the
    type takes no alpha."""
    t = _type(network_type)
    a = as_alpha(alpha)
    if not t.uses_alpha or a is None:
        return 1.0
    r = rank_of(network_type, shapes)
    return 1.0 if not r else a / r


def delta_weight(
    network_type: str,
    tensors: Mapping[str, torch.Tensor],
    alpha: float | None,
    target_shape: tuple[int, ...] | None = None,
    *,
    base_weight: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """fp32 ΔW with the module scale applied (no DoRA, no user multiplier).

    ``scale`` overrides the kohya ``alpha/rank`` rule where a format scales otherwise
    (PEFT LoKr with both factors full scales by alpha/r; kohya by 1).

    Reshaped to ``target_shape`` when given (element counts must match: 1×1 conv ↔
    linear, flattened LoHa conv factors). IA3, GLoRA, OFT and BOFT need ``base_weight``
    (for OFT/BOFT this is the ΔW at multiplier 1).
    """
    t = _type(network_type)
    if t.needs_base and base_weight is None:
        raise ValueError(f"{network_type}: ΔW depends on the base weight; pass base_weight")
    if base_weight is not None and target_shape is None:
        target_shape = tuple(base_weight.shape)
    if base_weight is not None and t.needs_base:
        base_weight = base_weight.reshape(target_shape)
    if base_weight is None and target_shape is not None and depends_on_base(network_type, set(tensors)):
        import torch

        device = next((t.device for t in tensors.values()), None)
        return torch.zeros(target_shape, dtype=torch.float32, device=device)  # bias-only: no weight change
    if scale is None:
        scale = scale_of(network_type, _shapes(tensors), alpha)
    dw = t.delta(tensors, scale, base=base_weight, alpha=as_alpha(alpha))
    return reshape_to(dw, target_shape)


def add_delta(
    target: torch.Tensor,
    network_type: str,
    tensors: Mapping[str, torch.Tensor],
    alpha: float | None,
    *,
    base_weight: torch.Tensor | None = None,
    scale: float | None = None,
) -> None:
    """``target += ΔW`` in place (fp32 target; scale applied; reshaped as
    :func:`delta_weight` does). LoRA adds through one fused GEMM without forming ΔW."""
    t = _type(network_type)
    if scale is None:
        scale = scale_of(network_type, _shapes(tensors), alpha)
    if t.add_into is not None and t.add_into(target, tensors, scale):
        return
    target += delta_weight(network_type, tensors, alpha, tuple(target.shape), base_weight=base_weight, scale=scale)


def delta_bias(
    network_type: str, tensors: Mapping[str, torch.Tensor], alpha: float | None
) -> torch.Tensor | None:
    """fp32 bias change with the module scale applied (``lora_up_bias``, ``diff_b``,
    ``b_norm``), or None when the module has none."""
    t = _type(network_type)
    if t.bias_delta is None:
        return None
    return t.bias_delta(tensors, scale_of(network_type, _shapes(tensors), alpha))


def merged_weight(
    network_type: str,
    tensors: Mapping[str, torch.Tensor],
    alpha: float | None,
    base_weight: torch.Tensor,
    multiplier: float = 1.0,
    dora_axis: str | None = None,
) -> torch.Tensor:
    """The fp32 merged weight: ``W0 + m·ΔW``, the DoRA merge when ``dora_scale`` is among
    the tensors (axis detected from shapes unless given), or the type's own merge where
    the multiplier is not linear in ΔW (OFT, BOFT)."""
    import torch

    t = _type(network_type)
    w0 = base_weight.to(torch.float32)
    dora = tensors.get("dora_scale")
    if t.merge is not None:
        if dora is not None:
            raise ValueError(f"{network_type}: DoRA is not defined for this type")
        return t.merge(w0, tensors, as_alpha(alpha), multiplier)
    dw = delta_weight(network_type, tensors, alpha, tuple(w0.shape), base_weight=w0)
    if dora is None:
        return w0 + multiplier * dw
    axis = dora_axis or _detect_axis(tuple(dora.shape), tuple(w0.shape))
    return apply_dora(w0, dw, dora, axis, multiplier)


def merged_bias(
    network_type: str,
    tensors: Mapping[str, torch.Tensor],
    alpha: float | None,
    base_bias: torch.Tensor | None,
    multiplier: float = 1.0,
) -> torch.Tensor | None:
    """fp32 ``b0 + m·Δb`` (a zero base when the layer had no bias); None when neither exists."""
    import torch

    db = delta_bias(network_type, tensors, alpha)
    if db is None:
        return None if base_bias is None else base_bias.to(torch.float32)
    b0 = torch.zeros_like(db) if base_bias is None else base_bias.to(torch.float32)
    return b0 + multiplier * db

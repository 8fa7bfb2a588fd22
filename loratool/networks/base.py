"""The shape of a network type, and small helpers shared by the per-type modules.

Nothing here imports torch at import time: recognising a type, reading its rank and its
scale work on shapes alone (``loratool inspect`` stays torch-free). Functions that take
tensors import torch inside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Shapes = Mapping[str, tuple[int, ...]]
Tensors = Mapping[str, "torch.Tensor"]

#: Parameters that ride along with any type and never decide it.
SIDE_PARAMS = frozenset({"alpha", "dora_scale"})


class ShapeError(ValueError):
    """Parameter shapes that no module of a type can have (the message says why)."""


def need(condition: bool, reason: str) -> None:
    """Raise :class:`ShapeError` with ``reason`` unless ``condition`` holds."""
    if not condition:
        raise ShapeError(reason)


def ndim(shapes: Shapes, name: str, lo: int, hi: int = 4) -> tuple[int, ...]:
    """``shapes[name]``, checked to have ``lo``–``hi`` dims."""
    shape = tuple(shapes[name])
    need(lo <= len(shape) <= hi, f"{name} has shape {list(shape)}; expected {lo}" + (f"–{hi}" if hi != lo else "") + " dims")
    return shape


@dataclass(frozen=True)
class NetworkType:
    """One network type: which parameters it has and how its weight change is computed.

    ``required``/``optional`` decide recognition (a module is this type when its
    parameter names, less :data:`SIDE_PARAMS`, contain every required name and nothing
    outside required ∪ optional) and ``accepts`` refines it by shapes.
    ``delta(tensors, scale, base)`` returns ΔW already multiplied by ``scale`` (``base``
    is W0 for types whose change depends on it, else ignored). ``merge(base, tensors,
    scale, multiplier)``, when set, computes the merged weight itself (types whose
    multiplier is not linear in ΔW: IA3, OFT, BOFT). ``add_into(target, tensors, scale)``,
    when set, adds the scaled ΔW to ``target`` in place without forming ΔW (False: it
    cannot for this target, use ``delta``).

    ``delta_shape(shapes, base)`` is the shape ``delta`` returns for these parameter
    shapes, or raises :class:`ShapeError` saying which shapes do not fit together (or
    do not fit ``base``, W0's shape, when given). Where ΔW follows W0 it is ``base``
    (None when not given). ``weight_params``: the parameters that carry a weight change;
    a module with none of them (a bias-only ``full``/``norm``) has a zero ΔW shaped like W0.
    """

    name: str
    required: frozenset[str]
    optional: frozenset[str] = frozenset()
    rank: Callable[[Shapes], int | None] = lambda shapes: None
    uses_alpha: bool = False
    delta: Callable[..., torch.Tensor] | None = None
    merge: Callable[..., torch.Tensor] | None = None
    bias_delta: Callable[[Tensors, float], torch.Tensor | None] | None = None
    needs_base: bool = False
    add_into: Callable[[torch.Tensor, Tensors, float], bool] | None = None
    accepts: Callable[[Shapes], bool] = lambda shapes: True
    alternatives: tuple[frozenset[str], ...] = field(default=())
    delta_shape: Callable[[Shapes, tuple[int, ...] | None], tuple[int, ...] | None] = lambda shapes, base: base
    weight_params: frozenset[str] | None = None  # None: every module of the type has one
    doc: str = ""

    def recognises(self, names: set[str] | frozenset[str], shapes: Shapes) -> bool:
        names = set(names) - SIDE_PARAMS
        allowed = self.required | self.optional
        if not names or not names <= allowed:
            return False
        groups = self.alternatives or (self.required,)
        if not any(g <= names for g in groups):
            return False
        return self.accepts(shapes)


def any_of(*groups: set[str] | frozenset[str]) -> tuple[frozenset[str], ...]:
    """Alternative sets of required names (``recognises`` needs one of them)."""
    return tuple(frozenset(g) for g in groups)


def kernel_size(shape: tuple[int, ...]) -> int:
    """Product of the spatial dims of a conv-shaped tensor (1 for a matrix)."""
    return prod(shape[2:]) if len(shape) > 2 else 1


def as_alpha(alpha: Any) -> float | None:
    """Alpha as a float (accepts a 0-d or 1-element tensor); ``None`` when absent or 0."""
    if alpha is None:
        return None
    if hasattr(alpha, "numel"):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must hold one value, got shape {tuple(alpha.shape)}")
        alpha = alpha.float().item()
    value = float(alpha)
    return None if value == 0.0 else value


def f32(t: torch.Tensor) -> torch.Tensor:
    """The tensor as float32 (ΔW is always computed in fp32)."""
    import torch

    return t.to(torch.float32)


def reshape_to(t: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Reshape to ``shape`` when given and the element counts match (1×1 conv ↔ linear)."""
    if shape is None or tuple(t.shape) == tuple(shape):
        return t
    if t.numel() != prod(shape):
        raise ValueError(f"ΔW of shape {tuple(t.shape)} does not fit target {tuple(shape)}")
    return t.reshape(shape)


def mat(t: torch.Tensor) -> torch.Tensor:
    """Flatten to a matrix ``(dim0, -1)``."""
    return t.reshape(t.shape[0], -1)

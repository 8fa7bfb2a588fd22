"""IA3 (LyCORIS layout): W = W0 · (1 + m·w), w scaling output rows or input columns.

``weight`` is ``[C]`` (linear) or ``[1, C, 1, 1]`` (conv); ``on_input`` (0/1) says whether
C is the input axis. When ``on_input`` is absent the axis is read from the length (output
when ambiguous). ΔW = W0 ⊙ w depends on W0, and is linear in the multiplier.
PEFT's ``ia3_l`` is ``w + 1``; decoders convert.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, f32, ndim, need

if TYPE_CHECKING:
    from torch import Tensor


def on_input(tensors: Tensors, base_shape: tuple[int, ...]) -> bool:
    """Whether the IA3 vector scales input columns."""
    flag = tensors.get("on_input")
    if flag is not None:
        return bool(float(flag.reshape(-1)[0]))
    n = tensors["weight"].numel()
    return n == base_shape[1] and n != base_shape[0]


def axis_fits(length: int, base: tuple[int, ...], flag: bool | None) -> bool:
    """Whether a vector of ``length`` scales the axis of W0 (``base``) that ``flag``, or
    the length when there is no flag, chooses."""
    if len(base) < 2:
        return False
    if flag is None:
        return length in (base[0], base[1])
    return length == base[1 if flag else 0]


def delta_shape(shapes: Shapes, base: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """W0's shape (ΔW = W0 ⊙ w); the vector must scale one of its first two axes."""
    length = prod(ndim(shapes, "weight", 1))
    if "on_input" in shapes:
        need(prod(shapes["on_input"]) == 1, f"on_input has shape {list(shapes['on_input'])}; expected one value")
    if base is not None:
        need(axis_fits(length, base, None), f"IA3 vector of {length} fits neither axis of a weight of shape {list(base)}")
    return base


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    if base is None:
        raise ValueError("IA3's ΔW depends on the base weight; pass base_weight")
    w0 = f32(base)
    w = f32(tensors["weight"]).reshape(-1)
    view = [1] * w0.dim()
    view[1 if on_input(tensors, tuple(w0.shape)) else 0] = -1
    return w0 * w.reshape(view) * scale


IA3 = NetworkType(
    name="ia3",
    required=frozenset({"weight"}),
    optional=frozenset({"on_input"}),
    delta=delta,
    needs_base=True,
    delta_shape=delta_shape,
    doc="IA3: learned per-channel scaling of W0",
)

"""DoRA: weight-decomposed merge, an add-on to LoRA/LoHa/LoKr (``dora_scale`` = magnitude M).

With V = W0 + s·ΔW (s = alpha/rank, the user multiplier not included) and ‖V‖ the L2 norm
per output row (axis "out": PEFT, LyCORIS ≥ 3.2 ``wd_on_out``) or per input column
(axis "in": LyCORIS 2.2–3.1), the merged weight follows LyCORIS ``apply_weight_decompose``:

    W' = V · (1 + m · (M / ‖V‖ − 1))

For m = 1 this is M·V/‖V‖, PEFT's merged weight. Zero-norm rows/columns are guarded with
float32 eps (LyCORIS adds eps everywhere; PEFT adds none; the difference is below 1e-6).
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

AXES = ("out", "in")


def dora_axis(dora_scale_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str:
    """Which axis a ``dora_scale`` normalises, read from its shape as ComfyUI does.

    K layout: ``[out, 1(, 1, 1)]`` → "out", ``[1, in(, 1, 1)]`` → "in"; PEFT's 1-D
    ``[out]`` → "out". The first dim decides when the count fits both
    axes (square weights): ``shape[0] == out`` → "out", else "in". PEFT's conv magnitude ``[1, out, 1, 1]``
    must be reshaped to ``[out, 1, 1, 1]`` by the decoder; unreshaped it reads as "out"
    only when out ≠ in.
    """
    n = prod(dora_scale_shape)
    out_dim, in_dim = weight_shape[0], (weight_shape[1] if len(weight_shape) > 1 else 1)
    fits_out, fits_in = n == out_dim, n == in_dim
    if fits_out and (len(dora_scale_shape) <= 1 or dora_scale_shape[0] == out_dim):
        return "out"
    if fits_in:
        return "in"
    if fits_out:
        return "out"
    raise ValueError(
        f"dora_scale of shape {tuple(dora_scale_shape)} fits neither axis of a "
        f"weight of shape {tuple(weight_shape)}"
    )


def weight_norm(v: Tensor, axis: str) -> Tensor:
    """L2 norm of V per output row ("out") or per input column ("in"), broadcastable to V."""
    import torch

    if axis == "out":
        norm = torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)
        return norm.reshape(-1, *([1] * (v.dim() - 1)))
    if axis == "in":
        norm = torch.linalg.vector_norm(v.transpose(0, 1).reshape(v.shape[1], -1), dim=1)
        return norm.reshape(1, -1, *([1] * (v.dim() - 2)))
    raise ValueError(f"DoRA axis must be one of {AXES}, got {axis!r}")


def apply_dora(base_weight: Tensor, delta: Tensor, dora_scale: Tensor, axis: str, multiplier: float = 1.0) -> Tensor:
    """Merged fp32 weight W' = V·(1 + m·(M/‖V‖ − 1)), V = W0 + delta (delta already scaled)."""
    import torch

    w0 = base_weight.to(torch.float32)
    v = w0 + delta.to(torch.float32).reshape(w0.shape)
    norm = weight_norm(v, axis).clamp_min(torch.finfo(torch.float32).eps)
    mag = dora_scale.to(torch.float32).reshape(norm.shape)
    return v * (1.0 + multiplier * (mag / norm - 1.0))

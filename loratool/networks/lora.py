"""LoRA and LoCon: ΔW = up @ down, optionally through a Tucker/CP core ``lora_mid``.

Shapes (kohya/LyCORIS): down ``[r, in(, kh, kw)]``, up ``[out, r(, 1, 1)]``; with Tucker,
down ``[r, in, 1, 1]`` and ``lora_mid [r, r, kh, kw]``. ``lora_up_bias`` (PEFT
``lora_B.bias``) is a bias change, scaled like the weight.

"locon" is the same math, reported for conv modules with a spatial kernel > 1 (or a Tucker
core). LoRA on 1×1 convs stays "lora": that is what kohya trains without ``conv_dim``.
"""

from __future__ import annotations

from dataclasses import replace
from math import prod
from typing import TYPE_CHECKING

from loratool.networks.base import NetworkType, Shapes, Tensors, f32, kernel_size, mat, ndim, need

if TYPE_CHECKING:
    from torch import Tensor

PARAMS = frozenset({"lora_down", "lora_up"})
OPTIONAL = frozenset({"lora_mid", "lora_up_bias"})


def rank(shapes: Shapes) -> int | None:
    return shapes["lora_down"][0] if "lora_down" in shapes else None


def is_conv_kernel(shapes: Shapes) -> bool:
    """True when the LoRA carries a spatial kernel > 1 (LoCon) or a Tucker core."""
    return "lora_mid" in shapes or kernel_size(tuple(shapes.get("lora_down", ()))) > 1


def delta(tensors: Tensors, scale: float, base: Tensor | None = None, alpha: float | None = None) -> Tensor:
    import torch

    down, up = f32(tensors["lora_down"]), f32(tensors["lora_up"])
    out_dim, in_dim = up.shape[0], down.shape[1]
    mid = tensors.get("lora_mid")
    if mid is not None:
        mid = f32(mid)
        dw = torch.einsum("m n ..., i m, n j -> i j ...", mid, mat(up), mat(down))
        return dw * scale
    dw = (mat(up) * scale) @ mat(down)  # scale the small factor: no pass over ΔW
    return dw.reshape(out_dim, in_dim, *down.shape[2:])


def add_into(target: Tensor, tensors: Tensors, scale: float) -> bool:
    """target += scale·(up @ down) in one fused GEMM (no ΔW temporary); False when the
    target is not a contiguous weight of ΔW's element count, or the LoRA has a Tucker core."""
    if "lora_mid" in tensors or not target.is_contiguous():
        return False
    up, down = mat(f32(tensors["lora_up"])), mat(f32(tensors["lora_down"]))
    if target.shape[0] != up.shape[0] or target.numel() != up.shape[0] * down.shape[1]:
        return False
    if up.device != target.device:
        up, down = up.to(target.device), down.to(target.device)
    target.view(up.shape[0], -1).addmm_(up, down, alpha=scale)
    return True


def factors(tensors: Tensors) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """ΔW/scale as a matrix product: ``(up [out, r], down [r, in·kh·kw], kernel)``, fp32.

    ``kernel`` is the down factor's spatial dims (``()`` for a linear layer, ``(1, 1)``
    for a 4-D 1×1 conv). A Tucker core is folded into down, exactly and at the same rank:
    ``down'[m, j, k, l] = Σₙ mid[m, n, k, l]·down[n, j]``, so a Tucker LoCon becomes a
    plain one (``mat(up) @ mat(down')`` is :func:`delta` flattened)."""
    import torch

    up, down = mat(f32(tensors["lora_up"])), f32(tensors["lora_down"])
    mid = tensors.get("lora_mid")
    if mid is not None:
        down = torch.einsum("m n ..., n j -> m j ...", f32(mid), mat(down))
    return up, mat(down), tuple(down.shape[2:])


def delta_shape(shapes: Shapes, base: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """ΔW's shape: ``[out, in(, kh, kw)]`` from down's trailing dims (Tucker: mid's kernel)."""
    down, up = ndim(shapes, "lora_down", 2), ndim(shapes, "lora_up", 2)
    rank = down[0]
    need(prod(up[2:]) == 1, f"lora_up has shape {list(up)}; expected [out, rank] or [out, rank, 1, 1]")
    if "lora_mid" in shapes:
        mid = ndim(shapes, "lora_mid", 2)
        need(prod(down[2:]) == 1, f"lora_down has shape {list(down)} beside a Tucker lora_mid; expected [rank, in, 1, 1]")
        need(mid[0] == up[1] and mid[1] == rank, f"lora_mid {list(mid)} does not join lora_up {list(up)} and lora_down {list(down)}")
        out = (up[0], down[1], *mid[2:])
    else:
        need(up[1] == rank, f"rank differs: lora_up {list(up)} vs lora_down {list(down)}")
        out = (up[0], *down[1:])
    if "lora_up_bias" in shapes:
        bias = ndim(shapes, "lora_up_bias", 1, 1)
        need(bias[0] == up[0], f"lora_up_bias {list(bias)} does not match {up[0]} outputs")
    return out


def bias_delta(tensors: Tensors, scale: float) -> Tensor | None:
    bias = tensors.get("lora_up_bias")
    return None if bias is None else f32(bias).reshape(-1) * scale


LORA = NetworkType(
    name="lora",
    required=PARAMS,
    optional=OPTIONAL,
    rank=rank,
    uses_alpha=True,
    delta=delta,
    bias_delta=bias_delta,
    delta_shape=delta_shape,
    add_into=add_into,
    accepts=lambda shapes: not is_conv_kernel(shapes),
    doc="LoRA: ΔW = up @ down",
)

LOCON = replace(
    LORA,
    name="locon",
    accepts=is_conv_kernel,
    doc="LoCon: LoRA on a conv with kernel > 1 (optionally Tucker lora_mid)",
)

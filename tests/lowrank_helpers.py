"""Test LoRAs with planted spectra (real SD1.5 kohya names and shapes) and an independent
ΔW reader: ΔW straight from the file's raw tensors in float64, no loratool code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

F64 = torch.float64

# kohya name -> (out, in, kernel): a linear, a 1×1-conv proj_in, a cross-attention key,
# a 3×3 resnet conv and a 1×1 conv shortcut, all as in fixtures/sd15_kohya_locon.
SD15_MODULES: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (3072, 768, ()),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320, (1, 1)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (1280, 768, ()),
    "lora_unet_down_blocks_0_resnets_0_conv1": (320, 320, (3, 3)),
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": (640, 320, (1, 1)),
}


def orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64)).Q


def planted(out: int, in_flat: int, spectrum: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) whose product has exactly the singular values ``spectrum``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(spectrum, dtype=F64)
    return orthonormal(out, len(spectrum), g) * s, orthonormal(in_flat, len(spectrum), g).T


def random_factors(out: int, in_flat: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g, dtype=F64) * 0.05, torch.randn(rank, in_flat, generator=g, dtype=F64) / in_flat**0.5


def write_kohya(
    path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]], dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None, mids: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A kohya file: per name (up [out, r], down [r, in·k·k], alpha); shapes from SD15_MODULES.
    ``mids`` adds Tucker cores (down is then [r, in, 1, 1])."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (up, down, alpha) in modules.items():
        out, in_dim, kernel = SD15_MODULES[name]
        r = up.shape[1]
        mid = (mids or {}).get(name)
        if mid is not None:
            tensors[f"{name}.lora_mid.weight"] = mid.to(dtype).contiguous()
            down_shape: tuple[int, ...] = (r, in_dim, 1, 1)
        else:
            down_shape = (r, in_dim, *kernel)
        tensors[f"{name}.lora_down.weight"] = down.reshape(down_shape).to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.reshape(out, r, *((1, 1) if kernel else ())).to(dtype).contiguous()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_network_dim": "16",
            "ss_network_alpha": "8.0", "ss_network_args": json.dumps({"conv_dim": "16", "conv_alpha": "8"}),
            "ss_output_name": path.stem, **(metadata or {})}
    save_file(tensors, str(path), meta)
    return path


def kohya_deltas(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Per kohya module (all, or ``names``): ΔW·alpha/rank as a float64 matrix
    [out, in·kh·kw] (Tucker: the einsum of FORMATS.md §5.2), read with safetensors alone.
    Keep ``names`` short for big files: every ΔW is held in float64."""
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        if names is None:
            names = sorted({k.split(".")[0] for k in keys if k.endswith("lora_down.weight")})
        out = {}
        for n in names:
            up = f.get_tensor(f"{n}.lora_up.weight").to(F64)
            down = f.get_tensor(f"{n}.lora_down.weight").to(F64)
            r = down.shape[0]
            alpha = f.get_tensor(f"{n}.alpha").item() if f"{n}.alpha" in keys else r
            if f"{n}.lora_mid.weight" in keys:
                mid = f.get_tensor(f"{n}.lora_mid.weight").to(F64)
                dw = torch.einsum("m n k l, i m, n j -> i j k l", mid, up.flatten(1), down.flatten(1))
            else:
                dw = up.flatten(1) @ down.flatten(1)
            out[n] = dw.reshape(dw.shape[0], -1) * (alpha / r)
    return out


def kohya_ranks(path: Path) -> dict[str, tuple[int, float]]:
    """Per module: (rank, alpha) as stored."""
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        return {
            k.split(".")[0]: (f.get_slice(k).get_shape()[0], f.get_tensor(k.split(".")[0] + ".alpha").item())
            for k in keys if k.endswith("lora_down.weight")
        }


class Oracle:
    """ΔW of every module of a kohya file (:func:`kohya_deltas`) and its float64 SVD,
    computed once per module."""

    def __init__(self, path: Path) -> None:
        self.deltas = kohya_deltas(path)
        self._svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def svd(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if name not in self._svd:
            self._svd[name] = torch.linalg.svd(self.deltas[name], full_matrices=False)
        return self._svd[name]

    def best(self, name: str, k: int) -> torch.Tensor:
        u, s, vh = self.svd(name)
        return (u[:, :k] * s[:k]) @ vh[:k]


def best_rank(dw: torch.Tensor, k: int) -> torch.Tensor:
    """Eckart–Young: the best rank-k approximation, from a full float64 SVD."""
    u, s, vh = torch.linalg.svd(dw.to(F64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def truncation_errors(approx: torch.Tensor, dw: torch.Tensor, k: int) -> tuple[float, float, float]:
    """(‖dw − approx‖_F, the Eckart–Young optimum for rank k, ‖dw‖_F), from float64
    singular values. A rank-k ``approx`` with the optimal error is a best rank-k
    approximation, whether or not that is unique."""
    s = torch.linalg.svdvals(dw.to(F64))
    err = torch.linalg.norm(dw.to(F64) - approx.to(F64)).item()
    return err, s[k:].square().sum().sqrt().item(), s.square().sum().sqrt().item()


def truncation_gap(approx: torch.Tensor, dw: torch.Tensor, k: int) -> float:
    """(‖dw − approx‖_F − optimum) / ‖dw‖_F: 0 for a best rank-k approximation."""
    err, optimum, norm = truncation_errors(approx, dw, k)
    return (err - optimum) / norm


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()

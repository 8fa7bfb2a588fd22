"""Independent readers for ``extract`` tests: the true ΔW of a checkpoint pair straight from
the files (through the fixture's single-file table: fused q/k/v rows, transposed
projection), a kohya LoRA's ΔW straight from its keys, the Eckart–Young optimum from a
float64 SVD, and kohya names from a rule written here. No loratool code."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from fixtures.checkpoints import FOLDER_FILES, CkptTensor, Piece

F64 = torch.float64
KOHYA_TE_PREFIX = {("sd1", "text_encoder"): "lora_te", ("sd2", "text_encoder"): "lora_te",
                   ("sdxl", "text_encoder"): "lora_te1", ("sdxl", "text_encoder_2"): "lora_te2"}


def where(table: list[CkptTensor], component: str, path: str) -> tuple[CkptTensor, Piece]:
    """The single-file tensor and piece holding a module's weight."""
    for t in table:
        for p in t.pieces:
            if p.component == component and p.key == f"{path}.weight":
                return t, p
    raise KeyError(f"{component}.{path}")


def stored_weight(ckpt: Path, table: list[CkptTensor], component: str, path: str) -> torch.Tensor:
    """A module's weight as a float64 matrix [out, in·kh·kw], from a single file or from a
    diffusers-style folder (component files), read with safetensors."""
    t, p = where(table, component, path)
    if ckpt.is_dir():
        with safe_open(str(ckpt / component / f"{FOLDER_FILES[component]}.safetensors"), "pt") as f:
            w = f.get_tensor(p.key).to(F64)
    else:
        with safe_open(str(ckpt), "pt") as f:
            w = f.get_tensor(t.key).to(F64)
        if p.rows is not None:
            w = w[p.rows[0] : p.rows[1]]
        if p.transposed:
            w = w.T
    return w.reshape(p.shape[0], -1)


def true_delta(base: Path, tuned: Path, table: list[CkptTensor], component: str, path: str) -> torch.Tensor:
    return stored_weight(tuned, table, component, path) - stored_weight(base, table, component, path)


def kohya_name(family: str, component: str, path: str, ldm_path: str | None = None) -> str:
    """kohya's flattened name: SD1/SD2 UNet diffusers-named, SDXL UNet SGM-named (``ldm_path``)."""
    if component == "unet":
        return "lora_unet_" + (ldm_path if family.startswith("sdxl") and ldm_path else path).replace(".", "_")
    return KOHYA_TE_PREFIX[(family, component)] + "_" + path.replace(".", "_")


def lora_delta(lora: Path, name: str) -> torch.Tensor:
    """alpha/rank · up @ down of one kohya module, float64 [out, in·kh·kw]."""
    with safe_open(str(lora), "pt") as f:
        up = f.get_tensor(f"{name}.lora_up.weight").to(F64)
        down = f.get_tensor(f"{name}.lora_down.weight").to(F64)
        rank = down.shape[0]
        alpha = f.get_tensor(f"{name}.alpha").item() if f"{name}.alpha" in f.keys() else rank  # noqa: SIM118
    return (alpha / rank) * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))


def lora_rank(lora: Path, name: str) -> int:
    with safe_open(str(lora), "pt") as f:
        return f.get_slice(f"{name}.lora_down.weight").get_shape()[0]


def optimum(delta: torch.Tensor, k: int) -> float:
    """The smallest ‖ΔW − X‖_F over rank-k X (Eckart–Young), from a full float64 SVD."""
    s = torch.linalg.svdvals(delta.to(F64))
    return s[k:].square().sum().sqrt().item()


def autov3(path: Path) -> str:
    """SHA-256 of a safetensors file after its header, first 12 hex digits, upper case."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()[:12].upper()

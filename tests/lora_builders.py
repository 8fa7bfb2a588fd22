"""Tiny LoRA files with real key names and shapes, for validate/metadata tests.

Written with the reference ``safetensors`` library (not loratool's writer). Shapes come
from the SD1.5 module list below (attention block 0 of the first UNet level and CLIP-L
layer 0), checked against diffusers/transformers elsewhere (test_arch).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
# kohya name -> base weight shape (SD1.5: 320 channels at level 0, context 768, CLIP-L 768).
SD1_MODULES: dict[str, tuple[int, ...]] = {
    BLOCK + "attn1_to_q": (320, 320),
    BLOCK + "attn1_to_k": (320, 320),
    BLOCK + "attn1_to_v": (320, 320),
    BLOCK + "attn1_to_out_0": (320, 320),
    BLOCK + "attn2_to_q": (320, 320),
    BLOCK + "attn2_to_k": (320, 768),
    BLOCK + "attn2_to_v": (320, 768),
    BLOCK + "attn2_to_out_0": (320, 320),
    BLOCK + "ff_net_0_proj": (2560, 320),
    BLOCK + "ff_net_2": (320, 1280),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320, 1, 1),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (768, 768),
    "lora_te_text_model_encoder_layers_0_self_attn_v_proj": (768, 768),
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": (768, 768),
}
# A kohya SDXL subset: SGM names (kohya's own), context 2048.
SDXL_MODULES: dict[str, tuple[int, ...]] = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v": (640, 2048),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640),
    "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q": (1280, 1280),
    "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q": (1280, 1280),
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": (1280, 1280),
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q": (1280, 1280),
}

KOHYA_META: dict[str, str] = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "ss_output_name": "tiny",
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "modelspec.sai_model_spec": "1.0.1",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.implementation": "diffusers",
    "modelspec.title": "tiny",
    "modelspec.resolution": "512x512",
    "modelspec.description": "a test LoRA",
    "modelspec.author": "loratool tests",
    "modelspec.date": "2026-01-01T00:00:00",
}


def kohya_tensors(
    modules: dict[str, tuple[int, ...]] = SD1_MODULES, rank: int = 4, alpha: float = 2.0,
    dtype: torch.dtype = torch.float16, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """kohya LoRA factors for ``modules`` (down ``[r, in(,1,1)]``, up ``[out, r(,1,1)]``)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in modules.items():
        conv = (1, 1) if len(shape) == 4 else ()
        out[f"{name}.lora_down.weight"] = (torch.randn(rank, shape[1], *conv, generator=g) * 0.1).to(dtype)
        out[f"{name}.lora_up.weight"] = (torch.randn(shape[0], rank, *conv, generator=g) * 0.02).to(dtype)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def data_sha256(path: Path) -> str:
    """SHA-256 of everything after the safetensors header (computed here, independently)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n :]).hexdigest()


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
          *, with_hashes: bool = False) -> Path:
    """Save with the reference library; ``with_hashes`` embeds the real data hash the way
    kohya (``sshs_model_hash``) and the modelspec reference (``0x`` + hex) write it."""
    meta = dict(metadata or {})
    save_file(tensors, str(path), metadata=meta or None)
    if with_hashes:
        digest = data_sha256(path)
        meta.update({"sshs_model_hash": digest, "modelspec.hash_sha256": "0x" + digest})
        save_file(tensors, str(path), metadata=meta)
        assert data_sha256(path) == digest
    return path


def clean_sd1(path: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
              meta: dict[str, str] | None = None, with_hashes: bool = True) -> Path:
    """The clean SD1 kohya file (validates with no findings at all), optionally edited."""
    tensors = kohya_tensors()
    if edit is not None:
        edit(tensors)
    return write(path, tensors, {**KOHYA_META, **(meta or {})}, with_hashes=with_hashes)


def peft_dir(path: Path, keys: dict[str, tuple[int, ...]], config: dict, dtype: torch.dtype = torch.float32) -> Path:
    """A PEFT adapter folder: ``base_model.model.<path>.lora_{A,B}.weight`` + adapter_config.json."""
    g = torch.Generator().manual_seed(1)
    r = config["r"]
    tensors: dict[str, torch.Tensor] = {}
    for module, (out_f, in_f) in keys.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) * 0.1).to(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, r, generator=g) * 0.02).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def clip_peft_config(**extra: object) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": None,
            "auto_mapping": {"base_model_class": "CLIPTextModel",
                             "parent_library": "transformers.models.clip.modeling_clip"}, **extra}

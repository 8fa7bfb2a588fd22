"""Base-model families as data: the numbers each catalog is generated from.

Values follow the published diffusers configs (``unet/config.json``,
``text_encoder*/config.json``) and the original LDM/SGM yaml files; the tests rebuild
diffusers' and transformers' own models from the same numbers and compare.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    """A ``UNet2DConditionModel`` layout, reduced to what decides module names and shapes."""

    channels: tuple[int, ...]  # block_out_channels, one per level
    attention: tuple[bool, ...]  # does down level i have cross-attention blocks
    depth: tuple[int, ...]  # transformer blocks per attention, per down level
    mid_depth: int  # transformer blocks in the mid-block attention
    context_dim: int  # cross_attention_dim (attn2.to_k/to_v in-features)
    linear_proj: bool  # proj_in/proj_out are Linear (else 1x1 Conv2d)
    adm_in: int | None = None  # add_embedding in-features (SDXL "text_time"), None: absent
    in_channels: int = 4
    out_channels: int = 4
    layers_per_block: int = 2

    @property
    def time_embed_dim(self) -> int:
        return self.channels[0] * 4


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text encoder (HF layout) and how single-file checkpoints store it.

    ``ldm_layout`` is ``"hf"`` (the checkpoint keeps transformers' names under
    ``ldm_prefix``) or ``"openclip"`` (resblocks with fused q/k/v, ``ln_final`` and a
    transposed ``text_projection``). ``comfy_name`` is ComfyUI's name for this encoder
    (``text_encoders.<comfy_name>.transformer.…``). ``kohya_prefixes[0]`` is written.
    """

    component: str
    hidden: int
    intermediate: int
    layers: int
    projection: int | None  # text_projection out-features (CLIPTextModelWithProjection)
    ldm_layout: str
    ldm_prefix: str
    comfy_name: str
    kohya_prefixes: tuple[str, ...]


@dataclass(frozen=True)
class FamilyConfig:
    """A family: one UNet plus its text encoders, and how kohya names its UNet."""

    name: str
    unet: UNetConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    # Which UNet naming kohya files are written with: "diffusers" (kohya's SD1/SD2 UNet)
    # or "ldm" (kohya's SDXL UNet, sdxl_original_unet.py). The other is accepted.
    unet_kohya_naming: str
    unet_kohya_prefix: str = "lora_unet"


_CLIP_L = {"hidden": 768, "intermediate": 3072, "layers": 12, "projection": None}
_OPENCLIP_H = {"hidden": 1024, "intermediate": 4096, "layers": 23, "projection": None}
_OPENCLIP_BIGG = {"hidden": 1280, "intermediate": 5120, "layers": 32, "projection": 1280}

_SD_UNET = {
    "channels": (320, 640, 1280, 1280),
    "attention": (True, True, True, False),
    "depth": (1, 1, 1, 0),
    "mid_depth": 1,
}

FAMILY_CONFIGS: dict[str, FamilyConfig] = {
    "sd1": FamilyConfig(
        name="sd1",
        unet=UNetConfig(**_SD_UNET, context_dim=768, linear_proj=False),
        text_encoders=(
            TextEncoderConfig(
                component="text_encoder",
                **_CLIP_L,
                ldm_layout="hf",
                ldm_prefix="cond_stage_model.transformer.",
                comfy_name="clip_l",
                # lora_te1_: written by diffusers' convert_state_dict_to_kohya; ComfyUI,
                # A1111 and diffusers all read it for SD1 (FORMATS.md §6.3).
                kohya_prefixes=("lora_te", "lora_te1"),
            ),
        ),
        unet_kohya_naming="diffusers",
    ),
    "sd2": FamilyConfig(
        name="sd2",
        unet=UNetConfig(**_SD_UNET, context_dim=1024, linear_proj=True),
        text_encoders=(
            TextEncoderConfig(
                component="text_encoder",
                **_OPENCLIP_H,
                ldm_layout="openclip",
                ldm_prefix="cond_stage_model.model.",
                comfy_name="clip_h",
                kohya_prefixes=("lora_te", "lora_te1"),
            ),
        ),
        unet_kohya_naming="diffusers",
    ),
    "sdxl": FamilyConfig(
        name="sdxl",
        unet=UNetConfig(
            channels=(320, 640, 1280),
            attention=(False, True, True),
            depth=(0, 2, 10),
            mid_depth=10,
            context_dim=2048,
            linear_proj=True,
            adm_in=2816,
        ),
        text_encoders=(
            TextEncoderConfig(
                component="text_encoder",
                **_CLIP_L,
                ldm_layout="hf",
                ldm_prefix="conditioner.embedders.0.transformer.",
                comfy_name="clip_l",
                # lora_te_: ComfyUI maps it to clip_l and diffusers to text_encoder.
                kohya_prefixes=("lora_te1", "lora_te"),
            ),
            TextEncoderConfig(
                component="text_encoder_2",
                **_OPENCLIP_BIGG,
                ldm_layout="openclip",
                ldm_prefix="conditioner.embedders.1.model.",
                comfy_name="clip_g",
                kohya_prefixes=("lora_te2",),
            ),
        ),
        unet_kohya_naming="ldm",
    ),
    "sdxl-refiner": FamilyConfig(
        name="sdxl-refiner",
        unet=UNetConfig(
            channels=(384, 768, 1536, 1536),
            attention=(False, True, True, False),
            depth=(0, 4, 4, 0),
            mid_depth=4,
            context_dim=1280,
            linear_proj=True,
            adm_in=2560,
        ),
        text_encoders=(
            TextEncoderConfig(
                component="text_encoder_2",  # diffusers' refiner pipeline has no text_encoder
                **_OPENCLIP_BIGG,
                ldm_layout="openclip",
                ldm_prefix="conditioner.embedders.0.model.",
                comfy_name="clip_g",
                # lora_te_: what ComfyUI maps to clip_g when no clip_l is loaded (the
                # refiner); lora_te2_: what diffusers (text_encoder_2) and OneTrainer
                # (text_projection) spell. See the package docstring.
                kohya_prefixes=("lora_te", "lora_te2"),
            ),
        ),
        unet_kohya_naming="ldm",
    ),
}

FAMILIES: tuple[str, ...] = tuple(FAMILY_CONFIGS)

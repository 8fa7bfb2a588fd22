"""The modules of an HF CLIP text encoder, placed in a single-file checkpoint.

Two checkpoint layouts: ``hf`` (transformers' names under a prefix: SD1, SDXL's CLIP-L)
and ``openclip`` (resblocks with fused q/k/v rows, ``ln_final``, ``text_projection``
stored transposed: SD2, SDXL's bigG, the refiner). FORMATS.md §2.5.
"""

from __future__ import annotations

from collections.abc import Iterator

from loratool.arch.families import TextEncoderConfig
from loratool.arch.raw import RawModule

# (HF name inside layer N, kind, OpenCLIP name inside resblocks.N — "in_proj_weight:i" is
# row block i of the fused q/k/v —, enclosing block class, target label)
_LAYER_PARTS: tuple[tuple[str, str, str, str, str], ...] = (
    ("self_attn.q_proj", "linear", "attn.in_proj_weight:0", "CLIPAttention", "q_proj"),
    ("self_attn.k_proj", "linear", "attn.in_proj_weight:1", "CLIPAttention", "k_proj"),
    ("self_attn.v_proj", "linear", "attn.in_proj_weight:2", "CLIPAttention", "v_proj"),
    ("self_attn.out_proj", "linear", "attn.out_proj", "CLIPAttention", "out_proj"),
    ("layer_norm1", "norm", "ln_1", "CLIPEncoderLayer", "layer_norm1"),
    ("mlp.fc1", "linear", "mlp.c_fc", "CLIPMLP", "mlp.fc1"),
    ("mlp.fc2", "linear", "mlp.c_proj", "CLIPMLP", "mlp.fc2"),
    ("layer_norm2", "norm", "ln_2", "CLIPEncoderLayer", "layer_norm2"),
)


def _layer_shape(name: str, h: int, inter: int) -> tuple[int, ...]:
    if name == "mlp.fc1":
        return (inter, h)
    if name == "mlp.fc2":
        return (h, inter)
    return (h,) if name.startswith("layer_norm") else (h, h)


def _te(
    cfg: TextEncoderConfig,
    path: str,
    kind: str,
    shape: tuple[int, ...],
    target: str,
    block: str,
    oc_name: str,
) -> RawModule:
    """Place one HF module in the checkpoint (``oc_name``: its OpenCLIP spelling)."""
    comfy = f"text_encoders.{cfg.comfy_name}.transformer.{path}"
    if cfg.ldm_layout == "hf":
        return RawModule(
            path,
            kind,
            shape,
            target,
            block,
            ldm_key=f"{cfg.ldm_prefix}{path}.weight",
            ldm_paths=(f"{cfg.ldm_prefix}{path}", comfy),
        )
    if cfg.ldm_layout != "openclip":
        raise ValueError(f"unknown text-encoder checkpoint layout {cfg.ldm_layout!r}")
    fused, _, part = oc_name.partition(":")
    if part:  # q/k/v rows of the fused in_proj_weight
        i, h = int(part), cfg.hidden
        module = fused.rsplit(".", 1)[0]  # ...resblocks.N.attn
        alias = f"{cfg.ldm_prefix}{module}.{path.rsplit('.', 1)[1]}"  # ...attn.q_proj
        return RawModule(
            path,
            kind,
            shape,
            target,
            block,
            ldm_key=f"{cfg.ldm_prefix}{fused}",
            ldm_paths=(alias, comfy),
            ldm_slice=(i * h, (i + 1) * h),
        )
    transposed = oc_name == "text_projection"
    key = f"{cfg.ldm_prefix}{oc_name}" + ("" if transposed else ".weight")
    return RawModule(
        path,
        kind,
        shape,
        target,
        block,
        ldm_key=key,
        ldm_paths=(f"{cfg.ldm_prefix}{oc_name}", comfy),
        ldm_transposed=transposed,
    )


def text_encoder_modules(cfg: TextEncoderConfig) -> Iterator[RawModule]:
    """Every Linear and LayerNorm of an HF ``CLIPTextModel[WithProjection]``."""
    h = cfg.hidden
    for n in range(cfg.layers):
        for name, kind, oc, block, target in _LAYER_PARTS:
            path = f"text_model.encoder.layers.{n}.{name}"
            shape = _layer_shape(name, h, cfg.intermediate)
            yield _te(cfg, path, kind, shape, target, block, f"transformer.resblocks.{n}.{oc}")
    yield _te(
        cfg,
        "text_model.final_layer_norm",
        "norm",
        (h,),
        "final_layer_norm",
        "CLIPTextTransformer",
        "ln_final",
    )
    if cfg.projection is not None:
        yield _te(
            cfg,
            "text_projection",
            "linear",
            (cfg.projection, h),
            "text_projection",
            "CLIPTextModelWithProjection",
            "text_projection",
        )

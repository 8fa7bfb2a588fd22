"""A checkpoint's family from its keys and shapes, with the signals LoRA detection uses.

Each stored weight becomes a :class:`~loratool.formats.family.ModuleShape` (component,
flattened name below the component, out/in features, conv or linear) and goes through
:func:`loratool.formats.family.detect_family`: cross-attention width, text-encoder widths
and depths, UNet levels, ``add_embedding``/``label_emb``, 1×1-conv or linear ``proj_in``,
SD3/Flux blocks. OpenCLIP encoders contribute their first layer only: an SD2 checkpoint
stores a 24th resblock that transformers' encoder drops, so their depth tells nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from loratool.formats.family import FamilyVerdict, ModuleShape, detect_family

OPENCLIP_FIRST = "transformer.resblocks.0."
# OpenCLIP name inside resblocks.0 -> (HF flattened name, rows of the fused tensor it is)
OPENCLIP_SIGNALS: dict[str, tuple[str, int]] = {
    "attn.in_proj_weight": ("text_model_encoder_layers_0_self_attn_q_proj", 3),
    "mlp.c_fc.weight": ("text_model_encoder_layers_0_mlp_fc1", 1),
}


def module_shapes(weights: Iterable[tuple[str, str, tuple[int, ...]]]) -> list[ModuleShape]:
    """ModuleShapes of (component, name below the component, shape) stored weights of
    the UNet and text encoders (not the VAE: its 1×1-conv ``proj_out`` would read as SD1's)."""
    out: list[ModuleShape] = []
    for component, name, shape in weights:
        if len(shape) < 2:
            continue
        if name.startswith("transformer.resblocks."):  # OpenCLIP
            if not name.startswith(OPENCLIP_FIRST):
                continue
            signal = OPENCLIP_SIGNALS.get(name[len(OPENCLIP_FIRST) :])
            if signal is not None:
                flat, fused = signal
                out.append(ModuleShape(component, flat, shape[0] // fused, shape[1]))
            continue
        if not name.endswith(".weight"):
            continue
        flat = name[: -len(".weight")].replace(".", "_")
        if component.startswith("text_encoder") and flat.startswith("encoder_"):
            flat = "text_model_" + flat  # transformers 5 saves CLIP without text_model.
        out.append(ModuleShape(component, flat, shape[0], shape[1], len(shape) == 4))
    return out


def detect(weights: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> FamilyVerdict:
    """The family verdict of a checkpoint's weights (structure first, metadata second)."""
    return detect_family(module_shapes(weights), metadata)

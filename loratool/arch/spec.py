"""The record the catalog holds for one LoRA-targetable module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModuleSpec:
    """One weight-bearing module of a base model, under every name the ecosystem uses.

    ``component``/``path`` are the canonical identity (diffusers component, dotted
    ``named_modules()`` path with CLIP's ``text_model.`` level). ``ldm_key`` is the full
    single-file checkpoint key of the weight; for OpenCLIP's fused attention it is the
    ``in_proj_weight`` and ``ldm_slice`` gives this module's rows; ``ldm_transposed`` marks
    SGM's ``text_projection`` (stored as Wᵀ). ``kohya_names[0]`` is the spelling we write.
    ``block`` is the diffusers/transformers class of the enclosing block that kohya-style
    trainers match on (``Transformer2DModel``, ``ResnetBlock2D``, ``CLIPAttention``…).
    """

    component: str
    path: str
    kind: str  # "linear" | "conv" | "norm"
    shape: tuple[int, ...]
    ldm_key: str
    ldm_slice: tuple[int, int] | None
    ldm_transposed: bool
    kohya_names: tuple[str, ...]
    target: str
    block: str = ""

    @property
    def kohya_name(self) -> str:
        """The preferred kohya flattened name (``kohya_names[0]``)."""
        return self.kohya_names[0]

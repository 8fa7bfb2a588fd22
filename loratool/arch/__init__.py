"""Base-model families as data: module catalogs for SD1.x, SD2.x, SDXL base and refiner.

A catalog lists every LoRA-targetable module (Linear, Conv2d and the norms) of a family's
UNet and text encoders, each under all the names in use: the diffusers component and
dotted path (canonical; CLIP keeps its ``text_model.`` level whatever transformers is
installed, FORMATS.md §9), the single-file checkpoint key (LDM/SGM, with OpenCLIP's
fused q/k/v row slices and SGM's transposed ``text_projection``), and the kohya
flattened names. Catalogs are generated from the configs in :mod:`.families`.

Kohya spellings (first one is written, the rest are accepted):

* UNet: SD1/SD2 diffusers-named (``lora_unet_down_blocks_0_…``, as kohya trains), then
  LDM-named (``lora_unet_input_blocks_1_1_…``, read by ComfyUI/A1111). SDXL and refiner:
  SGM-named first (kohya's SDXL UNet), then diffusers-named.
* Text encoders: SD1/SD2 ``lora_te`` then ``lora_te1`` (diffusers'
  ``convert_state_dict_to_kohya`` writes it; ComfyUI, A1111 and diffusers read it).
  SDXL ``lora_te1`` (also ``lora_te``, read by ComfyUI and diffusers) and ``lora_te2``.
  Refiner (one bigG encoder, diffusers component ``text_encoder_2``): ``lora_te`` first,
  because ComfyUI maps ``lora_te_`` to clip_g when no clip_l is loaded and does not map
  ``lora_te2_`` layers there; ``lora_te2`` is accepted (diffusers' refiner pipeline
  loads ``lora_te2_`` into ``text_encoder_2``; OneTrainer writes
  ``lora_te2_text_projection``, which ComfyUI maps on any clip_g).

Importing this package does not import torch.
"""

from loratool.arch.catalog import Catalog, flatten, get_catalog, kohya_prefixes
from loratool.arch.families import FAMILIES, FAMILY_CONFIGS
from loratool.arch.spec import ModuleSpec

__all__ = [
    "FAMILIES",
    "FAMILY_CONFIGS",
    "Catalog",
    "ModuleSpec",
    "flatten",
    "get_catalog",
    "kohya_prefixes",
]

"""The architecture catalogs, held against diffusers' and transformers' own models.

Models are built from the published configs on the meta device (no weights). The
single-file mapping is checked by running diffusers' own LDM/SGM converters over a state
dict keyed by the catalog's ``ldm_key``s.
"""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel
from diffusers.loaders import lora_conversion_utils as lcu
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loratool.arch import FAMILIES, Catalog, ModuleSpec, get_catalog, kohya_prefixes
from loratool.arch.catalog import _build
from loratool.arch.families import FAMILY_CONFIGS

# ------------------------------------------------------------------ published configs
# unet/config.json of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0 and stabilityai/stable-diffusion-xl-refiner-1.0
# (fields that shape modules; the rest are defaults).
_COMMON = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}
UNET_CONFIGS: dict[str, dict] = {
    "sd1": {
        **_COMMON,
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "sample_size": 64,
    },
    "sd2": {
        **_COMMON,
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "dual_cross_attention": False,
        "use_linear_projection": True,
        "upcast_attention": True,
        "sample_size": 96,
    },
    "sdxl": {
        **_COMMON,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "projection_class_embeddings_input_dim": 2816,
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
        "sample_size": 128,
    },
    "sdxl-refiner": {
        **_COMMON,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [6, 12, 24, 24],
        "block_out_channels": [384, 768, 1536, 1536],
        "cross_attention_dim": 1280,
        "down_block_types": [
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "projection_class_embeddings_input_dim": 2560,
        "transformer_layers_per_block": 4,
        "use_linear_projection": True,
        "sample_size": 128,
    },
}

# text_encoder*/config.json (CLIP-L of SD1.5 / SDXL, OpenCLIP-H of SD2.1, bigG of SDXL).
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_OPENCLIP_H = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
TE_CONFIGS: dict[tuple[str, str], tuple[type, dict]] = {
    ("sd1", "text_encoder"): (CLIPTextModel, _CLIP_L),
    ("sd2", "text_encoder"): (CLIPTextModel, _OPENCLIP_H),
    ("sdxl", "text_encoder"): (CLIPTextModel, _CLIP_L),
    ("sdxl", "text_encoder_2"): (CLIPTextModelWithProjection, _BIGG),
    ("sdxl-refiner", "text_encoder_2"): (CLIPTextModelWithProjection, _BIGG),
}

# The original LDM/SGM yaml UNet params (v1-inference.yaml, v2-inference-v.yaml,
# sd_xl_base.yaml, sd_xl_refiner.yaml): a second oracle, independent of the dicts above.
_LDM = {"in_channels": 4, "out_channels": 4, "num_res_blocks": 2}
_SGM = {
    **_LDM,
    "num_classes": "sequential",
    "num_head_channels": 64,
    "use_linear_in_transformer": True,
}
LDM_UNET_PARAMS: dict[str, dict] = {
    "sd1": {
        **_LDM,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "channel_mult": [1, 2, 4, 4],
        "num_heads": 8,
        "transformer_depth": 1,
        "context_dim": 768,
    },
    "sd2": {
        **_LDM,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "channel_mult": [1, 2, 4, 4],
        "num_head_channels": 64,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": 1024,
    },
    "sdxl": {
        **_SGM,
        "adm_in_channels": 2816,
        "model_channels": 320,
        "attention_resolutions": [4, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth": [1, 2, 10],
        "context_dim": 2048,
    },
    "sdxl-refiner": {
        **_SGM,
        "adm_in_channels": 2560,
        "model_channels": 384,
        "attention_resolutions": [4, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": 4,
        "context_dim": [1280, 1280, 1280, 1280],
    },
}

LAYER_TYPES = {
    torch.nn.Linear: "linear",
    torch.nn.Conv2d: "conv",
    torch.nn.GroupNorm: "norm",
    torch.nn.LayerNorm: "norm",
}
# The block classes the catalog records in ModuleSpec.block (kohya matches on these).
BLOCKS = {
    "Transformer2DModel",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
    "TimestepEmbedding",
    "CLIPAttention",
    "CLIPSdpaAttention",
    "CLIPMLP",
    "CLIPEncoderLayer",
    "CLIPTextTransformer",
}
ALIASES = {"CLIPSdpaAttention": "CLIPAttention"}


# ------------------------------------------------------------------------- helpers
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def _model(family: str, component: str) -> torch.nn.Module:
    key = (family, component)
    if key not in _MODELS:
        with torch.device("meta"):
            if component == "unet":
                _MODELS[key] = UNet2DConditionModel(**UNET_CONFIGS[family])
            else:
                cls, cfg = TE_CONFIGS[key]
                _MODELS[key] = cls(CLIPTextConfig(**cfg))
    return _MODELS[key]


def _hf_path(path: str, has_text_model: bool) -> str:
    """Catalog spelling of a transformers path (transformers 5 dropped ``text_model.``)."""
    if has_text_model or path == "text_projection":
        return path
    return f"text_model.{path}"


def _layers(family: str, component: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """path -> (kind, weight shape, enclosing block class) from the real model."""
    model = _model(family, component)
    has_text_model = component == "unet" or hasattr(model, "text_model")
    if int(transformers.__version__.split(".")[0]) < 5:
        assert has_text_model, "transformers 4.x must keep CLIP's text_model. level"
    classes = {name: type(m).__name__ for name, m in model.named_modules()}
    out = {}
    for name, module in model.named_modules():
        kind = next((k for t, k in LAYER_TYPES.items() if isinstance(module, t)), None)
        if kind is None:
            continue
        parts = name.split(".")
        block = type(model).__name__
        for i in range(len(parts) - 1, 0, -1):
            cls = classes[".".join(parts[:i])]
            if cls in BLOCKS:
                block = ALIASES.get(cls, cls)
                break
        out[_hf_path(name, has_text_model)] = (kind, tuple(module.weight.shape), block)
    return out


def _catalog_layers(cat: Catalog, component: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
    return {s.path: (s.kind, s.shape, s.block) for s in cat.of(component)}


UNETS = [("unet", f) for f in FAMILIES]
TEXT_ENCODERS = [(c, f) for (f, c) in TE_CONFIGS]


# ----------------------------------------------------------------- catalog vs models
@pytest.mark.parametrize(("component", "family"), UNETS + TEXT_ENCODERS)
def test_catalog_equals_model_modules(component: str, family: str) -> None:
    cat = get_catalog(family)
    real = _layers(family, component)
    ours = _catalog_layers(cat, component)
    assert sorted(set(real) - set(ours)) == [], "modules missing from the catalog"
    assert sorted(set(ours) - set(real)) == [], "catalog modules the model lacks"
    diff = {p: (ours[p], real[p]) for p in real if ours[p] != real[p]}
    assert diff == {}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_catalog_equals_unet_from_original_yaml(family: str) -> None:
    """diffusers' own yaml -> config derivation gives the same UNet as the catalog."""
    original = {
        "model": {
            "params": {
                "unet_config": {"params": LDM_UNET_PARAMS[family]},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    config = sfu.create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    real = {
        n: tuple(m.weight.shape)
        for n, m in unet.named_modules()
        if isinstance(m, tuple(LAYER_TYPES))
    }
    assert real == {s.path: s.shape for s in get_catalog(family).of("unet")}


def test_components_per_family() -> None:
    assert FAMILIES == ("sd1", "sd2", "sdxl", "sdxl-refiner")
    got = {f: get_catalog(f).components() for f in FAMILIES}
    assert got == {
        "sd1": ("unet", "text_encoder"),
        "sd2": ("unet", "text_encoder"),
        "sdxl": ("unet", "text_encoder", "text_encoder_2"),
        "sdxl-refiner": ("unet", "text_encoder_2"),
    }


# ------------------------------------------------------- single-file (LDM/SGM) keys
@pytest.mark.parametrize("family", FAMILIES)
def test_unet_ldm_keys_match_diffusers_converter(family: str) -> None:
    specs = get_catalog(family).of("unet")
    checkpoint = {s.ldm_key: torch.empty(1) for s in specs}
    assert len(checkpoint) == len(specs)
    # diffusers copies some biases unconditionally; give every module one
    biases = {k.removesuffix(".weight") + ".bias": torch.empty(1) for k in checkpoint}
    converted = sfu.convert_ldm_unet_checkpoint({**checkpoint, **biases}, UNET_CONFIGS[family])
    assert set(converted) == {f"{s.path}.{p}" for s in specs for p in ("weight", "bias")}
    wrong = [s.path for s in specs if converted[f"{s.path}.weight"] is not checkpoint[s.ldm_key]]
    assert wrong == []


def _te_checkpoint(specs: tuple[ModuleSpec, ...]) -> dict[str, torch.Tensor]:
    """Tiny tensors whose values tell rows apart; full shape for the transposed one."""
    checkpoint: dict[str, torch.Tensor] = {}
    for s in specs:
        if s.ldm_slice is not None:
            rows = 3 * (s.ldm_slice[1] - s.ldm_slice[0])
            checkpoint.setdefault(s.ldm_key, torch.arange(rows, dtype=torch.float32)[:, None])
        elif s.ldm_transposed:
            checkpoint[s.ldm_key] = torch.arange(s.shape[0] * s.shape[1]).reshape(s.shape[::-1])
        else:
            checkpoint[s.ldm_key] = torch.full((1,), float(len(checkpoint)))
    return checkpoint


@pytest.mark.parametrize(("component", "family"), TEXT_ENCODERS)
def test_text_encoder_ldm_keys_match_diffusers_converter(component: str, family: str) -> None:
    te = next(t for t in FAMILY_CONFIGS[family].text_encoders if t.component == component)
    specs = get_catalog(family).of(component)
    checkpoint = _te_checkpoint(specs)
    if te.ldm_layout == "hf":
        converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
    else:
        assert te.ldm_layout == "openclip"
        text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=te.hidden))
        converted = sfu.convert_open_clip_checkpoint(text_model, checkpoint, prefix=te.ldm_prefix)
    assert set(converted) == {f"{s.path}.weight" for s in specs}
    for s in specs:
        expected = checkpoint[s.ldm_key]
        if s.ldm_slice is not None:
            expected = expected[s.ldm_slice[0] : s.ldm_slice[1]]
        elif s.ldm_transposed:
            expected = expected.T
        assert torch.equal(converted[f"{s.path}.weight"], expected), s.path


def test_ldm_layouts_as_documented() -> None:
    sd2 = get_catalog("sd2").get("text_encoder", "text_model.encoder.layers.22.self_attn.v_proj")
    assert sd2.ldm_key == "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"
    assert sd2.ldm_slice == (2048, 3072)
    xl = get_catalog("sdxl")
    proj = xl.get("text_encoder_2", "text_projection")
    assert (proj.ldm_key, proj.ldm_transposed) == (
        "conditioner.embedders.1.model.text_projection",
        True,
    )
    te1 = xl.get("text_encoder", "text_model.encoder.layers.0.mlp.fc1")
    assert (
        te1.ldm_key
        == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    )
    ref = get_catalog("sdxl-refiner").get("text_encoder_2", "text_model.final_layer_norm")
    assert ref.ldm_key == "conditioner.embedders.0.model.ln_final.weight"
    # diffusers tells the refiner's checkpoint by this key (CHECKPOINT_KEY_NAMES)
    ref_proj = get_catalog("sdxl-refiner").get("text_encoder_2", "text_projection")
    assert ref_proj.ldm_key == sfu.CHECKPOINT_KEY_NAMES["open_clip_sdxl_refiner"]
    up = xl.get("unet", "up_blocks.0.upsamplers.0.conv")
    assert up.ldm_key == "model.diffusion_model.output_blocks.2.2.conv.weight"
    up1 = get_catalog("sd1").get("unet", "up_blocks.0.upsamplers.0.conv")
    assert up1.ldm_key == "model.diffusion_model.output_blocks.2.1.conv.weight"


# ComfyUI's names for the text encoders (comfy/sd.py, comfy/sdxl_clip.py): an outside fact.
COMFY_CLIP = {
    ("sd1", "text_encoder"): "clip_l",
    ("sd2", "text_encoder"): "clip_h",
    ("sdxl", "text_encoder"): "clip_l",
    ("sdxl", "text_encoder_2"): "clip_g",
    ("sdxl-refiner", "text_encoder_2"): "clip_g",
}


def _unet_ldm_pairs(family: str) -> dict[str, str]:
    """diffusers path -> LDM/SGM key, as diffusers' own single-file converter pairs them."""
    specs = get_catalog(family).of("unet")
    checkpoint = {s.ldm_key: torch.empty(1) for s in specs}
    biases = {k.removesuffix(".weight") + ".bias": torch.empty(1) for k in checkpoint}
    converted = sfu.convert_ldm_unet_checkpoint({**checkpoint, **biases}, UNET_CONFIGS[family])
    by_id = {id(t): k for k, t in checkpoint.items()}
    return {n.removesuffix(".weight"): by_id[id(t)] for n, t in converted.items() if id(t) in by_id}


def _te_ldm_pairs(component: str, family: str) -> dict[str, str]:
    """transformers path -> single-file key for the unsliced, untransposed weights, as
    diffusers' own CLIP/OpenCLIP converters pair them (each key holds a distinct value)."""
    te = next(t for t in FAMILY_CONFIGS[family].text_encoders if t.component == component)
    checkpoint = _te_checkpoint(get_catalog(family).of(component))
    if te.ldm_layout == "hf":
        converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
    else:
        text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=te.hidden))
        converted = sfu.convert_open_clip_checkpoint(text_model, checkpoint, prefix=te.ldm_prefix)
    by_value = {float(t): k for k, t in checkpoint.items() if t.numel() == 1}
    return {n.removesuffix(".weight"): by_value[float(t)] for n, t in converted.items() if t.numel() == 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_resolve_ldm(family: str) -> None:
    """LDM/SGM and ComfyUI dotted names resolve to the module diffusers maps them to."""
    cat = get_catalog(family)
    pairs = _unet_ldm_pairs(family)
    assert len(pairs) == len(_layers(family, "unet"))
    for path, key in pairs.items():
        dotted = key.removesuffix(".weight")
        for name in (dotted, dotted.removeprefix("model.")):
            spec = cat.resolve_ldm(name)
            assert spec is not None and (spec.component, spec.path) == ("unet", path), name
    for (fam, component), clip in COMFY_CLIP.items():
        if fam != family:
            continue
        for path, key in _te_ldm_pairs(component, family).items():
            spec = cat.resolve_ldm(key.removesuffix(".weight"))
            assert spec is not None and (spec.component, spec.path) == (component, path), key
        for path in _layers(family, component):
            spec = cat.resolve_ldm(f"text_encoders.{clip}.transformer.{path}")
            assert spec is not None and (spec.component, spec.path) == (component, path), path
    assert cat.resolve_ldm("diffusion_model.input_blocks.99.1.proj_in") is None
    assert cat.resolve_ldm("") is None


def test_resolve_ldm_examples() -> None:
    sd1, sd2 = get_catalog("sd1"), get_catalog("sd2")
    assert sd1.resolve_ldm("diffusion_model.input_blocks.1.1.proj_in").path == (
        "down_blocks.0.attentions.0.proj_in"
    )
    assert sd1.resolve_ldm("model.diffusion_model.output_blocks.2.1.conv.weight").path == (
        "up_blocks.0.upsamplers.0.conv"
    )
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    assert sd1.resolve_ldm(f"text_encoders.clip_l.transformer.{q}").path == q
    assert sd1.resolve_ldm(f"cond_stage_model.transformer.{q}").path == q
    assert sd2.resolve_ldm(f"text_encoders.clip_h.transformer.{q}").path == q
    assert sd2.resolve_ldm("cond_stage_model.model.transformer.resblocks.0.attn.k_proj").path == (
        "text_model.encoder.layers.0.self_attn.k_proj"
    )
    assert sd2.resolve_ldm(f"text_encoders.clip_l.transformer.{q}") is None
    g = get_catalog("sdxl-refiner").resolve_ldm(f"text_encoders.clip_g.transformer.{q}")
    assert (g.component, g.path) == ("text_encoder_2", q)


# ---------------------------------------------------------------------- kohya names
# The text-encoder prefixes kohya's sd-scripts writes (lora.py LoRANetwork; SDXL: te1/te2),
# and for the refiner's only encoder, what ComfyUI maps to clip_g: outside facts.
KOHYA_TE_PREFIX = {
    ("sd1", "text_encoder"): "lora_te",
    ("sd2", "text_encoder"): "lora_te",
    ("sdxl", "text_encoder"): "lora_te1",
    ("sdxl", "text_encoder_2"): "lora_te2",
    ("sdxl-refiner", "text_encoder_2"): "lora_te",
}


def _kohya_names(family: str) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, path), built as kohya builds them: ``prefix_`` + the
    module path with dots as underscores, where the UNet path is diffusers' for SD1/SD2
    and the SGM checkpoint key (paired by diffusers' converter) for SDXL."""
    names: dict[str, tuple[str, str]] = {}
    if family in ("sd1", "sd2"):
        for path in _layers(family, "unet"):
            names["lora_unet_" + path.replace(".", "_")] = ("unet", path)
    else:
        for path, key in _unet_ldm_pairs(family).items():
            sgm = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
            names["lora_unet_" + sgm.replace(".", "_")] = ("unet", path)
    for (fam, component), prefix in KOHYA_TE_PREFIX.items():
        if fam == family:
            for path in _layers(family, component):
                names[f"{prefix}_" + path.replace(".", "_")] = (component, path)
    return names


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_names_resolve_to_model_modules(family: str) -> None:
    cat = get_catalog(family)
    names = _kohya_names(family)
    assert len(names) == len(cat.modules)
    wrong = {}
    for name, want in names.items():
        spec = cat.resolve_kohya(name)
        got = None if spec is None else (spec.component, spec.path)
        if got != want:
            wrong[name] = (got, want)
        elif cat.kohya_name(spec) != name and family in ("sd1", "sd2"):
            wrong[name] = (cat.kohya_name(spec), "written name")
    assert wrong == {}
    all_names = [n for s in cat.modules for n in s.kohya_names]
    assert len(all_names) == len(set(all_names)), "a kohya name maps to two modules"


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd_kohya_names_flatten_model_paths(family: str) -> None:
    cat = get_catalog(family)
    for component, prefix in kohya_prefixes(family).items():
        paths = _layers(family, component)
        assert {cat.kohya_name(s) for s in cat.of(component)} == {
            prefix + "_" + p.replace(".", "_") for p in paths
        }


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_sdxl_kohya_names_are_sgm_keys_and_diffusers_names_are_accepted(family: str) -> None:
    cat = get_catalog(family)
    for path, key in _unet_ldm_pairs(family).items():
        spec = cat.resolve_kohya("lora_unet_" + path.replace(".", "_"))  # diffusers-named, accepted
        assert spec is not None and spec.path == path
        sgm = key.removeprefix("model.diffusion_model.").removesuffix(".weight")
        assert cat.kohya_name(spec) == "lora_unet_" + sgm.replace(".", "_")  # written SGM-named


def test_sdxl_sgm_kohya_names_load_where_diffusers_puts_them() -> None:
    """diffusers' own kohya-SDXL loader maps our SGM names to our diffusers paths.

    It covers the block modules (no conv_in/time/label embeddings, no norms) and speaks
    the old processor spelling for attention, which is normalised here.
    """
    specs = [
        s
        for s in get_catalog("sdxl").of("unet")
        if s.kind != "norm"
        and s.path != "conv_in"
        and re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", s.kohya_name)
    ]
    t = torch.zeros(1)
    state = {f"{s.kohya_name}.lora_{p}.weight": t for s in specs for p in ("down", "up")}
    state = lcu._maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(layers_per_block=2))
    converted, _ = lcu._convert_non_diffusers_lora_to_diffusers(state)
    got = set()
    for key in converted:
        if ".down." in key:
            key = re.sub(r"\.processor\.to_out_lora\.down\.weight$", ".to_out.0", key)
            key = re.sub(r"\.processor\.to_([qkv])_lora\.down\.weight$", r".to_\1", key)
            got.add(key.removeprefix("unet.").removesuffix(".lora.down.weight"))
    assert len(specs) > 700
    assert got == {s.path for s in specs}


def test_kohya_examples() -> None:
    sd1, xl, ref = get_catalog("sd1"), get_catalog("sdxl"), get_catalog("sdxl-refiner")
    cases = [
        (
            sd1,
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
        ),
        (
            sd1,
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        ),
        (
            sd1,
            "lora_te1_text_model_encoder_layers_11_mlp_fc2",
            "text_model.encoder.layers.11.mlp.fc2",
        ),
        (
            xl,
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        (xl, "lora_unet_input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
        (xl, "lora_unet_input_blocks_1_0_emb_layers_1", "down_blocks.0.resnets.0.time_emb_proj"),
        (xl, "lora_unet_input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        (xl, "lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
        (xl, "lora_unet_output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
        (xl, "lora_unet_middle_block_0_in_layers_2", "mid_block.resnets.0.conv1"),
        (xl, "lora_unet_label_emb_0_0", "add_embedding.linear_1"),
        (xl, "lora_unet_down_blocks_1_attentions_0_proj_in", "down_blocks.1.attentions.0.proj_in"),
        (xl, "lora_te2_text_projection", "text_projection"),
        (
            ref,
            "lora_te_text_model_encoder_layers_31_self_attn_out_proj",
            "text_model.encoder.layers.31.self_attn.out_proj",
        ),
        (
            ref,
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "text_model.encoder.layers.0.mlp.fc1",
        ),
    ]
    for cat, name, path in cases:
        spec = cat.resolve_kohya(name)
        assert spec is not None and spec.path == path, name
    te = xl.resolve_kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    assert te.component == "text_encoder"
    assert kohya_prefixes("sd1") == {"unet": "lora_unet", "text_encoder": "lora_te"}
    assert kohya_prefixes("sdxl") == {
        "unet": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
    }
    assert kohya_prefixes("sdxl-refiner") == {"unet": "lora_unet", "text_encoder_2": "lora_te"}


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_x"),
        ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_"),
        ("sd1", "lora_unet_down.blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("sd1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("sd1", "lora_unet"),
        ("sd1", ""),
        ("sd1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"),
        ("sd1", "lora_te_text_model_encoder_layers_12_mlp_fc1"),
        ("sd2", "lora_te_text_model_encoder_layers_23_mlp_fc1"),
        ("sdxl", "lora_unet_input_blocks_1_1_proj_in"),
        ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"),
        ("sdxl-refiner", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
    ],
)
def test_garbage_does_not_resolve(family: str, name: str) -> None:
    assert get_catalog(family).resolve_kohya(name) is None


def _count(cat: Catalog, component: str, blocks: set[str], kinds=("linear", "conv")) -> int:
    return sum(1 for s in cat.of(component) if s.block in blocks and s.kind in kinds)


def test_module_counts_match_kohya() -> None:
    """PEERS-kohya.md §0: what kohya's LoRANetwork creates (Linear/Conv2d in the blocks)."""
    sd1, xl = get_catalog("sd1"), get_catalog("sdxl")
    te_blocks = {"CLIPAttention", "CLIPMLP"}
    assert _count(sd1, "text_encoder", te_blocks) == 72
    assert _count(sd1, "unet", {"Transformer2DModel"}) == 192
    conv_blocks = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}
    assert _count(sd1, "unet", conv_blocks) == 278
    assert _count(xl, "text_encoder", te_blocks) + _count(xl, "text_encoder_2", te_blocks) == 264
    assert _count(xl, "unet", {"Transformer2DModel"}) == 722
    assert _count(get_catalog("sd2"), "text_encoder", te_blocks) == 23 * 6


# ------------------------------------------------------------------------ the API
def test_unknown_family_is_value_error() -> None:
    with pytest.raises(ValueError, match="unknown model family"):
        get_catalog("sd3")
    with pytest.raises(ValueError):
        kohya_prefixes("flux")


def test_catalog_is_cached() -> None:
    """(How long a build takes is measured in ``bench/bench_catalog.py``, not here.)"""
    for family in FAMILIES:
        assert get_catalog(family) is get_catalog(family)
        assert get_catalog(family) is not _build(FAMILY_CONFIGS[family])


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys; from loratool.arch import get_catalog, FAMILIES\n"
        "[get_catalog(f) for f in FAMILIES]\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# path -> the target label inspect shows, written out by hand (sd1 and sdxl paths).
TARGET_EXAMPLES = {
    ("sd1", "text_encoder", "text_model.encoder.layers.3.self_attn.q_proj"): "q_proj",
    ("sd1", "text_encoder", "text_model.encoder.layers.3.mlp.fc2"): "mlp.fc2",
    ("sd1", "unet", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"): "attn2.to_out.0",
    ("sd1", "unet", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"): "ff.net.0.proj",
    ("sd1", "unet", "mid_block.attentions.0.proj_in"): "proj_in",
    ("sd1", "unet", "down_blocks.1.resnets.0.conv_shortcut"): "conv_shortcut",
    ("sd1", "unet", "down_blocks.1.resnets.1.norm2"): "resnet.norm2",
    ("sd1", "unet", "up_blocks.2.upsamplers.0.conv"): "upsamplers.conv",
    ("sd1", "unet", "down_blocks.2.downsamplers.0.conv"): "downsamplers.conv",
    ("sd1", "unet", "time_embedding.linear_2"): "time_embedding.linear_2",
    ("sdxl", "unet", "add_embedding.linear_1"): "add_embedding.linear_1",
    ("sdxl", "unet", "down_blocks.2.attentions.1.transformer_blocks.9.norm3"): "norm3",
    ("sdxl", "text_encoder_2", "text_projection"): "text_projection",
    ("sdxl", "text_encoder_2", "text_model.final_layer_norm"): "final_layer_norm",
}


def test_target_labels() -> None:
    got = {k: get_catalog(k[0]).get(k[1], k[2]).target for k in TARGET_EXAMPLES}
    assert got == TARGET_EXAMPLES

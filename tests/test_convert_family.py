"""No silent coercion to a wrong family (issue 7 §4): modules that have no place in the
target family's catalog are refused by name for every target, ``--family`` is suggested
only when several families really fit, and base-model metadata that contradicts the
written family never reaches the output. Flux inputs carry real key names and shapes:
diffusers' own ``FluxTransformer2DModel`` (FLUX.1-dev config) built on the meta device,
and kohya sd-scripts' names for the BFL layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.formats.family import metadata_families
from loratool.ops.inspect import inspect
from tests.conftest import FIXTURES, run_cli

LYING = {"ss_base_model_version": "sd_1.5", "modelspec.architecture": "stable-diffusion-v1/lora"}
FLUX_TARGETS = re.compile(
    r"^(transformer_blocks\.[01]\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.(11|12)\.(attn\.to_[qkv]|proj_mlp|proj_out))$"
)
# kohya sd-scripts' Flux LoRA names (BFL layout, networks/lora_flux.py) and their weights'
# (out, in) in FLUX.1-dev: hidden 3072, mlp 12288, single-block linear1 3·3072 + 12288.
KOHYA_FLUX = {
    "lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072),
    "lora_unet_double_blocks_0_img_attn_proj": (3072, 3072),
    "lora_unet_double_blocks_0_img_mlp_0": (12288, 3072),
    "lora_unet_double_blocks_0_img_mlp_2": (3072, 12288),
    "lora_unet_double_blocks_0_txt_attn_qkv": (9216, 3072),
    "lora_unet_single_blocks_12_linear1": (21504, 3072),
    "lora_unet_single_blocks_12_linear2": (3072, 15360),
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format Flux LoRA on double and single blocks, claiming to be SD 1.5."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel()  # the FLUX.1-dev transformer config
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and FLUX_TARGETS.match(name):
            out_f, in_f = layer.weight.shape
            tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(4, in_f, generator=g) * 0.01).half()
            tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, 4, generator=g) * 0.01).half()
    assert len(tensors) == 60
    path = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    save_file(tensors, str(path), LYING)
    return path


@pytest.fixture(scope="module")
def kohya_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tensors = {}
    for name, (out_f, in_f) in KOHYA_FLUX.items():
        tensors[f"{name}.lora_down.weight"] = torch.zeros(4, in_f, dtype=torch.float16)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(out_f, 4, dtype=torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
    path = tmp_path_factory.mktemp("kflux") / "flux_kohya.safetensors"
    save_file(tensors, str(path), {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"})
    return path


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA on a ViT (transformers, tiny config)."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    folder = tmp_path_factory.mktemp("vit") / "vit_lora"
    get_peft_model(ViTForImageClassification(cfg), LoraConfig(r=4, target_modules=["query", "value"])).save_pretrained(folder)
    return folder


def test_flux_is_flux_and_its_metadata_contradiction_is_reported(flux: Path) -> None:
    r = inspect(flux)
    assert r.family == "flux"
    assert not [w for w in r.warnings if "proj_in/proj_out" in w], r.warnings  # proj_out of a DiT tells nothing
    assert "metadata ss_base_model_version = 'sd_1.5' says sd1, but the tensors fit flux" in r.warnings
    assert "metadata modelspec.architecture = 'stable-diffusion-v1/lora' says sd1, but the tensors fit flux" in r.warnings


@pytest.mark.parametrize("target", ["kohya", "diffusers", "peft"])
def test_forcing_a_family_refuses_every_module_it_does_not_hold(flux: Path, target: str, tmp_path: Path) -> None:
    out = tmp_path / ("out" if target == "peft" else "out.safetensors")
    result = run_cli("convert", str(flux), "--to", target, "--family", "sd1", "-o", str(out))
    assert result.returncode == 1 and not out.exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {flux}: {target} cannot hold 30 module(s)/key(s): no module of the sd1 catalog")
    assert "single_transformer_blocks.11.attn.to_k" in line and "--skip-unsupported" in line
    assert "verified" not in result.stdout
    skipped = run_cli("convert", str(flux), "--to", target, "--family", "sd1", "--skip-unsupported", "-o", str(out))
    assert skipped.returncode == 1 and "nothing left to write" in skipped.stderr and not out.exists()


def test_kohya_names_are_refused_too(kohya_flux: Path, tmp_path: Path) -> None:
    """The kohya target once let unresolved modules through: a Flux kohya file came out
    labelled stable-diffusion-v1 with keys no SD loader knows."""
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", str(kohya_flux), "--to", "kohya", "--family", "sd1", "-o", str(out))
    assert result.returncode == 1 and not out.exists()
    assert "kohya cannot hold 7 module(s)/key(s): no module of the sd1 catalog" in result.stderr
    assert "lora_unet_double_blocks_0_img_attn_proj" in result.stderr
    plain = run_cli("convert", str(kohya_flux), "--to", "kohya", "-o", str(out))
    assert plain.returncode == 1 and "this adapter is flux" in plain.stderr and "--family" not in plain.stderr.split("flux", 1)[1]


def test_a_module_absent_from_the_catalog_is_refused_by_name_and_skippable(tmp_path: Path) -> None:
    """A real SD1 module kohya's LoRA never targets (the CLIP token embedding) has no
    entry in our catalog: refused by name, and --skip-unsupported writes the rest."""
    src = load_file(str(FIXTURES / "sd15_kohya_lora.safetensors"))
    name = "lora_te_text_model_embeddings_token_embedding"
    src[f"{name}.lora_down.weight"] = torch.zeros(4, 49408, dtype=torch.float16)
    src[f"{name}.lora_up.weight"] = torch.zeros(768, 4, dtype=torch.float16)
    path = tmp_path / "with_embedding.safetensors"
    save_file(src, str(path))
    out = tmp_path / "out.safetensors"
    refused = run_cli("convert", str(path), "--to", "kohya", "-o", str(out))
    assert refused.returncode == 1 and f"(1: {name})" in refused.stderr and not out.exists()
    done = run_cli("convert", str(path), "--to", "kohya", "--skip-unsupported", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"  {name}: no module of the sd1 catalog has this name and shape" in done.stderr
    written = {k.split(".")[0] for k in load_file(str(out))}
    assert name not in written and written == {k.split(".")[0] for k in src} - {name}


def test_family_hint_only_when_several_families_fit(vit: Path, tmp_path: Path) -> None:
    result = run_cli("convert", str(vit), "--to", "kohya", "-o", str(tmp_path / "v.safetensors"))
    assert result.returncode == 1 and "--family" not in result.stderr
    assert "its modules are in none of their catalogs (e.g. 'vit.encoder.layer.0.attention.attention.query')" in result.stderr
    forced = run_cli("convert", str(vit), "--to", "kohya", "--family", "sd1", "-o", str(tmp_path / "v.safetensors"))
    assert forced.returncode == 1 and "kohya cannot hold 4 module(s)/key(s)" in forced.stderr
    assert not (tmp_path / "v.safetensors").exists()
    te = run_cli("convert", str(FIXTURES / "sd15_peft_te"), "--to", "kohya", "-o", str(tmp_path / "t.safetensors"))
    assert "the base model is ambiguous: its modules fit sd1, sdxl; pass --family" in te.stderr


@pytest.mark.parametrize("target", ["kohya", "diffusers", "peft"])
def test_contradicting_metadata_is_not_carried_into_the_output(target: str, tmp_path: Path) -> None:
    src = tmp_path / "lying.safetensors"
    save_file(load_file(str(FIXTURES / "sdxl_kohya_lora.safetensors")), str(src), {**LYING, "ss_v2": "True", "modelspec.title": "kept"})
    out = tmp_path / ("out" if target == "peft" else "out.safetensors")
    result = run_cli("convert", str(src), "--to", target, "-o", str(out))
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("metadata: ")]
    assert len(said) == 3 and all(line.endswith("it contradicted the written family sdxl") for line in said)
    if target == "peft":
        for sub in out.iterdir():
            config = json.loads((sub / "adapter_config.json").read_text())
            assert config.get("base_model_name_or_path") is None
        return
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert metadata_families(meta) == ([("sdxl", "ss_base_model_version = 'sdxl_base_v1-0'"),
                                        ("sdxl", "modelspec.architecture = 'stable-diffusion-xl-v1-base/lora'")]
                                       if target == "kohya" else [])
    assert meta.get("ss_v2") == ("False" if target == "kohya" else None) and meta["modelspec.title"] == "kept"
    assert "ss_base_model_version 'sd_1.5' (says sd1) " + ("replaced by 'sdxl_base_v1-0'" if target == "kohya" else "dropped") in result.stderr


@pytest.mark.parametrize(
    ("value", "family"),
    [("sd_v1", "sd1"), ("sd_v1_v", "sd1"), ("sd_1.5", "sd1"), ("SD 1.5", "sd1"), ("sd15", "sd1"), ("SD1.5", "sd1"),
     ("sd_v2", "sd2"), ("sd_v2_768_v", "sd2"), ("SD 2.1", "sd2"), ("sdxl_base_v1-0", "sdxl"), ("SDXL 1.0", "sdxl"),
     ("Pony", "sdxl"), ("sdxl_refiner_v1-0", "sdxl-refiner"), ("flux1", "flux"), ("Flux.1 D", "flux"),
     ("chroma", "flux"), ("sd3", "sd3"), ("SD 3.5", "sd3")],
)
def test_base_model_spellings_in_the_wild(value: str, family: str) -> None:
    assert [f for f, _ in metadata_families({"ss_base_model_version": value})] == [family]

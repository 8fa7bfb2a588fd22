"""``merge`` equals diffusers' ``load_lora_weights`` + ``fuse_lora`` (PEFT's merge for PEFT
folders) on real-shaped partial checkpoints of SD1.5, SD2 and SDXL (issue 8, "Proof").

Each case loads its LoRAs into models diffusers/transformers build from the published
configs (tests/merge_oracle.py), writes a single-file checkpoint holding exactly the
adapted layers plus a few others (real keys, real shapes, seeded values), fuses with the
ecosystem's code, merges with loratool, and compares layer by layer. The same merge into
the diffusers folder of the same weights must give the same tensors. SD2 and SDXL text
encoders go through OpenCLIP's fused q/k/v rows and SGM's transposed ``text_projection``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from fixtures import generate as gen
from fixtures.checkpoints import (
    FAMILIES,
    FOLDER_FILES,
    checkpoint_table,
    write_diffusers_folder,
    write_single_file,
)
from loratool.ops.merge import LoraSpec, merge
from tests import merge_oracle as oracle
from tests.conftest import source_path

SEED = 3


# ------------------------------------------------------------------ LoRAs made here


def kohya_sd15(path: Path) -> Path:
    """kohya LoRA + LoCon (3×3, 1×1 convs) on a small SD1.5 subset, with per-module alphas."""
    entries = gen._lora_entries(gen._sd15_lyco_subset(), 4, 2.0, torch.float16, 11, conv_rank=4, conv_alpha=1.0)
    md = gen.kohya_metadata("sd1", "networks.lora", 4, 2.0, {"conv_dim": "4", "conv_alpha": "1"}, path.stem, torch.float16)
    gen._write_kohya(path, "sd1", gen.TOOL_KOHYA, entries, md)
    return path


def kohya_sdxl(path: Path) -> Path:
    """kohya SDXL (SGM-named UNet, lora_te1/lora_te2) on a small subset incl. LoCon."""
    targets = gen._pick(
        gen.sdxl_kohya_targets("all", convs=True),
        [
            r"down_blocks\.1\.attentions\.0\.(proj_in|transformer_blocks\.1\.attn2\..*)",
            r"down_blocks\.0\.resnets\.1\.conv2",
            r"up_blocks\.0\.upsamplers\.0\.conv",
            r"text_model\.encoder\.layers\.0\.self_attn\.(q|k|v|out)_proj",
            r"text_model\.encoder\.layers\.5\.mlp\.fc2",
        ],
    )
    entries = gen._lora_entries(targets, 4, 1.0, torch.float16, 12, conv_rank=2, conv_alpha=2.0)
    md = gen.kohya_metadata("sdxl", "networks.lora", 4, 1.0, {"conv_dim": "2"}, path.stem, torch.float16)
    gen._write_kohya(path, "sdxl", gen.TOOL_KOHYA, entries, md)
    return path


def diffusers_lora(family: str, path: Path, unet: str, te: dict[str, str], seed: int) -> Path:
    """A diffusers single file written by ``save_lora_weights`` after PEFT injection."""
    from peft.utils import get_peft_model_state_dict

    models = oracle.build_models(family)
    kwargs = {}
    for component, targets in [("unet", unet), *te.items()]:
        cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
        gen._inject(models[component], cfg, seed, torch.float16)
        kwargs[f"{component}_lora_layers"] = get_peft_model_state_dict(models[component])
    oracle.PIPELINES[family].save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


# ------------------------------------------------------------------------- cases


def run_case(family: str, inputs: list[oracle.Input], tmp: Path, *, dtype: str = "F32", folder: bool = False) -> int:
    models = oracle.build_models(family)
    for i, lora in enumerate(inputs):
        oracle.load(models, family, lora, f"l{i}")
    layers = oracle.adapted(models)
    table = oracle.partial_table(family, layers)
    ckpt = write_single_file(tmp / "base.safetensors", table, dtype, SEED)
    oracle.set_base_weights(layers, table, SEED, oracle_dtype(dtype))
    oracle.fuse(models, inputs)
    specs = [LoraSpec(str(x.path), x.te, x.unet) for x in inputs]
    out = tmp / "merged.safetensors"
    result = merge(ckpt, specs, out)
    rtol = 2e-6 if dtype == "F32" else 2e-3
    n = oracle.compare(out, layers, table, rtol)
    if dtype == "F16":  # the comparison can fail: the unmerged checkpoint does not pass it
        with pytest.raises(AssertionError, match="loratool - diffusers fuse"):
            oracle.compare(ckpt, layers, table, rtol)
    assert n == len(layers) > 0
    changed = _changed(ckpt, out)
    touched = {t.key for t in table for p in t.pieces if (p.component, p.key.rsplit(".", 1)[0]) in layers and p.key.endswith(".weight")}
    assert changed == touched, f"tensors changed beyond the adapted layers: {sorted(changed ^ touched)[:5]}"
    assert result.tensors_merged == len(touched)
    if folder:
        write_diffusers_folder(tmp / "base_folder", family, table, dtype, SEED)
        merge(tmp / "base_folder", specs, tmp / "merged_folder")
        _same_weights(out, tmp / "merged_folder", table)
    return n


def oracle_dtype(st: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[st]


def _changed(a: Path, b: Path) -> set[str]:
    """Keys whose bytes differ; keys, order and dtypes must be the same."""
    from loratool.io.safetensors import SafetensorsFile

    with SafetensorsFile(a) as fa, SafetensorsFile(b) as fb:
        assert list(fa.tensors) == list(fb.tensors)
        assert [(t.dtype, t.shape) for t in fa.tensors.values()] == [(t.dtype, t.shape) for t in fb.tensors.values()]
        return {k for k in fa.tensors if fa.read_bytes(k) != fb.read_bytes(k)}


def _same_weights(single: Path, folder: Path, table) -> None:
    """Every tensor of the merged folder equals its part of the merged single file."""
    handles = {}
    try:
        with safe_open(str(single), "pt") as s:
            for t in table:
                whole = s.get_tensor(t.key)
                for p in t.pieces:
                    f = folder / p.component / f"{FOLDER_FILES[p.component]}.safetensors"
                    h = handles.setdefault(f, safe_open(str(f), "pt"))
                    part = whole[p.rows[0] : p.rows[1]] if p.rows else whole
                    part = part.T if p.transposed else part
                    assert torch.equal(h.get_tensor(p.key), part.reshape(p.shape)), p.key
    finally:
        handles.clear()


def test_kohya_locon_sd15_fp16_checkpoint(tmp_path: Path) -> None:
    """kohya LoRA/LoCon, separate text-encoder and UNet weights, into an fp16 checkpoint."""
    lora = kohya_sd15(tmp_path / "k.safetensors")
    assert run_case("sd1", [oracle.Input(lora, te=0.5, unet=0.8)], tmp_path, dtype="F16") == 23


def test_two_loras_sum_with_negative_weights_sd15(tmp_path: Path) -> None:
    """A diffusers and a kohya LoRA on overlapping modules add up, one with negative weights;
    the diffusers-folder merge holds the same weights."""
    k = kohya_sd15(tmp_path / "k.safetensors")
    d = source_path("fixtures/sd15_diffusers.safetensors")
    inputs = [oracle.Input(d, te=1.0, unet=0.7), oracle.Input(k, te=-0.5, unet=-1.0)]
    assert run_case("sd1", inputs, tmp_path, folder=True) > 23


def test_peft_folders_sd15_text_encoder_and_dora(tmp_path: Path) -> None:
    """PEFT adapters (a real-world text-encoder adapter; a UNet DoRA) fused by PEFT."""
    inputs = [
        oracle.Input(source_path("realworld/peft-te-sd15"), loader="peft", te=0.75),
        oracle.Input(source_path("fixtures/sd15_peft_unet_dora"), loader="peft"),
    ]
    assert run_case("sd1", inputs, tmp_path) == 24 + 6


def test_sd2_fused_qkv_rows(tmp_path: Path) -> None:
    """SD2: OpenCLIP-H q/k/v LoRAs land in rows of in_proj_weight; linear proj_in."""
    lora = diffusers_lora(
        "sd2", tmp_path / "sd2.safetensors",
        unet=r".*down_blocks\.0\.attentions\.0\.(proj_in|transformer_blocks\.0\.attn2\.(to_k|to_v))",
        te={"text_encoder": r".*layers\.(0|22)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc1)"},
        seed=5,
    )  # fmt: skip
    assert run_case("sd2", [oracle.Input(lora, te=0.9, unet=0.6)], tmp_path, folder=True) == 3 + 10


def test_sdxl_diffusers_and_kohya_sgm(tmp_path: Path) -> None:
    """SDXL: diffusers' own file (TE2 fused rows) and a kohya SGM-named file with LoCon."""
    inputs = [
        oracle.Input(source_path("fixtures/sdxl_diffusers.safetensors"), te=0.6, unet=1.2),
        oracle.Input(kohya_sdxl(tmp_path / "k.safetensors"), te=1.0, unet=0.5),
    ]
    assert run_case("sdxl", inputs, tmp_path, dtype="F16") > 22


def test_sdxl_text_projection_is_transposed(tmp_path: Path) -> None:
    """SGM stores bigG's text_projection as Wᵀ: the merged change must be transposed."""
    lora = diffusers_lora(
        "sdxl", tmp_path / "proj.safetensors",
        unet=r".*down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q",
        te={"text_encoder_2": r"text_projection|.*layers\.31\.(self_attn\.v_proj|mlp\.fc1)"},
        seed=6,
    )  # fmt: skip
    assert run_case("sdxl", [oracle.Input(lora)], tmp_path, folder=True) == 4


def test_sdxl_peft_unet_folder(tmp_path: Path) -> None:
    assert run_case("sdxl", [oracle.Input(source_path("fixtures/sdxl_peft"), loader="peft", unet=-0.4)], tmp_path) == 18


def test_tables_cover_the_families_used_here() -> None:
    assert {"sd1", "sd2", "sdxl"} <= set(FAMILIES)
    assert len(checkpoint_table("sd1")) > 1000

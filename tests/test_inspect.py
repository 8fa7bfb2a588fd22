"""inspect: fixtures against the generator's manifest, real-world files against their
README, family detection on real shapes, the JSON contract, hashes, and no torch."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratool.ops.inspect import inspect
from tests.conftest import FIXTURES, ROOT, run_cli, write_raw_safetensors

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int64": "I64"}
CONTRACT = {
    "path", "format", "variant", "family", "family_evidence", "network_types", "components", "modules",
    "rank", "alpha", "targets", "dtypes", "metadata", "complete", "warnings", "unknown_keys",
    "invalid_modules", "loader_notes",
}


# What detection must answer for a fixture whose tensors fit several families: its
# generator adapts only CLIP-L (text_encoder), the first text encoder of SD1 and of SDXL
# alike, and its adapter_config names no base model. Every other fixture: its family.
FITS_SEVERAL = {"sd15_peft_te": "sd1, sdxl"}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_fixture_matches_manifest(name: str) -> None:
    expected = MANIFEST[name]
    r = inspect(FIXTURES / name)
    assert r.format == expected["format"]
    if name in FITS_SEVERAL:
        assert (expected["unet"], expected["text_encoder_2"]) == (0, 0)
        assert r.family == "unknown" and f"ambiguous: fits {FITS_SEVERAL[name]}" in r.family_evidence
        assert inspect(FIXTURES / name, family=expected["family"]).family == expected["family"]
    else:
        assert r.family == expected["family"], r.family_evidence
    assert set(r.network_types) == set(expected["network_types"])
    assert r.modules == expected["modules"]
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert r.components.get(component, 0) == expected[component], component
    assert r.rank == expected["rank"]
    assert r.alpha == expected["alpha"]
    assert r.dtypes == sorted(DTYPE_NAMES[d] for d in expected["dtypes"])
    assert r.complete and not r.unknown_keys and not r.warnings


def test_realworld_answers_from_its_readme(realworld: Path) -> None:
    attn = inspect(realworld / "diffusers-attnproc-sd1/pytorch_lora_weights.safetensors", keys=True)
    assert (attn.format, attn.family, attn.network_types) == ("diffusers", "sd1", ["lora"])
    assert "attn-processor" in attn.variant and "no-prefix" in attn.variant  # README: no `unet.` prefix
    assert len(attn.keys) == 256 and attn.modules == 128
    assert attn.rank == {"min": 4, "max": 4} and attn.dtypes == ["F32"] and attn.metadata == {"format": "pt"}
    assert attn.components == {"unet": 128}
    assert set(attn.targets) == {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}

    d = inspect(realworld / "diffusers-sd15/pytorch_lora_weights.safetensors")
    assert (d.format, d.family, d.rank["max"], d.dtypes) == ("diffusers", "sd1", 4, ["F32"])

    lokr = inspect(realworld / "lycoris-lokr-sd1/smart_falcon_4_lokr.safetensors")
    assert (lokr.format, lokr.family, lokr.network_types) == ("kohya", "sd1", ["lokr"])
    assert lokr.components == {"text_encoder": 72, "unet": 278} and lokr.modules == 350
    assert lokr.dtypes == ["F16"] and lokr.metadata["ss_network_module"] == "lycoris.kohya"
    assert len([k for k in lokr.metadata if k.startswith(("ss_", "sshs_"))]) == 61
    assert lokr.rank == {"min": 4, "max": 4}
    assert {"conv1", "conv2", "time_emb_proj"} <= set(lokr.targets)

    peft = inspect(realworld / "peft-te-sd15")
    assert (peft.format, peft.family, peft.network_types) == ("peft", "sd1", ["lora"])
    assert peft.rank == {"min": 8, "max": 8} and peft.alpha == {"min": 8.0, "max": 8.0}
    assert set(peft.targets) == {"q_proj", "v_proj"} and peft.components == {"text_encoder": 24}


def test_json_contract_and_several_paths() -> None:
    paths = [str(FIXTURES / "sd15_kohya_lora.safetensors"), str(FIXTURES / "sdxl_peft")]
    result = run_cli("inspect", "--json", *paths)
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [r["path"] for r in reports] == paths
    for r in reports:
        assert set(r) == CONTRACT
    one = json.loads(run_cli("inspect", "--json", paths[0]).stdout)
    assert isinstance(one, dict) and set(one) == CONTRACT


def test_human_output_is_a_summary() -> None:
    result = run_cli("inspect", str(FIXTURES / "sdxl_kohya_lora.safetensors"))
    assert result.returncode == 0
    for word in ("kohya", "sdxl", "locon", "attn2.to_k", "text_encoder_2"):
        assert word in result.stdout


def test_hashes_match_independent_computation() -> None:
    path = FIXTURES / "sd15_kohya_locon.safetensors"  # > 2 MiB, so AutoV1 exists
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    result = json.loads(run_cli("inspect", "--json", "--hashes", str(path)).stdout)["hashes"]
    full = hashlib.sha256(data).hexdigest().upper()
    assert result["sha256"] == full and result["autov2"] == full[:10]
    assert result["autov1"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest().upper()[:8]
    assert result["autov3"] == hashlib.sha256(data[8 + n :]).hexdigest().upper()[:12]
    small = json.loads(run_cli("inspect", "--json", "--hashes", str(FIXTURES / "sd15_kohya_lokr.safetensors")).stdout)
    assert small["hashes"]["autov1"] is None


def test_keys_lists_every_tensor() -> None:
    path = FIXTURES / "sd15_kohya_loha.safetensors"
    r = inspect(path, keys=True)
    assert r.keys == sorted(load_file(str(path)))


def test_inspect_never_imports_torch() -> None:
    code = (
        "import sys, io, contextlib\n"
        "from loratool.cli.main import main\n"
        f"sys.argv = ['loratool', 'inspect', '--json', {str(FIXTURES / 'sdxl_kohya_lora.safetensors')!r}, {str(FIXTURES / 'sd15_peft_te')!r}]\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: main()\n"
        "    except SystemExit as e: assert not e.code, e.code\n"
        "import loratool\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(len(buf.getvalue()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 100


def _lora_pair(name: str, out_f: int, in_f: int, r: int = 2, conv: bool = False) -> dict[str, dict]:
    down = [r, in_f, 1, 1] if conv else [r, in_f]
    up = [out_f, r, 1, 1] if conv else [out_f, r]
    return {f"{name}.lora_down.weight": {"dtype": "F16", "shape": down}, f"{name}.lora_up.weight": {"dtype": "F16", "shape": up}}


def _peft_pair(name: str, out_f: int, in_f: int, r: int = 2) -> dict[str, dict]:
    return {f"{name}.lora_A.weight": {"dtype": "F16", "shape": [r, in_f]}, f"{name}.lora_B.weight": {"dtype": "F16", "shape": [out_f, r]}}


def _write(tmp_path: Path, name: str, entries: dict[str, dict]) -> Path:
    header, offset = {}, 0
    for key, e in entries.items():
        n = 2
        for d in e["shape"]:
            n *= d
        header[key] = {**e, "data_offsets": [offset, offset + n]}
        offset += n
    return write_raw_safetensors(tmp_path / name, header, bytes(offset))


@pytest.mark.parametrize(
    ("entries", "family"),
    [
        # SD2: 1024-wide cross-attention and a 23-layer OpenCLIP-H text encoder (kohya, conv proj_in).
        ({**_lora_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 1024),
          **_lora_pair("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, conv=True),
          **_lora_pair("lora_te_text_model_encoder_layers_22_self_attn_q_proj", 1024, 1024)}, "sd2"),
        # SDXL refiner: 1280-wide context, 768-wide attention at its first attention level.
        ({**_lora_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 768, 1280),
          **_lora_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 768, 768)}, "sdxl-refiner"),
        # Flux (kohya names as sd-scripts writes them) and SD3 (kohya/SAI names).
        ({**_lora_pair("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072),
          **_lora_pair("lora_unet_single_blocks_0_linear1", 21504, 3072)}, "flux"),
        ({**_lora_pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 4608, 1536)}, "sd3"),
        # The same two families as diffusers' PEFT-style keys.
        ({**_peft_pair("transformer.transformer_blocks.0.attn.to_q", 3072, 3072),
          **_peft_pair("transformer.transformer_blocks.0.attn.add_q_proj", 3072, 3072),
          **_peft_pair("transformer.single_transformer_blocks.0.proj_mlp", 12288, 3072)}, "flux"),
        ({**_peft_pair("transformer.transformer_blocks.0.attn.to_q", 1536, 1536),
          **_peft_pair("transformer.transformer_blocks.0.attn.add_q_proj", 1536, 1536)}, "sd3"),
    ],
)
def test_family_from_structure(tmp_path: Path, entries: dict, family: str) -> None:
    assert inspect(_write(tmp_path, "x.safetensors", entries)).family == family


def test_structure_wins_over_contradicting_metadata(tmp_path: Path) -> None:
    src = load_file(str(FIXTURES / "sdxl_kohya_lora.safetensors"))
    path = tmp_path / "lying.safetensors"
    save_file(src, str(path), metadata={"ss_base_model_version": "sd_v1"})
    r = inspect(path)
    assert r.family == "sdxl"
    assert any("metadata" in w and "sd1" in w for w in r.warnings)


def test_llm_adapter_is_not_a_stable_diffusion_family(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "llm")
    r = inspect(tmp_path / "llm")
    assert r.format == "peft" and r.family == "unknown" and r.modules == 4


def test_mixed_diffusers_naming_as_training_scripts_save_it(tmp_path: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers

    peft_sd = load_file(str(FIXTURES / "sd15_diffusers.safetensors"))
    mixed = convert_state_dict_to_diffusers(peft_sd)  # to_q.lora.down + proj_in.lora_A, as ≥0.25 scripts save
    path = tmp_path / "mixed.safetensors"
    save_file({k: v.contiguous() for k, v in mixed.items()}, str(path))
    r = inspect(path)
    plain = inspect(FIXTURES / "sd15_diffusers.safetensors")
    assert r.format == "diffusers" and r.family == "sd1"
    assert "lora.down/up" in r.variant or "lora_linear_layer" in r.variant
    assert r.modules == plain.modules and r.targets == plain.targets and not r.unknown_keys


def test_pt_file_through_weights_only(tmp_path: Path) -> None:
    tensors = load_file(str(FIXTURES / "sd15_kohya_lora.safetensors"))
    torch.save(tensors, tmp_path / "lora.pt")
    assert inspect(tmp_path / "lora.pt").modules == inspect(FIXTURES / "sd15_kohya_lora.safetensors").modules


def test_comfyui_dotted_ldm_names(tmp_path: Path) -> None:
    """ComfyUI's generic format (diffusion_model.<LDM path>, text_encoders.clip_l…) reads
    as the same modules, and converts back to the kohya file it came from."""
    from loratool import arch

    catalog = arch.get_catalog("sd1")
    kohya = load_file(str(FIXTURES / "sd15_kohya_lora.safetensors"))
    comfy = {}
    for key, tensor in kohya.items():
        name, _, param = key.partition(".")
        if param == "alpha":
            continue  # ComfyUI's extractor writes none: alpha = rank
        spec = catalog.resolve_kohya(name)
        module = spec.ldm_key.removeprefix("model.").removesuffix(".weight") if spec.component == "unet" else f"text_encoders.clip_l.transformer.{spec.path}"
        comfy[f"{module}.{param}"] = tensor
    path = tmp_path / "comfy.safetensors"
    save_file(comfy, str(path))
    r = inspect(path)
    assert (r.format, r.family, r.modules) == ("comfyui", "sd1", inspect(FIXTURES / "sd15_kohya_lora.safetensors").modules)
    assert not r.unknown_keys and r.alpha["min"] == r.rank["min"]
    out = tmp_path / "back.safetensors"
    assert run_cli("convert", str(path), "--to", "kohya", "-o", str(out)).returncode == 0
    back = load_file(str(out))
    for key, tensor in kohya.items():
        if not key.endswith(".alpha"):
            assert torch.equal(back[key], tensor), key


def test_family_override_that_does_not_fit_is_reported(tmp_path: Path) -> None:
    """--family sdxl on an SD1 LoRA: names resolve, shapes do not (768-wide cross-attention)."""
    r = inspect(FIXTURES / "sd15_kohya_lora.safetensors", family="sdxl")
    assert r.family == "sdxl" and "--family sdxl given" in r.family_evidence
    (warning,) = [w for w in r.warnings if "sdxl catalog" in w]
    assert "attn2_to_k" in warning or "proj_in" in warning
    result = run_cli("convert", str(FIXTURES / "sd15_kohya_lora.safetensors"), "--to", "diffusers", "--family", "sdxl", "-o", str(tmp_path / "x.safetensors"))
    assert result.returncode != 0 and "no module of the sdxl catalog has this name and shape" in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_folder_of_loras_is_inspected_file_by_file(tmp_path: Path) -> None:
    for name in ("b.safetensors", "a.safetensors"):
        (tmp_path / name).write_bytes((FIXTURES / "sd15_kohya_lokr.safetensors").read_bytes())
    (tmp_path / "notes.txt").write_text("not a LoRA")
    (tmp_path / "broken.safetensors").write_bytes(b"junk")
    result = run_cli("inspect", "--json", str(tmp_path), str(FIXTURES / "sdxl_peft"))
    assert result.returncode == 1 and result.stderr.count("error:") == 1 and "broken.safetensors" in result.stderr
    paths = [r["path"] for r in json.loads(result.stdout)]
    assert paths == [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), str(FIXTURES / "sdxl_peft")]


def test_legacy_pickle_inputs_read_and_convert(tmp_path: Path) -> None:
    """A PEFT folder with adapter_model.bin and a kohya .pt both go through weights_only
    loading, inspect like their safetensors twins, and convert with verification."""
    import shutil

    peft = tmp_path / "peft_bin"
    peft.mkdir()
    shutil.copy(FIXTURES / "sd15_peft_te" / "adapter_config.json", peft)
    torch.save(load_file(str(FIXTURES / "sd15_peft_te" / "adapter_model.safetensors")), peft / "adapter_model.bin")
    a, b = inspect(peft), inspect(FIXTURES / "sd15_peft_te")
    assert (a.format, a.modules, a.rank, a.alpha, a.targets) == (b.format, b.modules, b.rank, b.alpha, b.targets)

    pt = tmp_path / "lora.pt"
    torch.save(load_file(str(FIXTURES / "sdxl_kohya_lora.safetensors")), pt)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", str(pt), "--to", "diffusers", "-o", str(out), "--keep-factors")
    assert result.returncode == 0, result.stderr
    assert "max |ΔW difference| = 0 " in result.stdout
    assert inspect(out).modules == inspect(FIXTURES / "sdxl_kohya_lora.safetensors").modules

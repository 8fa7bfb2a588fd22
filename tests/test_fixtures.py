"""The committed fixtures: deterministic, described truthfully by manifest.json, and loadable
by the ecosystem's own loaders (diffusers, PEFT).

Facts are re-derived here from the files' keys, independently of the generator's records.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = json.loads((FIX / "manifest.json").read_text())
GENERATOR_FILES = {"generate.py", "checkpoints.py", "extract_pairs.py", "README.md", "manifest.json"}


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("fixtures_generate", FIX / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fixtures_generate"] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    gen.generate(out)
    return out


# --------------------------------------------------------------------------------------
# Independent reading of a fixture
# --------------------------------------------------------------------------------------


def _tensors_and_meta(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        keys = f.keys()
        return {k: f.get_tensor(k) for k in keys}, dict(f.metadata() or {})


def _pattern_value(name: str, default: float, patterns: dict[str, float]) -> float:
    """PEFT's rank/alpha pattern rule: key matches the end of the dotted name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value)
    return float(default)


_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder_2|text_encoder)\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


def describe(path: Path) -> dict[str, Any]:
    """Re-derive the manifest facts for one fixture from its keys and config."""
    modules: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    alphas: dict[tuple[str, str], float | None] = {}
    if path.is_dir():
        tensors, _ = _tensors_and_meta(path / "adapter_model.safetensors")
        cfg = json.loads((path / "adapter_config.json").read_text())
        fmt = "peft"
        for key, t in tensors.items():
            m = _PEFT_KEY.match(key)
            assert m, key
            comp = "text_encoder" if m[1].startswith("text_model.") else "unet"
            modules[(comp, m[1])][m[2]] = t
        for comp, name in modules:
            alphas[(comp, name)] = _pattern_value(name, cfg["lora_alpha"], cfg["alpha_pattern"])
    else:
        tensors, meta = _tensors_and_meta(path)
        if all(k.startswith("lora_") for k in tensors):
            fmt = "kohya"
            prefix = {"lora_unet": "unet", "lora_te2": "text_encoder_2",
                      "lora_te1": "text_encoder", "lora_te": "text_encoder"}
            for key, t in tensors.items():
                name, param = key.split(".", 1)
                comp = next(v for k, v in prefix.items() if name.startswith(k + "_"))
                modules[(comp, name)][param] = t
            for mk, params in modules.items():
                alphas[mk] = float(params["alpha"].float()) if "alpha" in params else None
        else:
            fmt = "diffusers"
            adapter_meta = json.loads(meta["lora_adapter_metadata"])
            for key, t in tensors.items():
                m = _DIFFUSERS_KEY.match(key)
                assert m, key
                modules[(m[1], m[2])][m[3]] = t
            for comp, name in modules:
                alphas[(comp, name)] = _pattern_value(
                    name, adapter_meta[f"{comp}.lora_alpha"],
                    adapter_meta.get(f"{comp}.alpha_pattern") or {})

    types: set[str] = set()
    ranks, alpha_values, full = [], [], 0
    for mk, p in modules.items():
        down = p.get("lora_down.weight", p.get("lora_A.weight"))
        if down is not None:
            types.add("locon" if down.dim() == 4 and max(down.shape[2:]) > 1 else "lora")
            rank = down.shape[0]
        elif "hada_w1_b" in p:
            types.add("loha")
            rank = p["hada_w1_b"].shape[0]
        else:
            types.add("lokr")
            low = p.get("lokr_w1_b", p.get("lokr_w2_b"))
            rank = None if low is None else low.shape[0]
        if "dora_scale" in p or "lora_magnitude_vector" in p:
            types.add("dora")
        if rank is None:
            full += 1
            continue
        ranks.append(int(rank))
        alpha_values.append(alphas[mk] if alphas[mk] is not None else float(rank))

    counts = defaultdict(int)
    for comp, _ in modules:
        counts[comp] += 1
    return {
        "format": fmt,
        "family": _family(modules),
        "network_types": [t for t in ["lora", "locon", "loha", "lokr", "dora"] if t in types],
        "modules": len(modules),
        "unet": counts["unet"],
        "text_encoder": counts["text_encoder"],
        "text_encoder_2": counts["text_encoder_2"],
        "full_matrix_modules": full,
        "rank": {"min": min(ranks), "max": max(ranks)},
        "alpha": {"min": min(alpha_values), "max": max(alpha_values)},
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
    }


def _family(modules: dict[tuple[str, str], dict[str, Any]]) -> str:
    """Context width of a cross-attention to_k, else the UNet/TE topology."""
    for (_, name), p in modules.items():
        if re.search(r"attn2[._]to_k$", name):
            down = next(v for k, v in p.items() if k in ("lora_down.weight", "lora_A.weight",
                                                         "hada_w1_b", "lokr_w1"))
            width = down.shape[1]
            if "lokr_w1" in p:  # kron: in = w1 cols × w2 cols
                width *= p.get("lokr_w2_b", p.get("lokr_w2")).shape[1]
            return {768: "sd1", 2048: "sdxl"}[int(width)]
    comps = {c for c, _ in modules}
    if "text_encoder_2" in comps:
        return "sdxl"
    names = " ".join(n for _, n in modules)
    if re.search(r"down_blocks[._]0[._]attentions", names) or comps == {"text_encoder"}:
        return "sd1"
    raise AssertionError("cannot tell the family")


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------

EXPECTED = {
    "sd15_kohya_lora.safetensors", "sd15_kohya_locon.safetensors", "sd15_kohya_loha.safetensors",
    "sd15_kohya_lokr.safetensors", "sd15_kohya_dora.safetensors",
    "sd15_kohya_dora_inaxis.safetensors", "sd15_diffusers.safetensors", "sd15_peft_te",
    "sd15_peft_unet_dora", "sdxl_kohya_lora.safetensors",
    "sdxl_kohya_diffusers_named.safetensors", "sdxl_diffusers.safetensors", "sdxl_peft",
}


def test_fixture_set_is_complete_and_small() -> None:
    assert set(MANIFEST) == EXPECTED
    on_disk = {p.name for p in FIX.iterdir() if p.name not in GENERATOR_FILES
               and p.name != "__pycache__"}
    assert on_disk == EXPECTED
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file()
                and "__pycache__" not in p.parts)
    assert total < 12_000_000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_manifest_matches_file(name: str) -> None:
    derived = describe(FIX / name)
    recorded = {k: v for k, v in MANIFEST[name].items() if k != "tool"}
    assert derived == recorded


def test_generator_is_deterministic(regenerated: Path) -> None:
    assert (regenerated / "manifest.json").read_bytes() == (FIX / "manifest.json").read_bytes()
    for name, entry in MANIFEST.items():
        ours = entry["tool"].startswith("loratool")
        for committed in sorted((FIX / name).rglob("*") if (FIX / name).is_dir()
                                else [FIX / name]):
            fresh = regenerated / committed.relative_to(FIX)
            if ours:
                assert fresh.read_bytes() == committed.read_bytes(), committed.name
            elif committed.suffix == ".json":
                assert json.loads(fresh.read_text()) == json.loads(committed.read_text())
            else:  # safetensors may order its header differently between runs
                t_new, m_new = _tensors_and_meta(fresh)
                t_old, m_old = _tensors_and_meta(committed)
                assert sorted(t_new) == sorted(t_old)
                assert all(torch.equal(t_new[k], t_old[k]) for k in t_old), committed
                assert {k: _maybe_json(v) for k, v in m_new.items()} == {
                    k: _maybe_json(v) for k, v in m_old.items()}


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def test_sd15_kohya_counts_names_and_alpha_dtype() -> None:
    lora = describe(FIX / "sd15_kohya_lora.safetensors")
    assert (lora["unet"], lora["text_encoder"]) == (192, 72)
    locon = describe(FIX / "sd15_kohya_locon.safetensors")
    assert (locon["unet"], locon["text_encoder"]) == (278, 72)
    tensors, meta = _tensors_and_meta(FIX / "sd15_kohya_locon.safetensors")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in tensors
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (2, 768)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 320, 3, 3)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (320, 2, 1, 1)
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert all(t.dtype == torch.float16 and t.dim() == 0 for t in alphas)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5"}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    body = (FIX / "sd15_kohya_locon.safetensors").read_bytes()
    n = int.from_bytes(body[:8], "little")
    import hashlib

    assert meta["sshs_model_hash"] == hashlib.sha256(body[8 + n:]).hexdigest()


def test_kohya_sd15_names_resolve_to_real_modules() -> None:
    """Every SD1.5 kohya name is a flattened diffusers/HF path with a matching shape."""
    unet, te = gen.meta_unet("sd1"), gen.meta_text_encoder("clip_l")
    table = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules()}
    table |= {"lora_te_" + n.replace(".", "_"): m for n, m in te.named_modules()}
    for fname in ["sd15_kohya_locon", "sd15_kohya_loha", "sd15_kohya_lokr", "sd15_kohya_dora"]:
        tensors, _ = _tensors_and_meta(FIX / f"{fname}.safetensors")
        groups: dict[str, dict[str, Any]] = defaultdict(dict)
        for k, t in tensors.items():
            name, param = k.split(".", 1)
            groups[name][param] = t
        for name, p in groups.items():
            w = table[name].weight.shape
            if "lora_up.weight" in p:
                assert p["lora_up.weight"].shape[0] == w[0]
                assert p["lora_down.weight"].shape[1:] == w[1:]
            elif "hada_w1_a" in p:
                assert p["hada_w1_a"].shape[0] == w[0]
                assert p["hada_w2_b"].shape[1] == w[1:].numel()
            else:
                w2 = p.get("lokr_w2")
                if w2 is None:
                    w2 = p["lokr_w2_a"] @ p["lokr_w2_b"].float().to(p["lokr_w2_a"].dtype)
                    w2 = w2.reshape(w2.shape[0], -1, *w[2:])
                w1 = p["lokr_w1"]
                assert (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) == tuple(w[:2])


def test_lokr_has_low_rank_and_full_matrix_modules() -> None:
    tensors, meta = _tensors_and_meta(FIX / "sd15_kohya_lokr.safetensors")
    assert json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert any(k.endswith(".lokr_w2_b") for k in tensors)
    full = [k.split(".")[0] for k in tensors if k.endswith(".lokr_w2")]
    assert full and all(f"{n}.lokr_w1" in tensors for n in full)
    # LyCORIS factorization(320, -1) == (16, 20); 768 == 24 x 32
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2"].shape == (20, 20, 3, 3)
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1"].shape == (24, 24)
    assert gen.factorization(1280) == (32, 40)


def test_loha_has_a_conv_module() -> None:
    tensors, _ = _tensors_and_meta(FIX / "sd15_kohya_loha.safetensors")
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b"].shape == (4, 320 * 9)


def test_dora_axes() -> None:
    new, _ = _tensors_and_meta(FIX / "sd15_kohya_dora.safetensors")
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert new[f"{q}.dora_scale"].shape == (320, 1)
    assert new["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape == (320, 1, 1, 1)
    old, _ = _tensors_and_meta(FIX / "sd15_kohya_dora_inaxis.safetensors")
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert old[f"{te}.dora_scale"].shape == (1, 768)
    assert all(t.shape[0] == 1 for k, t in old.items() if k.endswith("dora_scale"))


def test_sdxl_kohya_sgm_names_and_metadata() -> None:
    tensors, meta = _tensors_and_meta(FIX / "sdxl_kohya_lora.safetensors")
    names = {k.split(".")[0] for k in tensors}
    for expected in ["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
                     "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_q",
                     "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_v",
                     "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                     "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_4_0_skip_connection",
                     "lora_te2_text_model_encoder_layers_31_self_attn_q_proj",
                     "lora_te1_text_model_encoder_layers_11_self_attn_out_proj"]:
        assert expected in names
    assert not any("down_blocks" in n for n in names)
    assert tensors["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight"].shape == (4, 2048)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_sdxl_kohya_loads_with_diffusers_sgm_mapping() -> None:
    from diffusers import StableDiffusionXLPipeline

    cfg = gen.meta_unet("sdxl").config
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(
        str(FIX / "sdxl_kohya_lora.safetensors"), unet_config=cfg)
    entry = MANIFEST["sdxl_kohya_lora.safetensors"]
    assert sum(k.startswith("unet.") for k in sd) == 2 * entry["unet"]
    assert not any("input_blocks" in k or "middle_block" in k for k in sd)
    assert set(alphas.values()) == {1.0}


def test_kohya_diffusers_named_is_diffusers_converter_output() -> None:
    tensors, _ = _tensors_and_meta(FIX / "sdxl_kohya_diffusers_named.safetensors")
    names = {k.split(".")[0] for k in tensors}
    assert any(n.startswith("lora_unet_down_blocks_1_attentions_0") for n in names)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    for k, t in tensors.items():
        if k.endswith(".alpha"):
            assert t.dtype == torch.int64
            assert int(t) == tensors[k.replace(".alpha", ".lora_down.weight")].shape[0]


def test_sd15_kohya_loads_with_diffusers() -> None:
    from diffusers import StableDiffusionPipeline

    sd, alphas = StableDiffusionPipeline.lora_state_dict(str(FIX / "sd15_kohya_lora.safetensors"))
    assert len(sd) == 2 * (192 + 72)
    assert len(alphas) == 264 and set(alphas.values()) == {1.0}


@pytest.mark.parametrize(
    ("name", "pipeline"),
    [("sd15_diffusers.safetensors", "StableDiffusionPipeline"),
     ("sdxl_diffusers.safetensors", "StableDiffusionXLPipeline")],
)
def test_diffusers_files_load_with_diffusers(name: str, pipeline: str) -> None:
    import diffusers

    cls = getattr(diffusers, pipeline)
    sd, alphas, meta = cls.lora_state_dict(str(FIX / name), return_lora_metadata=True)
    tensors = load_file(str(FIX / name))
    assert set(sd) == set(tensors)
    assert alphas is None  # alphas travel in lora_adapter_metadata instead
    entry = MANIFEST[name]
    assert meta["unet.r"] == 4
    if name.startswith("sd15"):
        assert meta["unet.lora_alpha"] == 8 and meta["text_encoder.lora_alpha"] == 8
    else:
        assert meta["unet.alpha_pattern"] == {"^up_blocks.0.attentions.0.proj_in": 8}
        assert entry["alpha"] == {"min": 4.0, "max": 8.0}


def test_peft_te_loads_with_peft() -> None:
    from peft import PeftModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # A real (CPU) CLIP with CLIP-L's attention widths and 12 layers; tiny elsewhere.
    cfg = CLIPTextConfig(**{**gen.CLIP_L_CONFIG, "vocab_size": 8, "intermediate_size": 8,
                            "max_position_embeddings": 4})
    path = FIX / "sd15_peft_te"
    model = PeftModel.from_pretrained(CLIPTextModel(cfg), str(path))
    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.text_model.encoder.layers.") for k in tensors)
    layers = model.base_model.model.text_model.encoder.layers
    q0, v11 = layers[0].self_attn.q_proj, layers[11].self_attn.v_proj
    assert q0.scaling["default"] == 8 / 4
    assert v11.r["default"] == 2 and v11.scaling["default"] == 4 / 2
    key = "base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(q0.lora_B["default"].weight.detach(), tensors[key])
    assert tensors[key].abs().sum() > 0


@pytest.mark.parametrize(("name", "alpha", "dora"), [("sd15_peft_unet_dora", 4, True),
                                                     ("sdxl_peft", 2, False)])
def test_peft_unet_folders(name: str, alpha: int, dora: bool) -> None:
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    cfg = LoraConfig.from_pretrained(str(FIX / name))
    assert (cfg.r, cfg.lora_alpha, cfg.use_dora) == (4, alpha, dora)
    weights = load_peft_weights(str(FIX / name), device="cpu")
    mags = [t for k, t in weights.items() if k.endswith("lora_magnitude_vector")]
    assert bool(mags) == dora
    # PEFT's DoRA magnitude: [out] for Linear, [1,out,1,1] for Conv2d (FORMATS §5.3)
    shapes = {k.rsplit(".", 2)[-2]: tuple(t.shape) for k, t in weights.items()
              if k.endswith("lora_magnitude_vector")}
    if dora:
        assert shapes == {"proj_in": (1, 320, 1, 1), "to_q": (320,), "to_k": (320,),
                          "to_v": (320,), "0": (320,), "2": (320,)}
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)


def test_write_kohya_sdxl_all_modules(tmp_path: Path) -> None:
    out = tmp_path / "all.safetensors"
    rec = gen.write_kohya_sdxl(out, rank=1, modules="all")
    with safe_open(str(out), "pt") as f:
        keys = f.keys()
    names = {k.split(".")[0] for k in keys}
    unet = sum(n.startswith("lora_unet_") for n in names)
    te1 = sum(n.startswith("lora_te1_") for n in names)
    te2 = sum(n.startswith("lora_te2_") for n in names)
    assert (unet, te1, te2) == (722, 72, 192)
    assert len(rec.modules) == len(names)

"""Values a LoRA file can hold that no module can use (issue 7 §2, §3): each becomes an
invalid module, named in a warning and in ``invalid_modules``, refused by ``convert``
by name; the rest of the file stays usable. No traceback, no NaN in any JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loratool
from loratool.errors import ConversionError, InputError
from loratool.io.safetensors import decode_scalar
from loratool.ops.convert import convert
from tests.conftest import run_cli

GOOD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
BAD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
OTHER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"


def _lora(name: str, rank: int = 4, alpha: float | torch.Tensor | None = 2.0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(name) + rank)
    out = {
        f"{name}.lora_down.weight": torch.randn(rank, 320, generator=gen).to(dtype) / 20,
        f"{name}.lora_up.weight": torch.randn(320, rank, generator=gen).to(dtype) / 20,
    }
    if alpha is not None:
        out[f"{name}.alpha"] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha)
    return out


def _file(tmp_path: Path, bad: dict[str, torch.Tensor], name: str = "x.safetensors") -> Path:
    path = tmp_path / name
    save_file({**_lora(GOOD), **_lora(OTHER), **bad}, str(path), {"ss_base_model_version": "sd_v1"})
    return path


def _inspect_json(path: Path) -> dict:
    proc = run_cli("inspect", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # strict JSON: NaN/Infinity are not JSON
    return json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


# (what the bad module holds, words the reason must contain)
BAD_MODULES: list[tuple[str, dict[str, torch.Tensor], str]] = [
    ("0-dim factors", {f"{BAD}.lora_down.weight": torch.tensor(1.0), f"{BAD}.lora_up.weight": torch.tensor(1.0)}, "lora_down"),
    ("rank mismatch", {f"{BAD}.lora_down.weight": torch.zeros(4, 320), f"{BAD}.lora_up.weight": torch.zeros(320, 8)}, "rank differs"),
    ("3-D lora_up", {f"{BAD}.lora_down.weight": torch.zeros(4, 320), f"{BAD}.lora_up.weight": torch.zeros(320, 4, 3)}, "lora_up"),
    ("empty factor", {f"{BAD}.lora_down.weight": torch.zeros(0, 320), f"{BAD}.lora_up.weight": torch.zeros(320, 0)}, "empty"),
    ("integer factors", {f"{BAD}.lora_down.weight": torch.ones(4, 320, dtype=torch.int32), f"{BAD}.lora_up.weight": torch.ones(320, 4, dtype=torch.int32)}, "I32"),
    ("bool factors", {f"{BAD}.lora_down.weight": torch.ones(4, 320, dtype=torch.bool), f"{BAD}.lora_up.weight": torch.ones(320, 4, dtype=torch.bool)}, "BOOL"),
    ("NaN alpha", _lora(BAD, alpha=float("nan")), "nan"),
    ("Inf alpha", _lora(BAD, alpha=float("inf")), "inf"),
    ("-Inf alpha in F16", _lora(BAD, alpha=torch.tensor(float("-inf"), dtype=torch.float16)), "inf"),
    ("F64 alpha of 1e300", _lora(BAD, alpha=torch.tensor(1e300, dtype=torch.float64)), "float32 range"),
    ("F8 NaN alpha", _lora(BAD, alpha=torch.tensor(float("nan")).to(torch.float8_e4m3fn)), "nan"),
    ("empty alpha", _lora(BAD, alpha=torch.zeros(0)), "alpha holds 0 values"),
    ("two alphas", _lora(BAD, alpha=torch.ones(2)), "alpha holds 2 values"),
    ("bool alpha", _lora(BAD, alpha=torch.tensor(True)), "boolean"),
    ("dora_scale fits no axis", {**_lora(BAD), f"{BAD}.dora_scale": torch.ones(7, 1)}, "dora_scale"),
    ("dora_scale empty", {**_lora(BAD), f"{BAD}.dora_scale": torch.ones(0, 1)}, "dora_scale"),
    ("loha factors differ", {
        f"{BAD}.hada_w1_a": torch.zeros(320, 4), f"{BAD}.hada_w1_b": torch.zeros(4, 320),
        f"{BAD}.hada_w2_a": torch.zeros(160, 4), f"{BAD}.hada_w2_b": torch.zeros(4, 320),
    }, "LoHa factors differ"),
    ("lokr stray half-pair", {f"{BAD}.lokr_w1": torch.zeros(4, 4), f"{BAD}.lokr_w2": torch.zeros(80, 80), f"{BAD}.lokr_w2_b": torch.zeros(2, 80)}, "pairs"),
]


@pytest.mark.parametrize(("what", "bad", "reason"), BAD_MODULES, ids=[c[0] for c in BAD_MODULES])
def test_bad_module_is_reported_not_a_traceback(what: str, bad: dict[str, torch.Tensor], reason: str, tmp_path: Path) -> None:
    src = _file(tmp_path, bad)
    adapter = loratool.load(src, family="sd1")
    assert set(adapter.invalid_modules) == {BAD}, adapter.invalid_modules
    assert reason.lower() in adapter.invalid_modules[BAD].lower()
    assert len(adapter.modules) == 2 and not adapter.complete
    assert any(BAD in w for w in adapter.warnings)
    report = _inspect_json(src)
    assert list(report["invalid_modules"]) == [BAD] and report["modules"] == 2 and report["complete"] is False
    human = run_cli("inspect", str(src))
    assert human.returncode == 0 and "Traceback" not in human.stderr and BAD in human.stdout
    # convert refuses the module by name; --skip-unsupported writes the rest
    with pytest.raises(ConversionError, match=BAD):
        convert(src, "kohya", tmp_path / "k.safetensors", family="sd1")
    assert not (tmp_path / "k.safetensors").exists()
    for target, out in (("kohya", "k.safetensors"), ("diffusers", "d.safetensors"), ("peft", "p")):
        result = convert(src, target, tmp_path / out, family="sd1", skip_unsupported=True)
        assert result.modules == 2 and BAD in result.skipped
        assert set(loratool.load(tmp_path / out, family="sd1").modules) == set(adapter.modules)


def test_cli_convert_refuses_bad_modules_by_name(tmp_path: Path) -> None:
    src = _file(tmp_path, _lora(BAD, alpha=float("nan")))
    proc = run_cli("convert", str(src), "--to", "peft", "-o", str(tmp_path / "p"), "--family", "sd1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and BAD in proc.stderr and "nan" in proc.stderr
    proc = run_cli("convert", str(src), "--to", "peft", "-o", str(tmp_path / "p"), "--family", "sd1", "--skip-unsupported")
    assert proc.returncode == 0, proc.stderr
    config = (tmp_path / "p" / "unet" / "adapter_config.json").read_text()
    json.loads(config, parse_constant=lambda c: pytest.fail(f"{c} in adapter_config.json"))


def test_every_module_bad_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "all_bad.safetensors"
    save_file(_lora(BAD, alpha=float("inf")), str(path))
    with pytest.raises(InputError, match=f"no usable module.*{BAD}"):
        loratool.load(path)
    proc = run_cli("inspect", str(path))
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("value", [0.5, 3.0, 12.0, -2.5, 0.017578125])
def test_f8_alpha_is_read_exactly(dtype: torch.dtype, value: float, tmp_path: Path) -> None:
    alpha = torch.tensor(value).to(dtype)
    src = _file(tmp_path, _lora(BAD, alpha=alpha))
    module = next(m for m in loratool.load(src, family="sd1").modules.values() if m.source_name == BAD)
    assert module.alpha == alpha.float().item()  # what torch (and kohya/ComfyUI: .item()) read
    assert module.scale == alpha.float().item() / 4


def test_f8_scalars_decode_like_torch() -> None:
    for name, dtype in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        want = torch.arange(256, dtype=torch.uint8).view(dtype).float().tolist()
        for byte, w in enumerate(want):
            got = decode_scalar(bytes([byte]), name)
            assert got == w or (math.isnan(got) and math.isnan(w)), (name, byte, got, w)


def test_pt_with_empty_alpha(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({**_lora(GOOD), **_lora(BAD, alpha=torch.zeros(0))}, path)
    adapter = loratool.load(path, family="sd1")
    assert list(adapter.invalid_modules) == [BAD] and len(adapter.modules) == 1
    assert _inspect_json(path)["invalid_modules"] == {BAD: "alpha holds 0 values, not one"}


# ----------------------------------------------------------------- configs that lie

def _peft_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "peft"
    folder.mkdir()
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {}
    for proj in ("to_q", "to_k"):
        tensors[f"base_model.model.{path}.{proj}.lora_A.weight"] = torch.randn(4, 320)
        tensors[f"base_model.model.{path}.{proj}.lora_B.weight"] = torch.randn(320, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, **config}))
    return folder


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"lora_alpha": float("nan")}, "nan"),
        ({"lora_alpha": float("inf")}, "inf"),
        ({"lora_alpha": "16"}, "not a number"),
        ({"lora_alpha": 1e300}, "float32 range"),
        ({"lora_alpha": 8, "alpha_pattern": ["to_q"]}, "not an object"),
        ({"lora_alpha": 8, "alpha_pattern": {"to_q": [1]}}, "not a number"),
    ],
)
def test_peft_config_values_that_are_not_numbers(config: dict, reason: str, tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path, config)
    if "alpha_pattern" in config and isinstance(config["alpha_pattern"], dict):
        adapter = loratool.load(folder, family="sd1")
        assert len(adapter.modules) == 1 and len(adapter.invalid_modules) == 1
        assert reason in next(iter(adapter.invalid_modules.values()))
        _inspect_json(folder)
        return
    with pytest.raises(InputError, match=reason):
        loratool.load(folder, family="sd1")
    proc = run_cli("inspect", "--json", str(folder))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr

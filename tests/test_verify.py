"""Verification cannot be fooled (issue 7 §3): NaN/Inf that appears in the output, a
source that holds NaN/Inf, and a comparison that cannot be made are all failures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from loratool.errors import ConversionError
from loratool.ops.convert import convert
from loratool.ops.verify import compare_adapters
from tests.conftest import FIXTURES, run_cli

SRC = FIXTURES / "sd15_kohya_lora.safetensors"
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


def _poisoned_copy(src: Path, dst: Path, key: str, value: float) -> Path:
    tensors = load_file(str(src))
    t = tensors[key].clone()
    t.view(-1)[0] = value
    tensors[key] = t
    save_file(tensors, str(dst))
    return dst


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_in_an_output_tensor_fails_verification(value: float, tmp_path: Path) -> None:
    source = loratool.load(SRC)
    key = next(k for k in load_file(str(SRC)) if k.endswith("lora_up.weight"))
    out = loratool.load(_poisoned_copy(SRC, tmp_path / "out.safetensors", key, value))
    report = compare_adapters(list(source.modules.values()), out)
    assert report.failures and "NaN/Inf" in report.failures[0]
    assert not report.nonfinite_source and report.identical == len(source.modules) - 1


def test_nan_that_appears_when_casting_fails_the_conversion(tmp_path: Path) -> None:
    """fp32 factors that are finite but overflow fp16: up·0 = 0 in the source, inf·0 =
    NaN in the fp16 output. The old check (NaN > tolerance is False) passed it as 0."""
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(4, 320, generator=gen)
    down[:, 0] = 0.0
    up = torch.randn(320, 4, generator=gen)
    up[0, 0] = 1e6  # beyond fp16
    src = tmp_path / "big.safetensors"
    save_file({f"{TO_Q}.lora_down.weight": down, f"{TO_Q}.lora_up.weight": up, f"{TO_Q}.alpha": torch.tensor(4.0)}, str(src))
    with pytest.raises(ConversionError, match="verification failed"):
        convert(src, "kohya", tmp_path / "out.safetensors", family="sd1", dtype="fp16")
    assert not (tmp_path / "out.safetensors").exists()
    proc = run_cli("convert", str(src), "--to", "kohya", "-o", str(tmp_path / "o.safetensors"), "--family", "sd1", "--dtype", "fp16")
    assert proc.returncode == 1 and "verification failed" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("dtype", [None, "fp32"])  # byte-identical shortcut / recomputed ΔW
@pytest.mark.parametrize("target", ["kohya", "diffusers"])
def test_source_with_nan_tensor_is_refused_by_name(dtype: str | None, target: str, tmp_path: Path) -> None:
    src = _poisoned_copy(SRC, tmp_path / "src.safetensors", f"{TO_K}.lora_down.weight", math.nan)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ConversionError, match=f"NaN/Inf.*{TO_K}.*--skip-unsupported"):
        convert(src, target, out, dtype=dtype)
    assert not out.exists()
    result = convert(src, target, out, dtype=dtype, skip_unsupported=True)
    assert list(result.skipped) == [TO_K] and result.modules == len(loratool.load(src).modules) - 1
    written = loratool.load(out)
    assert len(written.modules) == result.modules and result.max_abs_diff is not None


def test_base_dependent_modules_with_other_parameters_cannot_be_compared(tmp_path: Path) -> None:
    """OFT is compared parameter by parameter; an output without ``rescale`` used to pass
    because only the parameters both sides have were compared."""
    blocks = torch.randn(40, 8, 8)
    save_file({f"{TO_Q}.oft_blocks": blocks, f"{TO_Q}.rescale": torch.ones(320, 1)}, str(tmp_path / "a.safetensors"))
    save_file({f"{TO_Q}.oft_blocks": blocks}, str(tmp_path / "b.safetensors"))
    a, b = loratool.load(tmp_path / "a.safetensors", family="sd1"), loratool.load(tmp_path / "b.safetensors", family="sd1")
    report = compare_adapters(list(a.modules.values()), b)
    assert report.failures and "cannot compare" in report.failures[0]


def test_oft_source_with_inf_is_refused(tmp_path: Path) -> None:
    blocks = torch.randn(40, 8, 8)
    blocks[0, 0, 1] = math.inf
    src = tmp_path / "oft.safetensors"
    save_file({f"{TO_Q}.oft_blocks": blocks, **{k: v for k, v in load_file(str(SRC)).items() if k.startswith(TO_K)}}, str(src))
    with pytest.raises(ConversionError, match=f"NaN/Inf.*{TO_Q}"):
        convert(src, "kohya", tmp_path / "out.safetensors", family="sd1", dtype="fp16")
    result = convert(src, "kohya", tmp_path / "out.safetensors", family="sd1", dtype="fp16", skip_unsupported=True)
    assert TO_Q in result.skipped and result.modules == 1


def _measured(source: loratool.model.Adapter, out: loratool.model.Adapter) -> float:
    """max |ΔW difference| over every 8th module (LoRA and LoCon), computed the plain way."""
    from loratool.networks import delta_weight

    worst = 0.0
    for m in list(source.modules.values())[::8]:
        o = out.modules[m.key]
        a = delta_weight(m.network_type, {k: r.load() for k, r in m.params.items()}, m.alpha, scale=m.scale)
        b = delta_weight(o.network_type, {k: r.load() for k, r in o.params.items()}, o.alpha, tuple(a.shape), scale=o.scale)
        worst = max(worst, (a - b).abs().max().item())
    return worst


@pytest.mark.parametrize(("target", "dtype"), [("kohya", "fp32"), ("kohya", "bf16"), ("diffusers", None), ("diffusers", "bf16")])
def test_factor_bound_covers_the_measured_difference(target: str, dtype: str | None, tmp_path: Path) -> None:
    """Casts and folded alphas are verified from the factors (no out×in product): the
    reported difference is a bound at least the measured one, and small."""
    src = FIXTURES / "sd15_kohya_locon.safetensors"  # alpha/rank 0.25 and 0.5, fp16
    out = tmp_path / "out.safetensors"
    result = convert(src, target, out, dtype=dtype)
    source, written = loratool.load(src), loratool.load(out)
    report = compare_adapters(list(source.modules.values()), written)
    assert report.by_factors == result.modules - result.identical_modules > 0
    assert report.max_abs_diff == result.max_abs_diff
    measured = _measured(source, written)
    assert measured <= result.max_abs_diff < 1e-2 * max(measured, 1e-6) + 1e-3


def test_a_tampered_factor_is_not_taken_for_rounding(tmp_path: Path) -> None:
    """One lora_up value 1% off in a folded diffusers file: not a rescale within rounding,
    so the module is over tolerance (its bound, or its recomputed ΔW, shows it)."""
    source = loratool.load(SRC)
    convert(SRC, "diffusers", tmp_path / "d.safetensors")
    key = next(k for k in load_file(str(tmp_path / "d.safetensors")) if k.endswith("lora_B.weight"))
    tensors = load_file(str(tmp_path / "d.safetensors"))
    t = tensors[key].clone()
    i = int(t.float().abs().argmax())
    t.view(-1)[i] = t.view(-1)[i] * 1.01
    tensors[key] = t
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "t.safetensors"), meta)
    report = compare_adapters(list(source.modules.values()), loratool.load(tmp_path / "t.safetensors"))
    assert len(report.over_tolerance) == 1 and not report.failures and not report.missing


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F8_E4M3", "F8_E5M2"])
def test_byte_screen_agrees_with_torch_on_every_value(dtype: str) -> None:
    """The torch-free NaN/Inf screen of stored bytes, against torch.isfinite for every bit
    pattern of the 16- and 8-bit float dtypes."""
    from loratool.io.safetensors import DTYPE_SIZES, TORCH_DTYPES
    from loratool.ops.verify import _finite_bytes

    size = DTYPE_SIZES[dtype]
    patterns = torch.arange(256**size, dtype=torch.int32)
    raw = b"".join(int(p).to_bytes(size, "little") for p in patterns)
    values = torch.frombuffer(bytearray(raw), dtype=getattr(torch, TORCH_DTYPES[dtype])).float()
    want = torch.isfinite(values).tolist()
    got = [_finite_bytes(raw[i * size:(i + 1) * size], dtype) for i in range(len(want))]
    assert got == want
    assert _finite_bytes(raw, dtype) is False  # the whole range holds NaN


@pytest.mark.parametrize("dtype", ["F32", "F64"])
def test_byte_screen_wide_dtypes(dtype: str) -> None:
    from loratool.ops.verify import _finite_bytes

    tdt = torch.float32 if dtype == "F32" else torch.float64
    big = torch.finfo(tdt).max
    for x, finite in ((1.0, True), (-2.5, True), (big, True), (-big, True), (math.inf, False), (-math.inf, False), (math.nan, False)):
        t = torch.tensor([0.25, x, 3.0], dtype=tdt)
        assert _finite_bytes(bytes(t.view(torch.uint8).tolist()), dtype) is finite, x

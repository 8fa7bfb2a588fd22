"""``loratool resize``: the output's ΔW is the truncation of a full SVD of the input's ΔW
(the test's own float64 SVD of ΔW read straight from the file), ranks chosen from planted
spectra are the hand-computed ones, strength is kept, and what cannot be resized exactly
is refused by name."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import loratool
from loratool.errors import ConversionError, UsageError
from loratool.networks import delta_weight
from loratool.ops.factored import Check, Term, verify_written
from loratool.ops.resize import resize
from tests.conftest import FIXTURES, run_cli, source_path
from tests.lowrank_helpers import (
    F64,
    SD15_MODULES,
    Oracle,
    best_rank,
    kohya_deltas,
    kohya_ranks,
    planted,
    random_factors,
    rel_diff,
    truncation_errors,
    truncation_gap,
    write_kohya,
)

FP32_TOL = 1e-5  # max |ΔW − oracle| / max |oracle|: fp32 factors and fp32 QR/SVD


@pytest.fixture(scope="module")
def rank16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rank-16 kohya LoRA on five SD1.5 modules (linear, 1×1 conv, 3×3 conv), alpha 8, fp32;
    random factors, so that each module has its own, decaying spectrum."""
    path = tmp_path_factory.mktemp("resize") / "rank16.safetensors"
    modules = {}
    for i, (name, (out, in_dim, kernel)) in enumerate(SD15_MODULES.items()):
        up, down = random_factors(out, in_dim * (9 if kernel == (3, 3) else 1), 16, seed=i)
        modules[name] = (up * torch.logspace(0, -2, 16, dtype=F64), down, 8.0)
    return write_kohya(path, modules)


@pytest.fixture(scope="module")
def oracle16(rank16: Path) -> Oracle:
    return Oracle(rank16)


@pytest.mark.parametrize("rank", [1, 4, 15])
def test_resize_equals_truncated_full_svd(rank16: Path, oracle16: Oracle, tmp_path: Path, rank: int) -> None:
    out = tmp_path / "out.safetensors"
    result = resize(rank16, out, rank=rank)
    after = kohya_deltas(out)
    assert set(after) == set(oracle16.deltas)
    for name in oracle16.deltas:
        assert rel_diff(after[name], oracle16.best(name, rank)) < FP32_TOL, name
    ranks = kohya_ranks(out)
    assert all(r == rank and alpha == pytest.approx(8.0 * rank / 16) for r, alpha in ranks.values())  # alpha/rank kept
    assert result.counts() == {"resized": 5, "unchanged": 0, "refactored": 0}
    for m in result.modules:  # reported energy = the oracle's
        s = oracle16.svd(m.name)[1]
        assert m.retained == pytest.approx((s[:rank].square().sum() / s.square().sum()).sqrt().item(), rel=1e-5)
        assert m.error == pytest.approx((s[rank:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4, abs=1e-7)
    assert result.max_deviation is not None and result.max_deviation < 1e-5


def test_resize_keeps_shapes_and_is_plain_kohya(rank16: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    resize(rank16, out, rank=3)
    with safe_open(str(out), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] == (3, 320, 3, 3)
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] == (320, 3, 1, 1)
    assert shapes["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] == (3, 320, 1, 1)
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] == (3, 768)
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.5"}  # kohya: strings
    assert json.loads(meta["loratool.resize"]) == {"source": "rank16.safetensors", "method": "rank", "threshold": None, "rank": 3}
    assert meta["ss_output_name"] == "rank16"  # the rest is kept
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_planted_spectra_dynamic_ranks(tmp_path: Path) -> None:
    """Hand-computed ranks (no +1): A = [8, 4, 2, 1], B = [1, 1, 1, 1], C = [5, 5, 0.1, 0.1]."""
    spectra = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1": [8.0, 4.0, 2.0, 1.0],
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": [1.0, 1.0, 1.0, 1.0],
        "lora_unet_down_blocks_0_resnets_0_conv1": [5.0, 5.0, 0.1, 0.1],
    }
    modules = {}
    for i, (name, s) in enumerate(spectra.items()):
        out, in_dim, kernel = SD15_MODULES[name]
        up, down = planted(out, in_dim * (9 if kernel == (3, 3) else 1), s, seed=i)
        modules[name] = (up, down, 2.0)
    src = write_kohya(tmp_path / "planted.safetensors", modules)
    a, b, c = spectra
    cases = {
        # ratio 3: σ ≥ σ₀/3 → A: {8, 4} = 2; B: 4 (unchanged); C: σ ≥ 5/3 → 2
        ("ratio", 3.0, None): {a: 2, b: 4, c: 2},
        # fro 0.95: A √(80/85) = 0.970 → 2; B √(3/4) = 0.866 < 0.95 → 4; C √(50/50.02) → 2
        ("fro", 0.95, None): {a: 2, b: 4, c: 2},
        # cumulative 0.9: A 8/15, 12/15 = 0.8, 14/15 = 0.933 → 3; B 4; C 10/10.2 = 0.98 → 2; cap 2
        ("cumulative", 0.9, None): {a: 3, b: 4, c: 2},
        ("cumulative", 0.9, 2): {a: 2, b: 2, c: 2},
    }
    before = kohya_deltas(src)
    for i, ((method, t, cap), expected) in enumerate(cases.items()):
        out = tmp_path / f"dyn{i}.safetensors"
        result = resize(src, out, dynamic=method, threshold=t, rank=cap)
        got = {m.name: m.rank_out for m in result.modules}
        assert got == expected, (method, t, got)
        ranks, after = kohya_ranks(out), kohya_deltas(out)
        for name, k in expected.items():
            assert ranks[name] == (k, pytest.approx(2.0 * k / 4))
            # a rank-k result with the Eckart–Young error is a best rank-k approximation
            # (B's equal singular values have no unique one)
            optimum = 0.5 * torch.tensor(spectra[name][k:], dtype=F64).square().sum().sqrt().item()  # scale 2/4
            err = torch.linalg.norm(after[name] - before[name]).item()
            assert err == pytest.approx(optimum, abs=1e-5 * torch.linalg.norm(before[name]).item()), name
        assert {m.name for m in result.modules if m.action == "unchanged"} == {n for n, k in expected.items() if k == 4}


def test_tucker_locon_is_folded_to_a_plain_locon(tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(320, 8, generator=g, dtype=F64), torch.randn(8, 320, generator=g, dtype=F64) * 0.05
    mid = torch.randn(8, 8, 3, 3, generator=g, dtype=F64) * 0.1
    src = write_kohya(tmp_path / "tucker.safetensors", {name: (up, down, 4.0)}, mids={name: mid})
    assert loratool.load(src).modules[next(iter(loratool.load(src).modules))].network_type == "locon"
    out = tmp_path / "out.safetensors"
    resize(src, out, rank=3)
    with safe_open(str(out), "pt") as f:
        assert not any("lora_mid" in k for k in f.keys())  # noqa: SIM118
        assert tuple(f.get_slice(f"{name}.lora_down.weight").get_shape()) == (3, 320, 3, 3)
    assert rel_diff(kohya_deltas(out)[name], best_rank(kohya_deltas(src)[name], 3)) < FP32_TOL


def test_modules_at_or_below_the_rank_are_copied_byte_identical(tmp_path: Path) -> None:
    src = FIXTURES / "sd15_kohya_locon.safetensors"  # rank 2 everywhere
    out = tmp_path / "same.safetensors"
    result = resize(src, out, rank=2)
    assert result.counts()["unchanged"] == 350
    with safe_open(str(src), "pt") as a, safe_open(str(out), "pt") as b:
        for k in a.keys():  # noqa: SIM118
            if not k.endswith(".alpha"):
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
                assert a.get_tensor(k).dtype == b.get_tensor(k).dtype


def test_fp16_fixture_keeps_dtype_and_strength(tmp_path: Path) -> None:
    src = FIXTURES / "sd15_kohya_locon.safetensors"  # rank 2, alpha 1 (convs 0.5), fp16
    out = tmp_path / "r1.safetensors"
    resize(src, out, rank=1)
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith("alpha")} == {torch.float16}  # noqa: SIM118
    ranks = kohya_ranks(out)
    assert {r for r, _ in ranks.values()} == {1} and len(ranks) == 350
    names = list(SD15_MODULES)  # the oracle on a sample of every kind of layer
    before, after = kohya_deltas(src, names), kohya_deltas(out, names)
    for name, dw in before.items():
        assert ranks[name][1] == pytest.approx(0.25 if "resnets_0_conv1" in name else 0.5)  # alpha/rank kept
        assert abs(truncation_gap(after[name], dw, 1)) < 1e-3, name  # fp16 rounding of the factors


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_other_formats_hold_the_same_delta(rank16: Path, oracle16: Oracle, tmp_path: Path, target: str) -> None:
    kohya = tmp_path / "k.safetensors"
    other = tmp_path / ("o.safetensors" if target == "diffusers" else "o")
    resize(rank16, kohya, rank=5)
    resize(rank16, other, rank=5, target=target)
    a, b = loratool.load(kohya), loratool.load(other)
    assert set(a.modules) == set(b.modules) and len(a.modules) == 5
    for key, m in b.modules.items():
        t = {k: v.load() for k, v in m.params.items()}
        dw = delta_weight(m.network_type, t, m.alpha).to(F64)
        name = a.modules[key].source_name
        assert m.rank == 5
        assert rel_diff(dw.reshape(dw.shape[0], -1), oracle16.best(name, 5)) < FP32_TOL


# LyCORIS fixtures: a linear, a 1×1 conv, a 3×3 conv (the oracle's SVDs on a sample).
LYCO_SAMPLE = ("text_model.encoder.layers.0.self_attn.k_proj", "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1")


def test_svd_full_loha_and_lokr(tmp_path: Path) -> None:
    """LoHa (ΔW of rank ≤ 16) and LoKr (convs are full Kronecker products) re-factored
    as LoRA: within 1 % of the optimal error (randomized SVD), ΔW from LyCORIS' formulas."""
    for name, rank in (("sd15_kohya_loha", 8), ("sd15_kohya_lokr", 16)):
        src = FIXTURES / f"{name}.safetensors"
        out = tmp_path / f"{name}.safetensors"
        result = resize(src, out, rank=rank, svd_full=True, dtype="fp32")
        assert result.counts()["refactored"] == 23
        adapter, after = loratool.load(src), loratool.load(out)
        assert {o.network_type for o in after.modules.values()} == {"lora", "locon"}
        for key, m in adapter.modules.items():
            if not key.path.endswith(LYCO_SAMPLE):
                continue
            shape = tuple(m.extra["shape"])
            dw = delta_weight(m.network_type, {k: v.load() for k, v in m.params.items()}, m.alpha, shape).to(F64).flatten(1)
            o = after.modules[key]
            out_dw = delta_weight(o.network_type, {k: v.load() for k, v in o.params.items()}, o.alpha, shape).flatten(1)
            assert o.rank == min(rank, *dw.shape)
            err, optimum, norm = truncation_errors(out_dw, dw, rank)
            assert optimum - 1e-6 * norm <= err <= 1.01 * optimum + 1e-6 * norm, key


def test_svd_full_dora_keeps_the_magnitude(tmp_path: Path) -> None:
    src = FIXTURES / "sd15_kohya_dora.safetensors"  # 23 modules, rank 4
    out = tmp_path / "dora.safetensors"
    resize(src, out, rank=2, svd_full=True, dtype="fp32")
    with safe_open(str(src), "pt") as a, safe_open(str(out), "pt") as b:
        for k in a.keys():  # noqa: SIM118
            if k.endswith("dora_scale"):
                assert torch.equal(a.get_tensor(k).float(), b.get_tensor(k)), k
    names = ["lora_te_text_model_encoder_layers_0_self_attn_k_proj", "lora_unet_down_blocks_0_resnets_0_conv1"]
    before, after = kohya_deltas(src, names), kohya_deltas(out, names)
    for name in ("lora_te_text_model_encoder_layers_0_self_attn_k_proj", "lora_unet_down_blocks_0_resnets_0_conv1"):
        assert abs(truncation_gap(after[name], before[name], 2)) < 1e-6, name


def test_refusals_name_the_modules_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    r = run_cli("resize", str(FIXTURES / "sd15_kohya_loha.safetensors"), "-o", str(out), "--rank", "2")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "LOHA has no LoRA factors" in r.stderr and "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in r.stderr
    assert "--svd-full" in r.stderr and list(tmp_path.iterdir()) == []
    with pytest.raises(ConversionError, match="DoRA renormalises .*--svd-full.*lora_te_text_model_encoder_layers_0_self_attn_k_proj"):
        resize(FIXTURES / "sd15_kohya_dora.safetensors", out, rank=2)
    with pytest.raises(ConversionError, match="nothing left to write"):
        resize(FIXTURES / "sd15_kohya_dora.safetensors", out, rank=2, skip_unsupported=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "give --rank N"),
        ({"rank": 0}, "--rank must be ≥ 1"),
        ({"rank": 2, "threshold": 0.5}, "--threshold goes with --dynamic"),
        ({"dynamic": "fro"}, "needs --threshold"),
        ({"dynamic": "ratio", "threshold": 0.5}, "ratio threshold must be ≥ 1"),
        ({"dynamic": "cumulative", "threshold": 2.0}, "must be in \\(0, 1\\]"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        resize(FIXTURES / "sd15_kohya_lora.safetensors", tmp_path / "x.safetensors", **kwargs)


def test_output_safety(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    src.write_bytes((FIXTURES / "sd15_kohya_lora.safetensors").read_bytes())
    r = run_cli("resize", str(src), "-o", str(src), "--rank", "1", "--force")
    assert r.returncode == 2 and "refusing to write onto the input" in r.stderr and "Traceback" not in r.stderr
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    with pytest.raises(UsageError, match="--force"):
        resize(src, existing, rank=1)
    assert existing.read_bytes() == b"keep"
    resize(src, existing, rank=1, force=True)
    assert kohya_ranks(existing)["lora_te_text_model_encoder_layers_0_mlp_fc1"][0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.safetensors", "in.safetensors"]  # no temp files left


def test_verification_catches_a_wrong_output(rank16: Path, tmp_path: Path) -> None:
    """The check holds a written file to its source: another LoRA's output fails it."""
    out = tmp_path / "out.safetensors"
    resize(rank16, out, rank=4)
    other = FIXTURES / "sd15_kohya_locon.safetensors"
    adapter = loratool.load(other)
    wrong = [Check(m.key, m.source_name, [Term(m)]) for m in adapter.modules.values()
             if m.source_name in SD15_MODULES]
    with pytest.raises(ConversionError, match="verification failed"):
        verify_written(out, "sd1", wrong)
    mine = loratool.load(rank16)
    right = [Check(m.key, m.source_name, [Term(m)]) for m in mine.modules.values()]
    with pytest.raises(ConversionError, match="expected 0"):  # truncated, yet claimed exact
        verify_written(out, "sd1", right)


def test_cli_end_to_end_on_fixtures(tmp_path: Path) -> None:
    out = tmp_path / "sdxl_r2.safetensors"
    r = run_cli("resize", str(FIXTURES / "sdxl_kohya_lora.safetensors"), "-o", str(out), "--rank", "2", "--json")
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["summary"]["resized"] == 71 and payload["verified"] and payload["family"] == "sdxl"
    assert {m["rank_out"] for m in payload["modules"]} == {2} and payload["files"] == [str(out)]
    assert all(0 < m["retained"] <= 1 and m["retained"] ** 2 + m["error"] ** 2 == pytest.approx(1) for m in payload["modules"])
    r = run_cli("inspect", str(out), "--json")
    assert json.loads(r.stdout)["rank"] == {"min": 2, "max": 2}
    r = run_cli("resize", str(FIXTURES / "sd15_diffusers.safetensors"), "-o", str(tmp_path / "d.safetensors"),
                "--dynamic", "fro", "--threshold", "0.8", "--rank", "3")
    assert r.returncode == 0 and r.stdout.startswith("wrote ") and "verified:" in r.stdout


@pytest.mark.parametrize("name", ["realworld/peft-te-sd15", "realworld/diffusers-sd15/pytorch_lora_weights.safetensors"])
def test_realworld(tmp_path: Path, name: str) -> None:
    src = source_path(name)
    out = tmp_path / "out"
    result = resize(src, out, rank=2, dtype="fp32")
    adapter, after = loratool.load(src), loratool.load(out)
    assert result.target == adapter.format and result.counts()["resized"] == len(adapter.modules)
    assert set(after.modules) == set(adapter.modules) and {o.rank for o in after.modules.values()} == {2}
    sample = {m.extra["shape"]: key for key, m in adapter.modules.items()}  # one module per layer shape
    for key in sample.values():
        m, o = adapter.modules[key], after.modules[key]
        dw = delta_weight(m.network_type, {k: v.load() for k, v in m.params.items()}, m.alpha).flatten(1)
        out_dw = delta_weight(o.network_type, {k: v.load() for k, v in o.params.items()}, o.alpha).flatten(1)
        assert abs(truncation_gap(out_dw, dw, 2)) < 1e-6, key


def test_nan_factors_are_refused_by_name(rank16: Path, tmp_path: Path) -> None:
    """A module whose factors hold NaN is named, and nothing is written (resize and merge)."""
    from safetensors.torch import load_file, save_file

    from loratool.ops.merge_loras import merge_loras

    tensors = load_file(str(rank16))
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors[f"{name}.lora_up.weight"][3, 2] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), {"ss_network_module": "networks.lora"})
    out = tmp_path / "out.safetensors"
    for run in (lambda: resize(bad, out, rank=4), lambda: resize(bad, out, dynamic="fro", threshold=0.9),
                lambda: merge_loras([rank16, bad], out), lambda: merge_loras([rank16, bad], out, mode="svd", rank=4)):
        with pytest.raises(ConversionError, match="NaN/Inf"):
            run()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]

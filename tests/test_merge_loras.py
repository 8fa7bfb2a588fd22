"""``loratool merge-loras``: concat gives exactly the weighted sum of the inputs' ΔW (read
straight from the files), svd gives its best rank-k approximation (the test's own float64
SVD), for mixed ranks, alphas, signs and formats; what cannot be summed is refused."""

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
from loratool.ops.merge_loras import merge_loras, parse_input
from tests.conftest import FIXTURES, run_cli, source_path
from tests.lowrank_helpers import (
    F64,
    SD15_MODULES,
    kohya_deltas,
    kohya_ranks,
    random_factors,
    rel_diff,
    truncation_errors,
    write_kohya,
)

NAMES = list(SD15_MODULES)
FP32_TOL = 1e-6


def _lora(path: Path, names: list[str], rank: int, alpha: float | None, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    modules = {}
    for i, name in enumerate(names):
        out, in_dim, kernel = SD15_MODULES[name]
        up, down = random_factors(out, in_dim * (9 if kernel == (3, 3) else 1), rank, seed=seed * 100 + i)
        modules[name] = (up, down, alpha)
    return write_kohya(path, modules, dtype)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A: rank 4, alpha 1 on modules 0–3; B: rank 8, no alpha (scale 1) on modules 1–4."""
    d = tmp_path_factory.mktemp("merge")
    return _lora(d / "a.safetensors", NAMES[:4], 4, 1.0, seed=1), _lora(d / "b.safetensors", NAMES[1:], 8, None, seed=2)


def _weighted_sum(inputs: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, w in inputs:
        for name, dw in kohya_deltas(path).items():
            total[name] = total.get(name, 0) + w * dw
    return total


def test_concat_is_the_weighted_sum(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair
    out = tmp_path / "concat.safetensors"
    result = merge_loras([f"{a}:0.7", f"{b}:-1.5"], out)
    expected = _weighted_sum([(a, 0.7), (b, -1.5)])
    got = kohya_deltas(out)
    assert set(got) == set(expected) == set(NAMES)
    for name in NAMES:
        assert rel_diff(got[name], expected[name]) < FP32_TOL, name
    ranks = kohya_ranks(out)
    assert ranks[NAMES[0]] == (4, 4.0) and ranks[NAMES[4]] == (8, 8.0)  # present in one input only
    assert all(ranks[n] == (12, 12.0) for n in NAMES[1:4])  # ranks stacked, alpha = rank: scale 1
    assert {m.sources for m in result.modules} == {1, 2} and result.max_deviation is not None
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118


def test_concat_fp16_keeps_precision_on_both_factors(tmp_path: Path) -> None:
    a = _lora(tmp_path / "a.safetensors", NAMES[:2], 4, 1.0, seed=3, dtype=torch.float16)
    b = _lora(tmp_path / "b.safetensors", NAMES[:2], 16, 16.0, seed=4, dtype=torch.float16)
    out = tmp_path / "m.safetensors"
    merge_loras([(a, 1e-3), (b, -250.0)], out)  # large and tiny weights: √ split on both sides
    expected, got = _weighted_sum([(a, 1e-3), (b, -250.0)]), kohya_deltas(out)
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor(f"{NAMES[0]}.lora_up.weight").dtype == torch.float16
    for name in NAMES[:2]:
        assert rel_diff(got[name], expected[name]) < 2e-3, name


def test_svd_is_the_best_rank_k_of_the_sum(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair
    out = tmp_path / "svd.safetensors"
    result = merge_loras([(a, 0.5), (b, 2.0)], out, mode="svd", rank=6)
    expected, got = _weighted_sum([(a, 0.5), (b, 2.0)]), kohya_deltas(out)
    ranks = kohya_ranks(out)
    canonical = {m.source_name: str(key) for key, m in loratool.load(out).modules.items()}
    records = {m.name: m for m in result.modules}
    for name in NAMES:
        k = ranks[name][0]
        assert ranks[name] == (min(6, 4 if name == NAMES[0] else 8 if name == NAMES[4] else 12), float(k))
        err, optimum, norm = truncation_errors(got[name], expected[name], k)
        assert abs(err - optimum) < 1e-6 * norm, name
        record = records[canonical[name]]
        assert record.error == pytest.approx(optimum / norm, rel=1e-4, abs=1e-7)
    assert rel_diff(got[NAMES[0]], expected[NAMES[0]]) < FP32_TOL  # rank 4 ≤ 6: exact


def test_mixed_formats_concat(tmp_path: Path) -> None:
    """kohya + diffusers + PEFT inputs of one family; ΔW of each input as loratool decodes it
    (held to diffusers/PEFT loaders by the convert oracles)."""
    inputs = [(FIXTURES / "sdxl_kohya_lora.safetensors", 0.8), (FIXTURES / "sdxl_diffusers.safetensors", -0.5), (FIXTURES / "sdxl_peft", 1.25)]
    out = tmp_path / "mixed.safetensors"
    result = merge_loras(inputs, out, dtype="fp32")
    assert result.family == "sdxl" and [i.format for i in result.inputs] == ["kohya", "diffusers", "peft"]
    expected: dict = {}
    ranks: dict = {}
    for path, w in inputs:
        for key, m in loratool.load(path).modules.items():
            dw = delta_weight(m.network_type, {k: v.load() for k, v in m.params.items()}, m.alpha, m.extra["shape"]).to(F64)
            expected[key] = expected.get(key, 0) + w * dw
            ranks[key] = ranks.get(key, 0) + m.rank
    merged = loratool.load(out)
    assert set(merged.modules) == set(expected) and len(expected) == len(result.modules)
    for key, m in merged.modules.items():
        assert m.rank == ranks[key] and m.alpha == m.rank
        dw = delta_weight(m.network_type, {k: v.load() for k, v in m.params.items()}, m.alpha, m.extra["shape"]).to(F64)
        assert rel_diff(dw, expected[key]) < 2e-6, key


def test_svd_with_loha_and_lokr(tmp_path: Path) -> None:
    """A LoRA + the LoHa and LoKr fixtures: ΔW formed (LyCORIS formulas as loratool decodes
    them), summed, re-factored within 1 % of the optimum; a module only the LoRA holds stays exact."""
    lora = _lora(tmp_path / "lora.safetensors", NAMES, 4, 2.0, seed=5)
    inputs = [(lora, 1.0), (FIXTURES / "sd15_kohya_loha.safetensors", 0.5), (FIXTURES / "sd15_kohya_lokr.safetensors", -0.25)]
    out = tmp_path / "svd.safetensors"
    merge_loras(inputs, out, mode="svd", rank=8, dtype="fp32")
    merged = loratool.load(out)
    loaded = [(loratool.load(path), w) for path, w in inputs]
    sample = ("text_model.encoder.layers.0.mlp.fc1", "text_model.encoder.layers.0.self_attn.k_proj",
              "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in")
    checked = 0
    for key, m in merged.modules.items():
        if not key.path.endswith(sample):
            continue
        shape = tuple(m.extra["shape"])
        target = 0
        for adapter, w in loaded:
            src = adapter.modules.get(key)
            if src is not None:
                target = target + w * delta_weight(src.network_type, {k: v.load() for k, v in src.params.items()}, src.alpha, shape).to(F64)
        got = delta_weight(m.network_type, {k: v.load() for k, v in m.params.items()}, m.alpha, shape)
        err, optimum, norm = truncation_errors(got.flatten(1), target.flatten(1), m.rank)
        assert optimum - 1e-6 * norm <= err <= 1.01 * optimum + 1e-6 * norm, key
        # mlp.fc1 is only in the LoRA (rank 4 ≤ 8): exact; the others sum LoHa/LoKr at rank 8
        assert m.rank == (4 if key.path.endswith("fc1") else 8)
        checked += 1
    assert checked == 4


def test_refusals(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    out = tmp_path / "x.safetensors"
    r = run_cli("merge-loras", str(FIXTURES / "sd15_kohya_lora.safetensors"), str(FIXTURES / "sdxl_kohya_lora.safetensors"), "-o", str(out))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "is sdxl, but" in r.stderr and "is sd1" in r.stderr and not out.exists()
    with pytest.raises(ConversionError, match=r"LOHA has no LoRA factors to concatenate \(--mode svd re-factors it\) \(in sd15_kohya_loha"):
        merge_loras([FIXTURES / "sd15_kohya_lora.safetensors", FIXTURES / "sd15_kohya_loha.safetensors"], out)
    for mode, rank in (("concat", None), ("svd", 4)):
        with pytest.raises(ConversionError, match="DoRA: .*depends on the base weight"):
            merge_loras([FIXTURES / "sd15_kohya_lora.safetensors", FIXTURES / "sd15_kohya_dora.safetensors"], out, mode=mode, rank=rank)
    result = merge_loras([FIXTURES / "sd15_kohya_lora.safetensors", FIXTURES / "sd15_kohya_dora.safetensors"], out, skip_unsupported=True)
    # the union is 264 + 3 DoRA-only convs; all 23 DoRA modules (20 shared) are left out entirely
    assert len(result.refused) == 23 and len(result.modules) == 264 + 3 - 23
    a, _ = pair
    for kwargs, message in (({"mode": "svd"}, "needs --rank"), ({"rank": 4}, "--rank goes with --mode svd"),
                            ({"mode": "average"}, "unknown mode")):
        with pytest.raises(UsageError, match=message):
            merge_loras([a], tmp_path / "y.safetensors", **kwargs)
    with pytest.raises(UsageError, match="onto the input"):
        merge_loras([a, FIXTURES / "sd15_kohya_lora.safetensors"], a, force=True)


def test_cli_json_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    src = FIXTURES / "sdxl_kohya_lora.safetensors"
    r = run_cli("merge-loras", f"{src}:0.5", f"{FIXTURES / 'sdxl_diffusers.safetensors'}:-1", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["mode"] == "concat" and payload["family"] == "sdxl" and payload["verified"]
    assert [(i["weight"], i["format"]) for i in payload["inputs"]] == [(0.5, "kohya"), (-1.0, "diffusers")]
    assert all(m["alpha_out"] == m["rank_out"] and m["error"] == 0.0 for m in payload["modules"])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta["loratool.merge_loras"])
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    autov3 = hashlib.sha256(data[8 + n:]).hexdigest()[:12].upper()
    assert record["sources"][0] == {"name": src.name, "weight": 0.5, "autov3": autov3}
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.title"] == "m"


def test_realworld_diffusers_plus_peft(tmp_path: Path) -> None:
    a = source_path("realworld/diffusers-sd15/pytorch_lora_weights.safetensors")
    b = source_path("realworld/peft-unet-sd15")
    out = tmp_path / "rw"
    merge_loras([(a, 1.0), (b, -0.5)], out, target="peft", dtype="fp32")
    merged, la, lb = loratool.load(out), loratool.load(a), loratool.load(b)
    assert set(merged.modules) == set(la.modules) | set(lb.modules)
    for key in [k for k in lb.modules if k in la.modules][:6]:
        expected = sum(w * delta_weight(m.network_type, {k: v.load() for k, v in m.params.items()}, m.alpha).to(F64)
                       for w, m in ((1.0, la.modules[key]), (-0.5, lb.modules[key])))
        m = merged.modules[key]
        got = delta_weight(m.network_type, {k: v.load() for k, v in m.params.items()}, m.alpha).to(F64)
        assert m.rank == 8 and rel_diff(got, expected) < 2e-6, key


def test_parse_input() -> None:
    assert parse_input("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_input("a.safetensors:-1") == ("a.safetensors", -1.0)
    assert parse_input("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_input("dir:with:colons/x.safetensors") == ("dir:with:colons/x.safetensors", 1.0)
    assert parse_input("dir:x:2e-1") == ("dir:x", 0.2)

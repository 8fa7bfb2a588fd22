"""``loratool extract``: planted ΔWs in real-shaped (partial) checkpoint pairs are recovered —
exactly when their rank fits, within 1 % of the Eckart–Young optimum otherwise — for
linear, 1×1-conv and 3×3-conv modules and text encoders (OpenCLIP's fused q/k/v rows
included), in any mix of dtypes and layouts; merging the result into the base gives the
tuned weights back within the truncation error; diffusers and PEFT load the other
outputs to the same ΔW. Truth comes from the files themselves (tests/extract_oracle.py),
never from loratool's reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fixtures.checkpoints import checkpoint_table, select
from fixtures.extract_pairs import deltas, module_seed, planted_delta, write_checkpoint
from loratool.ops.extract import ExtractResult, extract
from tests.conftest import run_cli
from tests.extract_oracle import (
    autov3,
    kohya_name,
    lora_delta,
    lora_rank,
    optimum,
    stored_weight,
    true_delta,
    where,
)
from tests.lowrank_helpers import planted

RANK = 8
EY_SLACK = 1.01  # error ≤ 1.01 × the Eckart–Young optimum
EXACT_TOL = 1e-5  # fp32 factors of an exactly low-rank ΔW: relative Frobenius error

# SD1.5 modules: (component, path) -> (planted rank, noise RMS); scale 1e-3 RMS.
SD1_EXACT = {
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"): (4, 0.0),  # linear
    ("unet", "down_blocks.0.attentions.0.proj_in"): (4, 0.0),  # 1×1 conv (SD1)
    ("unet", "down_blocks.0.resnets.0.conv1"): (4, 0.0),  # 3×3 conv
    ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj"): (4, 0.0),
}
SD1_NOISY = {
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"): (16, 1e-4),
    ("unet", "down_blocks.1.resnets.0.conv_shortcut"): (16, 1e-4),  # 1×1 conv of a resnet: linear rank
    ("unet", "down_blocks.1.resnets.0.conv1"): (16, 1e-4),
    ("unet", "down_blocks.0.resnets.1.time_emb_proj"): (16, 1e-4),  # linear of a resnet
    ("text_encoder", "text_model.encoder.layers.1.mlp.fc1"): (16, 1e-4),
}
NOT_TARGETED = {("unet", "conv_in"): (4, 0.0)}  # changed, but kohya's LoRA has no conv_in


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The oracles' float64 SVDs on one thread: on a loaded 2-core machine torch's second
    thread spins against other processes and runs several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Pair:
    family: str
    base: Path
    tuned: Path
    table: list
    planted: dict[tuple[str, str], tuple[int, float]]
    _optima: dict = field(default_factory=dict)

    def truth(self, component: str, path: str) -> torch.Tensor:
        return true_delta(self.base, self.tuned, self.table, component, path)

    def optimum(self, component: str, path: str, k: int = RANK) -> float:
        key = (component, path, k)
        if key not in self._optima:
            self._optima[key] = optimum(self.truth(component, path), k)
        return self._optima[key]

    def name(self, component: str, path: str) -> str:
        t, _ = where(self.table, component, path)
        return kohya_name(self.family, component, path, t.key.removeprefix("model.diffusion_model.").removesuffix(".weight"))


def _planted(modules: dict[tuple[str, str], tuple[int, float]], table: list, seed: int = 0) -> dict:
    out = {}
    for (component, path), (rank, noise) in modules.items():
        shape = where(table, component, path)[1].shape
        out[(component, path)] = planted_delta(shape, rank, module_seed(component, path, seed), noise=noise)
    return out


def make_pair(tmp: Path, family: str, modules: dict, dtypes: tuple[str, str] = ("F32", "F32"),
              folders: tuple[bool, bool] = (False, False)) -> Pair:
    table = select(checkpoint_table(family), modules)
    planted_ = _planted(modules, table)
    base = write_checkpoint(tmp / ("base" if folders[0] else "base.safetensors"), table, dtypes[0], folder=folders[0])
    tuned = write_checkpoint(tmp / ("tuned" if folders[1] else "tuned.safetensors"), table, dtypes[1],
                             delta_for=deltas(planted_), folder=folders[1])
    return Pair(family, base, tuned, table, modules)


def assert_near_optimum(pair: Pair, lora: Path, modules: dict, k: int = RANK) -> None:
    for component, path in modules:
        want = pair.truth(component, path)
        got = lora_delta(lora, pair.name(component, path))
        err = torch.linalg.norm(want - got).item()
        best = pair.optimum(component, path, k)
        assert err <= EY_SLACK * best + 1e-6 * torch.linalg.norm(want).item(), (
            f"{component}.{path}: error {err:.4g} vs optimum {best:.4g} (ratio {err / best:.4f})")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return make_pair(tmp_path_factory.mktemp("sd1"), "sd1", {**SD1_EXACT, **SD1_NOISY, **NOT_TARGETED})


@pytest.fixture(scope="module")
def sd1_lora(sd1: Pair, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExtractResult]:
    out = tmp_path_factory.mktemp("sd1_lora") / "lora.safetensors"
    result = extract(sd1.base, sd1.tuned, out, rank=RANK, conv_rank=RANK, dtype="fp32", text_encoders="on", device="cpu")
    return out, result


def test_planted_exact_rank_is_recovered_to_fp32_tolerance(sd1: Pair, sd1_lora: tuple[Path, ExtractResult]) -> None:
    lora, result = sd1_lora
    for component, path in SD1_EXACT:
        want = sd1.truth(component, path)
        got = lora_delta(lora, sd1.name(component, path))
        rel = torch.linalg.norm(want - got).item() / torch.linalg.norm(want).item()
        assert rel <= EXACT_TOL, f"{component}.{path}: relative error {rel:.3g}"
        assert lora_rank(lora, sd1.name(component, path)) == RANK
    assert result.verified and result.method == "randomized" and result.device == "cpu"


def test_noisy_low_rank_is_within_one_percent_of_eckart_young(sd1: Pair, sd1_lora: tuple[Path, ExtractResult],
                                                              tmp_path: Path) -> None:
    assert_near_optimum(sd1, sd1_lora[0], SD1_NOISY)
    fp16 = tmp_path / "fp16.safetensors"  # the default output dtype
    extract(sd1.base, sd1.tuned, fp16, rank=RANK, conv_rank=RANK, text_encoders="on", device="cpu", verify=False)
    assert_near_optimum(sd1, fp16, SD1_NOISY)
    with safe_open(str(fp16), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".alpha")} == {"F16"}  # noqa: SIM118


def test_exact_svd_equals_the_optimum(sd1: Pair, tmp_path: Path) -> None:
    out = tmp_path / "exact.safetensors"
    r = extract(sd1.base, sd1.tuned, out, rank=RANK, conv_rank=RANK, dtype="fp32", text_encoders="on", exact=True)
    assert r.method == "exact"
    for component, path in SD1_NOISY:
        want = sd1.truth(component, path)
        err = torch.linalg.norm(want - lora_delta(out, sd1.name(component, path))).item()
        assert err == pytest.approx(sd1.optimum(component, path), rel=1e-4)


def test_kohyas_modules_are_extracted_and_unchanged_ones_listed(sd1: Pair, sd1_lora: tuple[Path, ExtractResult]) -> None:
    lora, result = sd1_lora
    planted_targets = {**SD1_EXACT, **SD1_NOISY}
    names = {sd1.name(c, p) for c, p in planted_targets}
    with safe_open(str(lora), "pt") as f:
        keys = set(f.keys())
        assert keys == {f"{n}.{s}" for n in names for s in ("lora_up.weight", "lora_down.weight", "alpha")}
        assert all(f.get_tensor(f"{n}.alpha").item() == RANK for n in names)  # alpha = rank: scale 1
        meta = f.metadata()
    assert sd1.name("unet", "conv_in") not in {n.rsplit(".", 2)[0] for n in keys}  # changed, not a kohya target
    skipped = {(m.component, m.path): m.skipped for m in result.skipped}
    assert skipped[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")] == "identical in both checkpoints"
    assert skipped[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")] == "identical in both checkpoints"
    assert {(m.component, m.path) for m in result.extracted} == set(planted_targets)
    kinds = {(m.component, m.path): m.kind for m in result.modules}
    assert kinds[("unet", "down_blocks.0.resnets.0.conv1")] == "conv3x3"
    assert kinds[("unet", "down_blocks.0.attentions.0.proj_in")] == "conv1x1"
    record = json.loads(meta["loratool.extract"])
    assert record["base"] == {"name": "base.safetensors", "layout": "single-file", "autov3": autov3(sd1.base)}
    assert record["tuned"]["autov3"] == autov3(sd1.tuned)
    assert (record["rank"], record["conv_rank"], record["method"], record["clamp_quantile"]) == (RANK, RANK, "randomized", None)
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == f"{RANK}.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": str(RANK), "conv_alpha": f"{RANK}.0"}
    assert meta["ss_sd_model_name"] == "base.safetensors" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert autov3(sd1.tuned) in meta["modelspec.description"] and meta["modelspec.title"] == "lora"


def test_merge_of_the_extraction_gives_the_tuned_weights_back(sd1: Pair, sd1_lora: tuple[Path, ExtractResult],
                                                              tmp_path: Path) -> None:
    from loratool.ops.merge import merge

    merged = tmp_path / "merged.safetensors"
    merge(sd1.base, [str(sd1_lora[0])], merged, device="cpu")
    for component, path in {**SD1_EXACT, **SD1_NOISY}:
        tuned = stored_weight(sd1.tuned, sd1.table, component, path)
        got = stored_weight(merged, sd1.table, component, path)
        base = stored_weight(sd1.base, sd1.table, component, path)
        err = torch.linalg.norm(got - tuned).item()
        allowed = EY_SLACK * sd1.optimum(component, path) + 1e-5 * torch.linalg.norm(tuned - base).item()
        assert err <= allowed, f"{component}.{path}: ‖merged − tuned‖ {err:.4g} > {allowed:.4g}"


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_fused_qkv_rows_of_openclip_text_encoders(family: str, tmp_path: Path) -> None:
    te = "text_encoder" if family == "sd2" else "text_encoder_2"
    layer = "text_model.encoder.layers.1.self_attn"
    modules = {(te, f"{layer}.q_proj"): (4, 0.0), (te, f"{layer}.k_proj"): (16, 1e-4)}  # v_proj: unchanged
    modules[("unet", "down_blocks.1.attentions.0.proj_in")] = (16, 1e-4)  # linear proj_in (SD2, SDXL)
    pair = make_pair(tmp_path, family, modules, dtypes=("F16", "F16"))
    out = tmp_path / "lora.safetensors"
    r = extract(pair.base, pair.tuned, out, rank=RANK, text_encoders="on", dtype="fp32")
    assert_near_optimum(pair, out, modules)
    skipped = {(m.component, m.path): m.skipped for m in r.skipped}
    assert skipped[(te, f"{layer}.v_proj")] == "identical in both checkpoints"
    if family == "sdxl":  # SGM UNet names, as kohya writes SDXL
        assert any(m.name.startswith("lora_unet_input_blocks_4_1_proj_in") for m in r.extracted)


@pytest.mark.parametrize(("dtypes", "folders"), [(("F32", "BF16"), (True, False)), (("BF16", "F16"), (False, True))],
                         ids=["fp32-folder_vs_bf16-file", "bf16-file_vs_fp16-folder"])
def test_dtype_and_layout_mixes(dtypes: tuple[str, str], folders: tuple[bool, bool], tmp_path: Path) -> None:
    modules = {k: (16, 1e-3) for k in list(SD1_NOISY)[:3]}  # noise above bf16's rounding of W0
    modules[("text_encoder", "text_model.encoder.layers.0.mlp.fc2")] = (16, 1e-3)
    pair = make_pair(tmp_path, "sd1", modules, dtypes, folders)
    out = tmp_path / "lora.safetensors"
    r = extract(pair.base, pair.tuned, out, rank=RANK, conv_rank=RANK, text_encoders="on", dtype="fp32")
    assert_near_optimum(pair, out, modules)
    # Unchanged modules differ by the rounding between the two dtypes: negligible, listed.
    skipped = {(m.component, m.path): m.skipped for m in r.skipped}
    assert skipped[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")].startswith("negligible")
    assert {(m.component, m.path) for m in r.extracted} == set(modules)
    assert r.base.layout == ("diffusers" if folders[0] else "single-file")
    for inp, path, folder in ((r.base, pair.base, folders[0]), (r.tuned, pair.tuned, folders[1])):
        if folder:
            assert inp.autov3 == {str(f.relative_to(path)): autov3(f) for f in sorted(path.rglob("*.safetensors"))}
        else:
            assert inp.autov3 == autov3(path)


def test_dynamic_rank_selection(tmp_path: Path) -> None:
    """Planted spectra; ranks as computed by hand from the definitions (lowrank.rank)."""
    spectra = {
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): [1.0, 0.5, 0.25, 0.1, 0.05, 0.01],
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"): [1.0, 0.9, 0.8, 0.7, 0.01],
    }
    table = select(checkpoint_table("sd1"), spectra)
    exact: dict = {}
    for i, ((component, path), spectrum) in enumerate(spectra.items()):
        up, down = planted(320, 320, spectrum, seed=i)
        exact[(component, path)] = (up @ down).float()
    base = write_checkpoint(tmp_path / "base.safetensors", table, "F32")
    tuned = write_checkpoint(tmp_path / "tuned.safetensors", table, "F32", delta_for=deltas(exact))
    cases = [  # (dynamic, threshold, rank cap, expected ranks, method)
        ("fro", 0.99, 6, [3, 4], "randomized"),  # Σσ² share ≥ 0.9801: 1.3125/1.3251; 2.45/2.9401 < .9801 → 4
        ("fro", 0.9995, None, [5, 4], "exact"),
        ("ratio", 8.0, 6, [3, 4], "randomized"),  # σ ≥ σ₀/8 = 0.125
        ("ratio", 8.0, 2, [2, 2], "randomized"),  # capped
        ("cumulative", 0.9, 6, [3, 4], "exact"),  # Σσ share ≥ 0.9: 1.75/1.91; 3.4/3.41
    ]
    for n, (method, threshold, cap, want, how) in enumerate(cases):
        out = tmp_path / f"dyn{n}.safetensors"
        r = extract(base, tuned, out, rank=cap, dynamic=method, threshold=threshold, dtype="fp32", text_encoders="off")
        got = {(m.component, m.path): m.rank for m in r.extracted}
        assert [got[k] for k in spectra] == want, (method, threshold, cap)
        assert r.method == how
        for k, rank in zip(spectra, want):
            name = "lora_unet_" + k[1].replace(".", "_")
            assert lora_rank(out, name) == rank
            s = torch.tensor(spectra[k], dtype=torch.float64)
            assert torch.linalg.norm(exact[k].double() - lora_delta(out, name)).item() == pytest.approx(
                s[rank:].square().sum().sqrt().item(), rel=1e-4, abs=1e-6)
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_text_encoders_auto_both_ways(sd1: Pair, tmp_path: Path) -> None:
    """The planted text-encoder ΔWs stay below kohya's --min-diff 0.01 in magnitude."""
    te_max = max(sd1.truth(c, p).abs().max().item() for c, p in {**SD1_EXACT, **SD1_NOISY} if c == "text_encoder")
    assert 0.001 < te_max < 0.01
    out = tmp_path / "auto.safetensors"
    r = run_cli("extract", str(sd1.base), str(sd1.tuned), "-o", str(out), "--rank", "4")
    assert r.returncode == 0, r.stderr
    assert f"text encoder identical within 0.01 (max |ΔW| {te_max:.3g}): not extracted — pass --text-encoders on to force" in r.stdout
    with safe_open(str(out), "pt") as f:
        assert not any(k.startswith("lora_te") for k in f.keys())  # noqa: SIM118
    r = run_cli("extract", str(sd1.base), str(sd1.tuned), "-o", str(out), "--rank", "4", "--min-diff", "0.001",
                "--force", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["text_encoders"]["extracted"] is True
    assert report["text_encoders"]["message"] == f"text encoder differs (max |ΔW| {te_max:.3g}): extracted"
    assert report["text_encoders"]["max_abs_diff"] == pytest.approx(te_max, rel=1e-6)
    assert {m["component"] for m in report["modules"] if m["rank"]} == {"unet", "text_encoder"}
    with safe_open(str(out), "pt") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_1_mlp_fc1") for k in f.keys())  # noqa: SIM118


def test_clamp_quantile_clamps_both_factors_at_the_quantile_of_their_magnitudes(sd1: Pair, tmp_path: Path) -> None:
    plain, clamped = tmp_path / "plain.safetensors", tmp_path / "clamped.safetensors"
    common = {"rank": RANK, "conv_rank": RANK, "dtype": "fp32", "text_encoders": "on"}
    extract(sd1.base, sd1.tuned, plain, **common)
    r = extract(sd1.base, sd1.tuned, clamped, clamp_quantile=0.9, **common)
    assert r.clamp_quantile == 0.9
    with safe_open(str(plain), "pt") as a, safe_open(str(clamped), "pt") as b:
        names = {k.rsplit(".", 2)[0] for k in a.keys()}  # noqa: SIM118
        assert names and {k.rsplit(".", 2)[0] for k in b.keys()} == names  # noqa: SIM118
        for n in names:
            up, down = a.get_tensor(f"{n}.lora_up.weight"), a.get_tensor(f"{n}.lora_down.weight")
            q = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), 0.9).item()
            assert torch.allclose(b.get_tensor(f"{n}.lora_up.weight"), up.clamp(-q, q), rtol=0, atol=1e-7)
            assert torch.allclose(b.get_tensor(f"{n}.lora_down.weight"), down.clamp(-q, q), rtol=0, atol=1e-7)
        assert json.loads(b.metadata()["loratool.extract"])["clamp_quantile"] == 0.9


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_diffusers_and_peft_load_the_outputs_to_the_same_delta(sd1: Pair, target: str, tmp_path: Path) -> None:
    from tests.test_convert_oracles import ADAPTER, _load_with_diffusers, _load_with_peft

    out = tmp_path / ("lora.safetensors" if target == "diffusers" else "peft")
    extract(sd1.base, sd1.tuned, out, rank=RANK, dtype="fp32", text_encoders="on", target=target)  # no conv rank
    modules = {k for k in {**SD1_EXACT, **SD1_NOISY} if "resnets" not in k[1]}
    if target == "diffusers":
        layers = _load_with_diffusers(out, "sd1")
    else:
        assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "unet"]
        layers = _load_with_peft(out, "sd1", ["text_encoder", "unet"])
    assert set(layers) == modules
    for key in modules:
        want = sd1.truth(*key)
        got = layers[key].get_delta_weight(ADAPTER).double().reshape(want.shape)
        err = torch.linalg.norm(want - got).item()
        assert err <= EY_SLACK * sd1.optimum(*key) + 1e-5 * torch.linalg.norm(want).item(), key


def test_refusals_are_one_line_and_write_nothing(sd1: Pair, tmp_path: Path) -> None:
    xl = write_checkpoint(tmp_path / "xl.safetensors", select(checkpoint_table("sdxl"), set()), "F16")
    lacking_table = [t for t in sd1.table if "proj_in" not in t.key]
    lacking = write_checkpoint(tmp_path / "lacking.safetensors", lacking_table, "F32")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd1.tuned.read_bytes()[:-1000])
    out = tmp_path / "out.safetensors"
    cases = [
        ((str(sd1.base), str(xl), "-o", str(out), "--rank", "4"), 1, r"is sdxl, the base .*base\.safetensors is sd1"),
        ((str(sd1.base), str(lacking), "-o", str(out), "--rank", "4"), 1,
         r"lacks unet\.down_blocks\.0\.attentions\.0\.proj_in, which the base has"),
        ((str(sd1.base), str(truncated), "-o", str(out), "--rank", "4"), 1, r"truncated"),
        ((str(sd1.base), str(sd1.tuned), "-o", str(sd1.base), "--rank", "4", "--force"), 2, r"refusing to write onto the input"),
        ((str(sd1.base), str(sd1.tuned), "-o", str(out)), 2, r"give --rank N"),
        ((str(sd1.base), str(sd1.tuned), "-o", str(out), "--rank", "4", "--clamp-quantile", "1.5"), 2, r"clamp-quantile"),
        ((str(sd1.base), str(sd1.base), "-o", str(out), "--rank", "4"), 1, r"base\.safetensors: nothing to extract: every targeted module was skipped \(identical to the base: \d+; text encoder"),
    ]
    import re

    for args, code, pattern in cases:
        r = run_cli("extract", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no temp file left behind


def test_batched_svds_equal_one_by_one() -> None:
    """Same-shaped ΔWs factored in batches (one shared test matrix) give each module the
    factors it gets alone; groups flush by size and by the pending-memory bound."""
    from loratool.ops.extract_svd import Batcher, SolveSettings

    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(m, 8, generator=gen) @ torch.randn(8, n, generator=gen) + 0.01 * torch.randn(m, n, generator=gen)
            for m, n in [(96, 64)] * 5 + [(64, 200)] * 3 + [(96, 64)] * 2]
    settings = SolveSettings("randomized", None, None, None, torch.float32, power_iters=2)

    def run(batch_bytes: int, pending_bytes: int) -> tuple[dict[int, torch.Tensor], int]:
        b = Batcher(settings, batch_bytes, pending_bytes)
        done = []
        for i, a in enumerate(mats):
            done += b.add(i, a.clone(), 6, a.square().sum().item())
        done += b.flush()
        assert sorted(s.index for s in done) == list(range(len(mats)))
        return {s.index: s.up @ s.down for s in done}, b.batches

    alone, n_alone = run(0, 0)
    batched, n_batched = run(3 * 96 * 64 * 4, 1 << 30)
    bounded, n_bounded = run(1 << 30, 2 * 96 * 64 * 4)
    assert n_alone == len(mats) and n_batched < n_alone and n_bounded < n_alone
    for i in alone:
        assert torch.allclose(batched[i], alone[i], atol=1e-5) and torch.allclose(bounded[i], alone[i], atol=1e-5)


def test_the_device_path_gives_the_same_lora(sd1: Pair, sd1_lora: tuple[Path, ExtractResult], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What a GPU run does — weights handed over as stored, converted and subtracted where
    the SVD runs — taken on the CPU (CI has no GPU): the same factors."""
    import loratool.ops.extract as ex

    monkeypatch.setattr(ex, "converts_on_readers", lambda device: False)
    out = tmp_path / "device.safetensors"
    extract(sd1.base, sd1.tuned, out, rank=RANK, conv_rank=RANK, dtype="fp32", text_encoders="on", device="cpu")
    with safe_open(str(out), "pt") as a, safe_open(str(sd1_lora[0]), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_dynamic_methods_are_lowranks() -> None:
    from loratool.lowrank import RANK_METHODS
    from loratool.ops.extract import DYNAMIC_METHODS

    assert DYNAMIC_METHODS == RANK_METHODS  # spelled out so that the CLI needs no torch

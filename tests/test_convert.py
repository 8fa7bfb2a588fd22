"""``loratool convert``: round trips, refusals and output safety, through the real CLI.

The ecosystem oracles (diffusers and PEFT loading our output) are in
``test_convert_oracles.py``; here the claims are loratool's own: kohya → diffusers →
PEFT → kohya gives back the same tensors bit for bit with the same effective alpha
(diffusers with ``--keep-factors``; by default alpha/rank is folded into the factors),
what a target cannot hold is refused before anything is written, outputs are never
clobbered, and metadata/hashes are what A1111/Civitai expect.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from loratool.formats.decode import decode
from loratool.io.sources import open_source
from loratool.model import Adapter
from loratool.ops.convert import convert
from tests.conftest import FIXTURES, run_cli, source_path

# Every input each round trip can hold. "full": kohya → diffusers → peft → kohya;
# "peft": kohya ↔ peft (LoHa/LoKr have no diffusers layout); "kohya": only kohya holds it.
ROUND_TRIPS: list[tuple[str, str | None, str]] = [
    ("fixtures/sd15_kohya_lora.safetensors", None, "full"),
    ("fixtures/sd15_kohya_locon.safetensors", None, "full"),
    ("fixtures/sd15_kohya_dora.safetensors", None, "full"),
    ("fixtures/sd15_diffusers.safetensors", None, "full"),
    ("fixtures/sd15_peft_te", "sd1", "full"),
    ("fixtures/sd15_peft_unet_dora", None, "full"),
    ("fixtures/sdxl_kohya_lora.safetensors", None, "full"),
    ("fixtures/sdxl_kohya_diffusers_named.safetensors", None, "full"),
    ("fixtures/sdxl_diffusers.safetensors", None, "full"),
    ("fixtures/sdxl_peft", None, "full"),
    ("realworld/diffusers-attnproc-sd1/pytorch_lora_weights.safetensors", None, "full"),
    ("realworld/diffusers-sd15/pytorch_lora_weights.safetensors", None, "full"),
    ("realworld/peft-te-sd15", None, "full"),
    ("fixtures/sd15_kohya_loha.safetensors", None, "peft"),
    ("fixtures/sd15_kohya_lokr.safetensors", None, "peft"),
    ("fixtures/sd15_kohya_dora_inaxis.safetensors", None, "kohya"),
    ("realworld/lycoris-lokr-sd1/smart_falcon_4_lokr.safetensors", None, "kohya"),
]
VERIFIED = re.compile(r"max \|ΔW difference\| [=≤] (\S+)")


def _id(name: str) -> str:
    return name.split("/")[1] if name.startswith("realworld/") else Path(name).name.split(".")[0]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- round trips


class Snapshot:
    """What a file says per module: network type, each parameter's dtype and stored
    bytes, the effective scale (alpha/rank as loaders apply it) and the DoRA axis."""

    def __init__(self, path: Path, family: str | None) -> None:
        source = open_source(path)
        try:
            self.adapter: Adapter = decode(source, family=family)
            self.modules = {
                str(k): (
                    m.network_type,
                    m.scale,
                    m.dora_axis,
                    {p: (ref.dtype, bytes(ref.raw() or b"")) for p, ref in m.params.items()},
                )
                for k, m in self.adapter.modules.items()
            }
            self.alphas = {str(k): m.alpha for k, m in self.adapter.modules.items()}
        finally:
            source.close()


def _assert_same(a: Snapshot, b: Snapshot, what: str) -> None:
    assert a.modules.keys() == b.modules.keys(), f"{what}: modules differ: {sorted(a.modules.keys() ^ b.modules.keys())[:5]}"
    for key, (ntype, scale, axis, params) in a.modules.items():
        ntype2, scale2, axis2, params2 = b.modules[key]
        assert (ntype, axis) == (ntype2, axis2), f"{what}: {key} type/DoRA axis"
        assert scale == scale2, f"{what}: {key} effective scale {scale} != {scale2}"
        assert params.keys() == params2.keys(), f"{what}: {key} parameters {sorted(params)} != {sorted(params2)}"
        for p, (dtype, raw) in params.items():
            assert raw, f"{what}: {key}.{p} has no raw view"
            assert (dtype, raw) == params2[p], f"{what}: {key}.{p} is not bit-identical ({dtype} vs {params2[p][0]})"


def _kohya_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a kohya file, alphas excluded (compared as effective scale)."""
    out = {}
    with safe_open(path, "pt") as f:
        for key in f.keys():  # noqa: SIM118
            if key.endswith(".alpha"):
                continue
            t = f.get_tensor(key)
            out[key] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.mark.parametrize(("name", "family", "route"), ROUND_TRIPS, ids=[_id(n) for n, _, _ in ROUND_TRIPS])
def test_round_trip_is_tensor_identical(name: str, family: str | None, route: str, tmp_path: Path) -> None:
    """kohya → diffusers (--keep-factors) → peft → kohya (or kohya ↔ peft) gives back the
    same tensors, bit for bit, under the same kohya keys, with the same effective alpha;
    and every intermediate holds exactly the source's modules, tensors and scales."""
    src = source_path(name)
    source = Snapshot(src, family)
    fam = source.adapter.family
    chain = {"full": ["kohya", "diffusers", "peft", "kohya"], "peft": ["kohya", "peft", "kohya"], "kohya": ["kohya", "kohya"]}[route]
    paths = []
    prev = src
    for i, target in enumerate(chain):
        out = tmp_path / f"{i}.{target}" if target == "peft" else tmp_path / f"{i}.{target}.safetensors"
        result = convert(prev, target, out, family=fam, keep_factors=True)
        assert result.max_abs_diff == 0.0 and result.identical_modules == len(source.modules)
        _assert_same(source, Snapshot(out, fam), f"{name} step {i} ({target})")
        paths.append(out)
        prev = out
    first, last = paths[0], paths[-1]
    assert _kohya_tensors(first) == _kohya_tensors(last)
    with safe_open(first, "pt") as f1, safe_open(last, "pt") as f2:
        assert {k for k in f1.keys() if k.endswith(".alpha")} == {k for k in f2.keys() if k.endswith(".alpha")}  # noqa: SIM118


def test_round_trip_detects_a_changed_tensor(tmp_path: Path) -> None:
    """The comparison above is not vacuous: one flipped bit in one tensor is caught."""
    src = source_path("fixtures/sd15_kohya_lokr.safetensors")
    k1 = tmp_path / "a.safetensors"
    convert(src, "kohya", k1)
    with safe_open(k1, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    key = next(k for k in sorted(tensors) if k.endswith("lokr_w1"))
    tensors[key].view(torch.int16)[0, 0] ^= 1
    k2 = tmp_path / "b.safetensors"
    save_file(tensors, k2, meta)
    with pytest.raises(AssertionError, match="not bit-identical"):
        _assert_same(Snapshot(k1, None), Snapshot(k2, None), "tampered")


def test_lokr_full_factors_keep_scale_one_through_peft(tmp_path: Path) -> None:
    """LoKr modules with both factors full ignore alpha in kohya (scale 1); PEFT always
    scales by alpha/r, so the PEFT config must give those modules alpha == r."""
    src = source_path("fixtures/sd15_kohya_lokr.safetensors")
    source = Snapshot(src, None)
    full = {k for k, (_, _, _, params) in source.modules.items() if {"lokr_w1", "lokr_w2"} <= params.keys()}
    assert full, "the fixture has full-factor LoKr modules"
    out = tmp_path / "p"
    convert(src, "peft", out)
    config = json.loads((out / "unet" / "adapter_config.json").read_text())
    for key in full:
        path = key.removeprefix("unet.")
        if not key.startswith("unet."):
            continue
        r = config["rank_pattern"].get(f"^{path}", config["r"])
        alpha = config["alpha_pattern"].get(f"^{path}", config["alpha"])
        assert alpha / r == 1.0, f"{path}: PEFT scale {alpha}/{r}"


# ------------------------------------------------------------------ refusals and safety


def _cli_ok(*args: str) -> tuple[str, str]:
    proc = run_cli("convert", *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def _cli_fails(*args: str) -> str:
    proc = run_cli("convert", *args)
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def test_loha_to_diffusers_is_refused_before_writing(tmp_path: Path) -> None:
    src = source_path("fixtures/sd15_kohya_loha.safetensors")
    out = tmp_path / "out.safetensors"
    err = _cli_fails(str(src), "--to", "diffusers", "-o", str(out))
    assert "cannot hold LOHA" in err
    assert re.search(r"lora_(unet|te)_\w+", err), "the refusal names modules"
    assert "--skip-unsupported" in err
    assert _listing(tmp_path) == [], "nothing written, no temp file left"


def _mixed_file(tmp_path: Path) -> tuple[Path, set[str]]:
    """A kohya file with LoRA modules plus LoHa ones (LyCORIS can mix them)."""
    lora, loha = source_path("fixtures/sd15_kohya_lora.safetensors"), source_path("fixtures/sd15_kohya_loha.safetensors")
    with safe_open(loha, "pt") as f:
        loha_t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    loha_modules = {k.split(".")[0] for k in loha_t}
    with safe_open(lora, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.split(".")[0] not in loha_modules}  # noqa: SIM118
        meta = f.metadata()
    tensors.update(loha_t)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, meta)
    return path, loha_modules


def test_skip_unsupported_writes_the_rest_and_lists_what_was_left_out(tmp_path: Path) -> None:
    src, loha_modules = _mixed_file(tmp_path)
    out = tmp_path / "out.safetensors"
    err = _cli_fails(str(src), "--to", "diffusers", "-o", str(out))
    assert f"{len(loha_modules)} module(s)" in err and not out.exists()
    stdout, stderr = _cli_ok(str(src), "--to", "diffusers", "-o", str(out), "--skip-unsupported")
    listed = set(re.findall(r"^\s+(\S+): (.+)$", stderr, re.M))
    assert {name for name, _ in listed} == loha_modules
    assert all("LOHA" in why for _, why in listed)
    written = Snapshot(out, None)
    whole = Snapshot(src, None)
    kept = {k for k, v in whole.modules.items() if v[0] != "loha"}
    assert set(written.modules) == kept
    assert f"{len(kept)} modules" in stdout


def test_input_axis_dora_to_peft_is_refused(tmp_path: Path) -> None:
    src = source_path("fixtures/sd15_kohya_dora_inaxis.safetensors")
    err = _cli_fails(str(src), "--to", "peft", "-o", str(tmp_path / "p"))
    assert "input column" in err and "DoRA" in err
    assert _listing(tmp_path) == []


def test_never_overwrites_without_force(tmp_path: Path) -> None:
    src = source_path("fixtures/sd15_kohya_lora.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    err = _cli_fails(str(src), "--to", "diffusers", "-o", str(out))
    assert "--force" in err and out.read_bytes() == b"precious"
    peft_out = tmp_path / "p"
    peft_out.mkdir()
    (peft_out / "keep.txt").write_text("mine")
    _cli_fails(str(src), "--to", "peft", "-o", str(peft_out))
    assert (peft_out / "keep.txt").read_text() == "mine"
    _cli_ok(str(src), "--to", "diffusers", "-o", str(out), "--force")
    assert Snapshot(out, None).modules.keys() == Snapshot(src, None).modules.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "p"], "no temp file left behind"


def test_refuses_to_write_onto_the_input(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    src.write_bytes(source_path("fixtures/sd15_kohya_lora.safetensors").read_bytes())
    before = src.read_bytes()
    err = _cli_fails(str(src), "--to", "kohya", "-o", str(src), "--force")
    assert "onto the input" in err and src.read_bytes() == before
    folder = tmp_path / "peft_in"
    convert(source_path("fixtures/sdxl_peft"), "peft", folder)
    listing = _listing(folder)
    _cli_fails(str(folder), "--to", "peft", "-o", str(folder), "--force")
    _cli_fails(str(folder), "--to", "kohya", "-o", str(folder / "unet" / "x.safetensors"))
    assert _listing(folder) == listing


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_cast_is_reported_and_kept_dtype_is_exact(dtype: str, torch_dtype: torch.dtype, tmp_path: Path) -> None:
    src = source_path("realworld/diffusers-sd15/pytorch_lora_weights.safetensors")  # float32
    with safe_open(src, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118
    kept, _ = _cli_ok(str(src), "--to", "kohya", "-o", str(tmp_path / "kept.safetensors"))
    assert float(VERIFIED.search(kept).group(1)) == 0.0
    cast, _ = _cli_ok(str(src), "--to", "kohya", "-o", str(tmp_path / "cast.safetensors"), "--dtype", dtype)
    diff = float(VERIFIED.search(cast).group(1))
    with safe_open(tmp_path / "cast.safetensors", "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".alpha")}  # noqa: SIM118
        alphas = [f.get_tensor(k) for k in f.keys() if k.endswith(".alpha")]  # noqa: SIM118
    assert {t.dtype for t in weights.values()} == {torch_dtype}
    assert {t.dtype for t in alphas} == {torch.float32}, "alpha stays float32 (FORMATS §6.5)"
    # The rounding error of the largest ΔW: non-zero, and within a few ulps of the cast.
    source = Snapshot(src, None).adapter
    src_t = open_source(src)
    try:
        biggest = max(
            (m.params["lora_up"].load().float() @ m.params["lora_down"].load().float()).abs().max().item() * m.scale
            for m in source.modules.values()
        )
    finally:
        src_t.close()
    eps = torch.finfo(torch_dtype).eps
    assert 0.0 < diff <= 8 * eps * biggest, (diff, biggest)


def _autov3(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()


@pytest.mark.parametrize("name", ["fixtures/sd15_kohya_lora.safetensors", "fixtures/sdxl_diffusers.safetensors", "fixtures/sd15_peft_unet_dora"])
def test_kohya_metadata_and_addnet_hash(name: str, tmp_path: Path) -> None:
    src = source_path(name)
    out = tmp_path / "k.safetensors"
    _cli_ok(str(src), "--to", "kohya", "-o", str(out))
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    source_meta: dict[str, str] = {}
    if src.is_file():
        with safe_open(src, "pt") as f:
            source_meta = f.metadata() or {}
    for key, value in source_meta.items():
        if key.startswith("ss_"):
            assert meta.get(key) == value, f"{key} not kept"
    arch = meta["modelspec.architecture"]
    assert arch.endswith("/lora")
    assert arch.startswith("stable-diffusion-xl-v1-base" if "sdxl" in name else "stable-diffusion-v1")
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if "sdxl" in name else "sd_v1")
    assert meta["sshs_model_hash"] == _autov3(out)
    assert "ss_network_module" in meta


def test_ambiguous_file_needs_family_and_family_overrides(tmp_path: Path) -> None:
    src = source_path("fixtures/sd15_peft_te")  # CLIP-L layers only: SD1 and SDXL's first encoder alike
    err = _cli_fails(str(src), "--to", "kohya", "-o", str(tmp_path / "a.safetensors"))
    assert "ambiguous" in err and "sd1" in err and "sdxl" in err and "--family" in err
    assert not (tmp_path / "a.safetensors").exists()
    for family, prefix in (("sd1", "lora_te_"), ("sdxl", "lora_te1_")):
        out = tmp_path / f"{family}.safetensors"
        stdout, _ = _cli_ok(str(src), "--to", "kohya", "-o", str(out), "--family", family)
        assert f"kohya, {family}," in stdout
        with safe_open(out, "pt") as f:
            keys = list(f.keys())  # noqa: SIM118
        assert keys and all(k.startswith(prefix) and not k.startswith("lora_te2_") for k in keys), keys[:3]


def test_verification_catches_a_dora_axis_flip(tmp_path: Path) -> None:
    """Same bytes, other axis: a square layer's input-column magnitude [1, n] rewritten as
    [n, 1] reads as per-row DoRA. Byte equality must not pass it as identical."""
    from loratool.ops.verify import compare_adapters

    src = source_path("fixtures/sd15_kohya_dora_inaxis.safetensors")
    with safe_open(src, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    flipped = [k for k, t in tensors.items() if k.endswith("dora_scale") and t.shape[0] == 1 and t.dim() == 2]
    assert flipped
    square = []
    for k in flipped:
        t = tensors[k]
        tensors[k] = t.reshape(t.shape[1], 1)
        square.append(k)
    out = tmp_path / "flipped.safetensors"
    save_file(tensors, out, meta)
    a_src, b_src = open_source(src), open_source(out)
    try:
        a, b = decode(a_src), decode(b_src)
        assert {m.dora_axis for m in a.modules.values()} == {"in"}
        report = compare_adapters(list(a.modules.values()), b)
        same = compare_adapters(list(a.modules.values()), a)
    finally:
        a_src.close()
        b_src.close()
    changed = {str(k) for k, m in b.modules.items() if m.dora_axis == "out"}
    assert changed, "square layers now read as per-row DoRA"
    assert set(report.missing) == changed
    assert same.missing == [] and same.identical == len(a.modules)


def test_peft_adapter_wide_lokr_setting_refuses_the_odd_module(tmp_path: Path) -> None:
    """PEFT's decompose_both holds for a whole adapter: one low-rank W1 among full ones
    would be built full by PEFT, so it is refused by name (and --skip-unsupported writes
    the rest)."""
    from safetensors.torch import load_file

    src = load_file(str(FIXTURES / "sd15_kohya_lokr.safetensors"))
    odd = next(
        k.split(".")[0] for k in sorted(src)
        if k.startswith("lora_unet") and k.endswith(".lokr_w1") and k.replace("w1", "w2_a") in src
    )
    w1 = src.pop(f"{odd}.lokr_w1").float()
    u, sv, vh = torch.linalg.svd(w1)
    src[f"{odd}.lokr_w1_a"] = (u[:, :4] * sv[:4]).contiguous().half()
    src[f"{odd}.lokr_w1_b"] = vh[:4].contiguous().half()
    path = tmp_path / "mixed_w1.safetensors"
    save_file(src, str(path))
    refused = run_cli("convert", str(path), "--to", "peft", "-o", str(tmp_path / "p"))
    assert refused.returncode != 0 and "decompose_both" in refused.stderr and odd in refused.stderr
    assert not (tmp_path / "p").exists()
    kept = run_cli("convert", str(path), "--to", "peft", "-o", str(tmp_path / "p"), "--skip-unsupported")
    assert kept.returncode == 0, kept.stderr
    assert odd in kept.stderr and "verified" in kept.stdout
    config = json.loads((tmp_path / "p" / "unet" / "adapter_config.json").read_text())
    assert config["decompose_both"] is False


# ------------------------------------------------ diffusers output: alpha folded into factors


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda x: abs(x) > 1e-6))
def test_split_scale_is_exact(scale: float) -> None:
    from loratool.formats.encode import split_scale

    down, up = split_scale(scale)
    assert down * up == scale
    assert math.frexp(down)[0] == 0.5  # a power of two: scaling by it is exact
    assert abs(math.log2(abs(down))) <= abs(math.log2(abs(scale))) / 2 + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("alpha", "rank"), [(16.0, 32), (3.0, 4), (1.0, 3), (128.0, 4)])
def test_diffusers_output_folds_alpha_into_the_factors(alpha: float, rank: int, dtype: torch.dtype, tmp_path: Path) -> None:
    """Every module of the diffusers file has scale 1 (lora_alpha = r in the metadata), its
    scale-1 ΔW is the source's ΔW — exactly when alpha/rank is a power of two — and the
    verification holds any rounding to its tolerance."""
    gen = torch.Generator().manual_seed(rank)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = torch.randn(rank, 320, generator=gen).to(dtype), (torch.randn(320, rank, generator=gen) / 4).to(dtype)
    src = tmp_path / "src.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}, src)
    out = tmp_path / "out.safetensors"
    stdout, _ = _cli_ok(str(src), "--to", "diffusers", "-o", str(out), "--family", "sd1")
    assert "folded into the factors of 1 module" in stdout
    with safe_open(out, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())  # noqa: SIM118
        up_key, down_key = next(k for k in keys if k.endswith("lora_B.weight")), next(k for k in keys if k.endswith("lora_A.weight"))
        got_up, got_down = f.get_tensor(up_key), f.get_tensor(down_key)
    assert meta["unet.lora_alpha"] == meta["unet.r"] == rank and got_up.dtype == dtype
    scale = alpha / rank
    want = (up.float() @ down.float()) * scale
    got = got_up.float() @ got_down.float()
    if math.frexp(scale)[0] == 0.5 and dtype != torch.float16:  # fp16 subnormals may lose bits
        assert torch.equal(got, want)
    # otherwise lora_B·scale is rounded once to its dtype (unit roundoff u), and both
    # products are float32 sums of `rank` terms: |error| ≤ (u + (rank + 2)·2⁻²⁴)·(|up|·|scale|)@|down|
    u = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    bound = (up.float().abs() * abs(scale)) @ down.float().abs()
    assert ((got - want).abs() <= (u + (rank + 2) * 2.0**-24) * bound).all()
    written = decode(open_source(out), family="sd1")
    assert {m.scale for m in written.modules.values()} == {1.0}


def test_keep_factors_writes_alpha_in_metadata_only(tmp_path: Path) -> None:
    src = FIXTURES / "sd15_kohya_lora.safetensors"  # alpha 1, rank 2
    out = tmp_path / "out.safetensors"
    stdout, _ = _cli_ok(str(src), "--to", "diffusers", "-o", str(out), "--keep-factors")
    assert "folded" not in stdout and "(264 byte-identical)" in stdout
    with safe_open(out, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 1.0 and meta["unet.r"] == 2


def test_folded_alpha_keeps_ss_network_alpha_true(tmp_path: Path) -> None:
    """kohya (rank 2, alpha 1) → diffusers (folded: alpha = rank) → kohya: the carried
    ss_network_alpha follows the alpha the files hold, not the source's 1.0."""
    convert(FIXTURES / "sd15_kohya_lora.safetensors", "diffusers", tmp_path / "d.safetensors")
    convert(tmp_path / "d.safetensors", "kohya", tmp_path / "k.safetensors")
    for name in ("d.safetensors", "k.safetensors"):
        with safe_open(tmp_path / name, "pt") as f:
            meta = f.metadata()
            alphas = {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")}  # noqa: SIM118
        assert meta["ss_network_alpha"] == "2.0" and meta["ss_network_dim"] == "2"
        assert alphas in (set(), {2.0})


def test_peft_refuses_the_minority_type_of_a_mixed_component(tmp_path: Path) -> None:
    """One PEFT adapter holds one type: a UNet with LoRA and LoHa modules keeps the
    majority and names the others (it used to end in a ValueError traceback)."""
    gen = torch.Generator().manual_seed(0)
    path = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
    tensors = {}
    for proj in ("to_q", "to_k"):
        tensors[f"{path}{proj}.lora_down.weight"] = torch.randn(4, 320, generator=gen)
        tensors[f"{path}{proj}.lora_up.weight"] = torch.randn(320, 4, generator=gen)
    for p, shape in (("hada_w1_a", (320, 4)), ("hada_w1_b", (4, 320)), ("hada_w2_a", (320, 4)), ("hada_w2_b", (4, 320))):
        tensors[f"{path}to_v.{p}"] = torch.randn(shape, generator=gen)
    src = tmp_path / "mixed.safetensors"
    save_file(tensors, src)
    err = _cli_fails(str(src), "--to", "peft", "-o", str(tmp_path / "p"), "--family", "sd1")
    assert f"{path}to_v" in err and "one PEFT adapter holds one type" in err and "Traceback" not in err
    _, stderr = _cli_ok(str(src), "--to", "peft", "-o", str(tmp_path / "p"), "--family", "sd1", "--skip-unsupported")
    assert f"{path}to_v" in stderr
    assert json.loads((tmp_path / "p" / "unet" / "adapter_config.json").read_text())["peft_type"] == "LORA"

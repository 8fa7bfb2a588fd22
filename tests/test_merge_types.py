"""``merge`` for every network type, against LyCORIS' own math (``lycoris.functional`` and
its modules' weight functions) on a real-shaped partial SD1.5 checkpoint.

LoHa, LoKr and DoRA come from the committed LyCORIS-layout fixtures; IA3, GLoRA, OFT,
BOFT, full diff (with ``diff_b``), norm (``w_norm``/``b_norm``) and a LoRA with a bias are
written here. The expected weights are computed from the files' raw tensors with
LyCORIS, read through the single-file table (not loratool's catalog), so placement,
scale, multiplier, order and the one cast are all checked.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures import generate as gen
from fixtures.checkpoints import (
    CkptTensor,
    checkpoint_table,
    piece_value,
    select,
    write_single_file,
)
from loratool.ops.merge import LoraSpec, merge
from tests.conftest import source_path

lyco = pytest.importorskip("lycoris.functional")
ia3 = pytest.importorskip("lycoris.modules.ia3")
glora = pytest.importorskip("lycoris.modules.glora")

SEED = 7
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
TE0 = "text_model.encoder.layers.0"
# synthetic modules: (component, diffusers path) -> network type
SYNTHETIC = {
    ("unet", f"{BLOCK}.attn1.to_k"): "ia3",
    ("unet", f"{BLOCK}.ff.net.2"): "ia3-in",
    ("unet", f"{BLOCK}.attn1.to_v"): "glora",
    ("unet", f"{BLOCK}.attn2.to_q"): "oft",
    ("unet", "down_blocks.0.attentions.0.proj_in"): "boft",
    ("unet", f"{BLOCK}.attn1.to_out.0"): "full",
    ("unet", f"{BLOCK}.norm1"): "norm",
    ("text_encoder", f"{TE0}.self_attn.out_proj"): "lora-bias",
}


def _rand(name: str, *shape: int, scale: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.rand(*shape, generator=g) - 0.5) * 2 * scale


def _kohya(component: str, path: str) -> str:
    return ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")


def write_synthetic(path: Path, shapes: dict[tuple[str, str], tuple[int, ...]]) -> Path:
    t: dict[str, torch.Tensor] = {}
    for (component, mod), kind in SYNTHETIC.items():
        n, shape = _kohya(component, mod), shapes[(component, mod)]
        out, inp = shape[0], (shape[1] if len(shape) > 1 else 0)
        if kind in ("ia3", "ia3-in"):
            t[f"{n}.weight"] = _rand(n, inp if kind == "ia3-in" else out)
            t[f"{n}.on_input"] = torch.tensor(int(kind == "ia3-in"))
        elif kind == "glora":
            r = 4
            t |= {f"{n}.a1.weight": _rand(n + "a1", inp, r), f"{n}.a2.weight": _rand(n + "a2", r, inp),
                  f"{n}.b1.weight": _rand(n + "b1", out, r), f"{n}.b2.weight": _rand(n + "b2", r, inp),
                  f"{n}.alpha": torch.tensor(2.0)}  # fmt: skip
        elif kind == "oft":
            t[f"{n}.oft_blocks"] = _rand(n, 8, out // 8, out // 8, scale=0.05)
            t[f"{n}.alpha"] = torch.tensor(1e-3)
        elif kind == "boft":
            t[f"{n}.oft_blocks"] = _rand(n, 2, out // 4, 4, 4, scale=0.05)
            t[f"{n}.rescale"] = 1 + _rand(n + "r", out, 1, 1, 1)
        elif kind == "full":
            t[f"{n}.diff"] = _rand(n, *shape, scale=0.01)
            t[f"{n}.diff_b"] = _rand(n + "b", out, scale=0.01)
        elif kind == "norm":
            t[f"{n}.w_norm"] = _rand(n, out)
            t[f"{n}.b_norm"] = _rand(n + "b", out)
        elif kind == "lora-bias":
            t[f"{n}.lora_down.weight"] = _rand(n + "d", 4, inp)
            t[f"{n}.lora_up.weight"] = _rand(n + "u", out, 4)
            t[f"{n}.lora_up.bias"] = _rand(n + "ub", out)
            t[f"{n}.alpha"] = torch.tensor(8.0)
    save_file(t, str(path), metadata={"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya"})
    return path


def _raw(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {param: fp32 tensor}, read straight from the file."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            name, _, rest = key.partition(".")
            param = "lora_up_bias" if rest == "lora_up.bias" else rest.removesuffix(".weight") if rest != "weight" else rest
            mods.setdefault(name, {})[param] = f.get_tensor(key).to(torch.float32)
    return mods


def _lyco_delta(p: dict[str, torch.Tensor], w0: torch.Tensor) -> torch.Tensor:
    """LyCORIS' ΔW of a LoRA/LoCon, LoHa or LoKr module (alpha/rank scale)."""
    alpha = float(p.get("alpha", torch.tensor(0.0)))
    if "lora_down" in p:
        r = p["lora_down"].shape[0]
        dw = lyco.locon.diff_weight(p["lora_down"], p["lora_up"], p.get("lora_mid"), gamma=alpha / r, backend="torch")
    elif "hada_w1_a" in p:
        r = p["hada_w1_b"].shape[0]
        dw = lyco.loha.diff_weight(p["hada_w1_b"], p["hada_w1_a"], p["hada_w2_b"], p["hada_w2_a"], None, None,
                                   gamma=torch.tensor(alpha / r), backend="torch")  # fmt: skip
    else:
        low = [p[k] for k in ("lokr_w1_b", "lokr_w2_b") if k in p]
        scale = alpha / low[0].shape[0] if low and alpha else 1.0
        args = [p.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")]
        dw = lyco.lokr.kron_weight(*args, scale=scale, backend="torch")
    return dw.reshape(w0.shape)


def _synthetic_expected(kind: str, p: dict[str, torch.Tensor], w0: torch.Tensor, b0: torch.Tensor | None, m: float):
    if kind in ("ia3", "ia3-in"):
        return ia3._ia3_weight(w0, p["weight"], kind == "ia3-in", m, False), b0
    if kind == "glora":
        r = p["a1"].shape[1]
        dw = glora._glora_weight(w0, p["a1"], p["a2"], p["b1"], p["b2"], None, float(p["alpha"]) / r)
        return w0 + m * dw, b0
    if kind == "oft":
        assert m == 1.0
        dw = lyco.diag_oft.diff_weight(w0, p["oft_blocks"], None, constraint=float(p["alpha"]) * w0.shape[0], backend="torch")
        return w0 + dw, b0
    if kind == "boft":
        dw = lyco.boft.diff_weight(w0, p["oft_blocks"], p["rescale"], constraint=0, scale=m, backend="torch")
        return w0 + dw, b0
    if kind == "full":
        return w0 + m * p["diff"], b0 + m * p["diff_b"]
    if kind == "norm":
        return w0 + m * p["w_norm"], b0 + m * p["b_norm"]
    s = float(p["alpha"]) / p["lora_down"].shape[0]
    return w0 + m * s * (p["lora_up"] @ p["lora_down"]), b0 + m * s * p["lora_up_bias"]


def _where(table: list[CkptTensor]) -> dict[str, tuple[CkptTensor, object]]:
    """kohya flattened name (+ ``.weight``/``.bias``) -> (single-file tensor, piece)."""
    out = {}
    for t in table:
        for p in t.pieces:
            mod, param = p.key.rsplit(".", 1)
            out[f"{_kohya(p.component, mod)}.{param}"] = (t, p)
    return out


def _get(f, t: CkptTensor, p) -> torch.Tensor:
    v = f.get_tensor(t.key).to(torch.float32)
    v = v[p.rows[0] : p.rows[1]] if p.rows else v
    return (v.T if p.transposed else v).reshape(p.shape)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    diff = (got - want.reshape(got.shape)).abs().max().item()
    assert diff <= rtol * max(want.abs().max().item(), 1e-6), f"{what}: max diff {diff:.3g}"


def test_every_network_type_merges_as_lycoris_computes_it(tmp_path: Path) -> None:
    full = checkpoint_table("sd1")
    shapes = {(p.component, p.key.rsplit(".", 1)[0]): p.shape for t in full for p in t.pieces if p.key.endswith(".weight")}
    synthetic = write_synthetic(tmp_path / "types.safetensors", shapes)
    lyco_files = [source_path(f"fixtures/sd15_kohya_{n}.safetensors") for n in ("loha", "lokr", "dora")]
    subset = {(t.component, t.path) for t in gen._sd15_lyco_subset()} | set(SYNTHETIC)
    table = select(full, subset)
    ckpt = write_single_file(tmp_path / "base.safetensors", table, "F32", SEED)
    where = _where(table)

    # LoHa at UNet 0.6 and LoKr at -0.3 add up on W0; the DoRA file is applied to that sum
    specs = [LoraSpec(str(lyco_files[0]), 1.0, 0.6), LoraSpec(str(lyco_files[1]), 0.5, -0.3), LoraSpec(str(lyco_files[2]), 0.8, 0.9)]
    out = tmp_path / "lyco.safetensors"
    merge(ckpt, specs, out)
    raws = [_raw(f) for f in lyco_files]
    checked = 0
    with safe_open(str(out), "pt") as f:
        for name in raws[0]:
            t, p = where[f"{name}.weight"]
            w0 = piece_value(t, p, SEED)
            te = name.startswith("lora_te_")
            acc = w0.clone()
            for spec, raw in zip(specs[:2], raws[:2]):
                acc += (spec.te if te else spec.unet) * _lyco_delta(raw[name], w0)
            dora = raws[2][name]
            m = specs[2].te if te else specs[2].unet
            dw = _lyco_delta({k: v for k, v in dora.items() if k != "dora_scale"}, w0)
            want = lyco.general._weight_decompose(acc + dw, dora["dora_scale"], m, dora["dora_scale"].shape[0] == w0.shape[0])
            _close(_get(f, t, p), want, name, 1e-4)
            checked += 1
    assert checked == 23

    out = tmp_path / "types_merged.safetensors"
    merge(ckpt, [LoraSpec(str(synthetic), -0.4, 1.0)], out)
    raw = _raw(synthetic)
    with safe_open(str(out), "pt") as f:
        for (component, mod), kind in SYNTHETIC.items():
            name = _kohya(component, mod)
            t, p = where[f"{name}.weight"]
            w0 = piece_value(t, p, SEED)
            bias = where.get(f"{name}.bias")
            b0 = piece_value(*bias, SEED) if bias else None
            m = -0.4 if component != "unet" else 1.0
            want_w, want_b = _synthetic_expected(kind, raw[name], w0, b0, m)
            _close(_get(f, t, p), want_w, f"{name} ({kind})")
            if bias:
                _close(_get(f, *bias), want_b, f"{name}.bias ({kind})")
            else:
                assert want_b is None


def test_bias_change_without_a_bias_is_unplaced(tmp_path: Path) -> None:
    """to_q has no bias: a LoRA with lora_up.bias there is reported, not half merged."""
    from loratool.errors import ConversionError

    table = select(checkpoint_table("sd1"), {("unet", f"{BLOCK}.attn1.to_q")})
    ckpt = write_single_file(tmp_path / "base.safetensors", table, "F16", SEED)
    n = _kohya("unet", f"{BLOCK}.attn1.to_q")
    save_file({f"{n}.lora_down.weight": _rand("d", 4, 320), f"{n}.lora_up.weight": _rand("u", 320, 4), f"{n}.lora_up.bias": _rand("b", 320)},
              str(tmp_path / "b.safetensors"), metadata={"ss_base_model_version": "sd_v1"})  # fmt: skip
    with pytest.raises(ConversionError, match="changes a bias"):
        merge(ckpt, [str(tmp_path / "b.safetensors")], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_kohya_sd2_conv_shaped_lora_on_linear_proj_in(tmp_path: Path) -> None:
    """kohya trains SD2 with 1×1-conv projections (FORMATS §2.1): its 4-D proj_in factors
    merge into the checkpoint's linear proj_in by element count."""
    mod = "down_blocks.0.attentions.0.proj_in"
    table = select(checkpoint_table("sd2"), {("unet", mod)})
    ckpt = write_single_file(tmp_path / "sd2.safetensors", table, "F32", SEED)
    n = _kohya("unet", mod)
    down, up = _rand("d", 8, 320, 1, 1), _rand("u", 320, 8, 1, 1)
    save_file({f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(4.0)},
              str(tmp_path / "k.safetensors"), metadata={"ss_v2": "True"})  # fmt: skip
    merge(ckpt, [LoraSpec(str(tmp_path / "k.safetensors"), 1.0, 0.5)], tmp_path / "out.safetensors")
    t, p = _where(table)[f"{n}.weight"]
    assert t.shape == (320, 320)  # linear in the checkpoint
    want = piece_value(t, p, SEED) + 0.5 * (4.0 / 8) * (up.reshape(320, 8) @ down.reshape(8, 320))
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        _close(_get(f, t, p), want, n)

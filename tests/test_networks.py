"""loratool.networks against the ecosystem's own code (PEFT, LyCORIS) and by properties."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loratool.networks import (
    NETWORK_TYPES,
    apply_dora,
    classify,
    delta_bias,
    delta_weight,
    dora_axis,
    merged_bias,
    merged_weight,
    rank_of,
    scale_of,
)

ATOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, tol: float = ATOL) -> None:
    assert a.dtype == torch.float32
    assert tuple(a.shape) == tuple(b.shape), (a.shape, b.shape)
    torch.testing.assert_close(a, b.to(torch.float32), atol=tol, rtol=tol)


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


# --------------------------------------------------------------------------- import rule


def test_import_and_shape_functions_stay_torch_free():
    code = (
        "import sys\n"
        "from loratool.networks import classify, rank_of, scale_of, NETWORK_TYPES\n"
        "s = {'lora_down': (4, 8), 'lora_up': (16, 4)}\n"
        "assert classify(set(s) | {'alpha'}, s) == 'lora'\n"
        "assert rank_of('lora', s) == 4 and scale_of('lora', s, 2.0) == 0.5\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- classify

CLASSIFY_CASES = [
    ({"lora_down": (4, 8), "lora_up": (16, 4)}, "lora"),
    ({"lora_down": (4, 8, 1, 1), "lora_up": (16, 4, 1, 1)}, "lora"),  # 1×1 conv
    ({"lora_down": (4, 8, 3, 3), "lora_up": (16, 4, 1, 1)}, "locon"),
    ({"lora_down": (4, 8, 1, 1), "lora_up": (16, 4, 1, 1), "lora_mid": (4, 4, 3, 3)}, "locon"),
    ({"lora_down": (4, 8), "lora_up": (16, 4), "lora_up_bias": (16,)}, "lora"),
    (
        {"hada_w1_a": (16, 4), "hada_w1_b": (4, 8), "hada_w2_a": (16, 4), "hada_w2_b": (4, 8)},
        "loha",
    ),
    (
        {
            **{f"hada_w{i}_a": (4, 16) for i in (1, 2)},
            **{f"hada_w{i}_b": (4, 8) for i in (1, 2)},
            **{f"hada_t{i}": (4, 4, 3, 3) for i in (1, 2)},
        },
        "loha",
    ),
    ({"lokr_w1": (4, 2), "lokr_w2": (4, 4)}, "lokr"),
    ({"lokr_w1": (4, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4)}, "lokr"),
    ({"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 2), "lokr_w2": (4, 4)}, "lokr"),
    (
        {"lokr_w1": (4, 2), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 4), "lokr_t2": (2, 2, 3, 3)},
        "lokr",
    ),
    ({"weight": (16,), "on_input": ()}, "ia3"),
    ({"diff": (16, 8), "diff_b": (16,)}, "full"),
    ({"diff_b": (16,)}, "full"),
    ({"w_norm": (16,), "b_norm": (16,)}, "norm"),
    ({"a1": (8, 4), "a2": (4, 8), "b1": (16, 4), "b2": (4, 8)}, "glora"),
    ({"oft_blocks": (4, 4, 4)}, "oft"),
    ({"oft_blocks": (4, 4, 4), "rescale": (16, 1)}, "oft"),
    ({"oft_blocks": (2, 4, 4, 4)}, "boft"),
    # unrecognised
    ({"lora_down": (4, 8)}, None),
    ({"lora_down": (4, 8), "lora_up": (16, 4), "hada_w1_a": (16, 4)}, None),
    ({"lokr_w1": (4, 2)}, None),
    ({"lokr_w1": (4, 2), "lokr_w1_a": (4, 2), "lokr_w1_b": (2, 2), "lokr_w2": (4, 4)}, None),
    ({"lokr_w1": (4, 2), "lokr_w2": (4, 4), "lokr_t2": (2, 2, 3, 3)}, None),
    ({"oft_blocks": (4, 4)}, None),
    ({"something": (3,)}, None),
    ({}, None),
]


@pytest.mark.parametrize("shapes,expected", CLASSIFY_CASES)
def test_classify(shapes, expected):
    assert classify(set(shapes), shapes) == expected
    # alpha and dora_scale never change the answer
    with_side = {**shapes, "alpha": (), "dora_scale": (16, 1)}
    assert classify(set(with_side), with_side) == (expected if shapes else None)


def test_registry_names():
    assert set(NETWORK_TYPES) == {
        "lora", "locon", "loha", "lokr", "ia3", "full", "norm", "glora", "oft", "boft",
    }  # fmt: skip
    assert all(t.name == n for n, t in NETWORK_TYPES.items())


# --------------------------------------------------------------------------- rank and scale

RANK_CASES = [
    ("lora", {"lora_down": (4, 8), "lora_up": (16, 4)}, 4),
    ("locon", {"lora_down": (3, 8, 3, 3), "lora_up": (16, 3, 1, 1)}, 3),
    ("loha", {"hada_w1_a": (16, 5), "hada_w1_b": (5, 8)}, 5),
    ("lokr", {"lokr_w1": (4, 2), "lokr_w2_a": (4, 3), "lokr_w2_b": (3, 4)}, 3),
    ("lokr", {"lokr_w1_a": (4, 6), "lokr_w1_b": (6, 2), "lokr_w2": (4, 4)}, 6),
    # Tucker LoKr: w2_a is [r, b]; rank comes from w2_b.shape[0], not w2_a.shape[1]
    (
        "lokr",
        {"lokr_w1": (4, 2), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 4), "lokr_t2": (2, 2, 3, 3)},
        2,
    ),
    ("lokr", {"lokr_w1": (4, 2), "lokr_w2": (4, 4)}, None),
    ("glora", {"a1": (8, 4), "a2": (4, 8), "b1": (16, 4), "b2": (4, 8)}, 4),
    ("full", {"diff": (16, 8)}, None),
    ("ia3", {"weight": (16,)}, None),
    ("oft", {"oft_blocks": (4, 4, 4)}, None),
]


@pytest.mark.parametrize("kind,shapes,expected", RANK_CASES)
def test_rank_of(kind, shapes, expected):
    assert rank_of(kind, shapes) == expected


@settings(max_examples=60, deadline=None)
@given(
    rank=st.integers(1, 64),
    alpha=st.one_of(st.none(), st.just(0.0), st.floats(0.01, 256)),
    kind=st.sampled_from(
        ["lora", "loha", "lokr_lowrank", "glora", "lokr_full", "full", "ia3", "oft"]
    ),
)
def test_scale_rules(rank, alpha, kind):
    shapes = {
        "lora": {"lora_down": (rank, 8), "lora_up": (16, rank)},
        "loha": {"hada_w1_a": (16, rank), "hada_w1_b": (rank, 8)},
        "lokr_lowrank": {"lokr_w1": (4, 2), "lokr_w2_a": (4, rank), "lokr_w2_b": (rank, 4)},
        "glora": {"a1": (8, rank), "a2": (rank, 8), "b1": (16, rank), "b2": (rank, 8)},
        "lokr_full": {"lokr_w1": (4, 2), "lokr_w2": (4, 4)},
        "full": {"diff": (16, 8)},
        "ia3": {"weight": (16,)},
        "oft": {"oft_blocks": (4, 4, 4)},
    }[kind]
    name = kind.split("_")[0]
    got = scale_of(name, shapes, alpha)
    if kind in ("lokr_full", "full", "ia3", "oft") or not alpha:
        assert got == 1.0
    else:
        assert got == pytest.approx(alpha / rank)


def test_scale_accepts_tensor_alpha():
    s = {"lora_down": (4, 8), "lora_up": (16, 4)}
    assert scale_of("lora", s, torch.tensor(2.0, dtype=torch.bfloat16)) == 0.5
    assert scale_of("lora", s, torch.tensor([8.0], dtype=torch.float16)) == 2.0
    assert scale_of("lora", s, torch.tensor(0.0)) == 1.0
    assert scale_of("lora", s, torch.tensor(4, dtype=torch.int64)) == 1.0


def test_unknown_type_raises():
    with pytest.raises(ValueError):
        scale_of("nope", {}, 1.0)


# --------------------------------------------------------------------------- PEFT oracle


class One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def peft_layer(config, base: nn.Module, seed: int = 0):
    """``base`` wrapped by PEFT's own layer, all adapter parameters randomised."""
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    model = inject_adapter_in_model(config, One(base))
    layer = model.layer
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "base_layer" not in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "magnitude" in name else 0.0))
    return layer


def adapter_tensors(layer, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """PEFT parameters under our canonical names (``names``: ours -> PEFT attribute)."""
    out = {}
    for ours, attr in names.items():
        holder = getattr(layer, attr)
        if "default" not in holder:
            continue
        p = holder["default"]
        out[ours] = (p.weight if hasattr(p, "weight") else p).detach().clone()
    return out


LORA_NAMES = {"lora_down": "lora_A", "lora_up": "lora_B"}

BASES = {
    "linear": lambda: nn.Linear(12, 10, bias=True),
    "conv3x3": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
}


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("r,lora_alpha,rslora", [(4, 8, False), (3, 3, False), (4, 6, True)])
def test_lora_matches_peft(base, r, lora_alpha, rslora):
    from peft import LoraConfig

    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["layer"], use_rslora=rslora)
    layer = peft_layer(cfg, BASES[base]())
    t = adapter_tensors(layer, LORA_NAMES)
    alpha = lora_alpha * math.sqrt(r) if rslora else lora_alpha  # kohya-convention alpha
    w0 = layer.get_base_layer().weight
    expected = layer.get_delta_weight("default")
    close(delta_weight("lora", t, alpha, tuple(w0.shape)), expected)
    kind = classify(set(t), shapes_of(t))
    assert kind == ("locon" if base == "conv3x3" else "lora")
    close(delta_weight(kind, t, alpha, tuple(w0.shape)), expected)
    # merge at multiplier 1 equals PEFT's merged layer
    merged = merged_weight(kind, t, alpha, w0.detach())
    layer.merge(adapter_names=["default"])
    close(merged, layer.get_base_layer().weight.detach())


def test_lora_1x1_conv_stored_2d_reshapes_to_target():
    torch.manual_seed(1)
    t = {"lora_down": torch.randn(4, 6), "lora_up": torch.randn(8, 4)}
    dw = delta_weight("lora", t, 2.0, (8, 6, 1, 1))
    assert dw.shape == (8, 6, 1, 1)
    close(dw.reshape(8, 6), (t["lora_up"] @ t["lora_down"]) * 0.5)
    with pytest.raises(ValueError):
        delta_weight("lora", t, 2.0, (8, 6, 3, 3))


def test_lora_bias_matches_peft():
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["layer"], lora_bias=True)
    layer = peft_layer(cfg, nn.Linear(12, 10))
    t = adapter_tensors(layer, LORA_NAMES)
    t["lora_up_bias"] = layer.lora_B["default"].bias.detach().clone()
    b0 = layer.get_base_layer().bias.detach().clone()
    w0 = layer.get_base_layer().weight.detach().clone()
    close(delta_bias("lora", t, 2), t["lora_up_bias"] * 0.5)
    got_w, got_b = merged_weight("lora", t, 2, w0), merged_bias("lora", t, 2, b0)
    layer.merge(adapter_names=["default"])
    close(got_w, layer.get_base_layer().weight.detach())
    close(got_b, layer.get_base_layer().bias.detach())


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_dora_matches_peft_merge(base, rslora):
    from peft import LoraConfig

    r, lora_alpha = 4, 8
    cfg = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=["layer"], use_dora=True, use_rslora=rslora
    )
    layer = peft_layer(cfg, BASES[base]())
    t = adapter_tensors(layer, {**LORA_NAMES, "dora_scale": "lora_magnitude_vector"})
    w0 = layer.get_base_layer().weight.detach().clone()
    # canonical K layout: [out, 1(, 1, 1)] (decoders reshape PEFT's [out] / [1, out, 1, 1])
    t["dora_scale"] = t["dora_scale"].reshape(w0.shape[0], *([1] * (w0.dim() - 1)))
    alpha = lora_alpha * math.sqrt(r) if rslora else lora_alpha
    kind = classify(set(t), shapes_of(t))
    assert dora_axis(tuple(t["dora_scale"].shape), tuple(w0.shape)) == "out"
    got = merged_weight(kind, t, alpha, w0)
    layer.merge(adapter_names=["default"])
    close(got, layer.get_base_layer().weight.detach(), 1e-4)
    # DoRA really changed something beyond the plain LoRA merge
    plain = {k: v for k, v in t.items() if k != "dora_scale"}
    assert not torch.allclose(got, merged_weight(kind, plain, alpha, w0), atol=1e-3)


LOHA_NAMES = {
    k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
}
LOKR_NAMES = {
    k: k
    for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
}


@pytest.mark.parametrize("base,tucker", [("linear", False), ("conv3x3", False), ("conv3x3", True)])
def test_loha_matches_peft(base, tucker):
    from peft import LoHaConfig

    r, alpha = 4, 6
    cfg = LoHaConfig(r=r, alpha=alpha, target_modules=["layer"], use_effective_conv2d=tucker)
    layer = peft_layer(cfg, BASES[base]())
    t = adapter_tensors(layer, LOHA_NAMES)
    assert ("hada_t1" in t) == tucker
    w0 = layer.get_base_layer().weight.detach()
    assert classify(set(t), shapes_of(t)) == "loha"
    assert rank_of("loha", shapes_of(t)) == r
    close(delta_weight("loha", t, alpha, tuple(w0.shape)), layer.get_delta_weight("default"))


LOKR_CASES = {
    # name: (base, config kwargs)
    "linear_w2_lowrank": ("linear", {"r": 2}),
    "linear_decompose_both": ("linear", {"r": 1, "decompose_both": True, "decompose_factor": 2}),
    "conv_tucker": ("conv_big", {"r": 2, "use_effective_conv2d": True}),
    "conv_flat": ("conv_big", {"r": 2}),
    "conv_both_full": ("conv3x3", {"r": 2}),
    "linear_both_full": ("linear", {"r": 16}),
}


@pytest.mark.parametrize("case", sorted(LOKR_CASES))
def test_lokr_matches_peft(case):
    from peft import LoKrConfig

    base, kw = LOKR_CASES[case]
    alpha = 3.0
    cfg = LoKrConfig(alpha=alpha, target_modules=["layer"], **kw)
    layer = peft_layer(cfg, nn.Conv2d(16, 32, 3) if base == "conv_big" else BASES[base]())
    t = adapter_tensors(layer, LOKR_NAMES)
    w0 = layer.get_base_layer().weight.detach()
    assert classify(set(t), shapes_of(t)) == "lokr"
    assert ("lokr_t2" in t) == (case == "conv_tucker")
    expected = layer.get_delta_weight("default")
    ours = delta_weight("lokr", t, alpha, tuple(w0.shape))
    if case.endswith("both_full"):
        # LyCORIS/kohya convention: both factors full -> scale 1; PEFT still uses alpha/r
        assert rank_of("lokr", shapes_of(t)) is None
        close(ours * (alpha / kw["r"]), expected)
    else:
        assert rank_of("lokr", shapes_of(t)) == kw["r"]
        close(ours, expected)


# --------------------------------------------------------------------------- LyCORIS oracle


@pytest.fixture(scope="module")
def lyco():
    return pytest.importorskip("lycoris.functional")


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def test_locon_tucker_matches_lycoris(lyco):
    torch.manual_seed(2)
    t = {"lora_down": rand(3, 6, 1, 1), "lora_up": rand(8, 3, 1, 1), "lora_mid": rand(3, 3, 3, 3)}
    expected = lyco.locon.diff_weight(
        t["lora_down"], t["lora_up"], t["lora_mid"], gamma=0.75, backend="torch"
    )
    assert classify(set(t), shapes_of(t)) == "locon"
    close(delta_weight("locon", t, 2.25, (8, 6, 3, 3)), expected)


def test_locon_plain_conv_matches_lycoris(lyco):
    torch.manual_seed(3)
    t = {"lora_down": rand(4, 6, 3, 3), "lora_up": rand(8, 4, 1, 1)}
    expected = lyco.locon.diff_weight(
        t["lora_down"], t["lora_up"], None, gamma=0.5, backend="torch"
    )
    close(delta_weight("locon", t, 2.0), expected)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_matches_lycoris(lyco, tucker):
    torch.manual_seed(4)
    r, out_dim, in_dim, k = 3, 8, 6, 3
    if tucker:
        t = {f"hada_w{i}_a": rand(r, out_dim) for i in (1, 2)}
        t |= {f"hada_w{i}_b": rand(r, in_dim) for i in (1, 2)}
        t |= {f"hada_t{i}": rand(r, r, k, k) for i in (1, 2)}
        t1, t2 = t["hada_t1"], t["hada_t2"]
    else:
        t = {f"hada_w{i}_a": rand(out_dim, r) for i in (1, 2)}
        t |= {f"hada_w{i}_b": rand(r, in_dim * k * k) for i in (1, 2)}
        t1 = t2 = None
    expected = lyco.loha.diff_weight(
        t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t1, t2,
        gamma=torch.tensor(2.0 / r), backend="torch",
    )  # fmt: skip
    close(
        delta_weight("loha", t, 2.0, (out_dim, in_dim, k, k)),
        expected.reshape(out_dim, in_dim, k, k),
    )


LYCO_LOKR = {
    "both_full_linear": {"lokr_w1": (2, 3), "lokr_w2": (5, 4)},
    "both_full_conv": {"lokr_w1": (2, 3), "lokr_w2": (4, 2, 3, 3)},
    "w2_lowrank": {"lokr_w1": (2, 3), "lokr_w2_a": (5, 2), "lokr_w2_b": (2, 4)},
    "w1_lowrank": {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 3), "lokr_w2": (5, 4)},
    "tucker": {
        "lokr_w1": (2, 3),
        "lokr_w2_a": (2, 4),
        "lokr_w2_b": (2, 2),
        "lokr_t2": (2, 2, 3, 3),
    },
    "conv_flat": {"lokr_w1": (2, 3), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 2 * 9)},
}


@pytest.mark.parametrize("case", sorted(LYCO_LOKR))
def test_lokr_matches_lycoris(lyco, case):
    torch.manual_seed(5)
    t = {k: rand(*s) for k, s in LYCO_LOKR[case].items()}
    alpha = 3.0
    rank = rank_of("lokr", shapes_of(t))
    scale = 1.0 if rank is None else alpha / rank
    args = [
        t.get(k)
        for k in (
            "lokr_w1",
            "lokr_w1_a",
            "lokr_w1_b",
            "lokr_w2",
            "lokr_w2_a",
            "lokr_w2_b",
            "lokr_t2",
        )
    ]
    expected = lyco.lokr.kron_weight(*args, scale=scale, backend="torch")
    target = (8, 6, 3, 3) if case == "conv_flat" else None
    ours = delta_weight("lokr", t, alpha, target)
    expected = expected.reshape(ours.shape)
    close(ours, expected)
    if case.startswith("both_full"):
        assert scale_of("lokr", shapes_of(t), alpha) == 1.0


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("multiplier", [1.0, 0.6, -0.5])
def test_dora_matches_lycoris(lyco, axis, conv, multiplier):
    torch.manual_seed(6)
    shape = (8, 6, 3, 3) if conv else (8, 6)
    w0 = rand(*shape)
    t = {"lora_down": rand(3, 6, *shape[2:]), "lora_up": rand(8, 3, *([1] * (len(shape) - 2)))}
    n = shape[0] if axis == "out" else shape[1]
    dshape = (n, *([1] * (len(shape) - 1))) if axis == "out" else (1, n, *([1] * (len(shape) - 2)))
    t["dora_scale"] = rand(*dshape).abs() + 0.5
    assert dora_axis(dshape, shape) == axis
    # ΔW from LyCORIS too (scale alpha/rank = 1.5/3), not from the code under test
    dw = lyco.locon.diff_weight(t["lora_down"], t["lora_up"], None, gamma=0.5, backend="torch").reshape(shape)
    expected = lyco.general._weight_decompose(w0 + dw, t["dora_scale"], multiplier, axis == "out")
    close(merged_weight("lora", t, 1.5, w0, multiplier), expected, 1e-4)
    close(apply_dora(w0, dw, t["dora_scale"], axis, multiplier), expected, 1e-4)


def test_ia3_matches_lycoris():
    ia3 = pytest.importorskip("lycoris.modules.ia3")
    torch.manual_seed(7)
    for on_input, shape, wshape in [
        (False, (8, 6), (8,)),
        (True, (8, 6), (6,)),
        (False, (8, 6, 3, 3), (1, 8, 1, 1)),
        (True, (8, 6, 3, 3), (1, 6, 1, 1)),
    ]:
        w0, w = rand(*shape), rand(*wshape)
        t = {"weight": w, "on_input": torch.tensor(int(on_input))}
        assert classify(set(t), shapes_of(t)) == "ia3"
        for m in (1.0, 0.3):
            expected = ia3._ia3_weight(w0, w, on_input, m, False)
            close(merged_weight("ia3", t, None, w0, m), expected)
        close(
            delta_weight("ia3", t, None, base_weight=w0), ia3._ia3_weight(w0, w, on_input, 1, True)
        )


@pytest.mark.parametrize("conv,tucker", [(False, False), (True, False), (True, True)])
def test_glora_matches_lycoris(conv, tucker):
    glora = pytest.importorskip("lycoris.modules.glora")
    torch.manual_seed(8)
    r, o, i = 3, 8, 6
    sp = (1, 1) if conv else ()
    w0 = rand(o, i, 3, 3) if conv else rand(o, i)
    t = {"a1": rand(i, r, *sp), "a2": rand(r, i, *sp), "b1": rand(o, r, *sp)}
    t["b2"] = rand(r, i, *sp) if (tucker or not conv) else rand(r, i, 3, 3)
    if tucker:
        t["bm"] = rand(r, r, 3, 3)
    assert classify(set(t), shapes_of(t)) == "glora"
    expected = glora._glora_weight(w0, t["a1"], t["a2"], t["b1"], t["b2"], t.get("bm"), 2.0 / r)
    close(delta_weight("glora", t, 2.0, base_weight=w0), expected)
    close(merged_weight("glora", t, 2.0, w0, 0.5), w0 + 0.5 * expected)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("alpha", [None, 1e-3])
def test_oft_matches_lycoris(lyco, conv, rescale, alpha):
    torch.manual_seed(9)
    shape = (12, 5, 3, 3) if conv else (12, 5)
    w0 = rand(*shape)
    t = {"oft_blocks": rand(3, 4, 4) * 0.2}
    if rescale:
        t["rescale"] = rand(12, *([1] * (len(shape) - 1))) + 1
    constraint = (alpha or 0) * shape[0]
    expected = lyco.diag_oft.diff_weight(
        w0, t["oft_blocks"], t.get("rescale"), constraint=constraint, backend="torch"
    )
    close(delta_weight("oft", t, alpha, base_weight=w0), expected)
    close(merged_weight("oft", t, alpha, w0), w0 + expected)
    # multiplier interpolates R toward I (LyCORIS module make_weight)
    r = lyco.diag_oft.get_r(t["oft_blocks"], constraint=constraint)
    r_m = 0.4 * r + 0.6 * torch.eye(4)
    w_m = torch.einsum("k n m, k n ... -> k m ...", r_m, w0.reshape(3, 4, *shape[1:])).reshape(
        shape
    )
    if rescale:
        w_m = w_m * t["rescale"]
    close(merged_weight("oft", t, alpha, w0, 0.4), w_m)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize("rescale", [False, True])
def test_boft_matches_lycoris(lyco, conv, multiplier, rescale):
    torch.manual_seed(10)
    shape = (16, 5, 3, 3) if conv else (16, 5)
    w0 = rand(*shape)
    t = {"oft_blocks": rand(3, 4, 4, 4) * 0.2}  # m=3 stages, 4 blocks of 4
    if rescale:
        t["rescale"] = rand(16, *([1] * (len(shape) - 1))) + 1
    expected = lyco.boft.diff_weight(
        w0, t["oft_blocks"], t.get("rescale"), constraint=0, scale=multiplier, backend="torch"
    )
    assert classify(set(t), shapes_of(t)) == "boft"
    close(merged_weight("boft", t, None, w0, multiplier), w0 + expected)


def test_oft_types_refuse_dora_and_need_base():
    t = {"oft_blocks": torch.zeros(2, 4, 4)}
    with pytest.raises(ValueError):
        delta_weight("oft", t, None)
    with pytest.raises(ValueError):
        merged_weight("oft", {**t, "dora_scale": torch.ones(8, 1)}, None, torch.randn(8, 3))
    # zero blocks: identity rotation
    w0 = torch.randn(8, 3)
    close(merged_weight("oft", t, None, w0, 0.3), w0)


def test_full_and_norm():
    torch.manual_seed(11)
    w0, b0 = rand(8, 6), rand(8)
    t = {"diff": rand(8, 6).half(), "diff_b": rand(8).bfloat16()}
    assert classify(set(t), shapes_of(t)) == "full"
    close(merged_weight("full", t, 4.0, w0, 0.5), w0 + 0.5 * t["diff"].float())  # alpha ignored
    close(merged_bias("full", t, None, b0, 0.5), b0 + 0.5 * t["diff_b"].float())
    close(merged_bias("full", t, None, None), t["diff_b"].float())
    only_b = {"diff_b": t["diff_b"]}
    close(merged_weight("full", only_b, None, w0), w0)
    n = {"w_norm": rand(8), "b_norm": rand(8)}
    assert classify(set(n), shapes_of(n)) == "norm"
    close(merged_weight("norm", n, None, b0, 2.0), b0 + 2.0 * n["w_norm"])
    close(delta_bias("norm", n, None), n["b_norm"])
    assert delta_bias("loha", {}, None) is None


# --------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    r=st.integers(1, 4),
    out_dim=st.integers(5, 12),
    in_dim=st.integers(5, 12),
    seed=st.integers(0, 2**16),
)
def test_lora_and_loha_rank_bounds(r, out_dim, in_dim, seed):
    g = torch.Generator().manual_seed(seed)
    t = {
        "lora_down": torch.randn(r, in_dim, generator=g),
        "lora_up": torch.randn(out_dim, r, generator=g),
    }
    assert torch.linalg.matrix_rank(delta_weight("lora", t, None)) <= r
    h = {f"hada_w{i}_a": torch.randn(out_dim, r, generator=g) for i in (1, 2)}
    h |= {f"hada_w{i}_b": torch.randn(r, in_dim, generator=g) for i in (1, 2)}
    assert torch.linalg.matrix_rank(delta_weight("loha", h, None)) <= r * r


@settings(max_examples=30, deadline=None)
@given(
    a=st.integers(1, 4),
    b=st.integers(1, 4),
    c=st.integers(1, 4),
    d=st.integers(1, 4),
    seed=st.integers(0, 999),
)
def test_lokr_kronecker_structure(a, b, c, d, seed):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(a, c, generator=g), torch.randn(b, d, generator=g)
    dw = delta_weight("lokr", {"lokr_w1": w1, "lokr_w2": w2}, 7.0)  # alpha ignored: both full
    assert dw.shape == (a * b, c * d)
    # block (i, j) of the Kronecker product is w1[i, j] * w2
    blocks = dw.reshape(a, b, c, d).permute(0, 2, 1, 3)
    close(blocks, w1[:, :, None, None] * w2)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["lora", "locon", "loha", "lokr"]),
    alpha=st.one_of(st.none(), st.floats(0.5, 16)),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 999),
)
def test_low_precision_inputs_compute_in_fp32(kind, alpha, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "lora": {"lora_down": (4, 12), "lora_up": (10, 4)},
        "locon": {"lora_down": (2, 6, 1, 1), "lora_up": (8, 2, 1, 1), "lora_mid": (2, 2, 3, 3)},
        "loha": {
            "hada_w1_a": (10, 3),
            "hada_w1_b": (3, 12),
            "hada_w2_a": (10, 3),
            "hada_w2_b": (3, 12),
        },
        "lokr": {"lokr_w1": (2, 3), "lokr_w2_a": (5, 2), "lokr_w2_b": (2, 4)},
    }[kind]
    low = {k: torch.randn(*s, generator=g).to(dtype) for k, s in shapes.items()}
    ref = delta_weight(kind, {k: v.float() for k, v in low.items()}, alpha)
    got = delta_weight(kind, low, alpha)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    base = torch.randn(*ref.shape, generator=g)
    merged = merged_weight(kind, low, alpha, base.to(dtype))
    assert merged.dtype == torch.float32


DORA_AXIS_CASES = [
    ((8, 1), (8, 6), "out"),
    ((1, 6), (8, 6), "in"),
    ((8,), (8, 6), "out"),
    ((6, 6), (8, 6), None),
    ((8, 1), (8, 8), "out"),
    ((1, 8), (8, 8), "in"),  # square: the first dim decides (ComfyUI)
    ((8, 1, 1, 1), (8, 6, 3, 3), "out"),
    ((1, 6, 1, 1), (8, 6, 3, 3), "in"),
    ((1, 8, 1, 1), (8, 6, 3, 3), "out"),  # PEFT conv magnitude, not reshaped
    ((1, 1), (1, 1), "out"),
    ((1, 6), (1, 6), "in"),
]


@pytest.mark.parametrize("dshape,wshape,expected", DORA_AXIS_CASES)
def test_dora_axis(dshape, wshape, expected):
    if expected is None:
        with pytest.raises(ValueError):
            dora_axis(dshape, wshape)
    else:
        assert dora_axis(dshape, wshape) == expected


def test_dora_multiplier_zero_is_plain_lora_merge():
    """LyCORIS' multiplier form: m = 0 leaves V = W0 + sΔW, not W0 (documented choice)."""
    torch.manual_seed(12)
    w0, dw = torch.randn(8, 6), torch.randn(8, 6)
    mag = torch.rand(8, 1) + 0.5
    close(apply_dora(w0, dw, mag, "out", 0.0), w0 + dw)
    v = w0 + dw
    row_norm = torch.sqrt((v * v).sum(dim=1, keepdim=True))  # [8, 1], written out by hand
    close(apply_dora(w0, dw, mag, "out", 1.0), mag * v / row_norm)
    # PEFT's 1-D magnitude [out] means the same as the K layout [out, 1]
    close(apply_dora(w0, dw, mag.reshape(8), "out"), mag * v / row_norm)
    # axis "in": one magnitude per input column, normalised by column norms
    col_mag = torch.rand(1, 6) + 0.5
    col_norm = torch.sqrt((v * v).sum(dim=0, keepdim=True))  # [1, 6]
    close(apply_dora(w0, dw, col_mag, "in"), col_mag * v / col_norm)
    # a multiplier interpolates the scale factor: V·(1 + m·(M/‖V‖ − 1))
    close(apply_dora(w0, dw, mag, "out", 0.5), v * (0.5 + 0.5 * mag / row_norm))
    with pytest.raises(ValueError):
        apply_dora(w0, dw, mag, "rows")

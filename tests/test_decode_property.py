"""Property (issue 7 §2): whatever shapes, dtypes and scalar values a module's tensors
have, ``loratool.load`` either gives modules whose rank, scale, ΔW, bias change and merge
all compute (finite scale, no exception), or reports the module (invalid, unknown keys)
— it never raises anything but :class:`LoraToolError`. ``convert`` likewise.

Each example starts from a consistent parameter set of one network type on a real SD1
layer (``attn1.to_q`` [320, 320] or ``resnets.0.conv1`` [320, 320, 3, 3]) and may bend
it: other dims, dims dropped or added, integer/bool/F8 dtypes, a parameter removed, a
stray one added, hostile alphas, DoRA magnitudes of any shape.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import loratool
from loratool.errors import LoraToolError
from loratool.networks import (
    NETWORK_TYPES,
    delta_bias,
    delta_weight,
    depends_on_base,
    merged_weight,
)
from loratool.ops.convert import convert
from loratool.ops.inspect import summarize

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # [320, 320]
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # [320, 320, 3, 3]
COMPANION = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
RANK = 4

# Consistent parameter sets per network type: (layer, {param: shape}).
TEMPLATES: list[tuple[str, str, dict[str, tuple[int, ...]]]] = [
    ("lora", LINEAR, {"lora_down": (RANK, 320), "lora_up": (320, RANK)}),
    ("lora+bias", LINEAR, {"lora_down": (RANK, 320), "lora_up": (320, RANK), "lora_up_bias": (320,)}),
    ("locon", CONV, {"lora_down": (RANK, 320, 3, 3), "lora_up": (320, RANK, 1, 1)}),
    ("locon-tucker", CONV, {"lora_down": (RANK, 320, 1, 1), "lora_mid": (RANK, RANK, 3, 3), "lora_up": (320, RANK, 1, 1)}),
    ("loha", LINEAR, {"hada_w1_a": (320, RANK), "hada_w1_b": (RANK, 320), "hada_w2_a": (320, RANK), "hada_w2_b": (RANK, 320)}),
    ("loha-conv", CONV, {"hada_w1_a": (320, RANK), "hada_w1_b": (RANK, 2880), "hada_w2_a": (320, RANK), "hada_w2_b": (RANK, 2880)}),
    ("loha-tucker", CONV, {
        "hada_w1_a": (RANK, 320), "hada_w1_b": (RANK, 320), "hada_t1": (RANK, RANK, 3, 3),
        "hada_w2_a": (RANK, 320), "hada_w2_b": (RANK, 320), "hada_t2": (RANK, RANK, 3, 3),
    }),
    ("lokr-full", LINEAR, {"lokr_w1": (4, 4), "lokr_w2": (80, 80)}),
    ("lokr-low", LINEAR, {"lokr_w1": (4, 4), "lokr_w2_a": (80, RANK), "lokr_w2_b": (RANK, 80)}),
    ("lokr-both", LINEAR, {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (80, RANK), "lokr_w2_b": (RANK, 80)}),
    ("lokr-tucker", CONV, {"lokr_w1": (4, 4), "lokr_w2_a": (RANK, 80), "lokr_w2_b": (RANK, 80), "lokr_t2": (RANK, RANK, 3, 3)}),
    ("ia3", LINEAR, {"weight": (320,), "on_input": ()}),
    ("full", CONV, {"diff": (320, 320, 3, 3), "diff_b": (320,)}),
    ("full-bias", LINEAR, {"diff_b": (320,)}),
    ("norm", LINEAR, {"w_norm": (320,), "b_norm": (320,)}),
    ("glora", LINEAR, {"a1": (320, RANK), "a2": (RANK, 320), "b1": (320, RANK), "b2": (RANK, 320)}),
    ("glora-conv", CONV, {"a1": (320, RANK, 1, 1), "a2": (RANK, 320, 1, 1), "b1": (320, RANK, 1, 1), "b2": (RANK, 320, 3, 3)}),
    ("oft", LINEAR, {"oft_blocks": (40, 8, 8), "rescale": (320, 1)}),
    ("boft", CONV, {"oft_blocks": (2, 40, 8, 8)}),
]
STRAY = ["lora_down", "lora_mid", "hada_t1", "lokr_w2_b", "lokr_t2", "bm", "rescale", "diff_b", "on_input"]
DIMS = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 40, 80, 320, 2880])
SHAPES = st.one_of(
    st.lists(st.sampled_from([0, 1, 2, 3, 4, 8]), max_size=5),
    st.lists(DIMS, max_size=2),
    st.lists(DIMS, min_size=3, max_size=4).filter(lambda s: math.prod(s) <= 1_000_000),
).map(tuple)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.int8, torch.bool]
FLOAT_ALPHA = st.one_of(st.floats(0.01, 256), st.sampled_from([0.0, -4.0, math.nan, math.inf, -math.inf, 1e300, 7e38]), st.floats(allow_nan=True, width=64))
ALPHAS = st.one_of(
    st.none(),
    st.tuples(FLOAT_ALPHA, st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]), st.just(())),
    st.tuples(st.integers(-300, 300), st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]), st.just(())),
    st.tuples(st.floats(0.5, 64), st.just(torch.float32), st.sampled_from([(0,), (1,), (2,), (1, 1)])),
)
DORA = st.one_of(st.none(), st.none(), st.none(), st.sampled_from([(320,), (320, 1), (1, 320), (7,), (320, 1, 1, 1), (1, 320, 1, 1), (0,), ()]))


@st.composite
def modules(draw: st.DrawFn) -> tuple[str, dict[str, tuple[tuple[int, ...], torch.dtype]], object, object]:
    _, layer, template = draw(st.sampled_from(TEMPLATES))
    dtype = draw(st.sampled_from(DTYPES[:4]))
    params = {name: (shape, dtype) for name, shape in template.items()}
    for name in list(params):
        if draw(st.integers(0, 11)) == 0:
            params[name] = (draw(SHAPES), params[name][1])
        if draw(st.integers(0, 14)) == 0:
            params[name] = (params[name][0], draw(st.sampled_from(DTYPES)))
    if len(params) > 1 and draw(st.integers(0, 14)) == 0:
        del params[draw(st.sampled_from(sorted(params)))]
    if draw(st.integers(0, 14)) == 0:
        params[draw(st.sampled_from(STRAY))] = (draw(SHAPES), dtype)
    if "on_input" in params:
        params["on_input"] = (params["on_input"][0], torch.bool)
    return layer, params, draw(ALPHAS), draw(DORA)


def _write(path: Path, layer: str, params: dict, alpha: object, dora: object, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in params.items():
        key = f"{layer}.{name}.weight" if name in ("lora_down", "lora_up", "lora_mid", "a1", "a2", "b1", "b2", "bm") else f"{layer}.{name}"
        values = torch.randn(shape, generator=gen) / 8 if shape else torch.tensor(0.5)
        if name == "on_input":
            values = torch.randint(0, 2, shape, generator=gen)
        elif dtype.is_floating_point is False:
            values = values * 8
        tensors[key] = values.to(dtype)
    if alpha is not None:
        value, dtype, shape = alpha
        t = torch.full(shape, value, dtype=torch.float64) if shape else torch.tensor(value, dtype=torch.float64)
        tensors[f"{layer}.alpha"] = t.to(dtype) if dtype != torch.uint8 else t.clamp(0, 255).to(dtype)
    if dora is not None:
        tensors[f"{layer}.dora_scale"] = torch.rand(dora, generator=gen) + 0.5
    # A plain LoRA beside it, so that a bad module leaves a usable file to report it in.
    tensors[f"{COMPANION}.lora_down.weight"] = torch.randn(RANK, 320, generator=gen) / 8
    tensors[f"{COMPANION}.lora_up.weight"] = torch.randn(320, RANK, generator=gen) / 8
    save_file(tensors, str(path))


def _reported(adapter: loratool.model.Adapter, layer: str) -> bool:
    return (
        any(m.source_name == layer for m in adapter.modules.values())
        or layer in adapter.invalid_modules
        or any(k.startswith(layer + ".") for k in adapter.unknown_keys)
    )


def _exercise(m: loratool.model.AdapterModule) -> None:
    """Everything downstream code does with a module, given a base weight where ΔW needs one."""
    assert math.isfinite(m.scale)
    _ = (m.rank, m.effective_alpha, m.dora)
    tensors = {k: ref.load() for k, ref in m.params.items()}
    core = {k: v for k, v in tensors.items() if k != "dora_scale"}
    shape = tuple(m.extra["shape"]) if m.resolved else None
    if shape is not None:
        base = torch.randn(shape)
        dw = delta_weight(m.network_type, core, m.alpha, shape, base_weight=base, scale=m.scale)
        assert tuple(dw.shape) == shape
        merged_weight(m.network_type, tensors, m.alpha, base, dora_axis=m.dora_axis)
    if not depends_on_base(m.network_type, set(core)):  # the shape decode checked is the one computed
        dw = delta_weight(m.network_type, core, m.alpha, scale=m.scale)
        shapes = {k: tuple(t.shape) for k, t in core.items()}
        assert tuple(dw.shape) == NETWORK_TYPES[m.network_type].delta_shape(shapes, None)
    delta_bias(m.network_type, core, m.alpha)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=modules(), seed=st.integers(0, 2**16))
def test_load_gives_usable_modules_or_reports_them(case: tuple, seed: int, tmp_path: Path) -> None:
    layer, params, alpha, dora = case
    path = tmp_path / "m.safetensors"
    _write(path, layer, params, alpha, dora, seed)
    try:
        adapter = loratool.load(path, family="sd1")
    except LoraToolError:
        return
    assert _reported(adapter, layer)
    json.dumps(summarize(adapter).to_json(), allow_nan=False)
    for m in adapter.modules.values():
        _exercise(m)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=modules(), seed=st.integers(0, 2**16), target=st.sampled_from(["kohya", "diffusers", "peft"]), dtype=st.sampled_from([None, "fp16"]))
def test_convert_writes_or_refuses(case: tuple, seed: int, target: str, dtype: str | None, tmp_path: Path) -> None:
    layer, params, alpha, dora = case
    work = Path(tempfile.mkdtemp(dir=tmp_path))  # tmp_path is shared by the examples
    path = work / "m.safetensors"
    _write(path, layer, params, alpha, dora, seed)
    out = work / ("p" if target == "peft" else "out.safetensors")
    try:
        result = convert(path, target, out, family="sd1", dtype=dtype, skip_unsupported=True)
    except LoraToolError:
        assert not out.exists()
        return
    assert result.max_abs_diff is not None and math.isfinite(result.max_abs_diff)
    assert len(loratool.load(out, family="sd1").modules) == result.modules

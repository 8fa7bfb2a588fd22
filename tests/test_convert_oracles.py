"""``convert`` proved with the ecosystem's own loaders (issue 3, "Proof in tests").

For every fixture and real-world file a target can hold, loratool converts it, then
diffusers (its pipeline loaders, and its kohya loader on our kohya output) or PEFT
(``PeftModel.from_pretrained`` on each component folder) loads the output into models
built from the published SD1.5/SDXL configs. For every adapted layer the ΔW that
PEFT applies (``get_delta_weight``; for DoRA the merged weight on random base weights)
must equal loratool's own ΔW computed from the *source* file, scale included, and the set
of adapted layers must equal the set of source modules (none missing, none extra).

The models are built on the meta device (real module paths, no weights); only the layers
the adapter targets are materialised (``to_empty``, uninitialised: ΔW of a LoRA layer does
not read the base weight), so real-size UNets cost almost nothing. Tensors are compared
one module at a time so memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from transformers import CLIPTextConfig

from loratool import arch
from loratool.formats.decode import decode
from loratool.io.sources import open_source
from loratool.model import Adapter, AdapterModule
from loratool.networks import delta_weight, merged_weight
from loratool.ops.convert import convert
from tests.conftest import source_path
from tests.test_arch import TE_CONFIGS, UNET_CONFIGS

ADAPTER = "oracle"
PIPELINES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
# Relative tolerance on ΔW: both sides compute in float32 from the same factors; a wrong
# scale, transpose, factor or axis is off by O(1).
RTOL = 2e-5

# (source, --family override or None, family the source belongs to)
LORA_SOURCES: list[tuple[str, str | None]] = [
    ("fixtures/sd15_kohya_lora.safetensors", None),
    ("fixtures/sd15_kohya_locon.safetensors", None),
    ("fixtures/sd15_diffusers.safetensors", None),
    ("fixtures/sd15_peft_te", "sd1"),
    ("fixtures/sdxl_kohya_lora.safetensors", None),
    ("fixtures/sdxl_kohya_diffusers_named.safetensors", None),
    ("fixtures/sdxl_diffusers.safetensors", None),
    ("fixtures/sdxl_peft", None),
    ("realworld/diffusers-attnproc-sd1/pytorch_lora_weights.safetensors", None),
    ("realworld/diffusers-sd15/pytorch_lora_weights.safetensors", None),
    ("realworld/peft-te-sd15", None),
]
DORA_SOURCES: list[tuple[str, str | None]] = [
    ("fixtures/sd15_kohya_dora.safetensors", None),
    ("fixtures/sd15_peft_unet_dora", None),
]
LYCORIS_SOURCES: list[tuple[str, str | None]] = [
    ("fixtures/sd15_kohya_loha.safetensors", None),
    ("fixtures/sd15_kohya_lokr.safetensors", None),
]


def _ids(cases: list[tuple[str, str | None]]) -> list[str]:
    return [Path(n).name.split(".")[0] if "realworld" not in n else n.split("/")[1] for n, _ in cases]


# ---------------------------------------------------------------------------- models


def _unet(family: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**UNET_CONFIGS[family])


def _text_encoder(family: str, component: str) -> torch.nn.Module:
    cls, cfg = TE_CONFIGS[(family, component)]
    with torch.device("meta"):
        return cls(CLIPTextConfig(**cfg))


def _components(family: str) -> list[str]:
    return ["unet", *(c for f, c in TE_CONFIGS if f == family)]


def _model(family: str, component: str) -> torch.nn.Module:
    return _unet(family) if component == "unet" else _text_encoder(family, component)


def _catalog_path(model: torch.nn.Module, component: str, name: str) -> str:
    """Catalog spelling of a model's module path (transformers 5 drops CLIP's ``text_model.``)."""
    if component == "unet" or hasattr(model, "text_model") or name == "text_projection":
        return name
    return f"text_model.{name}"


def _materialise(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter real but uninitialised CPU storage (no page is touched).

    PEFT moves each loaded adapter to its base layer's device, and diffusers moves a text
    encoder to ``text_encoder.device`` after loading, so the meta device cannot stay; the
    base values themselves are never read (ΔW of a LoRA layer does not depend on them).
    """
    return model.to_empty(device="cpu")


def _adapted(model: torch.nn.Module, component: str, adapter: str = ADAPTER) -> dict[tuple[str, str], BaseTunerLayer]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer) and adapter in mod.active_adapters and _has_adapter(mod, adapter):
            out[(component, _catalog_path(model, component, name))] = mod
    return out


def _has_adapter(layer: BaseTunerLayer, adapter: str) -> bool:
    return any(adapter in getattr(layer, n, {}) for n in layer.adapter_layer_names)


@contextmanager
def _strict_loading() -> Iterator[list[str]]:
    """Collect PEFT/diffusers/transformers warnings about keys that did not load.

    PEFT's "missing adapter keys … newly initialized" is only a warning; here it fails.
    """
    caught: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            yield caught
        finally:
            caught.extend(str(x.message) for x in w)
            for lg in loggers:
                lg.removeHandler(handler)


BAD_LOAD = re.compile(r"missing|unexpected|newly initiali[sz]ed|not (been )?(correctly )?(loaded|renamed)|were not used|No LoRA keys", re.I)


def _assert_clean(messages: list[str]) -> None:
    bad = [m for m in messages if BAD_LOAD.search(m)]
    assert not bad, "loader reported keys it did not load:\n" + "\n".join(m[:500] for m in bad)


# ---------------------------------------------------------------------- loratool ΔW


def _decode(path: Path, family: str | None = None) -> tuple[Adapter, object]:
    source = open_source(path)
    return decode(source, family=family), source


def _tensors(m: AdapterModule) -> dict[str, torch.Tensor]:
    return {k: ref.load() for k, ref in m.params.items()}


def _our_delta(m: AdapterModule, family: str) -> torch.Tensor:
    spec = arch.get_catalog(family).get(m.key.component, m.key.path)
    assert spec is not None, f"{m.key} is not in the {family} catalog"
    core = {k: v for k, v in _tensors(m).items() if k != "dora_scale"}
    return delta_weight(m.network_type, core, m.alpha, spec.shape, scale=m.scale)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """max |got − want| ≤ RTOL·max |want| (one pass each; these can be 15M elements)."""
    got = got.detach().to(torch.float32).reshape(want.shape)
    lo, hi = torch.aminmax(want)
    scale = max(-lo.item(), hi.item())
    diff = torch.linalg.vector_norm(got.sub_(want) if got.data_ptr() != want.data_ptr() else got - want, float("inf")).item()
    assert diff <= RTOL * max(scale, 1e-12), f"{what}: max |ΔW_oracle − ΔW_loratool| = {diff:.3g} (max |ΔW| = {scale:.3g})"


def _compare(
    layers: dict[tuple[str, str], BaseTunerLayer], source: Adapter, family: str, *, seed: int = 0
) -> int:
    """Every source module is an adapted layer with the same ΔW (DoRA: same merged weight)."""
    want = {(m.key.component, m.key.path): m for m in source.modules.values()}
    assert set(layers) == set(want), (
        f"adapted layers differ from the source modules: missing {sorted(set(want) - set(layers))[:5]}, "
        f"extra {sorted(set(layers) - set(want))[:5]}"
    )
    gen = torch.Generator().manual_seed(seed)
    for key, m in sorted(want.items()):
        layer = layers[key]
        ours = _our_delta(m, family)
        _close(layer.get_delta_weight(ADAPTER), ours, f"ΔW of {key}")
        if m.dora:
            base = layer.get_base_layer()
            w0 = torch.randn(base.weight.shape, generator=gen)
            with torch.no_grad():
                base.weight.copy_(w0)
            layer.merge(adapter_names=[ADAPTER])
            expected = merged_weight(m.network_type, _tensors(m), m.alpha, w0, dora_axis=m.dora_axis)
            _close(base.weight - w0, expected - w0, f"DoRA merged weight of {key}")
        del ours
    return len(want)


def _convert(src: Path, target: str, out: Path, family: str | None, *, keep_factors: bool = False) -> Path:
    result = convert(src, target, out, family=family, keep_factors=keep_factors)
    # Exact, except where alpha/rank was folded into the factors (rounded when it is not a
    # power of two, or in fp16 subnormals): then within the verification's tolerance.
    assert result.max_abs_diff == 0.0 or (result.folded_modules and result.max_abs_diff is not None)
    return out


def _scale_one_delta(f: object, m: AdapterModule, family: str) -> torch.Tensor:
    """ΔW of a diffusers-file module as a loader that reads ``lora_A``/``lora_B`` but never
    ``lora_adapter_metadata`` applies it (ComfyUI: no ``.alpha`` key → scale 1)."""
    prefix = f"{m.key.component}.{m.key.path}"
    up = f.get_tensor(f"{prefix}.lora_B.weight").to(torch.float32)
    down = f.get_tensor(f"{prefix}.lora_A.weight").to(torch.float32)
    shape = arch.get_catalog(family).get(m.key.component, m.key.path).shape
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def _assert_qv_only_kohya(out: Path, source: Adapter) -> None:
    """Our kohya file for a q/v-only text-encoder adapter is what kohya writes: every
    module as ``lora_te_<path with underscores>`` with the source's factors and alpha."""
    from safetensors.torch import load_file

    written = load_file(out)
    want = {}
    for m in source.modules.values():
        assert m.key.component == "text_encoder" and m.key.path.endswith(("q_proj", "v_proj"))
        name = "lora_te_" + m.key.path.replace(".", "_")
        want[f"{name}.lora_down.weight"] = m.params["lora_down"].load()
        want[f"{name}.lora_up.weight"] = m.params["lora_up"].load()
        want[f"{name}.alpha"] = torch.tensor(m.effective_alpha)
    assert set(written) == set(want)
    for key, tensor in want.items():
        assert torch.equal(written[key].float(), tensor.float()), key


# ------------------------------------------------------------------- diffusers loaders


def _load_with_diffusers(path: Path, family: str, *, kohya: bool = False) -> dict[tuple[str, str], BaseTunerLayer]:
    """``lora_state_dict`` + ``load_lora_into_unet``/``load_lora_into_text_encoder``."""
    pipe = PIPELINES[family]
    layers: dict[tuple[str, str], BaseTunerLayer] = {}
    with _strict_loading() as messages:
        kwargs = {"unet_config": _unet(family).config} if family.startswith("sdxl") else {}
        state_dict, alphas, metadata = pipe.lora_state_dict(str(path), return_lora_metadata=True, **kwargs)
        if kohya:
            assert metadata is None and alphas, "diffusers did not take our kohya file for a kohya file"
        keys = list(state_dict)
        for component in _components(family):
            prefix = component + "."
            mine = [k for k in keys if k.startswith(prefix)]
            if not mine:
                continue
            model = _materialise(_model(family, component))
            if component == "unet":
                pipe.load_lora_into_unet(
                    state_dict, alphas, model, adapter_name=ADAPTER, metadata=metadata, low_cpu_mem_usage=True
                )
            else:
                pipe.load_lora_into_text_encoder(
                    state_dict, alphas, model, prefix=component, adapter_name=ADAPTER, metadata=metadata,
                    low_cpu_mem_usage=True,
                )
            model.to(torch.float32)
            layers.update(_adapted(model, component))
        unclaimed = [k for k in keys if not k.startswith(tuple(c + "." for c in _components(family)))]
        assert not unclaimed, f"diffusers produced keys no component takes: {unclaimed[:5]}"
    _assert_clean(messages)
    return layers


@pytest.mark.parametrize(("name", "family"), LORA_SOURCES + DORA_SOURCES, ids=_ids(LORA_SOURCES + DORA_SOURCES))
def test_diffusers_loads_our_diffusers_output(name: str, family: str | None, tmp_path: Path) -> None:
    """diffusers' own loader on our diffusers file applies exactly loratool's ΔW, per module."""
    src = source_path(name)
    out = _convert(src, "diffusers", tmp_path / "out.safetensors", family)
    source, handle = _decode(src, family)
    try:
        layers = _load_with_diffusers(out, source.family)
        assert _compare(layers, source, source.family) == len(source.modules) > 0
        # alpha folded into the factors: diffusers' scaling is 1 everywhere, and a loader
        # that ignores lora_adapter_metadata gets the same ΔW (issue 7 §9)
        assert {layer.scaling[ADAPTER] for layer in layers.values()} == {1.0}
        with safe_open(out, "pt") as f:
            for m in source.modules.values():
                if not m.dora:
                    _close(_scale_one_delta(f, m, source.family), _our_delta(m, source.family), f"scale-1 ΔW of {m.key}")
    finally:
        handle.close()


@pytest.mark.parametrize("name", ["fixtures/sd15_kohya_lora.safetensors", "fixtures/sdxl_diffusers.safetensors"])
def test_keep_factors_keeps_them_and_only_diffusers_gets_the_strength(name: str, tmp_path: Path) -> None:
    """--keep-factors: bit-identical factors, alpha only in the metadata — right in
    diffusers, off by alpha/rank in a loader that ignores the metadata (why folding is the
    default)."""
    src = source_path(name)
    out = _convert(src, "diffusers", tmp_path / "out.safetensors", None, keep_factors=True)
    source, handle = _decode(src)
    try:
        assert _compare(_load_with_diffusers(out, source.family), source, source.family) == len(source.modules)
        off = [m for m in source.modules.values() if m.scale != 1.0]
        assert off
        with safe_open(out, "pt") as f:
            for m in off:
                _close(_scale_one_delta(f, m, source.family) * m.scale, _our_delta(m, source.family), f"{m.key}")
    finally:
        handle.close()


DIFFUSERS_TE_QV_BUG = (
    "diffusers 0.35.2: a kohya text-encoder LoRA on q_proj/v_proj only becomes 'to_q_lora' keys that "
    "convert_state_dict_to_diffusers cannot classify ('Could not automatically infer state dict type'; it "
    "looks for to_out_lora). Our file is valid kohya; diffusers' loader fails on any such file."
)


# Sources whose kohya output meets DIFFUSERS_TE_QV_BUG (text encoder, q_proj/v_proj only).
# (diffusers drops DoRA's dora_scale and cannot read LoHa/LoKr at all: FORMATS §5.3, §6.8.)
QV_ONLY = {"fixtures/sd15_peft_te", "realworld/peft-te-sd15"}
QV_SYMPTOM = "Could not automatically infer state dict type"


@pytest.mark.parametrize(("name", "family"), LORA_SOURCES, ids=_ids(LORA_SOURCES))
def test_diffusers_kohya_loader_reads_our_kohya_output(name: str, family: str | None, tmp_path: Path) -> None:
    """diffusers' kohya→diffusers conversion (SGM names via the SDXL UNet config) on our
    kohya file gives, with its network alphas, exactly loratool's ΔW for every module."""
    src = source_path(name)
    out = _convert(src, "kohya", tmp_path / "out.safetensors", family)
    source, handle = _decode(src, family)
    try:
        if name in QV_ONLY:
            _assert_qv_only_kohya(out, source)
            with pytest.raises(ValueError, match=QV_SYMPTOM):  # DIFFUSERS_TE_QV_BUG, exactly
                _load_with_diffusers(out, source.family, kohya=True)
            return
        layers = _load_with_diffusers(out, source.family, kohya=True)
        assert _compare(layers, source, source.family) == len(source.modules) > 0
    finally:
        handle.close()


def test_diffusers_sees_sgm_names_in_our_sdxl_kohya_output(tmp_path: Path) -> None:
    """Our SDXL kohya UNet keys are SGM-named, as kohya writes them (FORMATS §6.2)."""
    out = _convert(source_path("fixtures/sdxl_diffusers.safetensors"), "kohya", tmp_path / "k.safetensors", None)
    with safe_open(out, "pt") as f:
        unet = [k for k in f.keys() if k.startswith("lora_unet_")]  # noqa: SIM118
    assert unet
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", k) for k in unet), unet[:3]


# ----------------------------------------------------------------------------- PEFT


def _load_with_peft(folder: Path, family: str, components: list[str]) -> dict[tuple[str, str], BaseTunerLayer]:
    layers: dict[tuple[str, str], BaseTunerLayer] = {}
    with _strict_loading() as messages:
        for component in components:
            sub = folder / component
            model = _materialise(_model(family, component))
            peft_model = PeftModel.from_pretrained(model, sub, adapter_name=ADAPTER, low_cpu_mem_usage=True)
            peft_model.to(torch.float32)
            layers.update(_adapted(peft_model.base_model.model, component))
    _assert_clean(messages)
    return layers


def _peft_case(name: str, family: str | None, tmp_path: Path) -> None:
    src = source_path(name)
    out = _convert(src, "peft", tmp_path / "peft", family)
    source, handle = _decode(src, family)
    try:
        components = sorted({m.key.component for m in source.modules.values()})
        assert sorted(p.name for p in out.iterdir()) == components
        layers = _load_with_peft(out, source.family, components)
        assert _compare(layers, source, source.family) == len(source.modules) > 0
    finally:
        handle.close()


@pytest.mark.parametrize(
    ("name", "family"), LORA_SOURCES + DORA_SOURCES, ids=_ids(LORA_SOURCES + DORA_SOURCES)
)
def test_peft_loads_our_peft_output(name: str, family: str | None, tmp_path: Path) -> None:
    """``PeftModel.from_pretrained`` on each component folder: no missing or unexpected
    adapter key, every layer's ΔW (DoRA: merged weight) equals loratool's."""
    _peft_case(name, family, tmp_path)


@pytest.mark.parametrize(("name", "family"), LYCORIS_SOURCES, ids=_ids(LYCORIS_SOURCES))
def test_peft_loads_our_loha_lokr_output(name: str, family: str | None, tmp_path: Path) -> None:
    """LoHa/LoKr into PEFT's LoHaModel/LoKrModel: shapes follow from ``r``/``rank_pattern``,
    scale is PEFT's alpha/r, and LoKr with both factors full keeps kohya's scale 1."""
    _peft_case(name, family, tmp_path)


def test_peft_lokr_layout_refusal_matches_peft(tmp_path: Path) -> None:
    """The real LyCORIS LoKr puts the larger factor in W1, which PEFT's LoKrModel cannot
    build: convert refuses before writing, and refuses exactly the modules whose factor
    split differs from what PEFT's own ``factorization`` gives for the layer."""
    from peft.tuners.lokr.layer import factorization

    from loratool.errors import ConversionError

    src = source_path("realworld/lycoris-lokr-sd1/smart_falcon_4_lokr.safetensors")
    source, handle = _decode(src)
    try:
        cat = arch.get_catalog(source.family)
        differ = set()
        for m in source.modules.values():
            shape = cat.get(m.key.component, m.key.path).shape
            w1 = m.params["lokr_w1"].shape if "lokr_w1" in m.params else (m.params["lokr_w1_a"].shape[0], m.params["lokr_w1_b"].shape[1])
            if tuple(w1) != (factorization(shape[0])[0], factorization(shape[1])[0]):
                differ.add(m.source_name)
    finally:
        handle.close()
    assert differ
    with pytest.raises(ConversionError, match="LoKr factor split differs from PEFT's") as err:
        convert(src, "peft", tmp_path / "p")
    assert f"{len(differ)} module" in str(err.value)
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------- the sources themselves, read both ways

NATIVE_SOURCES: list[tuple[str, str | None, str]] = [
    ("fixtures/sd15_diffusers.safetensors", None, "diffusers"),
    ("fixtures/sdxl_diffusers.safetensors", None, "diffusers"),
    ("realworld/diffusers-sd15/pytorch_lora_weights.safetensors", None, "diffusers"),
    ("fixtures/sd15_kohya_lora.safetensors", None, "kohya"),
    ("fixtures/sdxl_kohya_lora.safetensors", None, "kohya"),
    ("fixtures/sdxl_kohya_diffusers_named.safetensors", None, "kohya"),
    ("fixtures/sd15_peft_te", "sd1", "peft"),
    ("fixtures/sd15_peft_unet_dora", None, "peft"),
    ("fixtures/sdxl_peft", None, "peft"),
    ("realworld/peft-te-sd15", None, "peft"),
]


@pytest.mark.parametrize(("name", "family", "loader"), NATIVE_SOURCES, ids=[_ids([(n, f)])[0] for n, f, _ in NATIVE_SOURCES])
def test_loratool_reads_sources_as_their_own_tools_do(name: str, family: str | None, loader: str, tmp_path: Path) -> None:
    """Before any conversion: the ΔW loratool computes from a diffusers/kohya/PEFT source
    equals what diffusers or PEFT apply when loading that same source (so the oracle tests
    above compare against the right thing)."""
    src = source_path(name)
    source, handle = _decode(src, family)
    try:
        if loader == "peft":
            component = next(iter({m.key.component for m in source.modules.values()}))
            staged = tmp_path / "staged"
            staged.mkdir()
            (staged / component).symlink_to(src.resolve(), target_is_directory=True)
            layers = _load_with_peft(staged, source.family, [component])
        else:
            layers = _load_with_diffusers(src, source.family, kohya=loader == "kohya")
        assert _compare(layers, source, source.family) == len(source.modules) > 0
    finally:
        handle.close()




def test_loratool_reads_peft_lokr_with_full_factors_at_peft_scale(tmp_path: Path) -> None:
    """A LoKr adapter made by PEFT itself, where PEFT's rank rule keeps both factors full
    and alpha != r: loratool must read the ΔW PEFT applies."""
    from peft import LoKrConfig, get_peft_model

    targets = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"]
    config = LoKrConfig(r=64, alpha=8, target_modules=targets, init_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(_materialise(_unet("sd1")), config, adapter_name=ADAPTER)
    model.save_pretrained(tmp_path / "adapter", selected_adapters=[ADAPTER])
    folder = tmp_path / "adapter" / ADAPTER if (tmp_path / "adapter" / ADAPTER).is_dir() else tmp_path / "adapter"
    layers = _adapted(model.base_model.model, "unet")
    source, handle = _decode(folder, "sd1")
    try:
        assert {m.network_type for m in source.modules.values()} == {"lokr"}
        assert all(m.rank is None for m in source.modules.values()), "PEFT kept both factors full"
        _compare(layers, source, "sd1")
    finally:
        handle.close()
    # kohya has no alpha for full factors: the scale is baked into lokr_w2, and the
    # verification (ΔW recomputed from the written file) holds it to rounding.
    kohya = convert(folder, "kohya", tmp_path / "k.safetensors", family="sd1")
    assert kohya.identical_modules < kohya.modules == 2 and kohya.max_abs_diff is not None
    back, handle = _decode(tmp_path / "k.safetensors", "sd1")
    try:
        assert all("scale" not in m.extra and m.scale == 1.0 for m in back.modules.values())
        _compare(layers, back, "sd1")
    finally:
        handle.close()


def _resized(src: Path, dst: Path) -> Path:
    """A kohya file with per-module ranks and alphas, as kohya's resize_lora leaves them:
    every third module cut to rank 1, every fifth given alpha 0.75."""
    from safetensors.torch import save_file

    with safe_open(src, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    names = sorted({k.split(".")[0] for k in tensors})
    for i, name in enumerate(names):
        if i % 3 == 0:
            tensors[f"{name}.lora_down.weight"] = tensors[f"{name}.lora_down.weight"][:1].clone()
            tensors[f"{name}.lora_up.weight"] = tensors[f"{name}.lora_up.weight"][:, :1].clone()
        if i % 5 == 0:
            tensors[f"{name}.alpha"] = torch.tensor(0.75, dtype=tensors[f"{name}.alpha"].dtype)
    save_file(tensors, dst, meta)
    return dst


DIFFUSERS_KOHYA_ALPHA_BUG = (
    "diffusers 0.35.2 kohya loader: network alphas of attention projections (UNet to_q/k/v/out.0, CLIP "
    "q/k/v/out_proj) are read from our file (lora_state_dict returns them) but keyed by the processor-style "
    "names (to_q_lora), so the alpha_pattern built from them matches no PEFT module and those layers get the "
    "default lora_alpha; ff/proj/mlp alphas are applied. Only files whose alphas vary per module are affected."
)


# The layers DIFFUSERS_KOHYA_ALPHA_BUG hits: attention projections of the UNet and of CLIP.
ATTENTION_PROJECTION = re.compile(r"(attn[12]\.(to_[qkv]|to_out\.0)|self_attn\.(q|k|v|out)_proj)$")


def _compare_with_kohya_alpha_bug(layers: dict[tuple[str, str], BaseTunerLayer], source: Adapter, family: str) -> int:
    """DIFFUSERS_KOHYA_ALPHA_BUG as its exact symptom: an attention projection whose alpha
    is not its component's most common alpha (diffusers' default lora_alpha) gets ΔW ×
    default/alpha; every other layer gets exactly loratool's ΔW."""
    from collections import Counter

    want = {(m.key.component, m.key.path): m for m in source.modules.values()}
    assert set(layers) == set(want)
    default = {
        c: Counter(m.alpha for m in want.values() if m.key.component == c).most_common(1)[0][0]
        for c in {m.key.component for m in want.values()}
    }
    hit = 0
    for key, m in sorted(want.items()):
        factor = 1.0
        if ATTENTION_PROJECTION.search(key[1]) and m.alpha != default[key[0]]:
            factor, hit = default[key[0]] / m.alpha, hit + 1
        _close(layers[key].get_delta_weight(ADAPTER), _our_delta(m, family) * factor, f"ΔW of {key}")
    assert hit > 0, "no layer shows the upstream bug: has diffusers fixed it? compare exactly"
    return len(want)


@pytest.mark.parametrize("target", ["diffusers", "diffusers-keep", "kohya", "peft"])
@pytest.mark.parametrize("name", ["fixtures/sd15_kohya_lora.safetensors", "fixtures/sdxl_kohya_lora.safetensors"])
def test_per_module_ranks_and_alphas_reach_the_oracles(name: str, target: str, tmp_path: Path) -> None:
    """Mixed ranks/alphas go through rank_pattern/alpha_pattern (diffusers --keep-factors,
    PEFT) or network alphas (diffusers' kohya loader) and still give loratool's ΔW
    everywhere. Folded into the factors (diffusers' default), alpha/rank = 0.375 is not a
    power of two, so lora_B is rounded once in fp16: diffusers applies exactly what
    loratool reads from the output, which the verification held to the source."""
    src = _resized(source_path(name), tmp_path / "resized.safetensors")
    source, handle = _decode(src)
    try:
        assert len({m.rank for m in source.modules.values()}) == 2
        assert len({m.alpha for m in source.modules.values()}) == 2
        want = source
        if target == "peft":
            out = _convert(src, "peft", tmp_path / "p", None)
            layers = _load_with_peft(out, source.family, sorted(p.name for p in out.iterdir()))
        else:
            out = _convert(src, target.split("-")[0], tmp_path / "out.safetensors", None, keep_factors=target.endswith("keep"))
            layers = _load_with_diffusers(out, source.family, kohya=target == "kohya")
            if target == "diffusers":
                want, _ = _decode(out)
                assert {m.scale for m in want.modules.values()} == {1.0}
        compare = _compare_with_kohya_alpha_bug if target == "kohya" else _compare
        assert compare(layers, want, source.family) == len(source.modules)
    finally:
        handle.close()


# ------------------------------------------------- SD2 and the SDXL refiner, files built from the models

PIPELINES["sd2"] = StableDiffusionPipeline
SUBSET = re.compile(
    r"^(down_blocks\.1\.attentions\.0\.|down_blocks\.0\.(resnets\.0|downsamplers)\.|mid_block\.|up_blocks\.\d\.upsamplers\.|"
    r"conv_in$|conv_out$|time_embedding\.|add_embedding\.|(text_model\.)?encoder\.layers\.(0|22|31)\.|text_projection$)"
)


NOT_KOHYA_TRAINED = re.compile(r"conv_in$|conv_out$|time_embedding\.|add_embedding\.")


def _synthetic(family: str, fmt: str, dst: Path, *, skip: re.Pattern[str] | None = None) -> Path:
    """A LoRA on a slice of every kind of layer (attention, ff, proj, resnet convs,
    samplers, conv_in/out, time/add embeddings, first/last text-encoder layers), named
    from diffusers'/transformers' own ``named_modules()``: kohya (SD2: 1×1-conv shaped
    proj_in/out as kohya trains SD2) or diffusers PEFT-style, random fp16 factors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
    for component in _components(family):
        model = _model(family, component)
        for path, layer in model.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or not SUBSET.match(path):
                continue
            if skip is not None and skip.match(path):
                continue
            path = _catalog_path(model, component, path)
            out_f, in_f = layer.weight.shape[:2]
            kernel = tuple(layer.weight.shape[2:])
            rank = 4 if out_f % 2 else 2  # two ranks in one file
            down = torch.randn(rank, in_f, *kernel, generator=gen) / in_f**0.5
            up = torch.randn(out_f, rank, *([1, 1] if kernel else []), generator=gen) / rank
            if fmt == "kohya":
                name = f"{prefixes[component]}_{path.replace('.', '_')}"
                if family == "sd2" and path.endswith(("proj_in", "proj_out")):
                    down, up = down[..., None, None], up[..., None, None]
                tensors[f"{name}.lora_down.weight"] = down.half()
                tensors[f"{name}.lora_up.weight"] = up.half()
                tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2).half()
            else:
                tensors[f"{component}.{path}.lora_A.weight"] = down.half()
                tensors[f"{component}.{path}.lora_B.weight"] = up.half()
    save_file(tensors, dst, {"ss_network_module": "networks.lora"} if fmt == "kohya" else {"format": "pt"})
    return dst


REFINER_TE_PREFIX = (
    "by design in loratool.arch.families (sdxl-refiner kohya_prefixes=('lora_te', 'lora_te2')): the refiner's "
    "bigG encoder is written as lora_te_ (what ComfyUI maps to clip_g without a clip_l), and diffusers maps "
    "lora_te_ to text_encoder, which the refiner pipeline lacks, so diffusers loads none of it. Also a diffusers "
    "0.35.2 bug: _maybe_map_sgm_blocks_to_diffusers maps SGM inner index 1 to 'attentions', so the refiner's "
    "attention-less up level (output_blocks_2_1_conv = up_blocks.0.upsamplers.0.conv, correct LDM naming) is "
    "silently dropped"
)


@pytest.mark.parametrize("target", ["diffusers", "peft", "kohya"])
@pytest.mark.parametrize(("family", "fmt"), [("sd2", "kohya"), ("sdxl-refiner", "diffusers")])
def test_sd2_and_refiner_files_reach_the_oracles(
    family: str, fmt: str, target: str, tmp_path: Path
) -> None:
    """SD2 (23-layer OpenCLIP-H, linear proj stored 1×1-conv shaped) and the SDXL refiner
    (bigG as ``text_encoder_2`` only): detected, converted, and loaded by diffusers/PEFT
    with loratool's ΔW in every module, conv_in/out and embeddings included."""
    if family == "sdxl-refiner":
        from diffusers import StableDiffusionXLImg2ImgPipeline

        PIPELINES[family] = StableDiffusionXLImg2ImgPipeline
    # diffusers' kohya loader drops (SD1/SD2) or rejects (SGM: "label_emb … not supported")
    # LoRA on layers kohya's trainer never targets, so its file leaves them out.
    skip = NOT_KOHYA_TRAINED if target == "kohya" else None
    src = _synthetic(family, fmt, tmp_path / "src.safetensors", skip=skip)
    source, handle = _decode(src)
    try:
        assert source.family == family and not source.unknown_keys
        if target == "peft":
            out = _convert(src, "peft", tmp_path / "p", None)
            layers = _load_with_peft(out, family, sorted(p.name for p in out.iterdir()))
        elif family == "sdxl-refiner" and target == "kohya":
            out = _convert(src, target, tmp_path / "out.safetensors", None)
            layers, source = _refiner_kohya_symptoms(out, source)
        else:
            out = _convert(src, target, tmp_path / "out.safetensors", None)
            layers = _load_with_diffusers(out, family, kohya=target == "kohya")
        assert _compare(layers, source, family) == len(source.modules) > 30
    finally:
        handle.close()


def _refiner_kohya_symptoms(out: Path, source: Adapter) -> tuple[dict[tuple[str, str], BaseTunerLayer], Adapter]:
    """REFINER_TE_PREFIX as its exact symptoms, on our refiner kohya file: diffusers files
    every bigG module under ``text_encoder`` (which the refiner lacks) and drops exactly
    ``up_blocks.0.upsamplers.0.conv``. Returns the UNet layers it does load, and the
    source reduced to what they must equal."""
    import dataclasses

    family, pipe = "sdxl-refiner", PIPELINES["sdxl-refiner"]
    dropped = ("unet", "up_blocks.0.upsamplers.0.conv")
    with _strict_loading() as messages:
        state_dict, alphas = pipe.lora_state_dict(str(out), unet_config=_unet(family).config)
        te2 = [m for m in source.modules.values() if m.key.component == "text_encoder_2"]
        te_modules = [k for k in state_dict if k.startswith("text_encoder.") and k.endswith("down.weight")]
        assert te2 and len(te_modules) == len(te2)
        assert not [k for k in state_dict if not k.startswith(("unet.", "text_encoder."))]
        unet = _materialise(_model(family, "unet"))
        unet_sd = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
        pipe.load_lora_into_unet(unet_sd, alphas, unet, adapter_name=ADAPTER, low_cpu_mem_usage=True)
        unet.to(torch.float32)
        layers = _adapted(unet, "unet")
    _assert_clean(messages)
    assert any((m.key.component, m.key.path) == dropped for m in source.modules.values())
    assert dropped not in layers
    kept = {k: m for k, m in source.modules.items() if m.key.component == "unet" and (m.key.component, m.key.path) != dropped}
    return layers, dataclasses.replace(source, modules=kept)


# ------------------------------------------------------------------ LyCORIS on our kohya output

LYCORIS_413_SPLIT = (
    "lycoris-lora 4.1.3 LokrModule.make_module_from_state_dict re-derives the factor split and builds "
    "W1 48x.. where this file (older LyCORIS, larger factor in W1) holds 64x..: copy_ fails on the source "
    "file too; our kohya output is byte-identical to it (test_convert round trip)"
)
KOHYA_LYCORIS_SOURCES: list = [
    ("fixtures/sd15_kohya_loha.safetensors", None),
    ("fixtures/sd15_kohya_lokr.safetensors", None),
    ("fixtures/sd15_kohya_locon.safetensors", None),
]
LYCORIS_SPLIT_SYMPTOM = re.compile(r"The size of tensor a \(\d+\) must match the size of tensor b \(\d+\)")


def _lycoris_layers(family: str) -> dict[str, torch.nn.Module]:
    """Flattened ``named_modules()`` names -> layers, as LyCORIS' network names them."""
    unet = _materialise(_unet(family))
    te = _materialise(_text_encoder(family, "text_encoder"))
    layers = {f"lora_unet_{n}".replace(".", "_"): mod for n, mod in unet.named_modules()}
    layers.update({f"lora_te_{n}".replace(".", "_"): mod for n, mod in te.named_modules()})
    return layers


def test_lycoris_413_cannot_build_the_real_lokr_file_nor_our_identical_copy(tmp_path: Path) -> None:
    """LYCORIS_413_SPLIT as its exact symptom: our kohya output holds the source's tensors
    unchanged, and LyCORIS' make_module fails on every module of the *source* file (and so
    of ours) with the same size mismatch."""
    pytest.importorskip("lycoris")
    from lycoris.modules import get_module, make_module
    from safetensors.torch import load_file

    src = source_path("realworld/lycoris-lokr-sd1/smart_falcon_4_lokr.safetensors")
    out = _convert(src, "kohya", tmp_path / "k.safetensors", None)
    original, ours = load_file(src), load_file(out)
    assert set(original) == set(ours) and all(torch.equal(original[k], ours[k]) for k in original)
    layers = _lycoris_layers("sd1")
    for weights in (original, ours):
        failures = {}
        names = sorted({k.split(".")[0] for k in weights})
        for lora_name in names:
            with pytest.raises(RuntimeError) as err:
                make_module(*get_module(weights, lora_name), lora_name, layers[lora_name])
            failures[lora_name] = str(err.value).splitlines()[0]
        assert len(failures) == len(names) == 350
        assert all(LYCORIS_SPLIT_SYMPTOM.search(msg) for msg in failures.values())


@pytest.mark.parametrize(
    ("name", "family"), KOHYA_LYCORIS_SOURCES, ids=["sd15_kohya_loha", "sd15_kohya_lokr", "sd15_kohya_locon"],
)
def test_lycoris_loads_our_kohya_output(name: str, family: str | None, tmp_path: Path) -> None:
    """LyCORIS' own loading steps (those of ``create_network_from_weights``: flattened
    ``named_modules()`` names, ``get_module`` + ``make_module`` on the file's tensors) take
    every module of our kohya file, and each ``get_diff_weight`` equals loratool's ΔW from
    the source (LoKr full factors: scale 1). Its network class itself asserts on
    diffusers' UNet (``duplicated lora name``), so the per-module steps are called directly."""
    pytest.importorskip("lycoris")
    from lycoris.modules import LoConModule, get_module, make_module
    from safetensors.torch import load_file

    src = source_path(name)
    out = _convert(src, "kohya", tmp_path / "k.safetensors", family)
    source, handle = _decode(src, family)
    try:
        fam = source.family
        unet = _materialise(_unet(fam))
        te = _materialise(_text_encoder(fam, "text_encoder"))
        by_name = {f"lora_unet_{n}".replace(".", "_"): ("unet", n) for n, _ in unet.named_modules()}
        by_name.update(
            {f"lora_te_{n}".replace(".", "_"): ("text_encoder", _catalog_path(te, "text_encoder", n)) for n, _ in te.named_modules()}
        )
        layers = {f"lora_unet_{n}".replace(".", "_"): mod for n, mod in unet.named_modules()}
        layers.update({f"lora_te_{n}".replace(".", "_"): mod for n, mod in te.named_modules()})
        weights = load_file(out)
        loaded = {}
        for lora_name in sorted({k.split(".")[0] for k in weights}):
            assert lora_name in layers, f"LyCORIS finds no module named {lora_name}"
            module = make_module(*get_module(weights, lora_name), lora_name, layers[lora_name])
            assert module is not None, lora_name
            module.multiplier = 1.0
            loaded[by_name[lora_name]] = module
        want = {(m.key.component, m.key.path): m for m in source.modules.values()}
        assert set(loaded) == set(want), sorted(set(want) ^ set(loaded))[:5]
        for key, m in sorted(want.items()):
            ours = _our_delta(m, fam)
            module = loaded[key]
            if isinstance(module, LoConModule):
                diff, _ = module.get_diff_weight(multiplier=1)
            else:
                # lycoris-lora 4.1.3: LoHa/LoKr get_weight() already applies self.scale and
                # get_diff_weight() multiplies by it again (scale², a LyCORIS bug), so the
                # once-scaled weight is read from get_weight().
                diff = module.get_weight(tuple(ours.shape))
            _close(diff, ours, f"LyCORIS ΔW of {key}")
    finally:
        handle.close()


# ------------------------------------- diffusers' save_lora_adapter: metadata without a prefix

SAVED_TARGETS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
]


def _saved_by_unet(folder: Path, r: int = 4, lora_alpha: int = 16) -> tuple[Path, dict[tuple[str, str], BaseTunerLayer]]:
    """A UNet LoRA saved by diffusers' own ``UNet2DConditionModel.save_lora_adapter``: bare
    ``down_blocks…lora_A/B`` keys, ``lora_adapter_metadata`` without a component prefix.
    Returns the file and the adapted layers of the model that saved it (the ground truth)."""
    from peft import LoraConfig

    unet = _materialise(_unet("sd1"))
    torch.manual_seed(3)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=SAVED_TARGETS, init_lora_weights=False), adapter_name=ADAPTER)
    unet.save_lora_adapter(str(folder), adapter_name=ADAPTER)
    return folder / "pytorch_lora_weights.safetensors", _adapted(unet, "unet")


def _load_with_unet(path: Path, prefix: str | None) -> dict[tuple[str, str], BaseTunerLayer]:
    """``UNet2DConditionModel.load_lora_adapter``, diffusers' model-level loader."""
    unet = _materialise(_unet("sd1"))
    with _strict_loading() as messages:
        unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=prefix, adapter_name=ADAPTER)
    _assert_clean(messages)
    return _adapted(unet, "unet")


def test_unprefixed_diffusers_metadata_alpha_is_read_as_diffusers_reads_it(tmp_path: Path) -> None:
    """loratool reads the alpha of a ``save_lora_adapter`` file (it used to drop it: scale 1,
    a silent 4× error here), equal to the model that saved it and to ``load_lora_adapter``;
    diffusers' pipeline loader loads none of it, and inspect says so."""
    src, truth = _saved_by_unet(tmp_path / "saved")
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["lora_alpha"] == 16 and meta["r"] == 4 and not any("." in k for k in meta)
    source, handle = _decode(src.parent, "sd1")
    try:
        assert {m.alpha for m in source.modules.values()} == {16.0}
        assert {m.scale for m in source.modules.values()} == {4.0}
        assert any("no component prefix" in w and "load_lora_weights" in w for w in source.warnings)
        assert _compare(truth, source, "sd1") == len(SAVED_TARGETS)
        assert _compare(_load_with_unet(src, None), source, "sd1") == len(SAVED_TARGETS)
        # The pipeline loader (lora_state_dict + load_lora_into_unet) finds no 'unet.' key.
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(src), return_lora_metadata=True)
        unet = _materialise(_unet("sd1"))
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, adapter_name=ADAPTER, metadata=metadata)
        assert not _adapted(unet, "unet")
    finally:
        handle.close()


def test_our_diffusers_output_of_a_saved_adapter_loads_in_both_diffusers_loaders(tmp_path: Path) -> None:
    """convert --to diffusers writes 'unet.'-prefixed keys and metadata: the pipeline loader
    and the model loader (prefix='unet') both apply the saving model's ΔW, scale 4 included."""
    src, truth = _saved_by_unet(tmp_path / "saved")
    out = tmp_path / "out.safetensors"
    result = convert(src.parent, "diffusers", out, family="sd1")
    assert result.modules == len(SAVED_TARGETS) and result.max_abs_diff is not None
    written, handle = _decode(out, "sd1")
    try:
        assert not written.warnings
        assert _compare(truth, written, "sd1") == len(SAVED_TARGETS)
        assert _compare(_load_with_diffusers(out, "sd1"), written, "sd1") == len(SAVED_TARGETS)
        assert _compare(_load_with_unet(out, "unet"), written, "sd1") == len(SAVED_TARGETS)
    finally:
        handle.close()

"""Encode a normalised :class:`Adapter` as kohya, diffusers or PEFT output files.

An encoder turns modules into :class:`OutputFile` plans (keys, dtypes, shapes and lazy
producers); nothing is read until the writer streams the plan to disk. Each target
states per module whether it can hold it (:func:`unsupported_reason`), so ``convert``
can refuse before writing anything.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from loratool.arch import Catalog, ModuleSpec
from loratool.formats.peft_layout import (
    PEFT_TYPES,
    components,
    lokr_mismatch,
    peft_adapter_conflicts,
    peft_config,
)
from loratool.io.writer import OutTensor
from loratool.model import Adapter, AdapterModule, TensorRef

if TYPE_CHECKING:
    import torch

TARGETS = ("kohya", "diffusers", "peft")
DTYPES: dict[str, str] = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# kohya/LyCORIS parameters written with a ``.weight`` suffix; all others are bare.
KOHYA_WEIGHT_SUFFIX = frozenset({"lora_down", "lora_up", "lora_mid", "a1", "a2", "b1", "b2", "bm"})
# PEFT-style names for LoRA parameters (diffusers single files and PEFT folders).
PEFT_LORA_KEYS: dict[str, str] = {
    "lora_down": "lora_A.weight",
    "lora_up": "lora_B.weight",
    "lora_up_bias": "lora_B.bias",
    "dora_scale": "lora_magnitude_vector",
}
DIFFUSERS_TYPES = frozenset({"lora", "locon"})
# family -> modelspec.architecture stem and ss_base_model_version (kohya's spellings).
MODELSPEC_ARCH: dict[str, str] = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
}
BASE_MODEL_VERSION: dict[str, str] = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sdxl-refiner": "sdxl_refiner_v1-0"}
# Metadata that no longer holds once tensors are rewritten.
STALE_METADATA = frozenset({"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "lora_adapter_metadata"})


@dataclass
class OutputFile:
    """One file to write: path relative to the output, tensors, header metadata, side JSON."""

    relpath: str
    tensors: list[OutTensor]
    metadata: dict[str, str]
    config: dict[str, Any] | None = None  # adapter_config.json written beside it
    hash_key: str | None = None


@dataclass
class EncodeOptions:
    dtype: str | None = None  # safetensors dtype to cast float tensors to; None keeps each
    extra_metadata: dict[str, str] = field(default_factory=dict)
    # diffusers: keep the factors bit-identical, alpha only in lora_adapter_metadata
    # (loaders that ignore that metadata then apply another strength); default: fold.
    keep_factors: bool = False


def folds_alpha(target: str, m: AdapterModule, opts: EncodeOptions) -> bool:
    """Whether ``target`` output multiplies this module's scale into its factors: diffusers
    files, unless ``keep_factors``, for every module whose scale is not 1."""
    return target == "diffusers" and not opts.keep_factors and m.scale != 1.0


def split_scale(scale: float) -> tuple[float, float]:
    """(for lora_down, for lora_up), whose product is exactly ``scale``: its power of two
    split between the factors (exact in floating point barring under/overflow, and each
    factor's exponent moves half as far), the rest of its mantissa on lora_up (one
    rounding when ``scale`` is not a power of two)."""
    mantissa, exponent = math.frexp(scale)  # scale = mantissa · 2^exponent, |mantissa| in [0.5, 1)
    down = exponent // 2
    return math.ldexp(1.0, down), math.ldexp(mantissa, exponent - down)


def _times(factor: float, same_dtype: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Multiply by ``factor`` with one rounding to the dtype written: in the tensor's own
    dtype when it is kept (CPU half/bfloat16 arithmetic computes in float32 and rounds
    once), else in float32/64 before the cast. F8 has no arithmetic kernels: float32."""

    def scaled(t: torch.Tensor) -> torch.Tensor:
        import torch

        native = (torch.float16, torch.bfloat16) if same_dtype else ()
        return (t if t.dtype in (*native, torch.float32, torch.float64) else t.float()) * factor

    return scaled


def _folded(m: AdapterModule, opts: EncodeOptions) -> tuple[AdapterModule, dict[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The module with its scale moved into the factors (alpha = rank, scale 1), and the
    tensor transforms that do it (the bias is scaled like ΔW)."""
    down, up = split_scale(m.scale)
    transforms = {
        name: _times(f, _cast(m.params[name], opts.dtype) == m.params[name].dtype)
        for name, f in (("lora_down", down), ("lora_up", up), ("lora_up_bias", m.scale))
        if f != 1.0 and name in m.params
    }
    return replace(m, alpha=None), transforms


def unsupported_reason(target: str, module: AdapterModule) -> str | None:
    """Why ``target`` cannot hold ``module`` losslessly, or None when it can."""
    params = set(module.params)
    if target == "kohya":
        if "lora_up_bias" in params:
            return "kohya files have no LoRA bias (PEFT lora_bias)"
        if params & {"ia3_l", "oft_r"}:
            return "PEFT IA3/OFT parameterisations have no kohya spelling"
        return None
    if target == "diffusers" and module.network_type not in DIFFUSERS_TYPES:
        return f"diffusers LoRA files cannot hold {module.network_type.upper()}"
    if target == "peft" and module.network_type not in PEFT_TYPES:
        return f"PEFT has no {module.network_type.upper()} layout that matches LyCORIS"
    if "lora_mid" in params:
        return "Tucker (lora_mid) LoCon has no PEFT/diffusers layout"
    if target == "peft" and module.network_type == "lokr":
        why = lokr_mismatch(module)
        if why:
            return why
    if module.dora and module.network_type not in DIFFUSERS_TYPES:
        return f"PEFT has no DoRA for {module.network_type.upper()}"
    if module.dora and module.dora_axis == "in":
        return "DoRA normalised per input column (older LyCORIS) cannot be expressed as PEFT's per-row magnitude"
    return None


def _cast(ref: TensorRef, dtype: str | None) -> str:
    return dtype if dtype and ref.dtype in FLOAT_DTYPES else ref.dtype


def _producer(
    ref: TensorRef, shape: tuple[int, ...], dtype: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Callable[[], torch.Tensor | bytes]:
    """Stored bytes as they are when nothing changes (no torch needed), else a tensor."""

    def produce() -> torch.Tensor | bytes:
        if fn is None and dtype == ref.dtype:
            raw = ref.raw()
            if raw is not None:
                return raw
        import torch

        from loratool.io.safetensors import TORCH_DTYPES

        t = ref.load()
        if fn is not None:
            t = fn(t)
        return t.reshape(shape).to(getattr(torch, TORCH_DTYPES[dtype]))

    return produce


def _lora_shape(param: str, ref: TensorRef, spec: ModuleSpec | None) -> tuple[int, ...]:
    """Shape of a LoRA factor for the target layer: 2-D for Linear, 4-D for Conv2d."""
    shape = ref.shape
    if spec is None or param not in ("lora_down", "lora_up"):
        return shape
    if spec.kind == "linear" and len(shape) == 4 and shape[2:] == (1, 1):
        return shape[:2]
    if spec.kind == "conv" and len(shape) == 2:
        return (*shape, 1, 1)
    return shape


def _dora_shape(target: str, m: AdapterModule, spec: ModuleSpec | None) -> tuple[int, ...]:
    ref = m.params["dora_scale"]
    n = 1
    for d in ref.shape:
        n *= d
    conv = spec.kind == "conv" if spec else len(m.params["lora_up"].shape) == 4 if "lora_up" in m.params else False
    if m.dora_axis == "in":
        return (1, n, 1, 1) if conv else (1, n)
    if target == "kohya":
        return (n, 1, 1, 1) if conv else (n, 1)
    return (1, n, 1, 1) if conv else (n,)


def _module_tensors(
    target: str, m: AdapterModule, spec: ModuleSpec | None, prefix: str, names: Callable[[str], str],
    opts: EncodeOptions, transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> list[OutTensor]:
    out = []
    for param, ref in sorted(m.params.items()):
        shape = _dora_shape(target, m, spec) if param == "dora_scale" else _lora_shape(param, ref, spec)
        dtype = _cast(ref, opts.dtype)
        fn = (transforms or {}).get(param)
        unchanged = fn is None and dtype == ref.dtype
        out.append(OutTensor(
            f"{prefix}.{names(param)}", dtype, shape, _producer(ref, shape, dtype, fn),
            copy_from=ref.location if unchanged else None,
        ))
    return out


def _baked_scale(m: AdapterModule) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """kohya ignores alpha on a LoKr with both factors full (scale 1): a source scale
    other than 1 (PEFT's alpha/r) is multiplied into ``lokr_w2``."""
    scale = m.extra.get("scale")
    if scale is None or scale == 1.0 or "lokr_w2" not in m.params:
        return {}
    return {"lokr_w2": lambda t: t.float() * scale}


def _kohya_param(param: str) -> str:
    return f"{param}.weight" if param in KOHYA_WEIGHT_SUFFIX else param


def _alpha_tensor(key: str, alpha: float) -> OutTensor:
    """A float32 scalar, packed without torch (a conversion that copies every factor as
    stored then never imports it; decode refuses alphas beyond float32)."""
    data = struct.pack("<f", alpha)
    return OutTensor(key, "F32", (), lambda: data)


def encode_kohya(adapter: Adapter, modules: list[AdapterModule], catalog: Catalog, opts: EncodeOptions) -> list[OutputFile]:
    """One ``.safetensors`` with kohya names (SGM for the SDXL UNet), float32 alphas."""
    tensors: list[OutTensor] = []
    for m in modules:
        spec = catalog.get(m.key.component, m.key.path) if m.resolved else None
        name = catalog.kohya_name(spec) if spec else m.source_name
        tensors += _module_tensors("kohya", m, spec, name, _kohya_param, opts, _baked_scale(m))
        alpha = m.effective_alpha
        if alpha is not None and _uses_alpha(m):
            tensors.append(_alpha_tensor(f"{name}.alpha", alpha))
    return [OutputFile("", tensors, _kohya_metadata(adapter, modules, opts), hash_key="sshs_model_hash")]


def _uses_alpha(m: AdapterModule) -> bool:
    from loratool.networks import NETWORK_TYPES

    return NETWORK_TYPES[m.network_type].uses_alpha


def _kohya_metadata(adapter: Adapter, modules: list[AdapterModule], opts: EncodeOptions) -> dict[str, str]:
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith(("ss_", "modelspec.", "sshs_")) and k not in STALE_METADATA}
    plain = all(m.network_type in ("lora", "locon") and not m.dora for m in modules)
    if adapter.format != "kohya" or "ss_network_module" not in meta:
        meta["ss_network_module"] = "networks.lora" if plain else "lycoris.kohya"
    ranks = Counter(m.rank for m in modules if m.rank is not None)
    alphas = Counter(m.effective_alpha for m in modules if m.rank is not None)
    if ranks:
        meta.setdefault("ss_network_dim", str(ranks.most_common(1)[0][0]))
        meta.setdefault("ss_network_alpha", str(alphas.most_common(1)[0][0]))
    meta.setdefault("ss_base_model_version", BASE_MODEL_VERSION[adapter.family])
    meta.setdefault("ss_v2", str(adapter.family == "sd2"))
    arch = meta.get("modelspec.architecture", MODELSPEC_ARCH[adapter.family])
    meta["modelspec.architecture"] = arch.split("/")[0] + "/lora"
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    meta.setdefault("modelspec.implementation", "https://github.com/Stability-AI/generative-models")
    meta.update(opts.extra_metadata)
    return meta


def encode_diffusers(adapter: Adapter, modules: list[AdapterModule], catalog: Catalog, opts: EncodeOptions) -> list[OutputFile]:
    """One ``.safetensors`` with ``unet.``/``text_encoder.``… + ``lora_A``/``lora_B`` keys and
    the rank/alpha information in ``lora_adapter_metadata`` as diffusers writes it
    (component-prefixed, what the pipeline loader reads).

    Each module's scale (alpha/rank) is folded into its factors and written as
    ``lora_alpha = r`` (:func:`split_scale`), so that loaders which read the
    ``lora_A``/``lora_B`` keys but never that metadata (ComfyUI) apply the same strength
    as diffusers; ``opts.keep_factors`` keeps the factors bit-identical instead."""
    tensors: list[OutTensor] = []
    packed: dict[str, Any] = {}
    alphas: Counter[float] = Counter()
    for component, mods in components(modules).items():
        written = []
        for m in mods:
            spec = catalog.get(m.key.component, m.key.path)
            transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
            if folds_alpha("diffusers", m, opts):
                m, transforms = _folded(m, opts)
            written.append(m)
            tensors += _module_tensors(
                "diffusers", m, spec, f"{component}.{m.key.path}", PEFT_LORA_KEYS.__getitem__, opts, transforms
            )
        packed.update({f"{component}.{k}": v for k, v in peft_config(written).items()})
        alphas.update(m.effective_alpha for m in written if m.rank is not None)
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith(("ss_", "modelspec.")) and k not in STALE_METADATA}
    if "ss_network_alpha" in meta and alphas:  # folded alphas are ranks now: keep the header true
        meta["ss_network_alpha"] = str(alphas.most_common(1)[0][0])
    meta.update({"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True, allow_nan=False)}, **opts.extra_metadata)
    return [OutputFile("", tensors, meta)]


def encode_peft(adapter: Adapter, modules: list[AdapterModule], catalog: Catalog, opts: EncodeOptions) -> list[OutputFile]:
    """One PEFT adapter folder per component (``unet/``, ``text_encoder/``…)."""
    files = []
    base = (adapter.config or {}).get("base_model_name_or_path")
    for component, mods in components(modules).items():
        tensors: list[OutTensor] = []
        for m in mods:
            spec = catalog.get(m.key.component, m.key.path)
            names = PEFT_LORA_KEYS.__getitem__ if m.network_type in DIFFUSERS_TYPES else str
            tensors += _module_tensors("peft", m, spec, f"base_model.model.{m.key.path}", names, opts)
        meta = {"format": "pt"}
        meta.update(opts.extra_metadata)
        files.append(OutputFile(f"{component}/adapter_model.safetensors", tensors, meta, peft_config(mods, base)))
    return files


ENCODERS: dict[str, Callable[[Adapter, list[AdapterModule], Catalog, EncodeOptions], list[OutputFile]]] = {
    "kohya": encode_kohya,
    "diffusers": encode_diffusers,
    "peft": encode_peft,
}


def writes_directory(target: str) -> bool:
    return target == "peft"


__all__ = [
    "DTYPES", "ENCODERS", "TARGETS", "EncodeOptions", "OutputFile", "folds_alpha", "peft_adapter_conflicts",
    "split_scale", "unsupported_reason",
]

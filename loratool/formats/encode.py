"""Encode a normalised :class:`Adapter` as kohya, diffusers or PEFT output files.

An encoder turns modules into :class:`OutputFile` plans (keys, dtypes, shapes and lazy
producers); nothing is read until the writer streams the plan to disk. Each target
states per module whether it can hold it (:func:`unsupported_reason`), so ``convert``
can refuse before writing anything.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loratool.arch import Catalog, ModuleSpec, kohya_prefixes
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
# Network types each PEFT-style target holds, with PEFT's peft_type and alpha field.
PEFT_TYPES: dict[str, tuple[str, str]] = {
    "lora": ("LORA", "lora_alpha"),
    "locon": ("LORA", "lora_alpha"),
    "loha": ("LOHA", "alpha"),
    "lokr": ("LOKR", "alpha"),
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
        why = _peft_lokr_mismatch(module)
        if why:
            return why
    if module.dora and module.network_type not in DIFFUSERS_TYPES:
        return f"PEFT has no DoRA for {module.network_type.upper()}"
    if module.dora and module.dora_axis == "in":
        return "DoRA normalised per input column (older LyCORIS) cannot be expressed as PEFT's per-row magnitude"
    return None


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS/PEFT LoKr split of ``dimension`` into (m, n), m ≤ n, m·n = dimension, m
    closest to ``factor`` (−1: to √dimension), the rule PEFT builds its factors from."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _peft_lokr_mismatch(m: AdapterModule) -> str | None:
    """Why PEFT's LoKrModel (``decompose_factor=-1``) would build other factor shapes.

    PEFT derives each factor's shape from the layer (``factorization(out)``,
    ``factorization(in)``, smaller factor in W1) and decides full vs low-rank from ``r``:
    W2 is low-rank iff r < max(W2 dims)/2, W1 iff ``decompose_both`` and r < max(W1 dims)/2.
    """
    shape = m.extra.get("shape")
    s = {k: v.shape for k, v in m.params.items()}
    if not shape or len(shape) < 2:
        return None
    w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
    (out_l, out_k), (in_m, in_n) = factorization(shape[0]), factorization(shape[1])
    if tuple(w1[:2]) != (out_l, in_m):
        return "LoKr factor split differs from PEFT's (PEFT derives it from the layer, smaller factor in W1)"
    r = m.rank or _full_rank(m)
    w2_low = "lokr_w2" not in s
    if w2_low != (r < max(out_k, in_n) / 2):
        return f"LoKr {'low-rank' if w2_low else 'full'} W2 where PEFT's rank rule (r < max(W2 dims)/2) builds the other"
    if "lokr_w1_a" in s and not r < max(out_l, in_m) / 2:
        return "LoKr low-rank W1 where PEFT's rank rule (r < max(W1 dims)/2) builds it full"
    return None


# PEFT LoHa/LoKr settings that hold for a whole adapter: (type, flag, says-yes, needs-it).
# ``needs-it`` tells whether a module agrees only if the flag is on (None: indifferent).
def _lokr_w1_needs_decompose(m: AdapterModule) -> bool | None:
    if "lokr_w1_a" in m.params:
        return True
    shape = m.extra.get("shape")
    if not shape or len(shape) < 2:
        return None
    r = m.rank or _full_rank(m)
    w1 = m.params["lokr_w1"].shape
    # full W1 stays full under decompose_both only when r >= max(W1 dims)/2
    return None if r >= max(w1[0], w1[1]) / 2 else False


def _tucker_needs_effective_conv(tucker_param: str) -> Callable[[AdapterModule], bool | None]:
    def needs(m: AdapterModule) -> bool | None:
        shape = m.extra.get("shape")
        if not shape or len(shape) != 4 or tuple(shape[2:]) == (1, 1):
            return None  # PEFT applies the flag to convs with a kernel only
        return tucker_param in m.params

    return needs


ADAPTER_WIDE_FLAGS: list[tuple[str, str, Callable[[AdapterModule], bool | None]]] = [
    ("lokr", "decompose_both", _lokr_w1_needs_decompose),
    ("lokr", "use_effective_conv2d", _tucker_needs_effective_conv("lokr_t2")),
    ("loha", "use_effective_conv2d", _tucker_needs_effective_conv("hada_t1")),
]


def peft_adapter_conflicts(modules: list[AdapterModule]) -> dict[str, str]:
    """Modules PEFT would build differently because a LoHa/LoKr setting is adapter-wide.

    Per component and flag, the setting that fits more modules wins; the others are
    returned as ``{module: reason}`` (PEFT would refuse their shapes on load)."""
    refused: dict[str, str] = {}
    for component, mods in _components(modules).items():
        for ntype, flag, needs in ADAPTER_WIDE_FLAGS:
            votes = [(m, needs(m)) for m in mods if m.network_type == ntype]
            yes = [m for m, v in votes if v is True]
            no = [m for m, v in votes if v is False]
            if yes and no:
                losers, setting = (no, True) if len(yes) >= len(no) else (yes, False)
                for m in losers:
                    refused[m.source_name or str(m.key)] = (
                        f"PEFT's {flag} is one setting for all of {component}; it must be {setting} "
                        f"for most {ntype.upper()} modules there, which builds this one differently"
                    )
    return refused


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
    def produce() -> torch.Tensor:
        import torch

        return torch.tensor(alpha, dtype=torch.float32)

    return OutTensor(key, "F32", (), produce)


def effective_alpha(m: AdapterModule) -> float | None:
    """Kohya alpha with 'absent' made explicit as the rank (None for rank-less types)."""
    if m.alpha is not None:
        return m.alpha
    rank = m.rank
    return float(rank) if rank is not None else None


def encode_kohya(adapter: Adapter, modules: list[AdapterModule], catalog: Catalog, opts: EncodeOptions) -> list[OutputFile]:
    """One ``.safetensors`` with kohya names (SGM for the SDXL UNet), float32 alphas."""
    tensors: list[OutTensor] = []
    for m in modules:
        spec = catalog.get(m.key.component, m.key.path) if m.resolved else None
        name = catalog.kohya_name(spec) if spec else m.source_name
        tensors += _module_tensors("kohya", m, spec, name, _kohya_param, opts, _baked_scale(m))
        alpha = effective_alpha(m)
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
    alphas = Counter(effective_alpha(m) for m in modules if m.rank is not None)
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


def _components(modules: list[AdapterModule]) -> dict[str, list[AdapterModule]]:
    out: dict[str, list[AdapterModule]] = {}
    for m in modules:
        out.setdefault(m.key.component, []).append(m)
    return out


def peft_config(modules: list[AdapterModule], base_model: str | None = None) -> dict[str, Any]:
    """An adapter_config.json for one component: defaults = most common rank/alpha,
    ``^``-anchored ``rank_pattern``/``alpha_pattern`` entries for the rest, exact targets."""
    ntypes = {PEFT_TYPES[m.network_type][0] for m in modules}
    if len(ntypes) != 1:
        raise ValueError(f"one PEFT adapter cannot mix {sorted(ntypes)}")
    peft_type = ntypes.pop()
    alpha_field = "lora_alpha" if peft_type == "LORA" else "alpha"
    ranks = {m.key.path: m.rank or _full_rank(m) for m in modules}
    alphas = {m.key.path: _peft_alpha(m) for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, Any] = {
        "peft_type": peft_type,
        "r": r,
        alpha_field: alpha,
        "rank_pattern": {f"^{p}": v for p, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{p}": v for p, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "task_type": None,
        "revision": None,
    }
    if peft_type == "LORA":
        config.update(
            use_dora=any(m.dora for m in modules), use_rslora=False, lora_dropout=0.0, bias="none",
            lora_bias=any("lora_up_bias" in m.params for m in modules), fan_in_fan_out=False,
            init_lora_weights=True,
        )
    else:
        config.update(rank_dropout=0.0, module_dropout=0.0, init_weights=True)
        if peft_type == "LOKR":
            config.update(decompose_factor=-1)
        config.update({flag: any(needs(m) for m in modules) for t, flag, needs in ADAPTER_WIDE_FLAGS if t == peft_type.lower()})
    return config


def _full_rank(m: AdapterModule) -> int:
    """A PEFT LoKr rank large enough that PEFT keeps both factors full."""
    shapes = [ref.shape for ref in m.params.values()]
    return max(max(s) for s in shapes if s)


def _peft_alpha(m: AdapterModule) -> float:
    if m.network_type == "lokr" and m.rank is None:
        # Both factors full: kohya/LyCORIS ignore the stored alpha (scale 1) but PEFT
        # always scales by alpha/r, so alpha = r·scale for the r written for this module.
        return float(_full_rank(m)) * m.scale
    alpha = effective_alpha(m)
    return float(alpha) if alpha is not None else float(_full_rank(m))


def encode_diffusers(adapter: Adapter, modules: list[AdapterModule], catalog: Catalog, opts: EncodeOptions) -> list[OutputFile]:
    """One ``.safetensors`` with ``unet.``/``text_encoder.``… + ``lora_A``/``lora_B`` keys and
    the rank/alpha information in ``lora_adapter_metadata`` as diffusers writes it."""
    tensors: list[OutTensor] = []
    packed: dict[str, Any] = {}
    for component, mods in _components(modules).items():
        for m in mods:
            spec = catalog.get(m.key.component, m.key.path)
            tensors += _module_tensors("diffusers", m, spec, f"{component}.{m.key.path}", PEFT_LORA_KEYS.__getitem__, opts)
        packed.update({f"{component}.{k}": v for k, v in peft_config(mods).items()})
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith(("ss_", "modelspec.")) and k not in STALE_METADATA}
    meta.update({"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}, **opts.extra_metadata)
    return [OutputFile("", tensors, meta)]


def encode_peft(adapter: Adapter, modules: list[AdapterModule], catalog: Catalog, opts: EncodeOptions) -> list[OutputFile]:
    """One PEFT adapter folder per component (``unet/``, ``text_encoder/``…)."""
    files = []
    base = (adapter.config or {}).get("base_model_name_or_path")
    for component, mods in _components(modules).items():
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


__all__ = ["DTYPES", "ENCODERS", "TARGETS", "EncodeOptions", "OutputFile", "kohya_prefixes", "unsupported_reason"]

"""Decode a :class:`TensorSource` into a normalised :class:`Adapter`.

read keys → parse (formats.keys) → group per module → classify network type →
detect family (formats.family) → resolve names in the family's catalog (arch).
Nothing here loads tensor data except the tiny ``alpha`` scalars.
"""

from __future__ import annotations

import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loratool import arch
from loratool.errors import InputError, NotAnAdapterError, UsageError
from loratool.formats.family import ALL_FAMILIES, ModuleShape, detect_family
from loratool.formats.keys import ParsedKey, kohya_prefix, parse_dotted, parse_kohya
from loratool.formats.peft_config import (
    BARE_METADATA,
    LORA_ADAPTER_METADATA_KEY,
    configs_from_diffusers_metadata,
    kohya_alpha,
    peft_scale,
)
from loratool.formats.weight_shape import weight_io
from loratool.io.sources import Part, TensorSource
from loratool.model import Adapter, AdapterModule, ModuleKey, TensorRef
from loratool.networks import (
    NETWORK_TYPES,
    classify,
    dora_axis,
    fits_weight,
    invalid_shapes,
    rank_of,
)
from loratool.networks.ia3 import axis_fits as ia3_axis_fits

PEFT_PREFIX = "base_model.model."
# ComfyUI dotted LDM prefixes -> component; text encoders by ComfyUI's clip names.
COMFY_PREFIXES: dict[str, str] = {
    "diffusion_model.": "unet",
    "model.diffusion_model.": "unet",
    "text_encoders.clip_l.transformer.": "text_encoder",
    "text_encoders.clip_h.transformer.": "text_encoder",
    "text_encoders.clip_g.transformer.": "text_encoder_2",
}
# PEFT config's model class -> component.
PEFT_MODEL_CLASS: dict[str, str] = {
    "UNet2DConditionModel": "unet",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
    "CLIPTextTransformer": "text_encoder",
    "SD3Transformer2DModel": "transformer",
    "FluxTransformer2DModel": "transformer",
}
# First path segment -> component, for keys that carry no component prefix.
PATH_COMPONENT: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(down_blocks|up_blocks|mid_block|conv_in|conv_out|time_embedding|add_embedding)\."), "unet"),
    (re.compile(r"^text_model\."), "text_encoder"),
    (re.compile(r"^encoder\.layers\.\d+\.(self_attn|mlp)\."), "text_encoder"),  # CLIP saved by transformers 5
    (re.compile(r"^(transformer_blocks|single_transformer_blocks|context_embedder|x_embedder)\."), "transformer"),
]
# The first segment of CLIP module paths below ``text_model.`` (transformers 5 drops that level).
CLIP_INNER = ("encoder.layers.", "embeddings.", "final_layer_norm")
# Parameters that never decide a network type on their own.
SIDE_PARAMS = frozenset({"alpha", "dora_scale", "scale"})
# Storage dtypes of tensors that hold weights (factors, diffs, DoRA magnitudes).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# Parameters that hold a number or a flag rather than weights: any numeric dtype.
SCALAR_PARAMS = frozenset({"alpha", "on_input"})
# Largest finite float32: alpha is written and computed as float32.
F32_MAX = 3.4028234663852886e38
# Style -> variant label for inspect.
STYLE_LABEL: dict[str, str] = {
    "diffusers-attnproc": "attn-processor",
    "diffusers-attnproc-te": "attn-processor",
    "diffusers-lora-linear": "lora_linear_layer",
    "diffusers-lora": "lora.down/up",
    "peft": "lora_A/lora_B",
    "peft-bias": "lora_A/lora_B",
    "peft-dora": "lora_A/lora_B",
    "lycoris-dotted": "kohya-suffixes",
}


class _Invalid(Exception):
    """A module whose values cannot be used; the message says why, ``kind`` what is wrong
    ("shape", "nonfinite" or "value", as :attr:`Adapter.invalid_kinds` keeps it)."""

    def __init__(self, why: str, kind: str = "value") -> None:
        super().__init__(why)
        self.kind = kind


@dataclass
class _Config:
    """A PEFT-style config and where it was read (adapter_config.json or lora_adapter_metadata)."""

    data: dict[str, Any]
    origin: str


@dataclass
class _Group:
    part: Part
    component: str | None
    module: str
    styles: set[str] = field(default_factory=set)
    params: dict[str, TensorRef] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    prefixed: bool = True


def decode(source: TensorSource, family: str | None = None) -> Adapter:
    """Normalise ``source``; ``family`` overrides detection."""
    if family is not None and family not in ALL_FAMILIES:
        raise UsageError(None, f"unknown family {family!r}; choose from {', '.join(ALL_FAMILIES)}")
    groups, unparsed = _group_keys(source)
    fmt = _format_of(source, groups)
    metadata = _merged_metadata(source)
    configs = _configs(source)
    modules, unclassified, invalid = _classify(groups, fmt, configs)
    if not modules and invalid:
        raise _no_usable_module(source.path, {name: str(exc) for name, exc in invalid.items()})
    if not modules:
        raise NotAnAdapterError(source.path, _no_adapter_message(source, unparsed))
    shapes = [_module_shape(g, m) for g, m in modules]
    verdict = detect_family(shapes, {**metadata, **_config_hints(configs)})
    chosen = family or verdict.family
    evidence = verdict.evidence + ([f"--family {family} given"] if family else [])
    adapter = Adapter(
        path=source.path, format=fmt, variant=_variant(fmt, groups, metadata), family=chosen,
        family_evidence=evidence, modules={}, metadata=metadata,
        config=source.parts[0].config if len(source.parts) == 1 else None,
        unknown_keys=sorted(unparsed + [k for g in unclassified for k in g.keys]),
        warnings=list(verdict.warnings) + _metadata_warnings(groups, configs),
        invalid_modules={name: str(exc) for name, exc in invalid.items()},
        invalid_kinds={name: exc.kind for name, exc in invalid.items()},
    )
    adapter.complete = not adapter.unknown_keys  # a key no module holds: something is not applied
    if unclassified:
        names = ", ".join(sorted({g.module for g in unclassified})[:5])
        adapter.warnings.append(f"{len(unclassified)} module(s) with an incomplete or unknown parameter set: {names}")
    _resolve(adapter, modules, chosen)
    if not adapter.modules and adapter.invalid_modules:  # every module had a DoRA magnitude that fits no axis
        raise _no_usable_module(source.path, adapter.invalid_modules)
    if adapter.invalid_modules:
        adapter.complete = False
        shown = "; ".join(f"{n} ({why})" for n, why in list(adapter.invalid_modules.items())[:3])
        more = ", …" if len(adapter.invalid_modules) > 3 else ""
        adapter.warnings.append(f"{len(adapter.invalid_modules)} invalid module(s) left out: {shown}{more}")
    _note_truncation(adapter, source, [m for _, m in modules])
    return adapter


def _no_usable_module(path: str, invalid: dict[str, str]) -> InputError:
    name, why = next(iter(invalid.items()))
    return InputError(path, f"no usable module: {len(invalid)} invalid, e.g. {name}: {why}")


def _note_truncation(adapter: Adapter, source: TensorSource, modules: list[AdapterModule]) -> None:
    """A file opened with ``allow_truncated`` and cut short: described from its header."""
    part = source.truncated
    if part is None:
        return
    adapter.complete = False
    missing = sum(len(p.missing) for p in source.parts)
    total = sum(len(p.tensors) for p in source.parts)
    adapter.warnings.append(f"{part.truncated}; described from its header ({missing} of {total} tensors cut off)")
    unknown = [m.source_name for m in modules if m.extra.get("alpha_unknown")]
    if unknown:
        adapter.warnings.append(f"alpha of {len(unknown)} module(s) lies beyond the end of the file: unknown (e.g. {unknown[0]})")


def _group_keys(source: TensorSource) -> tuple[dict[tuple[str | None, str], _Group], list[str]]:
    groups: dict[tuple[str | None, str], _Group] = {}
    unparsed: list[str] = []
    for part in source.parts:
        default = _default_component(part)
        for key, entry in part.tensors.items():
            parsed = _parse(key, default)
            if parsed is None:
                unparsed.append(key)
                continue
            g = groups.setdefault((parsed.component, parsed.module), _Group(part, parsed.component, parsed.module))
            if parsed.param in g.params:
                unparsed.append(key)  # the same parameter spelled twice
                continue
            g.styles.add(parsed.style)
            g.prefixed = g.prefixed and parsed.prefixed
            g.params[parsed.param] = TensorRef(
                key, entry.dtype, entry.shape, part.get, part.raw,
                None if entry.offset is None else (part.path, entry.offset),
            )
            g.keys.append(key)
    return groups, unparsed


def _parse(key: str, default_component: str | None) -> ParsedKey | None:
    parsed = parse_kohya(key)
    if parsed is not None:
        return parsed
    body = key.removeprefix(PEFT_PREFIX)
    parsed = parse_dotted(body, default_component)
    if parsed is None:
        return None
    component = parsed.component
    for prefix, comfy_component in COMFY_PREFIXES.items():
        if parsed.module.startswith(prefix):
            return ParsedKey(comfy_component, parsed.module, parsed.param, "comfyui")
    if component is None:
        component = next((c for p, c in PATH_COMPONENT if p.match(parsed.module + ".")), None)
        return ParsedKey(component, parsed.module, parsed.param, parsed.style, prefixed=False)
    return parsed


def _default_component(part: Part) -> str | None:
    if part.component:
        return part.component
    auto = (part.config or {}).get("auto_mapping") or {}
    return PEFT_MODEL_CLASS.get(str(auto.get("base_model_class", "")))


def _format_of(source: TensorSource, groups: dict[Any, _Group]) -> str:
    if source.kind in ("peft-dir", "peft-components"):
        return "peft"
    styles = Counter(next(iter(sorted(g.styles))) for g in groups.values())
    if not styles:
        return "unknown"
    top = styles.most_common(1)[0][0]
    return {"kohya": "kohya", "comfyui": "comfyui"}.get(top, "diffusers")


def _variant(fmt: str, groups: dict[Any, _Group], metadata: dict[str, str]) -> str:
    styles = {s for g in groups.values() for s in g.styles}
    params = {p for g in groups.values() for p in g.params}
    parts: list[str] = []
    if fmt == "kohya":
        unet = [g.module for g in groups.values() if g.module.startswith("lora_unet_")]
        sgm = any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) for n in unet)
        diff = any(re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", n) for n in unet)
        parts.append({(True, True): "mixed-names", (True, False): "sgm-names", (False, True): "diffusers-names"}.get((sgm, diff), ""))
        parts.append("+".join(sorted({kohya_prefix(g.module) for g in groups.values() if "kohya" in g.styles})))
        if "lycoris" in metadata.get("ss_network_module", "") or params & {"hada_w1_a", "lokr_w1", "lokr_w1_a", "dora_scale"}:
            parts.append("lycoris")
    elif fmt == "peft":
        parts.extend(sorted({label for g in groups.values() for label in _peft_labels(g)}))
    elif fmt in ("diffusers", "comfyui"):
        parts.extend(sorted({STYLE_LABEL.get(s, s) for s in styles if s != "comfyui"}))
        if fmt == "diffusers" and not any(g.prefixed for g in groups.values()):
            parts.append("no-prefix")
    return ", ".join(p for p in parts if p)


# PEFT's own parameter spellings, by style (and for LyCORIS-named types, by parameter prefix):
# a PEFT folder is labelled in PEFT's terms, whatever the model it adapts.
PEFT_STYLE_LABEL: dict[str, str] = {
    "peft": "lora_A/lora_B", "peft-bias": "lora_A/lora_B", "peft-dora": "lora_A/lora_B",
    "peft-ia3": "ia3_l", "peft-oft": "oft_R",
}
PEFT_PARAM_LABEL: dict[str, str] = {"hada_": "hada_w1/hada_w2", "lokr_": "lokr_w1/lokr_w2"}


def _peft_labels(g: _Group) -> set[str]:
    labels = {PEFT_STYLE_LABEL[s] for s in g.styles if s in PEFT_STYLE_LABEL}
    labels |= {label for prefix, label in PEFT_PARAM_LABEL.items() if any(p.startswith(prefix) for p in g.params)}
    return labels


def _merged_metadata(source: TensorSource) -> dict[str, str]:
    merged: dict[str, str] = {}
    for part in source.parts:
        merged.update(part.metadata)
    return merged


def _configs(source: TensorSource) -> dict[str | None, _Config]:
    """Per-component PEFT-style configs: adapter_config.json or diffusers header metadata
    (key None: a config for the keys that name no component, e.g. diffusers'
    ``save_lora_adapter`` metadata without a component prefix)."""
    configs: dict[str | None, _Config] = {}
    for part in source.parts:
        if part.config is not None:
            configs[part.component or _default_component(part)] = _Config(part.config, "adapter_config.json")
        for component, cfg in configs_from_diffusers_metadata(part.metadata).items():
            configs[None if component == BARE_METADATA else component] = _Config(cfg, LORA_ADAPTER_METADATA_KEY)
    return configs


def _metadata_warnings(groups: dict[Any, _Group], configs: dict[str | None, _Config]) -> list[str]:
    """diffusers metadata without a component prefix: read as diffusers' model loader reads
    it, and say that diffusers' pipeline loader does not."""
    bare = configs.get(None)
    if bare is None or bare.origin != LORA_ADAPTER_METADATA_KEY:
        return []
    unprefixed = any(not g.prefixed for g in groups.values())
    loads = "loads none of the keys (they name no component)" if unprefixed else "does not use it (it reads 'unet.'-prefixed fields)"
    return [
        f"{LORA_ADAPTER_METADATA_KEY} has no component prefix (as diffusers' save_lora_adapter writes it): read "
        f"as UNet2DConditionModel.load_lora_adapter(prefix=None) reads it; diffusers' pipeline load_lora_weights {loads}; "
        "convert --to diffusers writes the prefixed form the pipeline reads"
    ]


def _config_hints(configs: dict[str | None, _Config]) -> dict[str, str]:
    for cfg in configs.values():
        base = cfg.data.get("base_model_name_or_path")
        if isinstance(base, str) and base:
            return {"base_model_name_or_path": base}
    return {}


def _classify(
    groups: dict[Any, _Group], fmt: str, configs: dict[str | None, _Config]
) -> tuple[list[tuple[_Group, AdapterModule]], list[_Group], dict[str, _Invalid]]:
    """(modules, groups of no known type, {module: why} for modules whose values are unusable)."""
    modules: list[tuple[_Group, AdapterModule]] = []
    unclassified: list[_Group] = []
    invalid: dict[str, _Invalid] = {}
    for g in groups.values():
        shapes = {k: v.shape for k, v in g.params.items()}
        kinds = set(shapes) - SIDE_PARAMS
        ntype = classify(kinds, shapes) if kinds else None
        if ntype is None:
            unclassified.append(g)
            continue
        try:
            modules.append((g, _module(g, ntype, shapes, configs)))
        except _Invalid as exc:
            invalid[g.module] = exc
    return modules, unclassified, invalid


def _module(g: _Group, ntype: str, shapes: dict[str, tuple[int, ...]], configs: dict[str | None, _Config]) -> AdapterModule:
    """The module of a classified group; raises :class:`_Invalid` when its values cannot be used."""
    problem = _invalid_values(g, ntype, shapes)
    if problem:
        raise problem
    rank = rank_of(ntype, shapes)
    alpha_cut = "alpha" in g.params and g.params["alpha"].key in g.part.missing  # truncated file
    alpha, alpha_source = (None, None) if alpha_cut else _alpha(g, configs, rank)
    params = {k: v for k, v in g.params.items() if k != "alpha"}
    module = AdapterModule(
        key=ModuleKey(g.component or "unknown", g.module), params=params, network_type=ntype,
        alpha=alpha, source_name=g.module,
        dora_axis="out" if "peft-dora" in g.styles else None,
    )
    module.extra["styles"] = sorted(g.styles)
    if alpha_source:
        module.extra["alpha_source"] = alpha_source
    if "alpha" in g.params:
        module.extra["alpha_dtype"] = g.params["alpha"].dtype
    if alpha_cut:
        module.extra["alpha_unknown"] = True
    if "on_input" in g.params and g.params["on_input"].key not in g.part.missing:
        module.extra["on_input"] = bool(_scalar(g, "on_input"))
    config = _config_for(g, configs)
    if config is not None and rank is None and ntype == "lokr":
        # Both LoKr factors full: kohya's scale is 1 and ignores alpha, PEFT's is alpha/r.
        try:
            module.extra["scale"] = _finite(peft_scale(config.data, g.module), "scale")
        except (TypeError, ValueError) as exc:
            raise _Invalid(f"{config.origin}: {exc}") from None
    return module


def _invalid_values(g: _Group, ntype: str, shapes: dict[str, tuple[int, ...]]) -> _Invalid | None:
    """Why a module's stored tensors cannot be used: dtypes, element counts, shapes."""
    for name, ref in g.params.items():
        if name in SCALAR_PARAMS:
            n = math.prod(ref.shape)
            if n != 1:
                return _Invalid(f"{name} holds {n} values, not one", kind="shape")
            if name == "alpha" and ref.dtype == "BOOL":
                return _Invalid("alpha is a boolean")
        elif ref.dtype not in FLOAT_DTYPES:
            return _Invalid(f"{name} is stored as {ref.dtype}; weights must be floating point")
    if "dora_scale" in shapes:
        if len(shapes["dora_scale"]) > 4 or 0 in shapes["dora_scale"]:
            return _Invalid(f"dora_scale has shape {list(shapes['dora_scale'])}", kind="shape")
        if NETWORK_TYPES[ntype].merge is not None:
            return _Invalid(f"DoRA is not defined for {ntype.upper()}")
    why = invalid_shapes(ntype, shapes)
    return _Invalid(why, kind="shape") if why else None


def _scalar(g: _Group, name: str) -> float:
    try:
        return g.part.scalar(g.params[name].key)
    except (ValueError, struct.error) as exc:  # a dtype or byte count that does not decode
        raise _Invalid(f"{name} cannot be read: {exc}") from None


def _finite(value: float, what: str) -> float:
    """``value`` if it is a finite float32; else the module is invalid."""
    if not math.isfinite(value):
        raise _Invalid(f"{what} is {value}", kind="nonfinite")
    if abs(value) > F32_MAX:
        raise _Invalid(f"{what} {value:g} is beyond float32 range")
    return value


def _alpha(g: _Group, configs: dict[str | None, _Config], rank: int | None) -> tuple[float | None, str | None]:
    """(kohya-convention alpha, where it came from): the module's alpha tensor, else its config."""
    if "alpha" in g.params:
        value = _finite(_scalar(g, "alpha"), "alpha")
        value = struct.unpack("<f", struct.pack("<f", value))[0]  # read as float32
        return (value or None), "tensor"  # 0 means absent
    config = _config_for(g, configs)
    if config is None:
        return None, None
    try:
        alpha = kohya_alpha(config.data, g.module, rank)
    except (TypeError, ValueError) as exc:
        raise _Invalid(f"{config.origin}: {exc}") from None
    return (None if alpha is None else _finite(alpha, f"alpha ({config.origin})")), config.origin


def _config_for(g: _Group, configs: dict[str | None, _Config]) -> _Config | None:
    if "alpha" in g.params:  # an alpha tensor: the file speaks kohya's convention
        return None
    config = configs.get(g.component)
    if config is None and not g.prefixed:
        config = configs.get(None)
    return config or (next(iter(configs.values())) if len(configs) == 1 else None)


def _flat(g: _Group) -> str:
    name = g.module
    if g.styles == {"kohya"}:
        return name[len(kohya_prefix(name)) + 1 :]
    for prefix in COMFY_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if g.component in ("text_encoder", "text_encoder_2") and name.startswith(CLIP_INNER):
        name = f"text_model.{name}"
    return name.replace(".", "_")


def _module_shape(g: _Group, m: AdapterModule) -> ModuleShape:

    out_f, in_f = weight_io(m.network_type, {k: v.shape for k, v in m.params.items()})
    down = m.params.get("lora_down")
    mirrors_layer = down is not None and not (g.styles & {"kohya", "comfyui", "lycoris-dotted"})
    conv = len(down.shape) == 4 if mirrors_layer and down is not None else None
    return ModuleShape(g.component or "unknown", _flat(g), out_f, in_f, conv)


def _resolve(adapter: Adapter, modules: list[tuple[_Group, AdapterModule]], family: str) -> None:
    """Give each module its canonical key from the family's catalog; report what fails."""

    catalog = arch.get_catalog(family) if family in arch.FAMILIES else None
    unresolved: list[str] = []
    for g, m in modules:
        spec = _lookup(catalog, g, m) if catalog is not None else None
        if spec is not None:
            m.key = ModuleKey(spec.component, spec.path)
            m.resolved = True
            m.extra["target"] = spec.target
            m.extra["shape"] = spec.shape
        elif catalog is not None:
            unresolved.append(g.module)  # kept under its own name; a warning says so
        if m.dora:
            why = _dora_problem(m)
            if why:
                adapter.invalid_modules[g.module] = why
                adapter.invalid_kinds[g.module] = "shape"
                continue
        if m.key in adapter.modules:
            adapter.warnings.append(f"{m.key} appears twice (as {adapter.modules[m.key].source_name} and {g.module}); the second was dropped")
            adapter.unknown_keys.extend(g.keys)
            continue
        adapter.modules[m.key] = m
    adapter.unknown_keys.sort()
    if unresolved:
        shown = ", ".join(unresolved[:5]) + (", …" if len(unresolved) > 5 else "")
        adapter.warnings.append(f"{len(unresolved)} module(s) not found in the {family} catalog (by name and shape): {shown}")


def _dora_problem(m: AdapterModule) -> str | None:
    """Why the module's ``dora_scale`` fits no axis of its weight (sets the axis when it fits)."""
    shape, weight = m.params["dora_scale"].shape, _weight_shape(m)
    if m.dora_axis is None:
        try:
            m.dora_axis = dora_axis(shape, weight)
        except ValueError as exc:
            return str(exc)
    elif math.prod(shape) != weight[0]:
        return f"dora_scale of shape {list(shape)} does not hold one magnitude per {weight[0]} rows"
    return None


def _weight_shape(m: AdapterModule) -> tuple[int, ...]:

    if "shape" in m.extra:
        return tuple(m.extra["shape"])
    out_f, in_f = weight_io(m.network_type, {k: v.shape for k, v in m.params.items()})
    return (out_f or 0, in_f or 0)


def _lookup(catalog: Any, g: _Group, m: AdapterModule) -> Any:
    """The catalog entry for a group, by name — and only if its shapes fit that module."""
    if g.styles in ({"kohya"}, {"comfyui"}):
        spec = catalog.resolve_kohya(g.module) if g.styles == {"kohya"} else catalog.resolve_ldm(g.module)
        return spec if spec is not None and _fits(spec, m) else None
    components = [g.component] if g.component else []
    if g.component in ("text_encoder", "text_encoder_2", None):
        components += [c for c in ("text_encoder", "text_encoder_2") if c not in components]
    for component in components:
        for path in (g.module, *_clip_paths(component, g.module)):
            spec = catalog.get(component, path)
            if spec is not None and _fits(spec, m):
                if path != g.module:
                    m.extra["clip_without_text_model"] = True
                return spec
    return None


def _clip_paths(component: str | None, module: str) -> tuple[str, ...]:
    """A CLIP module path as transformers ≥ 5 names it (no ``text_model.``, FORMATS §9),
    spelled the catalog's way."""
    if component in ("text_encoder", "text_encoder_2") and module.startswith(CLIP_INNER):
        return (f"text_model.{module}",)
    return ()


def _fits(spec: Any, m: AdapterModule) -> bool:
    """Whether the module's ΔW fits the catalog's weight: same rows and element count
    (1×1 conv ↔ linear, flattened conv factors); IA3's vector on the axis its flag names."""
    shapes = {k: v.shape for k, v in m.params.items()}
    if not fits_weight(m.network_type, shapes, tuple(spec.shape)):
        return False
    if m.network_type == "ia3":
        return ia3_axis_fits(math.prod(shapes["weight"]), tuple(spec.shape), m.extra.get("on_input"))
    return True


# Text-encoder embedding width -> the family a textual-inversion vector belongs to.
EMBEDDING_WIDTH: dict[int, str] = {768: "SD1", 1024: "SD2", 1280: "SDXL refiner"}


def _embedding(tensors: dict[str, tuple[int, ...]]) -> str | None:
    """What a textual-inversion embedding is (vectors, width, family), from its keys:
    A1111 ``emb_params`` (safetensors) or ``string_to_param.*`` (.pt), SDXL ``clip_l`` +
    ``clip_g``, diffusers' ``learned_embeds`` (one ``<token>`` key)."""
    if {"clip_l", "clip_g"} <= set(tensors) and len(tensors) == 2:
        return f"{_vectors(tensors['clip_l'])}, width 768 + 1280: SDXL"
    keys = [k for k in tensors if k == "emb_params" or k.startswith("string_to_param.")]
    if not keys and len(tensors) == 1 and re.fullmatch(r"<[^<>]+>", next(iter(tensors))):
        keys = list(tensors)
    if not keys or len(keys) != len(tensors):
        return None
    shape = tensors[keys[0]]
    width = shape[-1] if shape else 0
    family = EMBEDDING_WIDTH.get(width)
    return f"{_vectors(shape)}, width {width}" + (f": {family}" if family else "")


def _vectors(shape: tuple[int, ...]) -> str:
    n = shape[0] if len(shape) == 2 else 1
    return f"{n} vector{'s' if n != 1 else ''}"


def _no_adapter_message(source: TensorSource, unparsed: list[str]) -> str:
    total = sum(len(p.tensors) for p in source.parts)
    if total == 0:
        return "holds no tensors"
    embedding = _embedding({k: e.shape for p in source.parts for k, e in p.tensors.items()})
    if embedding is not None:
        return f"a textual-inversion embedding ({embedding}), not a LoRA"
    example = unparsed[0] if unparsed else next(iter(source.parts[0].tensors))
    return f"no LoRA tensors among {total} tensors (e.g. {example!r}); is this a checkpoint rather than an adapter?"

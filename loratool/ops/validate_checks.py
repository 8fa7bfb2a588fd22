"""The header-level checks of ``validate``: structure, alphas, metadata against the
tensors, privacy and interop traps. Nothing here reads tensor data beyond the alpha
scalars, and nothing imports torch. Each check adds findings to a :class:`Collector`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from loratool import arch
from loratool.errors import InputError
from loratool.formats.family import SD_FAMILIES, metadata_families
from loratool.formats.keys import kohya_prefix, parse_dotted, parse_kohya
from loratool.formats.weight_shape import weight_io
from loratool.io.sources import Part, TensorSource
from loratool.model import Adapter, AdapterModule, ModuleKey
from loratool.networks import NETWORK_TYPES, classify
from loratool.ops.findings import Collector
from loratool.ops.privacy import privacy_hits

ALPHA_SCALE_RANGE = (1 / 1024, 16.0)  # alpha/rank outside this is "absurd"
MODELSPEC_FIELDS = (  # SAI model spec: MUST, then SHOULD
    "sai_model_spec", "architecture", "implementation", "title", "resolution",
    "description", "author", "date", "hash_sha256",
)
# Parameters that make a group of keys a module even when incomplete.
FACTOR_PARAMS = frozenset({
    "lora_down", "lora_up", "lora_mid", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
    "lokr_w2_b", "lokr_t2", "a1", "a2", "b1", "b2", "bm", "oft_blocks", "oft_r", "ia3_l",
})
SGM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
DIFFUSERS_UNET = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")
CLIP_WITHOUT_TEXT_MODEL = re.compile(r"^(encoder\.layers\.\d+|embeddings|final_layer_norm)\b")
DIFFUSERS_LOADS = frozenset({"lora", "locon"})
COMFYUI_MISSING = frozenset({"ia3"})


def _parse_any(key: str) -> tuple[str | None, str, str] | None:
    parsed = parse_kohya(key) or parse_dotted(key.removeprefix("base_model.model."))
    return None if parsed is None else (parsed.component, parsed.module, parsed.param)


def check_unknown_keys(adapter: Adapter, found: Collector) -> None:
    """Keys outside every module: a module spelled twice, an incomplete module, or junk."""
    by_name = {m.source_name: m for m in adapter.modules.values()}
    groups: dict[tuple[str | None, str], dict[str, str]] = {}
    junk: list[str] = []
    for key in adapter.unknown_keys:
        parsed = _parse_any(key)
        if parsed is None:
            junk.append(key)
            continue
        component, module, param = parsed
        groups.setdefault((component, module), {})[param] = key
    incomplete: list[str] = []
    for (_, module), params in groups.items():
        example = next(iter(params.values()))
        if module in by_name:  # the kept module has these parameters already
            found.add("duplicate-module", f"{module}: {', '.join(sorted(params))} spelled twice (e.g. {example})", module)
        elif classify(set(params), {}) is not None:  # a whole module the decoder dropped
            other = _same_module(adapter, module)
            also = f" and {other} are the same module" if other else " duplicates another module"
            found.add("duplicate-module", f"{module}{also}; only one was kept", module)
        elif set(params) & FACTOR_PARAMS:
            incomplete.append(f"{module} (has {', '.join(sorted(params))})")
        else:
            junk.extend(params.values())
    found.group("incomplete-module", "module(s) with missing factors", incomplete)
    found.group("unknown-keys", "key(s) belong to no recognised module", sorted(junk))


def _same_module(adapter: Adapter, name: str) -> str | None:
    """The spelling the decoder kept for the module a dropped name refers to."""
    if adapter.family not in arch.FAMILIES:
        return None
    catalog = arch.get_catalog(adapter.family)
    spec = _catalog_entry(catalog, name, None)
    kept = adapter.modules.get(ModuleKey(spec.component, spec.path)) if spec else None
    return kept.source_name if kept else None


def _catalog_entry(catalog: arch.Catalog, name: str, component: str | None) -> arch.ModuleSpec | None:
    """A catalog entry by name alone (no shape check)."""
    if kohya_prefix(name):
        return catalog.resolve_kohya(name)
    if name.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.")):
        return catalog.resolve_ldm(name)
    for comp in dict.fromkeys([component, "unet", "text_encoder", "text_encoder_2"]):
        spec = catalog.get(comp, name) if comp else None
        if spec is not None:
            return spec
    return None


def check_resolution(adapter: Adapter, found: Collector) -> None:
    if adapter.family not in arch.FAMILIES:
        if adapter.family == "unknown":
            why = next((e for e in adapter.family_evidence if e.startswith("ambiguous")), "no structural or metadata evidence")
            found.add("family-unknown", f"base-model family not determined ({why}); modules were not checked against a catalog")
        return
    catalog = arch.get_catalog(adapter.family)
    unresolved: list[str] = []
    for m in adapter.modules.values():
        if m.resolved or _clip_without_text_model(m):
            continue
        spec = _catalog_entry(catalog, m.source_name, m.key.component)
        if spec is None:
            unresolved.append(m.source_name)
            continue
        out_f, in_f = weight_io(m.network_type, {k: v.shape for k, v in m.params.items()})
        found.add("target-shape-mismatch", f"{m.source_name}: the adapter's weight is {out_f}×{in_f}, the {adapter.family} layer "
                  f"{spec.component}.{spec.path} is {'×'.join(map(str, spec.shape))}", m.source_name)
    found.group("unresolved-module", f"module(s) match no {adapter.family} layer (loaders skip them)", unresolved)


def _clip_without_text_model(m: AdapterModule) -> bool:
    return m.key.component.startswith("text_encoder") and bool(CLIP_WITHOUT_TEXT_MODEL.match(m.source_name))


def _factor_problem(ntype: str, s: dict[str, tuple[int, ...]]) -> str | None:
    """Why a module's factor shapes cannot multiply, or None."""
    def dim(name: str, axis: int) -> int | None:
        shape = s.get(name)
        return shape[axis] if shape is not None and len(shape) > axis else None

    pairs: list[tuple[str, int, str, int]] = []
    if ntype in ("lora", "locon"):
        pairs = [("lora_up", 1, "lora_down", 0)]
        if "lora_mid" in s:
            pairs += [("lora_mid", 0, "lora_down", 0), ("lora_mid", 1, "lora_down", 0)]
    elif ntype == "loha":
        for i in (1, 2):
            pairs += ([(f"hada_t{i}", 0, f"hada_w{i}_a", 0), (f"hada_t{i}", 1, f"hada_w{i}_b", 0)] if f"hada_t{i}" in s
                      else [(f"hada_w{i}_a", 1, f"hada_w{i}_b", 0)])
        pairs += [("hada_w1_a", 0 if "hada_t1" not in s else 1, "hada_w2_a", 0 if "hada_t2" not in s else 1)]
    elif ntype == "lokr":
        if "lokr_w1_a" in s:
            pairs.append(("lokr_w1_a", 1, "lokr_w1_b", 0))
        if "lokr_w2_a" in s:
            pairs += ([("lokr_t2", 0, "lokr_w2_a", 0), ("lokr_t2", 1, "lokr_w2_b", 0)] if "lokr_t2" in s
                      else [("lokr_w2_a", 1, "lokr_w2_b", 0)])
    for a, i, b, j in pairs:
        da, db = dim(a, i), dim(b, j)
        if da is None or db is None:
            return f"{a} {list(s.get(a, ()))} / {b} {list(s.get(b, ()))}: not matrices"
        if da != db:
            return f"{a} {list(s[a])} and {b} {list(s[b])} disagree ({da} vs {db})"
    return None


def check_invalid(adapter: Adapter, found: Collector) -> None:
    """Modules decode left out because their values cannot be used: shapes that do not fit
    together are factor-shape-mismatch, anything else invalid-module. A non-finite alpha
    is left to :func:`check_alphas`, which reads every stored alpha."""
    codes = {"shape": "factor-shape-mismatch", "value": "invalid-module"}
    for name, why in adapter.invalid_modules.items():
        code = codes.get(adapter.invalid_kinds.get(name, "value"))
        if code:
            found.add(code, f"{name}: {why}", name)


def check_factors(modules: list[AdapterModule], found: Collector) -> None:
    for m in modules:
        problem = _factor_problem(m.network_type, {k: v.shape for k, v in m.params.items()})
        if problem:
            found.add("factor-shape-mismatch", f"{m.source_name}: {problem}", m.source_name)


def check_dtypes(modules: list[AdapterModule], found: Collector) -> None:
    dtypes = Counter(ref.dtype for m in modules for ref in m.params.values())
    if len(dtypes) > 1:
        found.add("mixed-dtypes", "weights stored as " + ", ".join(f"{d} ({n} tensors)" for d, n in dtypes.most_common()))


def check_alphas(source: TensorSource, adapter: Adapter, found: Collector) -> None:
    """Alpha values as stored (the decoder reads 0 as "absent"), and the scale they give."""
    owners = _alpha_owners(adapter)
    flagged: set[ModuleKey] = set()
    for part in source.parts:
        for key, entry in part.tensors.items():
            if not (key.endswith(".alpha") or key == "alpha"):
                continue
            n = math.prod(entry.shape)
            if n != 1:
                found.add("factor-shape-mismatch", f"{key}: alpha must hold one value, it holds {n}", key)
                continue
            try:
                value = part.scalar(key)
            except (InputError, ValueError, struct.error):
                continue
            if not math.isfinite(value):
                found.add("non-finite", f"{key} = {value}", key)
            elif value <= 0:
                found.add("alpha-nonpositive", f"{key} = {value:g}: " + ("negative alpha flips the module's effect" if value < 0 else
                          "kohya and A1111 read 0 as alpha = rank, ComfyUI as scale 0"), key)
            else:
                continue
            if key in owners:
                flagged.add(owners[key])
    absurd: list[str] = []
    for m in adapter.modules.values():
        if m.key in flagged or m.rank is None or not NETWORK_TYPES[m.network_type].uses_alpha:
            continue
        if m.alpha is not None and m.extra.get("alpha_dtype") is None and m.alpha <= 0:
            found.add("alpha-nonpositive", f"{m.source_name}: alpha {m.alpha:g} from the adapter config", m.source_name)
            continue
        scale = m.scale
        lo, hi = ALPHA_SCALE_RANGE
        if math.isfinite(scale) and not lo <= scale <= hi:
            absurd.append(f"{m.source_name} (alpha {m.effective_alpha:g}, rank {m.rank})")
    found.group("alpha-absurd", f"module(s) with alpha/rank outside [1/{round(1 / ALPHA_SCALE_RANGE[0])}, {ALPHA_SCALE_RANGE[1]:g}]", absurd)


def _alpha_owners(adapter: Adapter) -> dict[str, ModuleKey]:
    """alpha tensor key -> module, for formats that store alpha tensors."""
    owners: dict[str, ModuleKey] = {}
    for m in adapter.modules.values():
        for ref in m.params.values():
            parts = ref.key.split(".")
            for i in range(len(parts) - 1, 0, -1):
                owners[".".join(parts[:i]) + ".alpha"] = m.key
    return owners


def _number(value: str | None) -> float | None:
    try:
        x = float(value) if value is not None else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


def _linear_modules(adapter: Adapter) -> list[AdapterModule]:
    """Modules on linear layers and 1×1 convs (kohya's network_dim/alpha; conv_dim/alpha
    cover the rest)."""
    out = []
    for m in adapter.modules.values():
        shape = m.extra.get("shape")
        kernel = math.prod(shape[2:]) if shape and len(shape) == 4 else None
        if kernel is None:
            kernel = 9 if m.network_type == "locon" else 1
        if kernel == 1 and m.rank is not None:
            out.append(m)
    return out


def check_meta_network(adapter: Adapter, found: Collector) -> None:
    meta = adapter.metadata
    linear = _linear_modules(adapter)
    if not linear:
        return
    dim = _number(meta.get("ss_network_dim"))
    ranks = sorted({m.rank for m in linear if m.rank is not None})
    if dim is not None and ranks and int(dim) not in ranks:
        found.add("meta-dim-mismatch", f"ss_network_dim = {meta['ss_network_dim']}, but the linear modules have rank "
                  + ", ".join(map(str, ranks)), "ss_network_dim")
    alpha = _number(meta.get("ss_network_alpha"))
    alphas = sorted({m.effective_alpha for m in linear if m.effective_alpha is not None})
    if alpha is not None and alphas and not any(math.isclose(alpha, a, rel_tol=1 / 128, abs_tol=1e-6) for a in alphas):
        found.add("meta-alpha-mismatch", f"ss_network_alpha = {meta['ss_network_alpha']}, but the linear modules have alpha "
                  + ", ".join(f"{a:g}" for a in alphas[:6]), "ss_network_alpha")


def check_meta_family(adapter: Adapter, source: TensorSource, found: Collector) -> None:
    if adapter.family == "unknown":
        return
    fields = {k: v for k, v in adapter.metadata.items()}
    for part in source.parts:
        base = (part.config or {}).get("base_model_name_or_path")
        if isinstance(base, str) and base:
            fields["base_model_name_or_path"] = base
    for key, value in fields.items():
        for fam, why in metadata_families({key: value}):
            if fam != adapter.family:
                found.add("meta-family-mismatch", f"{why} says {fam}, but the tensors are {adapter.family}", key)


def check_modelspec(metadata: dict[str, str], found: Collector) -> None:
    missing = [f for f in MODELSPEC_FIELDS if not metadata.get(f"modelspec.{f}", "").strip()]
    if len(missing) == len(MODELSPEC_FIELDS):
        found.add("modelspec-missing", "no modelspec metadata (title, architecture, resolution, author, description…); "
                  "set it with `loratool metadata set`")
    elif missing:
        found.add("modelspec-missing", "modelspec fields missing: " + ", ".join(missing), f"modelspec.{missing[0]}")


def _config_text(value: Any) -> str:
    """A config value as text: JSON, or Python's spelling where JSON has none (NaN)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return repr(value)


def _config_strings(part: Part, source: TensorSource) -> dict[str, str]:
    """A PEFT adapter config's fields as metadata-like strings, keyed by file:field."""
    if not part.config:
        return {}
    folder = Path(part.path).parent
    name = str((folder / "adapter_config.json").relative_to(source.path)) if Path(source.path).is_dir() else "adapter_config.json"
    return {f"{name}:{k}": v if isinstance(v, str) else _config_text(v) for k, v in part.config.items() if v is not None}


def check_privacy(source: TensorSource, found: Collector) -> None:
    for part in source.parts:
        for hit in privacy_hits({**part.metadata, **_config_strings(part, source)}):
            if hit.kind == "path":
                who = f", revealing the user name {hit.user!r}" if hit.user else ""
                more = f" (and {hit.count - 1} more)" if hit.count > 1 else ""
                found.add("privacy-path", f"{hit.key} holds an absolute path{who}: {hit.detail}{more}", hit.key)
            else:
                found.add("privacy-dataset-names", f"{hit.key} names {hit.count} dataset folder(s): {_short(hit.detail)}", hit.key)


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def check_interop(adapter: Adapter, found: Collector) -> None:
    modules = list(adapter.modules.values())
    te = [m for m in modules if m.key.component.startswith("text_encoder")]
    missing = [m.source_name for m in te if _clip_without_text_model(m)]
    found.group("te-missing-text-model", "text-encoder module(s) lack the text_model. level "
                "(PEFT under transformers 4, diffusers and kohya-format tools match none)", missing)
    if adapter.format == "peft" and any(m.source_name.startswith("text_model.") for m in te):
        found.add("te-transformers5", "PEFT text-encoder adapter with text_model. paths: under transformers 5 "
                  "PeftModel loads none of its keys, silently (use transformers 4.x, or convert to kohya/diffusers)")
    if adapter.format == "kohya" and adapter.family in ("sdxl", "sdxl-refiner"):
        names = [m.source_name for m in modules]
        sgm = [n for n in names if SGM_UNET.match(n)]
        diff = [n for n in names if DIFFUSERS_UNET.match(n)]
        if sgm and diff:
            found.add("mixed-sdxl-names", f"{len(sgm)} UNet module(s) in SGM naming and {len(diff)} in diffusers naming: "
                      "diffusers' SDXL loader drops the SGM ones silently (convert to one naming)", sgm[0])
    types = {m.network_type for m in modules}
    if adapter.format == "kohya" and adapter.family in SD_FAMILIES and types - DIFFUSERS_LOADS:
        found.add("diffusers-unsupported", f"{', '.join(sorted(types - DIFFUSERS_LOADS))} modules: diffusers cannot load "
                  "this file (A1111, Forge and ComfyUI can)")
    if types & COMFYUI_MISSING:
        n = sum(m.network_type in COMFYUI_MISSING for m in modules)
        found.add("comfyui-unsupported", f"{n} IA3 module(s): ComfyUI does not load IA3 (A1111 does)")

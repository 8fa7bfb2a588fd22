"""Tell the base-model family from structure and shapes first, metadata second.

Each signal looks at the adapter's modules (flattened names, weight in/out features) or
its metadata and returns the families it fits, with a sentence of evidence. Structural
signals are intersected; metadata breaks ties and is checked for contradictions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

SD_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
ALL_FAMILIES = (*SD_FAMILIES, "sd3", "flux")

# Cross-attention context width (attn2.to_k/to_v in-features) -> family (FORMATS §4.2).
CONTEXT_WIDTH: dict[int, str] = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
# Text-encoder hidden width -> families, per component slot.
TE_WIDTH: dict[tuple[str, int], frozenset[str]] = {
    ("text_encoder", 768): frozenset({"sd1", "sdxl"}),
    ("text_encoder", 1024): frozenset({"sd2"}),
    ("text_encoder", 1280): frozenset({"sdxl-refiner", "sdxl"}),
    ("text_encoder_2", 1280): frozenset({"sdxl", "sdxl-refiner"}),
    ("text_encoder_2", 768): frozenset({"sd3"}),
}
TE_LAYERS: dict[int, frozenset[str]] = {
    12: frozenset({"sd1", "sdxl", "sd3", "flux"}),
    23: frozenset({"sd2"}),
    32: frozenset({"sdxl", "sdxl-refiner", "sd3"}),
}
# UNet / DiT name patterns (on flattened names without the prefix) -> families.
TOPOLOGY: list[tuple[re.Pattern[str], frozenset[str], str]] = [
    (re.compile(r"^(down_blocks_0_attentions|up_blocks_3_attentions|input_blocks_[12]_1_|output_blocks_(9|10|11)_1_)"),
     frozenset({"sd1", "sd2"}), "attention at the first UNet level"),
    (re.compile(r"transformer_blocks_[4-9]_|transformer_blocks_\d\d+_"),
     frozenset({"sdxl", "sd3", "flux"}), "transformer depth > 4 inside a UNet attention block"),
    (re.compile(r"^(down_blocks_3|up_blocks_3|input_blocks_(10|11)|output_blocks_(9|10|11))_"),
     frozenset({"sd1", "sd2", "sdxl-refiner"}), "four UNet levels"),
    (re.compile(r"^(add_embedding|label_emb)_"), frozenset({"sdxl", "sdxl-refiner"}), "SDXL add_embedding"),
    (re.compile(r"^joint_blocks_|context_block_|x_block_"), frozenset({"sd3"}), "SD3 joint blocks"),
    (re.compile(r"^(double_blocks|single_blocks|single_transformer_blocks)_"), frozenset({"flux"}), "Flux double/single blocks"),
]
_DIT_ATTN = re.compile(r"^transformer_blocks_\d+_(attn_(add_[qkv]_proj|to_add_out)|ff_context_)")
_TE_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_")
# Attention channel widths at the first attention level that only the refiner has.
REFINER_WIDTHS = frozenset({384, 768, 1536})

# Metadata value patterns -> family, first match per field wins. Beside kohya's own
# spellings (sd_v1, sd_v1_v, sd_v2, sd_v2_v, sdxl_base_v1-0, flux1, chroma: FORMATS §11),
# the ones found in the wild: sd_1.5, SD 1.5, sd15, SD 2.1, SDXL 1.0, Pony, Flux.1 D…
METADATA_RULES: list[tuple[str, re.Pattern[str], str]] = [
    ("ss_base_model_version", re.compile(r"(?i)^sd[ _-]?xl[ _-]?refiner"), "sdxl-refiner"),
    ("ss_base_model_version", re.compile(r"(?i)^(sd[ _-]?xl|pony|illustrious|noobai)"), "sdxl"),
    ("ss_base_model_version", re.compile(r"(?i)^(sd|stable[ _-]?diffusion)[ _-]?v?3"), "sd3"),
    ("ss_base_model_version", re.compile(r"(?i)^(sd|stable[ _-]?diffusion)[ _-]?v?2"), "sd2"),
    ("ss_base_model_version", re.compile(r"(?i)^(sd|stable[ _-]?diffusion)[ _-]?v?1"), "sd1"),
    ("ss_base_model_version", re.compile(r"(?i)^(flux|chroma)"), "flux"),
    ("modelspec.architecture", re.compile(r"(?i)^stable-diffusion-xl-v1-refiner"), "sdxl-refiner"),
    ("modelspec.architecture", re.compile(r"(?i)^stable-diffusion-xl"), "sdxl"),
    ("modelspec.architecture", re.compile(r"(?i)^stable-diffusion-v2"), "sd2"),
    ("modelspec.architecture", re.compile(r"(?i)^stable-diffusion-v1"), "sd1"),
    ("modelspec.architecture", re.compile(r"(?i)^stable-diffusion-3"), "sd3"),
    ("modelspec.architecture", re.compile(r"(?i)^(flux|chroma)"), "flux"),
    ("ss_v2", re.compile(r"^True$"), "sd2"),
    ("base_model_name_or_path", re.compile(r"(?i)xl.?refiner"), "sdxl-refiner"),
    ("base_model_name_or_path", re.compile(r"(?i)(sdxl|stable-diffusion-xl)"), "sdxl"),
    ("base_model_name_or_path", re.compile(r"(?i)stable-diffusion-2"), "sd2"),
    ("base_model_name_or_path", re.compile(r"(?i)(stable-diffusion-v1|sd-?v?1[-._]?[45]|v1-5|v1-4)"), "sd1"),
    ("base_model_name_or_path", re.compile(r"(?i)stable-diffusion-3"), "sd3"),
    ("base_model_name_or_path", re.compile(r"(?i)flux"), "flux"),
]


@dataclass(frozen=True)
class ModuleShape:
    """What family detection needs of one module: where it is and its weight's in/out."""

    component: str
    flat: str  # module path with dots as underscores, no kohya prefix
    out_features: int | None
    in_features: int | None
    conv_layout: bool | None = None  # 4-D factors, in a format that mirrors the layer type


@dataclass
class FamilyVerdict:
    family: str
    evidence: list[str]
    candidates: tuple[str, ...]
    warnings: list[str]


Signal = Callable[[list[ModuleShape]], Iterable[tuple[frozenset[str], str]]]


def _cross_attention(mods: list[ModuleShape]) -> Iterable[tuple[frozenset[str], str]]:
    widths = {m.in_features for m in mods if m.component in ("unet",) and m.flat.endswith(("attn2_to_k", "attn2_to_v"))}
    for w in sorted(x for x in widths if x):
        fam = CONTEXT_WIDTH.get(w)
        yield (frozenset({fam}) if fam else frozenset(), f"cross-attention context width {w}")


def _text_encoders(mods: list[ModuleShape]) -> Iterable[tuple[frozenset[str], str]]:
    for component in ("text_encoder", "text_encoder_2"):
        te = [m for m in mods if m.component == component and _TE_LAYER.search(m.flat)]
        widths = {m.in_features for m in te if re.search(r"(q_proj|k_proj|v_proj|out_proj|fc1)$", m.flat)}
        for w in sorted(x for x in widths if x):
            yield TE_WIDTH.get((component, w), frozenset()), f"{component} hidden width {w}"
        layers = {int(_TE_LAYER.search(m.flat).group(1)) for m in te}
        top = max(layers, default=-1) + 1
        if top > min(TE_LAYERS):  # only a deep encoder tells anything
            fits = [fams for n, fams in TE_LAYERS.items() if n >= top]
            yield frozenset().union(*fits), f"{component} has layers up to {top - 1}"


def _unet_topology(mods: list[ModuleShape]) -> Iterable[tuple[frozenset[str], str]]:
    flats = [m.flat for m in mods if m.component in ("unet", "transformer")]
    for pattern, fams, why in TOPOLOGY:
        if any(pattern.search(f) for f in flats):
            yield fams, why
    if any(_DIT_ATTN.search(f) for f in flats):
        widths = {m.in_features for m in mods if m.flat.endswith("attn_to_q") and m.in_features}
        fams = frozenset({"flux"} if 3072 in widths else {"sd3"} if widths else {"sd3", "flux"})
        yield fams, "DiT joint attention (add_q_proj / ff_context)"
    widths = {
        m.out_features for m in mods
        if m.component == "unet" and m.flat.endswith("attn1_to_q") and m.out_features
    }
    if widths & REFINER_WIDTHS:
        yield frozenset({"sdxl-refiner"}), f"attention widths {sorted(widths)} (384/768/1536 levels)"


_UNET_PROJ = re.compile(r"(attentions_\d+|blocks_\d+_\d+|middle_block_\d+)_proj_(in|out)$")


def _proj_layout(mods: list[ModuleShape]) -> Iterable[tuple[frozenset[str], str]]:
    """A UNet attention's proj_in/proj_out are 1×1 convs only in SD1 (a DiT's proj_out,
    Flux's single blocks, tells nothing). Kohya files are excluded by the caller (kohya
    trains SD2 with conv projections too, FORMATS §2.1)."""
    layouts = {
        m.conv_layout for m in mods
        if m.component == "unet" and _UNET_PROJ.search(m.flat) and m.conv_layout is not None
    }
    if layouts == {True}:
        yield frozenset({"sd1"}), "proj_in/proj_out are 1x1 convs"
    elif layouts == {False}:
        yield frozenset({"sd2", "sdxl", "sdxl-refiner"}), "proj_in/proj_out are linear"


def _dit_text_encoder(mods: list[ModuleShape]) -> Iterable[tuple[frozenset[str], str]]:
    if any(m.component == "text_encoder_3" for m in mods):
        yield frozenset({"sd3", "flux"}), "a T5 text encoder (lora_te3)"


STRUCTURAL_SIGNALS: tuple[Signal, ...] = (_cross_attention, _text_encoders, _unet_topology, _proj_layout, _dit_text_encoder)


def metadata_families(metadata: dict[str, str]) -> list[tuple[str, str]]:
    """(family, evidence) pairs from metadata / config values, strongest first."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for field, pattern, family in METADATA_RULES:
        value = metadata.get(field)
        if field in seen or not value or not pattern.search(value):
            continue
        seen.add(field)
        found.append((family, f"{field} = {value!r}"))
    return found


def metadata_contradictions(metadata: dict[str, str], family: str) -> dict[str, str]:
    """Fields whose value names another family than ``family``: field -> the family it names."""
    out: dict[str, str] = {}
    for field, pattern, named in METADATA_RULES:
        value = metadata.get(field)
        if field in out or not value or not pattern.search(value):
            continue
        out[field] = named
    return {f: named for f, named in out.items() if named != family}


def detect_family(mods: list[ModuleShape], metadata: dict[str, str]) -> FamilyVerdict:
    """Decide the family; ``unknown`` when nothing (or nothing consistent) points to one."""
    evidence: list[str] = []
    warnings: list[str] = []
    candidates: frozenset[str] | None = None
    for signal in STRUCTURAL_SIGNALS:
        for fams, why in signal(mods):
            evidence.append(f"{why} -> {', '.join(sorted(fams)) or 'no known family'}")
            if not fams:
                continue
            narrowed = fams if candidates is None else candidates & fams
            if not narrowed:
                warnings.append(f"structural evidence conflicts: {why}")
                continue
            candidates = narrowed
    meta = metadata_families(metadata)
    for family, why in meta:
        evidence.append(f"metadata {why} -> {family}")
    if candidates is None:
        if meta and _looks_like_sd(mods):
            return FamilyVerdict(meta[0][0], evidence + ["(from metadata only)"], (meta[0][0],), warnings)
        return FamilyVerdict("unknown", evidence, (), warnings)
    ordered = tuple(f for f in ALL_FAMILIES if f in candidates)
    for family, why in meta:
        if family not in candidates:
            warnings.append(f"metadata {why} says {family}, but the tensors fit {', '.join(ordered)}")
    if len(ordered) == 1:
        return FamilyVerdict(ordered[0], evidence, ordered, warnings)
    for family, _ in meta:
        if family in candidates:
            return FamilyVerdict(family, evidence, ordered, warnings)
    evidence.append(f"ambiguous: fits {', '.join(ordered)}")
    return FamilyVerdict("unknown", evidence, ordered, warnings)


def _looks_like_sd(mods: list[ModuleShape]) -> bool:
    pattern = re.compile(r"^(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|text_model_)")
    return any(pattern.search(m.flat) for m in mods)

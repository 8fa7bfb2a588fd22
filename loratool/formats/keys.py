"""Parse one state-dict key into (component, module as written, canonical parameter, style).

Each key style is a table of patterns; nothing here knows about families. Module names
stay as written (kohya's flattened ``lora_unet_…`` names are resolved later, by lookup
in the family's catalog).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Canonical parameter names (model.py) as they appear after the module name in
# kohya/LyCORIS files, with ``.weight`` where those files use it.
LYCORIS_PARAMS: tuple[str, ...] = (
    "lora_down", "lora_up", "lora_mid",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "a1", "a2", "b1", "b2", "bm",
    "oft_blocks", "rescale", "diff", "diff_b", "w_norm", "b_norm",
    "dora_scale", "alpha", "on_input", "weight", "bias", "scale",
)
_PARAM_SET = frozenset(LYCORIS_PARAMS)

# kohya prefix -> diffusers component. Longest prefixes first where they share a stem.
KOHYA_PREFIXES: dict[str, str] = {
    "lora_prior_unet": "prior",
    "lora_prior_te": "prior_text_encoder",
    "lora_transformer": "transformer",
    "lora_unet": "unet",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_te": "text_encoder",
    "lycoris": "unet",
    "oft_unet": "unet",
}
_KOHYA_RE = re.compile(r"^(" + "|".join(KOHYA_PREFIXES) + r")_(.+)$")

# Component prefixes of dotted (diffusers / PEFT-style single-file) keys.
DOTTED_COMPONENTS: tuple[str, ...] = (
    "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior",
)

_ATTN_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_ATTN_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UPDOWN = {"down": "lora_down", "up": "lora_up", "A": "lora_down", "B": "lora_up"}


@dataclass(frozen=True)
class ParsedKey:
    """A key split into its parts; ``style`` names the spelling it was written in."""

    component: str | None
    module: str
    param: str
    style: str
    prefixed: bool = True  # False: the component was inferred, the key names none


def parse_kohya(key: str) -> ParsedKey | None:
    """``lora_unet_<flat>.<param>[.weight]`` → module = full flattened name incl. prefix."""
    name, dot, rest = key.partition(".")
    m = _KOHYA_RE.match(name)
    if not dot or m is None:
        return None
    param = _canonical_param(rest)
    if param is None:
        return None
    return ParsedKey(KOHYA_PREFIXES[m.group(1)], name, param, "kohya")


def kohya_prefix(lora_name: str) -> str:
    """The kohya prefix of a flattened module name (``lora_te1`` of ``lora_te1_text_model…``)."""
    m = _KOHYA_RE.match(lora_name)
    return m.group(1) if m else ""


def _canonical_param(rest: str) -> str | None:
    if rest in _PARAM_SET:
        return rest
    if rest.endswith(".weight") and rest[: -len(".weight")] in _PARAM_SET:
        return rest[: -len(".weight")]
    if rest == "lora_up.bias":
        return "lora_up_bias"
    return None


# Dotted styles: (style, regex on the key after the component prefix, param builder).
# The first match wins; ``mod`` is the module path, ``p`` the raw parameter part.
_DOTTED: list[tuple[str, re.Pattern[str]]] = [
    ("diffusers-attnproc", re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<p>down|up)\.weight$")),
    ("diffusers-attnproc-te", re.compile(r"^(?P<mod>.+\.self_attn)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<p>down|up)\.weight$")),
    ("diffusers-lora-linear", re.compile(r"^(?P<mod>.+)\.lora_linear_layer\.(?P<p>down|up)\.weight$")),
    ("diffusers-lora", re.compile(r"^(?P<mod>.+)\.lora\.(?P<p>down|up)\.weight$")),
    ("peft", re.compile(r"^(?P<mod>.+)\.lora_(?P<p>A|B)(?:\.[A-Za-z_][\w-]*)?\.weight$")),
    ("peft-bias", re.compile(r"^(?P<mod>.+)\.lora_B(?:\.[A-Za-z_][\w-]*)?\.bias$")),
    ("peft-dora", re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.[A-Za-z_][\w-]*)?(?:\.weight)?$")),
    ("peft-ia3", re.compile(r"^(?P<mod>.+)\.ia3_l(?:\.[A-Za-z_][\w-]*)?$")),
    ("peft-oft", re.compile(r"^(?P<mod>.+)\.oft_R(?:\.[A-Za-z_][\w-]*)?\.weight$")),
    ("lycoris-dotted", re.compile(r"^(?P<mod>.+?)\.(?P<p>" + "|".join(LYCORIS_PARAMS) + r")(?:\.weight)?$")),
]


def parse_dotted(key: str, default_component: str | None = None) -> ParsedKey | None:
    """Parse a dotted key (diffusers D0/D1/D2, PEFT, ComfyUI, LyCORIS suffixes)."""
    component, body = default_component, key
    head, _, tail = key.partition(".")
    if head in DOTTED_COMPONENTS and tail:
        component, body = head, tail
    for style, pattern in _DOTTED:
        m = pattern.match(body)
        if m is None:
            continue
        module, param = m.group("mod"), _dotted_param(style, m)
        if style == "diffusers-attnproc":
            module = f"{module}.{_ATTN_PROC[m.group('proj')]}"
        elif style == "diffusers-attnproc-te":
            module = f"{module}.{_TE_ATTN_PROC[m.group('proj')]}"
        return ParsedKey(component, module, param, style)
    return None


def _dotted_param(style: str, m: re.Match[str]) -> str:
    fixed = {"peft-bias": "lora_up_bias", "peft-dora": "dora_scale", "peft-ia3": "ia3_l", "peft-oft": "oft_r"}
    if style in fixed:
        return fixed[style]
    p = m.group("p")
    return _UPDOWN.get(p, p)

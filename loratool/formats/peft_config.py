"""PEFT's per-module rank/alpha rules, read from ``adapter_config.json`` or diffusers'
``lora_adapter_metadata`` header, folded into kohya-convention alpha (scale = alpha/rank)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# configs_from_diffusers_metadata's key for fields written without a component prefix.
BARE_METADATA = ""

# peft_type -> name of the alpha field in its config.
ALPHA_FIELD: dict[str, str] = {"LORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha"}


def _number(value: Any, what: str) -> float:
    """A config value as a float; ValueError when it is not a number (bools included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {value!r}, not a number")
    return float(value)


def _patterns(config: dict[str, Any], field: str) -> dict[str, Any]:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{field} is {type(patterns).__name__}, not an object")
    return patterns


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's rule: the first pattern ``k`` with ``(.*\\.)?(k)$`` matching ``module``."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def kohya_alpha(config: dict[str, Any], module: str, rank: int | None) -> float | None:
    """The kohya-convention alpha that reproduces PEFT's scale for ``module``.

    PEFT: scale = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA), with
    ``alpha_pattern`` overrides; rank comes from the tensors. ValueError when the
    config's values are not numbers.
    """
    field = ALPHA_FIELD.get(str(config.get("peft_type", "LORA")).upper(), "lora_alpha")
    alpha = config.get(field)
    patterns = _patterns(config, "alpha_pattern")
    key = pattern_key(patterns, module)
    if key is not None:
        alpha, field = patterns[key], f"alpha_pattern[{key!r}]"
    if alpha is None:
        return None
    alpha = _number(alpha, field)
    if config.get("use_rslora") and rank:
        return alpha * math.sqrt(rank)
    return alpha


def peft_scale(config: dict[str, Any], module: str) -> float:
    """PEFT's own scale for ``module``: alpha/r with both patterns applied (rsLoRA: /√r)."""
    r = config.get("r") or 8
    ranks = _patterns(config, "rank_pattern")
    key = pattern_key(ranks, module)
    if key is not None:
        r = ranks[key]
    r = _number(r, "r")
    if r <= 0:
        raise ValueError(f"r is {r:g}, not a positive rank")
    alpha = kohya_alpha({**config, "use_rslora": False}, module, None)
    alpha = r if alpha is None else alpha
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def configs_from_diffusers_metadata(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Split diffusers' ``lora_adapter_metadata`` ("unet.lora_alpha": …) per component.

    Fields without a component prefix (``{"lora_alpha": 16, "r": 4, …}``, what a model's
    ``save_lora_adapter`` writes, read by its ``load_lora_adapter``) are returned under
    :data:`BARE_METADATA`: they are the config of the keys that name no component."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, TypeError, RecursionError):  # not JSON, not text, nested too deep
        return {}
    if not isinstance(flat, dict):
        return {}
    per_component: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        if field:
            per_component.setdefault(component, {})[field] = value
        else:
            per_component.setdefault(BARE_METADATA, {})[component] = value
    return per_component

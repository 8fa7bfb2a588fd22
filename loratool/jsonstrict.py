"""JSON as the standard defines it: ``NaN``/``Infinity`` are neither read nor written.

Python's ``json`` accepts and emits them by default; strict parsers (browsers, Go, Rust,
``jq``) refuse the result. Where loratool parses JSON it will write back, it reads with
:func:`loads`; everything it writes goes through ``allow_nan=False``.
"""

from __future__ import annotations

import json
import math
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads`` that raises ``ValueError`` on ``NaN``, ``Infinity`` and ``-Infinity``."""
    return json.loads(text, parse_constant=_refuse)


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/Inf float (also inside dicts) replaced by None, for records
    that must be strict JSON while another field says what was wrong."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")

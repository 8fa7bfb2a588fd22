"""JSON as the standard defines it: ``NaN``/``Infinity`` are neither read nor written.

Python's ``json`` accepts and emits them by default; strict parsers (browsers, Go, Rust,
``jq``) refuse the result. Where loratool parses JSON it will write back, it reads with
:func:`loads`; everything it writes goes through ``allow_nan=False``.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads`` that raises ``ValueError`` on ``NaN``, ``Infinity`` and ``-Infinity``."""
    return json.loads(text, parse_constant=_refuse)


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")

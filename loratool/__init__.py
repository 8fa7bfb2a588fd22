"""loratool: inspect, convert, merge and fetch LoRA adapters for Stable Diffusion.

Importing this package never imports torch; functions that need tensors import it lazily.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from loratool.errors import (
    ConversionError,
    InputError,
    LoraToolError,
    NotAnAdapterError,
    OutputError,
    RegistryError,
    UnsafeInputError,
    UsageError,
)

if TYPE_CHECKING:
    from loratool.model import Adapter

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "InputError",
    "LoraToolError",
    "NotAnAdapterError",
    "OutputError",
    "RegistryError",
    "UnsafeInputError",
    "UsageError",
    "__version__",
    "load",
]


def load(path: str | os.PathLike[str], family: str | None = None) -> Adapter:
    """Read a LoRA file or folder (any supported format) into a normalised Adapter.

    ``family`` overrides base-model detection. No tensor data is read until asked for.
    """
    from loratool.ops.inspect import load as _load

    return _load(path, family=family)

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
    from loratool.checkpoint import Checkpoint
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
    "open_checkpoint",
]


def load(path: str | os.PathLike[str], family: str | None = None) -> Adapter:
    """Read a LoRA file or folder (any supported format) into a normalised Adapter.

    ``family`` overrides base-model detection. No tensor data is read until asked for;
    the file stays open for that until ``adapter.close()`` (or use ``with load(p) as a:``).
    """
    from loratool.ops.inspect import load as _load

    return _load(path, family=family)


def open_checkpoint(
    path: str | os.PathLike[str], *, family: str | None = None, variant: str | None = None
) -> Checkpoint:
    """Open a base-model checkpoint: a single file (LDM/SGM names), a UNet-only file or a
    diffusers folder (see :mod:`loratool.checkpoint`). Headers only until tensors are read;
    close it, or use ``with``. ``family`` overrides detection; ``variant`` picks a diffusers
    folder's weights variant (``"fp16"``…)."""
    from loratool.checkpoint import open_checkpoint as _open

    return _open(path, family=family, variant=variant)

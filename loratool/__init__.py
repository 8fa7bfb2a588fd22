"""loratool: inspect, convert, merge and fetch LoRA adapters for Stable Diffusion.

Importing this package never imports torch; functions that need tensors import it lazily.
"""

from loratool.errors import (
    ConversionError,
    InputError,
    LoraToolError,
    NotAnAdapterError,
    RegistryError,
    UnsafeInputError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "InputError",
    "LoraToolError",
    "NotAnAdapterError",
    "RegistryError",
    "UnsafeInputError",
    "UsageError",
    "__version__",
    "load",
]


def load(path):  # noqa: ANN001, ANN201 - re-exported below
    """Read a LoRA file or folder; see :func:`loratool.ops.inspect.load`."""
    from loratool.ops.inspect import load as _load

    return _load(path)

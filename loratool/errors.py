"""One error hierarchy. Every error carries the file it is about and a user-facing message.

The CLI prints ``error: <path>: <message>`` and exits non-zero; no traceback unless ``--debug``.
"""

from __future__ import annotations

from os import PathLike


class LoraToolError(Exception):
    """Base of every error loratool raises on purpose."""

    exit_code = 1

    def __init__(self, path: str | PathLike[str] | None, message: str) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InputError(LoraToolError):
    """A file or folder that cannot be read as what it claims to be."""


class LayoutError(InputError):
    """A safetensors file whose data area has gaps, overlaps or trailing bytes: the
    reference library refuses it, so loratool does too."""


class UnsafeInputError(InputError):
    """Input refused because reading it could execute code (e.g. a malicious pickle)."""


class NotAnAdapterError(InputError):
    """A readable file that holds no adapter (e.g. a plain checkpoint)."""


class UsageError(LoraToolError):
    """Options that do not fit together, or an output that would overwrite something."""

    exit_code = 2


class OutputError(LoraToolError):
    """An output that cannot be written (permissions, a full disk, a read-only file system)."""


class ConversionError(LoraToolError):
    """A conversion that cannot be done without losing something."""


class RegistryError(LoraToolError):
    """A registry request or download that failed."""

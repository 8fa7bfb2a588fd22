"""Where the float32 math of merge and extract runs: ``--device auto|cpu|cuda``."""

from __future__ import annotations

from loratool.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` choice: auto takes CUDA when torch sees one;
    an explicit ``cuda`` without one is a usage error (imports torch unless ``cpu``)."""
    if device not in DEVICES:
        raise UsageError(None, f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise UsageError(None, "--device cuda: torch sees no CUDA device")
    return "cpu"

"""Where the float32 math of merge and extract runs: ``--device auto|cpu|cuda``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


@contextlib.contextmanager
def torch_threads(device: str) -> Iterator[None]:
    """On the CPU, torch leaves a core to the thread that reads (pread + SHA-256) or writes:
    its own pool contending with that thread for two cores made the elementwise steps
    several times slower."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)

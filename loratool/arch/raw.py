"""The record the generators yield: one module before it is named for every tool."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RawModule:
    """One module before naming: canonical path, shape and checkpoint location."""

    path: str
    kind: str
    shape: tuple[int, ...]
    target: str
    block: str
    ldm_key: str
    ldm_paths: tuple[str, ...]  # dotted LDM/ComfyUI module paths that resolve to it
    ldm_slice: tuple[int, int] | None = None
    ldm_transposed: bool = False
    ldm_path: str | None = None  # UNet only: LDM path below diffusion_model.

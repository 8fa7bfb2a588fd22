"""Write a LoRA-shaped safetensors file of a given size with sparse (unwritten) data."""

from __future__ import annotations

import os

from fixtures.generate import sdxl_kohya_targets
from loratool.io.writer import OutTensor, header_bytes


def write_shaped(path: str, target_bytes: int) -> None:
    """kohya SDXL names and shapes at the rank that gives about ``target_bytes`` in fp16."""
    targets = sdxl_kohya_targets("all", convs=False)
    per_rank = sum(2 * (t.shape[0] + t.shape[1]) for t in targets)
    rank = max(1, target_bytes // per_rank)
    tensors: list[OutTensor] = []
    for t in targets:
        tensors.append(OutTensor(f"{t.kohya_name}.lora_down.weight", "F16", (rank, t.shape[1]), bytes))
        tensors.append(OutTensor(f"{t.kohya_name}.lora_up.weight", "F16", (t.shape[0], rank), bytes))
        tensors.append(OutTensor(f"{t.kohya_name}.alpha", "F16", (), bytes))
    header = header_bytes(tensors, {"ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0"})
    data_start = 8 + len(header)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(data_start + sum(t.nbytes for t in tensors))
        offset = data_start
        for t in tensors:
            if t.key.endswith(".alpha"):
                os.pwrite(fh.fileno(), b"\x00\x3c", offset)  # fp16 1.0
            offset += t.nbytes

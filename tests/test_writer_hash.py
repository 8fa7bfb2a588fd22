"""The kohya writer's ``sshs_model_hash`` (issue 7 §3): patched into its own field only."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.io.writer import HASH_PLACEHOLDER, OutTensor, atomic_path, write_safetensors
from loratool.ops.convert import convert
from tests.conftest import FIXTURES


def _autov3(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()


def test_a_metadata_value_equal_to_the_placeholder_is_kept(tmp_path: Path) -> None:
    t = torch.arange(6, dtype=torch.float32)
    out = tmp_path / "x.safetensors"
    zeros = HASH_PLACEHOLDER
    meta = {"a_user_field": zeros, "another": f"prefix{zeros}suffix", "sshs_model_hash": zeros}
    with atomic_path(out) as tmp:
        digest = write_safetensors(tmp, [OutTensor("t", "F32", (6,), lambda: t)], meta, hash_key="sshs_model_hash")
    with safe_open(str(out), "pt") as f:
        got = f.metadata()
    assert got["sshs_model_hash"] == digest == _autov3(out) != zeros
    assert got["a_user_field"] == zeros and got["another"] == f"prefix{zeros}suffix"


def test_convert_to_kohya_keeps_a_user_value_of_64_zeros(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    with safe_open(str(FIXTURES / "sd15_kohya_lora.safetensors"), "pt") as f:
        meta = {**f.metadata(), "ss_training_comment": "0" * 64, "ss_dataset_dirs": '{"0000000000000000000000000000000000000000000000000000000000000000": 1}'}
    save_file(load_file(str(FIXTURES / "sd15_kohya_lora.safetensors")), str(src), meta)
    out = tmp_path / "out.safetensors"
    convert(src, "kohya", out)
    with safe_open(str(out), "pt") as f:
        got = f.metadata()
    assert got["sshs_model_hash"] == _autov3(out)
    assert got["ss_training_comment"] == meta["ss_training_comment"]
    assert got["ss_dataset_dirs"] == meta["ss_dataset_dirs"]

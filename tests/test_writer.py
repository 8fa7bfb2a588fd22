"""The atomic, streaming writer: nothing partial under the final name, right modes,
data hash computed while writing equals the file's AutoV3."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratool.errors import InputError
from loratool.io.writer import OutTensor, atomic_path, write_safetensors


def _tensor(key: str, t: torch.Tensor) -> OutTensor:
    dtype = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype]
    return OutTensor(key, dtype, tuple(t.shape), lambda: t)


def test_streams_tensors_and_bytes_and_hashes_the_data(tmp_path: Path) -> None:
    a = torch.randn(3, 5, dtype=torch.float16)
    b = torch.randn(7, dtype=torch.bfloat16)
    raw = torch.arange(4, dtype=torch.float32)
    out = tmp_path / "x.safetensors"
    with atomic_path(out) as tmp:
        digest = write_safetensors(tmp, [_tensor("a", a), _tensor("b", b),
                                         OutTensor("c", "F32", (4,), lambda: raw.numpy().tobytes())],
                                   {"k": "v"}, hash_key="sshs_model_hash")
    back = load_file(str(out))
    assert torch.equal(back["a"], a) and torch.equal(back["b"], b) and torch.equal(back["c"], raw)
    data = out.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert digest == hashlib.sha256(data[8 + n :]).hexdigest()
    assert f'"sshs_model_hash":"{digest}"' in data[8 : 8 + n].decode()
    assert (8 + n) % 8 == 0  # data area aligned


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"old content")
    bad = OutTensor("a", "F32", (2, 2), lambda: torch.zeros(3))  # wrong shape
    with pytest.raises(InputError), atomic_path(out) as tmp:
        write_safetensors(tmp, [bad])
    assert out.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.safetensors") as tmp:
            write_safetensors(tmp, [_tensor("a", torch.zeros(1))])
        with atomic_path(tmp_path / "d", directory=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "sub" / "x").stat().st_mode) == 0o644


def test_directory_replace_keeps_old_until_new_is_complete(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final, directory=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in final.iterdir()] == ["old"]
    with atomic_path(final, directory=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

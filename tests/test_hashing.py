"""Civitai hashes: hashlib on known data, REGISTRY.md §2 vectors, kohya's AutoV3, AutoV1 rules."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import tracemalloc
from pathlib import Path

import pytest

from loratool.errors import InputError
from loratool.io import hashing
from loratool.io.hashing import FileHashes, compute_hashes


def kohya_autov3(path: Path) -> str:
    """kohya sd-scripts' addnet_hash_safetensors: SHA-256 of the bytes after 8 + N."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[n + 8 :]).hexdigest().upper()


def safetensors_bytes(payload: bytes, metadata: dict[str, str], pad_to: int | None = None) -> bytes:
    header = {"__metadata__": metadata,
              "w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    raw = json.dumps(header).encode()
    if pad_to is not None:
        raw += b" " * (pad_to - len(raw))
    return struct.pack("<Q", len(raw)) + raw + payload


def test_hello_world_matches_registry_vectors(tmp_path: Path) -> None:
    f = tmp_path / "hello.bin"
    f.write_bytes(b"hello world")
    h = compute_hashes(f)
    assert h.sha256 == "B94D27B9934D3E08A52E52D7DA7DABFAC484EFE37A5380EE9088F7ACE2EFCDE9"
    assert h.autov2 == "B94D27B993"
    assert h.autov1 is None
    # "hello wo" read as a u64 is far above 16 MiB, so AutoV3 hashes from byte 8: b"rld".
    assert h.autov3_full == hashlib.sha256(b"rld").hexdigest().upper()
    assert h.autov3 == h.autov3_full[:12]
    assert h.as_dict() == {"sha256": h.sha256, "autov1": None, "autov2": "B94D27B993", "autov3": h.autov3}


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 4095, 4096, 4097, 3 * 4096 + 5])
def test_sha256_matches_hashlib_across_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       size: int) -> None:
    monkeypatch.setattr(hashing, "CHUNK", 4096)  # many chunks from a small file
    data = random.Random(size).randbytes(size)
    f = tmp_path / "data.bin"
    f.write_bytes(data)
    h = compute_hashes(f)
    assert h.sha256 == hashlib.sha256(data).hexdigest().upper()
    assert h.autov2 == h.sha256[:10]
    if size < 8:
        assert h.autov3 is None and h.autov3_full is None


@pytest.mark.parametrize("chunk", [4096, 1 << 20, hashing.CHUNK])
def test_autov3_is_kohyas_hash_of_the_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  chunk: int) -> None:
    monkeypatch.setattr(hashing, "CHUNK", chunk)
    payload = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    f = tmp_path / "lora.safetensors"
    f.write_bytes(safetensors_bytes(payload, {"ss_network_dim": "16"}))
    h = compute_hashes(f)
    assert h.autov3_full == kohya_autov3(f) == hashlib.sha256(payload).hexdigest().upper()
    assert h.autov3 == h.autov3_full[:12]
    assert h.sha256 == hashlib.sha256(f.read_bytes()).hexdigest().upper()


def test_autov3_survives_header_edits_sha256_does_not(tmp_path: Path) -> None:
    payload = random.Random(2).randbytes(100_000)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(safetensors_bytes(payload, {"ss_output_name": "a"}))
    b.write_bytes(safetensors_bytes(payload, {"ss_output_name": "edited", "extra": "x" * 300}))
    ha, hb = compute_hashes(a), compute_hashes(b)
    assert ha.autov3 == hb.autov3
    assert ha.sha256 != hb.sha256


def test_autov3_matches_a_file_written_by_safetensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    f = tmp_path / "st.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.arange(4096, dtype=torch.float32).reshape(8, 512)},
              str(f), metadata={"ss_network_alpha": "8"})
    assert compute_hashes(f).autov3_full == kohya_autov3(f)


@pytest.mark.parametrize(("declared", "skips_header"), [(16 * 1024 * 1024 - 8, True), (16 * 1024 * 1024, False)])
def test_autov3_16_mib_header_rule(tmp_path: Path, declared: int, skips_header: bool) -> None:
    payload = b"tensor-bytes" * 100
    f = tmp_path / "big_header.safetensors"
    f.write_bytes(safetensors_bytes(payload, {}, pad_to=declared))
    data = f.read_bytes()
    expected = hashlib.sha256(data[8 + declared :] if skips_header else data[8:]).hexdigest().upper()
    assert compute_hashes(f).autov3_full == expected


def test_autov3_is_none_when_the_header_runs_past_the_end(tmp_path: Path) -> None:
    f = tmp_path / "cut.safetensors"
    f.write_bytes(struct.pack("<Q", 5000) + b"{" + b" " * 100)
    assert compute_hashes(f).autov3 is None


@pytest.mark.parametrize("chunk", [4096, 100_000, hashing.CHUNK])
def test_autov1_offset_length_and_two_mib_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(hashing, "CHUNK", chunk)  # 100_000 makes the 64 KiB window straddle chunks
    data = random.Random(3).randbytes(2 * 1024 * 1024)
    f = tmp_path / "two_mib.bin"
    f.write_bytes(data)
    expected = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8].upper()
    assert compute_hashes(f).autov1 == expected
    f.write_bytes(data[:-1])
    assert compute_hashes(f).autov1 is None


def test_progress_reports_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "CHUNK", 1000)
    f = tmp_path / "p.bin"
    f.write_bytes(b"x" * 12_345)
    seen: list[int] = []
    compute_hashes(f, seen.append)
    assert sum(seen) == 12_345 and len(seen) == 13


def test_memory_is_bounded_by_the_buffers(tmp_path: Path) -> None:
    f = tmp_path / "large.bin"
    with open(f, "wb") as fh:
        for i in range(8):
            fh.write(random.Random(i).randbytes(8 * 1024 * 1024))
    tracemalloc.start()
    try:
        compute_hashes(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * hashing.CHUNK + 4 * 1024 * 1024  # two read buffers, not the 64 MiB file


def test_missing_file_and_directory_raise_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        compute_hashes(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="directory"):
        compute_hashes(tmp_path)


def test_file_hashes_is_frozen() -> None:
    h = FileHashes("A" * 64, None, "A" * 10, None, None)
    with pytest.raises(AttributeError):
        h.sha256 = "B"  # type: ignore[misc]


def test_a_file_growing_while_hashed_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "CHUNK", 4096)
    f = tmp_path / "growing.safetensors"
    f.write_bytes(b"\0" * 40_000)

    def append_once(n: int, appended: list[int] = []) -> None:  # noqa: B006 - a call counter
        if not appended:
            appended.append(n)
            with open(f, "ab") as fh:  # a writer still busy with the file
                fh.write(b"\1" * 10_000)

    with pytest.raises(InputError, match="changed while being hashed"):
        compute_hashes(f, append_once)

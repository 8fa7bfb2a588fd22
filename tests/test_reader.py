"""Bad input gets one clear line, a non-zero exit and no traceback; the reader trusts nothing."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loratool import LoraToolError, load
from loratool.errors import InputError, NotAnAdapterError, UnsafeInputError
from loratool.io.safetensors import SafetensorsFile
from tests.conftest import run_cli, write_raw_safetensors

GOOD_HEADER = {
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
    "__metadata__": {"ss_network_dim": "2"},
}


def _good(tmp_path: Path) -> Path:
    return write_raw_safetensors(tmp_path / "good.safetensors", GOOD_HEADER, bytes(64))


class _Evil:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected fragment of the message)."""
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "nope.safetensors", "no such file")
    (tmp_path / "emptydir").mkdir()
    cases["dir without adapter"] = (tmp_path / "emptydir", "holds no adapter")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.safetensors", "empty")
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    cases["random bytes"] = (tmp_path / "random.safetensors", "not a safetensors file")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}")
    cases["header beyond file"] = (tmp_path / "long.safetensors", "runs past the end")
    raw = b"{not json"
    (tmp_path / "badjson.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    cases["invalid json"] = (tmp_path / "badjson.safetensors", "not valid JSON")
    raw = b"[1, 2]"
    (tmp_path / "list.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    cases["non-object json"] = (tmp_path / "list.safetensors", "not a JSON object")
    hdr = {"a.lora_down.weight": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}
    cases["unknown dtype"] = (write_raw_safetensors(tmp_path / "dtype.safetensors", hdr, bytes(4)), "unknown dtype")
    hdr = {"a.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}
    cases["offsets do not match shape"] = (write_raw_safetensors(tmp_path / "span.safetensors", hdr, bytes(12)), "needs 8")
    hdr = {
        "a.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "a.lora_up.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    cases["overlapping"] = (write_raw_safetensors(tmp_path / "overlap.safetensors", hdr, bytes(12)), "overlap")
    hdr = {"a.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}
    cases["negative offsets"] = (write_raw_safetensors(tmp_path / "neg.safetensors", hdr, bytes(8)), "data_offsets")
    good = _good(tmp_path).read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[:-20])
    cases["truncated"] = (tmp_path / "truncated.safetensors", "truncated")
    ckpt = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4), "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(4)}, str(ckpt))
    cases["plain checkpoint"] = (ckpt, "no LoRA tensors")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": _Evil(tmp_path / "pwned")}))
    cases["malicious pickle"] = (evil, "refused to unpickle")
    evil_zip = tmp_path / "evil_zip.ckpt"
    torch.save({"state_dict": _Evil(tmp_path / "pwned")}, evil_zip)
    cases["malicious torch.save zip"] = (evil_zip, "refused to unpickle")
    return cases


CASES = [
    "missing", "dir without adapter", "empty", "random bytes", "header beyond file", "invalid json",
    "non-object json", "unknown dtype", "offsets do not match shape", "overlapping", "negative offsets",
    "truncated", "plain checkpoint", "malicious pickle", "malicious torch.save zip",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path: Path, case: str) -> None:
    path, fragment = _bad_inputs(tmp_path)[case]
    before = path.read_bytes() if path.is_file() else None
    result = run_cli("inspect", str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pwned").exists(), "the pickle ran code"
    if before is not None:
        assert path.read_bytes() == before, "input was modified"


def test_error_types(tmp_path: Path) -> None:
    cases = _bad_inputs(tmp_path)
    with pytest.raises(UnsafeInputError):
        load(cases["malicious pickle"][0])
    with pytest.raises(NotAnAdapterError):
        load(cases["plain checkpoint"][0])
    with pytest.raises(InputError):
        load(cases["truncated"][0])
    assert not (tmp_path / "pwned").exists()


def test_one_bad_file_does_not_stop_the_others(tmp_path: Path) -> None:
    good = _good(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!")
    result = run_cli("inspect", "--json", str(bad), str(good))
    assert result.returncode == 1
    reports = json.loads(result.stdout)
    assert [r["path"] for r in reports] == [str(good)]
    assert result.stderr.count("error:") == 1


def test_plain_tensor_pickle_is_read_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "lora.pt"
    torch.save({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 320, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, 2, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0),
    }, path)
    adapter = load(path)
    (module,) = adapter.modules.values()
    assert (module.rank, module.alpha, module.scale) == (2, 1.0, 0.5)


def _bytes_read() -> int:
    """Bytes this thread has passed through read()/pread() so far (Linux ``rchar``)."""
    with open("/proc/thread-self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


def test_tensor_bytes_are_read_only_when_asked_for(tmp_path: Path) -> None:
    """Opening and loading read the header (and the alpha scalars), never tensor data;
    ``get`` preads exactly the one tensor asked for (no memory map: bytes are counted)."""
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {
        f"{name}.lora_down.weight": torch.ones(8, 320, dtype=torch.float16),
        f"{name}.lora_up.weight": torch.arange(320 * 8 * 1024, dtype=torch.float32).reshape(320 * 1024, 8) % 7,
        f"{name}.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    big = tensors[f"{name}.lora_up.weight"].numel() * 4  # 10 MiB
    slack = 64 * 1024  # the header, Python's read buffer and the counter file itself

    before = _bytes_read()
    f = SafetensorsFile(path)
    assert _bytes_read() - before < slack
    try:
        assert f.metadata == {"k": "v"}
        before = _bytes_read()
        assert f.scalar(f"{name}.alpha") == 4.0
        assert torch.equal(f.get(f"{name}.lora_down.weight"), tensors[f"{name}.lora_down.weight"])
        assert _bytes_read() - before < slack
        before = _bytes_read()
        assert torch.equal(f.get(f"{name}.lora_up.weight"), tensors[f"{name}.lora_up.weight"])
        assert big <= _bytes_read() - before < big + slack
    finally:
        f.close()

    load(path).close()  # once first, so that module imports are not counted
    before = _bytes_read()
    with load(path) as adapter:  # the whole decode: header + alpha only
        assert adapter.modules and next(iter(adapter.modules.values())).alpha == 4.0
    assert _bytes_read() - before < slack


def _mutations() -> st.SearchStrategy:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8))
    value = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)), max_leaves=6)
    fields = st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "lora_unet_x.alpha", ""])
    return st.lists(st.tuples(st.sampled_from(sorted(GOOD_HEADER)), fields, value), min_size=1, max_size=4)


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=_mutations(), cut=st.integers(0, 80), header_delta=st.integers(-3, 3))
def test_mutated_headers_only_raise_our_error(tmp_path: Path, mutations: list, cut: int, header_delta: int) -> None:
    header = json.loads(json.dumps(GOOD_HEADER))
    for key, field, value in mutations:
        if field == "" or key == "__metadata__":
            header[key] = value
        elif isinstance(header.get(key), dict):
            header[key][field] = value
    raw = json.dumps(header, allow_nan=True).encode()
    body = struct.pack("<Q", max(0, len(raw) + header_delta)) + raw + bytes(64)
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(body[: len(body) - cut])
    with contextlib.suppress(LoraToolError):  # anything else propagates and fails the test
        load(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".lora", ""])
def test_header_length_that_looks_like_pickle_magic(tmp_path: Path, suffix: str) -> None:
    """A header length whose low byte is 0x80 starts the file like a pickle does."""
    raw = json.dumps(GOOD_HEADER).encode()
    raw += b" " * (0x280 - len(raw))  # length 0x280: first bytes 80 02, a pickle-2 opening
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert len(load(path).modules) == 1


def _many_tensors(n: int) -> bytes:
    parts = [f'"lora_unet_{i:08d}.alpha":{{"dtype":"F32","shape":[],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(n)]
    return ("{" + ",".join(parts) + "}").encode()


@pytest.mark.parametrize("n", [2_000, 20_000])
def test_header_parse_memory_is_linear_in_its_size(n: int) -> None:
    """Python allocations while parsing stay within a fixed multiple of the header's size
    (entries become compact records as they are read; no dict per tensor piles up)."""
    import tracemalloc

    from loratool.io.safetensors import parse_header_bytes

    raw = _many_tensors(n)
    prefix = struct.pack("<Q", len(raw)) + raw
    tracemalloc.start()
    try:
        header = parse_header_bytes("x", prefix, len(prefix) + 4 * n)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(header.tensors) == n
    assert peak < 8 * len(raw), f"{peak / len(raw):.1f} bytes of Python objects per header byte"  # was 10.7


def test_huge_dimensions_stop_at_the_first_overflow() -> None:
    """The element count is multiplied with a 64-bit check, so 100k dimensions of 2**63-1
    before a 0 are refused at the second one, not multiplied into a 6-million-digit number."""
    from loratool.io.safetensors import parse_header_bytes

    dims = ",".join(["9223372036854775807"] * 100_000)
    raw = ('{"a":{"dtype":"F32","shape":[' + dims + ',0],"data_offsets":[0,0]}}').encode()
    prefix = struct.pack("<Q", len(raw)) + raw
    with pytest.raises(InputError, match="overflows 64 bits"):
        parse_header_bytes("x", prefix, len(prefix))

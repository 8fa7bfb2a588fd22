"""numpy is not a runtime dependency: tensor bytes go through torch and ctypes only.

The test venv has numpy (test extras bring it), so these runs block it the way a plain
install lacks it: ``sys.modules["numpy"] = None`` before torch is first imported.
``make smoke`` proves the same in a venv that truly lacks it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from loratool.io.safetensors import SafetensorsFile, tensor_memory
from tests.conftest import FIXTURES, ROOT

NO_NUMPY = "import sys; sys.modules['numpy'] = None\nfrom loratool.cli.main import main\nmain()"


def run_without_numpy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_NUMPY, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def pickles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A kohya fixture saved as zip-based ``.bin`` and as a raw (legacy) pickle ``.pt``."""
    folder = tmp_path_factory.mktemp("pickles")
    state = load_file(str(FIXTURES / "sdxl_kohya_diffusers_named.safetensors"))
    torch.save(state, folder / "lora.bin")
    torch.save(state, folder / "lora.pt", _use_new_zipfile_serialization=False)
    return {"bin": folder / "lora.bin", "pt": folder / "lora.pt"}


@pytest.mark.parametrize(("source", "target", "dtype"), [
    ("sd15_diffusers.safetensors", "kohya", None),  # writes new alpha tensors
    ("sdxl_peft", "diffusers", "bf16"),  # reads and casts every tensor
    ("bin", "peft", None),  # tensors come from a zip pickle
    ("pt", "kohya", "fp32"),  # ... from a raw pickle, cast
])
def test_convert_without_numpy(tmp_path: Path, pickles: dict[str, Path], source: str, target: str, dtype: str | None) -> None:
    src = pickles.get(source) or FIXTURES / source
    out = tmp_path / ("out" if target == "peft" else "out.safetensors")
    result = run_without_numpy("convert", str(src), "--to", target, "-o", str(out), *(["--dtype", dtype] if dtype else []))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no traceback, and no "Failed to initialize NumPy" warning
    assert "verified" in result.stdout


def test_inspect_pickle_without_numpy(pickles: dict[str, Path]) -> None:
    result = run_without_numpy("inspect", str(pickles["pt"]), str(pickles["bin"]))
    assert result.returncode == 0 and result.stderr == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                   torch.uint8, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2])
def test_tensor_memory_is_the_safetensors_serialisation(tmp_path: Path, dtype: torch.dtype) -> None:
    """Bytes out (writer) and bytes in (reader) agree with the safetensors library."""
    t = (torch.arange(-6, 18, dtype=torch.float64) * 0.75).reshape(4, 6)[1:, ::2].to(dtype)  # strided source
    blob = save({"t": t.contiguous()})
    (n,) = [int.from_bytes(blob[:8], "little")]
    assert bytes(tensor_memory(t.contiguous())) == blob[8 + n:]
    path = tmp_path / "t.safetensors"
    path.write_bytes(blob)
    with SafetensorsFile(path) as f:
        back = f.get("t")
    assert back.dtype == dtype and back.view(torch.uint8).equal(t.contiguous().view(torch.uint8))


def test_tensor_memory_keeps_the_tensor_alive() -> None:
    view = tensor_memory(torch.full((1024,), 7, dtype=torch.int32))  # the tensor has no other reference
    for _ in range(50):
        torch.zeros(1024, dtype=torch.int32)  # allocations that would reuse freed memory
    assert bytes(view[:8]) == b"\x07\x00\x00\x00" * 2
    assert len(tensor_memory(torch.empty(0, 3))) == 0

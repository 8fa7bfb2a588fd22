"""Test data shared by the benchmarks, made once (in a child process, so the benchmark
process stays small and the peak RSS it measures of its children is theirs alone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, scratch


def _generate(path: Path, code: str) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        subprocess.run([sys.executable, "-c", code, str(tmp)], check=True, cwd=ROOT)
        tmp.rename(path)
    return path


def sdxl_r128() -> Path:
    """All 722 UNet + 264 TE modules at rank 128, fp16 (~900 MB), real random data,
    written by the fixture generator's streaming writer."""
    code = (
        "import sys, torch\n"
        "from fixtures.generate import write_kohya_sdxl\n"
        "write_kohya_sdxl(sys.argv[1], rank=128, dtype=torch.float16, modules='all')\n"
    )
    return _generate(scratch() / "sdxl_kohya_r128.safetensors", code)


def sdxl_subset_r128() -> Path:
    """The SDXL fixture's 71-module subset (UNet 320/640/1280-wide blocks with resnet and
    sampler convs, both text encoders) at rank 128 (convs too), fp16: for quick runs of
    the rank benchmarks."""
    code = (
        "import sys, torch\n"
        "from fixtures.generate import write_kohya_sdxl\n"
        "write_kohya_sdxl(sys.argv[1], rank=128, dtype=torch.float16, modules='subset', conv_rank=128)\n"
    )
    return _generate(scratch() / "sdxl_kohya_subset_r128.safetensors", code)


def lora_shaped(name: str, target_bytes: int) -> Path:
    """A kohya SDXL-shaped file of about ``target_bytes``: real header and alphas, sparse
    zero tensor data (inspect never reads it)."""
    code = f"import sys\nfrom bench.shaped import write_shaped\nwrite_shaped(sys.argv[1], {target_bytes})\n"
    return _generate(scratch() / name, code)

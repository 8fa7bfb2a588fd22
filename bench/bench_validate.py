"""``loratool validate`` of the real-shaped SDXL rank-128 kohya LoRA (~900 MB) against
``sha256sum`` of the same file, and its peak RSS against a file 10× smaller.

Goals (issue 10): wall ≤ 1.5× sha256sum; peak RSS flat (the big file's within 1.2× of the
small one's). ``BENCH_VALIDATE_RANK`` picks the rank (default 128; the small file uses a
tenth of it), so a quick check can run on small files: ``BENCH_VALIDATE_RANK=8``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import best_of, scratch
from bench.sdxl import _generate, sdxl_r128


def sdxl_rank(rank: int) -> Path:
    """All 722 UNet + 264 TE modules at ``rank`` (fp16, real random data)."""
    if rank == 128:
        return sdxl_r128()
    code = (
        "import sys, torch\n"
        "from fixtures.generate import write_kohya_sdxl\n"
        f"write_kohya_sdxl(sys.argv[1], rank={rank}, dtype=torch.float16, modules='all')\n"
    )
    return _generate(scratch() / f"sdxl_kohya_r{rank}.safetensors", code)


def run() -> None:
    rank = int(os.environ.get("BENCH_VALIDATE_RANK", "128"))
    big, small = sdxl_rank(rank), sdxl_rank(max(1, rank // 10))
    cli = [sys.executable, "-m", "loratool", "validate", "--json"]
    for path in (big, small):
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # page cache warm
    t_big, rss_big = best_of([*cli, str(big)])
    t_small, rss_small = best_of([*cli, str(small)])
    mb = big.stat().st_size / 1e6
    if shutil.which("sha256sum") is None:
        print("   sha256sum not found; ratio skipped")
        peer = float("nan")
    else:
        peer, _ = best_of(["sha256sum", str(big)])
    print(f"   validate SDXL rank-{rank} kohya LoRA ({mb:.0f} MB): {t_big:.2f} s vs sha256sum {peer:.2f} s "
          f"-> {t_big / peer:.2f}x (target <= 1.5)")
    print(f"   peak RSS: {rss_big / 2**20:.0f} MiB ({mb:.0f} MB file) vs {rss_small / 2**20:.0f} MiB "
          f"({small.stat().st_size / 1e6:.0f} MB file, {t_small:.2f} s) -> {rss_big / rss_small:.2f} (target <= 1.2, flat)")

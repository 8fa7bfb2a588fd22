"""Hashing a 2 GB LoRA-shaped file (SHA256 + AutoV1/V2/V3 in one pass) vs ``sha256sum``.

Target (issue 2): loratool's wall within 1.3x of sha256sum on the same, page-cached file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

from bench.common import best_of, python_argv, scratch

SIZE = 2 * 1000 * 1000 * 1000


def make_file(path: Path, size: int = SIZE) -> Path:
    """A safetensors file of ``size`` bytes (one U8 tensor of random bytes); reused if present."""
    if path.exists() and path.stat().st_size == size:
        return path
    body = size - 8 - 128
    header = json.dumps({"__metadata__": {"ss_network_dim": "128"},
                         "w": {"dtype": "U8", "shape": [body], "data_offsets": [0, body]}}).encode()
    header += b" " * (128 - len(header))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        left = body
        while left:
            n = min(left, 64 << 20)
            fh.write(os.urandom(n))
            left -= n
    os.replace(tmp, path)
    return path


def run() -> None:
    path = make_file(scratch() / "hash_2g.safetensors")
    if shutil.which("sha256sum") is None:
        print("   sha256sum not found; skipped")
        return
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    peer, _ = best_of(["sha256sum", str(path)])
    code = ("import sys; from loratool.io.hashing import compute_hashes; "
            f"print(compute_hashes({str(path)!r}).as_dict())")
    ours, rss = best_of(python_argv(code))
    t0 = time.perf_counter()
    from loratool.io.hashing import compute_hashes

    h = compute_hashes(path)
    assert h.autov3 is not None and h.autov1 is not None
    print(f"   hashing 2 GB (sha256+autov1/2/3, one pass): loratool {ours:.2f} s vs sha256sum {peer:.2f} s "
          f"-> loratool/sha256sum = {ours / peer:.2f} (target <= 1.30); peak RSS {rss / 2**20:.0f} MiB")
    print(f"   in-process check: {time.perf_counter() - t0:.2f} s, sha256 {h.sha256[:16]}…")

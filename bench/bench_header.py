"""Header parsing stays linear in time and memory on hostile headers: loratool's
validating parser against the reference library's own (``safe_open``) on the same files.

Sizes: ``LORATOOL_BENCH_HEADER_MB`` (default 80, under the 100 MB header limit). Each
parse runs in a child process; its time and peak RSS are shown net of the same child
reading a tiny header (interpreter and imports).
"""

from __future__ import annotations

import os
import struct
import sys

from bench.common import run_measured, scratch

OURS = """
import sys
from loratool.errors import InputError
from loratool.io.safetensors import read_header
try:
    read_header(sys.argv[1])
except InputError:
    pass
"""

PEER = """
import sys, warnings
warnings.simplefilter("ignore")
from safetensors import safe_open
try:
    safe_open(sys.argv[1], "numpy").keys()
except Exception:
    pass
"""


def _many(size: int) -> tuple[bytes, int]:
    """As many small tensors as fit: the most entries a header of this size can hold
    (each entry is at most 96 bytes here)."""
    n = size // 96
    parts = [f'"lora_unet_{i:010d}.alpha":{{"dtype":"F32","shape":[],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(n)]
    return ("{" + ",".join(parts) + "}").encode(), 4 * n


def _long_shape(size: int) -> tuple[bytes, int]:
    """One tensor with millions of dimensions."""
    n = size // 2
    return ('{"a":{"dtype":"F32","shape":[' + ",".join(["1"] * n) + '],"data_offsets":[0,4]}}').encode(), 4


def _huge_dims(size: int) -> tuple[bytes, int]:
    """Dimensions near 2**63 before a 0: quadratic when multiplied without a 64-bit check."""
    n = size // 20
    return ('{"a":{"dtype":"F32","shape":[' + ",".join(["9223372036854775807"] * n) + ',0],"data_offsets":[0,0]}}').encode(), 0


KINDS = {"many tensors": _many, "a long shape": _long_shape, "huge dimensions": _huge_dims}


def _best(code: str, path: str) -> tuple[float, int]:
    return min(run_measured([sys.executable, "-c", code, path]) for _ in range(3))


def run() -> None:
    size = int(float(os.environ.get("LORATOOL_BENCH_HEADER_MB", "80")) * 1_000_000)
    path = scratch() / "hostile_header.safetensors"
    tiny = scratch() / "tiny_header.safetensors"
    tiny.write_bytes(struct.pack("<Q", 8) + b"{}      ")
    base = {code: _best(code, str(tiny)) for code in (OURS, PEER)}
    try:
        for label, make in KINDS.items():
            raw, data = make(size)
            with open(path, "wb") as fh:
                fh.write(struct.pack("<Q", len(raw)) + raw)
                fh.truncate(8 + len(raw) + data)
            del raw
            (t_ours, m_ours), (t_peer, m_peer) = (
                (t - base[code][0], m - base[code][1]) for code, (t, m) in
                ((code, _best(code, str(path))) for code in (OURS, PEER)))
            mb = (path.stat().st_size - data) / 1e6
            print(f"   {label} ({mb:.0f} MB header): loratool {t_ours:.2f} s, +{m_ours / 1e6:.0f} MB RSS; "
                  f"safetensors {t_peer:.2f} s, +{m_peer / 1e6:.0f} MB RSS -> time ratio {t_ours / max(t_peer, 0.01):.1f}")
    finally:
        path.unlink(missing_ok=True)
        tiny.unlink(missing_ok=True)

"""inspect is header-only: a 2 GB file costs what a 2 MB one does, and we beat a
load-everything inspector (safetensors.torch.load_file + summary) on SDXL rank 128."""

from __future__ import annotations

import sys

from bench.common import run_measured
from bench.sdxl import lora_shaped, sdxl_r128

PEER = """
import sys
from safetensors.torch import load_file
sd = load_file(sys.argv[1])
ranks = {k: v.shape[0] for k, v in sd.items() if k.endswith('lora_down.weight')}
alphas = {k: float(v) for k, v in sd.items() if k.endswith('.alpha')}
print(len(ranks), min(ranks.values()), max(ranks.values()), len(alphas))
"""


def run() -> None:
    big = lora_shaped("inspect_2gb.safetensors", 2 * 1024**3)
    small = lora_shaped("inspect_2mb.safetensors", 2 * 1024**2)
    cli = [sys.executable, "-m", "loratool", "inspect", "--json"]
    runs = {big: [], small: []}
    for _ in range(9):  # interleaved, so drift on a shared machine hits both alike
        for path in runs:
            runs[path].append(run_measured([*cli, str(path)])[0])
    t_big, t_small = min(runs[big]), min(runs[small])
    print(f"   header-only: 2 GB file {t_big:.3f} s vs 2 MB file {t_small:.3f} s -> ratio {t_big / t_small:.2f} (target <= 1.5)")
    real = sdxl_r128()
    size_mb = real.stat().st_size / 1e6
    ours, peer = [], []
    for _ in range(5):
        ours.append(run_measured([*cli, str(real)]))
        peer.append(run_measured([sys.executable, "-c", PEER, str(real)]))
    (t_ours, rss_ours), (t_peer, rss_peer) = min(ours), min(peer)
    print(f"   SDXL rank-128 kohya LoRA ({size_mb:.0f} MB): loratool inspect {t_ours:.3f} s, {rss_ours / 1e6:.0f} MB RSS;"
          f" load_file + summary {t_peer:.3f} s, {rss_peer / 1e6:.0f} MB RSS -> loratool {t_peer / t_ours:.1f}x faster (target >= 10x)")

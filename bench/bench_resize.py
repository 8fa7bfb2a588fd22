"""resize SDXL rank-128 kohya LoRA → rank 32: loratool (QR of the factors + SVD of the
128×128 core, verified) vs kohya's method (rebuild every ΔW, full ``torch.linalg.svd``,
PEERS-kohya.md §3), each in its own child process of the same run: wall, peak RSS, and
how far apart the two results are.

``LORATOOL_BENCH_RESIZE=subset`` runs the fixture's 71-module subset (3×3 convs included)
instead of all 986 modules: a quick check (kohya's method on the full file takes many
minutes on 2 cores; on the subset ~70 s).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.common import run_measured, scratch
from bench.sdxl import sdxl_r128, sdxl_subset_r128

NEW_RANK = 32

# kohya's resize_lora.py as described in PEERS-kohya.md §3 (fixed rank): load the whole
# file, and per module rebuild ΔW = up @ down in fp32 (convs flattened), run a full SVD
# (full_matrices=True), keep the top k, up = U·diag(S), down = Vh, alpha = alpha/r·k.
KOHYA = """
import sys, torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
src, out, new_rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
sd = load_file(src)
with safe_open(src, "pt") as f:
    meta = f.metadata() or {}
result = {}
with torch.no_grad():
    for key in sorted(k for k in sd if k.endswith(".lora_down.weight")):
        name = key[: -len(".lora_down.weight")]
        down, up = sd[key], sd[name + ".lora_up.weight"]
        dtype, rank = down.dtype, down.shape[0]
        alpha = float(sd[name + ".alpha"]) if name + ".alpha" in sd else float(rank)
        full = up.float().flatten(1) @ down.float().flatten(1)
        U, S, Vh = torch.linalg.svd(full)
        k = min(new_rank, *full.shape)
        new_up, new_down = U[:, :k] @ torch.diag(S[:k]), Vh[:k]
        if down.dim() == 4:
            new_up, new_down = new_up.reshape(*new_up.shape, 1, 1), new_down.reshape(k, *down.shape[1:])
        result[name + ".lora_up.weight"] = new_up.to(dtype).contiguous()
        result[name + ".lora_down.weight"] = new_down.to(dtype).contiguous()
        result[name + ".alpha"] = torch.tensor(alpha / rank * k).to(dtype)
save_file(result, out, meta)
"""


def _difference(ours: Path, theirs: Path) -> tuple[float, int]:
    """max over modules of ‖ΔW_ours − ΔW_kohya‖_F / ‖ΔW_kohya‖_F (from the factors: exact,
    no ΔW formed), and the number of modules compared."""
    import loratool
    from loratool.lowrank import product_norm, stack_factors
    from loratool.ops.factored import Term

    a, b = loratool.load(ours), loratool.load(theirs)
    worst = 0.0
    for key, m in a.modules.items():
        mine, other = Term(m).factors(), Term(b.modules[key]).factors()
        diff = product_norm(*stack_factors([mine, (-other[0], other[1])])).item()
        worst = max(worst, diff / product_norm(*other).item())
    return worst, len(a.modules)


def run() -> None:
    subset = os.environ.get("LORATOOL_BENCH_RESIZE") == "subset"
    src = sdxl_subset_r128() if subset else sdxl_r128()
    data = scratch()
    size = src.stat().st_size
    print(f"   source: {src.name}, {size / 1e6:.0f} MB, rank 128 -> {NEW_RANK}")
    ours_out, kohya_out = data / "resize_ours.safetensors", data / "resize_kohya.safetensors"
    cli = [sys.executable, "-m", "loratool", "resize", str(src), "--rank", str(NEW_RANK), "--force", "-o", str(ours_out)]
    t_ours, rss_ours = min(run_measured(cli) for _ in range(2))
    t_nov, rss_nov = run_measured([*cli, "--no-verify"])
    t_kohya, rss_kohya = run_measured([sys.executable, "-c", KOHYA, str(src), str(kohya_out), str(NEW_RANK)])
    diff, n = _difference(ours_out, kohya_out)
    print(f"   loratool resize (verified): {t_ours:.2f} s, peak RSS {rss_ours / 1e6:.0f} MB; "
          f"--no-verify {t_nov:.2f} s, {rss_nov / 1e6:.0f} MB")
    print(f"   kohya's method (full ΔW + full SVD per module): {t_kohya:.2f} s, peak RSS {rss_kohya / 1e6:.0f} MB")
    print(f"   -> loratool {t_kohya / t_ours:.1f}x faster ({t_kohya / t_nov:.1f}x without verification), "
          f"{rss_kohya / rss_ours:.1f}x less memory")
    print(f"   max ‖ΔW_loratool − ΔW_kohya‖_F / ‖ΔW_kohya‖_F over {n} modules: {diff:.2g} (both fp16)")
    ours_out.unlink(missing_ok=True)
    kohya_out.unlink(missing_ok=True)

"""convert SDXL rank-128 kohya -> diffusers and -> PEFT: wall vs `cp` of the same file,
peak RSS vs the largest tensor, and diffusers' own helpers as the peer — same run."""

from __future__ import annotations

import shutil
import sys

from bench.common import run_measured, scratch
from bench.sdxl import sdxl_r128
from loratool.io.safetensors import read_header

PEER = """
import sys, types
from safetensors.torch import save_file
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from fixtures.generate import SDXL_UNET_CONFIG
src, target, out = sys.argv[1:4]
cfg = types.SimpleNamespace(**SDXL_UNET_CONFIG)
sd, alphas = StableDiffusionXLPipeline.lora_state_dict(src, unet_config=cfg)
if target == "peft":
    sd = convert_state_dict_to_peft(convert_unet_state_dict_to_peft(sd))
save_file({k: v.contiguous() for k, v in sd.items()}, out)
"""


def fresh_best(argv: list[str], target, repeat: int = 3) -> tuple[float, int]:
    """Best wall / peak RSS over ``repeat`` runs, each writing to a target that does not exist."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        runs.append(run_measured(argv))
    return min(r[0] for r in runs), max(r[1] for r in runs)


def run() -> None:
    src = sdxl_r128()
    data = scratch()
    header = read_header(src)
    largest = max(t.nbytes for t in header.tensors.values())
    size = src.stat().st_size
    print(f"   source: {src.name}, {size / 1e6:.0f} MB, {len(header.tensors)} tensors, largest {largest / 1e6:.1f} MB")
    copy = data / "cp_copy.safetensors"
    t_cp, _ = fresh_best(["cp", str(src), str(copy)], copy)
    t_cps, _ = fresh_best(["sh", "-c", f"cp {src} {copy} && sync {copy}"], copy)
    print(f"   cp: {t_cp:.3f} s; cp + sync (as durable as loratool's fsynced output): {t_cps:.3f} s")
    budget = 1.5 * largest + 300e6
    for target, out in (("diffusers", data / "out_diffusers.safetensors"), ("peft", data / "out_peft")):
        for flags in ([], ["--no-verify"]):
            argv = [sys.executable, "-m", "loratool", "convert", str(src), "--to", target, "-o", str(out), *flags]
            t, rss = fresh_best(argv, out)
            label = f"{target}{' ' + flags[0] if flags else ' (verified)'}"
            print(f"   loratool -> {label}: {t:.3f} s = {t / t_cp:.2f}x cp, {t / t_cps:.2f}x cp+sync (target <= 2); "
                  f"peak RSS {rss / 1e6:.0f} MB (budget {budget / 1e6:.0f} MB: {'ok' if rss <= budget else 'OVER'})")
            if not flags:
                t_verified = t
        peer_out = data / f"peer_{target}.safetensors"
        t_peer, rss_peer = fresh_best([sys.executable, "-c", PEER, str(src), target, str(peer_out)], peer_out, repeat=1)
        print(f"   diffusers helpers -> {target}: {t_peer:.3f} s, peak RSS {rss_peer / 1e6:.0f} MB"
              f" -> loratool (verified) is {t_peer / t_verified:.1f}x faster")
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        peer_out.unlink(missing_ok=True)
    copy.unlink(missing_ok=True)

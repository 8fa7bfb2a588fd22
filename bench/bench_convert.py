"""convert SDXL rank-128 kohya -> diffusers and -> PEFT: wall vs `cp` of the same file,
peak RSS vs the largest tensor, and diffusers' own helpers as the peer — same run."""

from __future__ import annotations

import shutil
import sys

from bench.common import best_of, scratch
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


def run() -> None:
    src = sdxl_r128()
    data = scratch()
    header = read_header(src)
    largest = max(t.nbytes for t in header.tensors.values())
    size = src.stat().st_size
    print(f"   source: {src.name}, {size / 1e6:.0f} MB, {len(header.tensors)} tensors, largest {largest / 1e6:.1f} MB")
    t_cp, _ = best_of(["cp", str(src), str(data / "cp_copy.safetensors")])
    print(f"   cp: {t_cp:.3f} s")
    budget = 1.5 * largest + 300e6
    for target, out in (("diffusers", data / "out_diffusers.safetensors"), ("peft", data / "out_peft")):
        for flags in ([], ["--no-verify"]):
            argv = [sys.executable, "-m", "loratool", "convert", str(src), "--to", target, "-o", str(out), "--force", *flags]
            t, rss = best_of(argv)
            label = f"{target}{' ' + flags[0] if flags else ' (verified)'}"
            print(f"   loratool -> {label}: {t:.3f} s = {t / t_cp:.2f}x cp (target <= 2); "
                  f"peak RSS {rss / 1e6:.0f} MB (budget {budget / 1e6:.0f} MB: {'ok' if rss <= budget else 'OVER'})")
        peer_out = data / f"peer_{target}.safetensors"
        t_peer, rss_peer = best_of([sys.executable, "-c", PEER, str(src), target, str(peer_out)], repeat=1)
        print(f"   diffusers helpers -> {target}: {t_peer:.3f} s, peak RSS {rss_peer / 1e6:.0f} MB"
              f" -> loratool (verified) is {t_peer / t:.1f}x faster")
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        peer_out.unlink(missing_ok=True)
    (data / "cp_copy.safetensors").unlink(missing_ok=True)

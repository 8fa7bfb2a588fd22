"""merge a rank-64 kohya LoRA (every module kohya trains: UNet attention blocks + text
encoders) into real-shaped fp16 single-file checkpoints, SD1.5 (~2.1 GB) and SDXL
(~6.9 GB), incl. VAE and text encoders: wall against ``cp`` (and ``cp`` + ``sync``: our
output is fsynced) of the same checkpoint, peak RSS, and the same merge the way a
diffusers user does it today (whole model loaded: convert the single file, load the LoRA,
``fuse_lora``, save) — same run. Also ``check`` on the same pair (header only).

``LORATOOL_BENCH_SMALL=1`` runs a ~20 MB SD1.5 subset only, to test the benchmark itself;
``LORATOOL_BENCH_MERGE=sd15`` (or ``sdxl``) runs one of the two full-size cases.
Checkpoints and LoRAs are generated once, streamed, into bench/_data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, run_measured, scratch

GIB = 1024**3
RSS_GOAL = 1.3 * GIB

GEN_CKPT = """
import sys
from fixtures.checkpoints import checkpoint_table, write_single_file, select
from fixtures import generate as gen
family, small, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
table = checkpoint_table(family)
if small:
    table = select(table, {(t.component, t.path) for t in gen._sd15_lyco_subset()})
write_single_file(out, table, "F16", seed=0, metadata={"modelspec.title": "bench base"})
"""

GEN_LORA = """
import sys, torch
from pathlib import Path
from fixtures import generate as gen
family, small, out = sys.argv[1], sys.argv[2] == "1", Path(sys.argv[3])
if small:
    entries = gen._lora_entries(gen._sd15_lyco_subset(), 8, 8.0, torch.float16, 1, conv_rank=8, conv_alpha=8.0)
    gen._write_kohya(out, "sd1", gen.TOOL_KOHYA, entries, gen.kohya_metadata("sd1", "networks.lora", 8, 8.0, None, out.stem, torch.float16))
elif family == "sd1":
    gen.write_kohya_sd15(out, rank=64, alpha=32.0, dtype=torch.float16)
else:
    gen.write_kohya_sdxl(out, rank=64, dtype=torch.float16, modules="all", alpha=32.0)
"""

# The way a diffusers user merges today: the whole single file in memory, converted by
# diffusers' own single-file converters into models built from the published configs,
# the LoRA loaded by diffusers' kohya loader, fuse_lora, LoRA layers removed, saved.
PEER = """
import sys, types, torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import fuse_text_encoder_lora
from diffusers.loaders import single_file_utils as sfu
import transformers
from fixtures.checkpoints import FAMILIES
family, ckpt, lora, out = sys.argv[1:5]
fam = FAMILIES[family]

def real_buffers(model):  # non-persistent buffers (CLIP position_ids) stay on meta after assign
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                mod._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).to(buf.dtype).clone()

sd = load_file(ckpt)
with torch.device("meta"):
    unet = UNet2DConditionModel(**fam.unet)
unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, fam.unet), assign=True, strict=False)
models = {"unet": unet}
for te in fam.text_encoders:
    with torch.device("meta"):
        model = getattr(transformers, te.model_class)(transformers.CLIPTextConfig(**te.config))
    part = {k: v for k, v in sd.items() if k.startswith(te.prefix)}
    if te.layout == "hf":
        state = sfu.convert_ldm_clip_checkpoint(part)
    else:
        state = sfu.convert_open_clip_checkpoint(model, part, prefix=te.prefix)
    state.pop("text_model.embeddings.position_ids", None)
    model.load_state_dict(state, assign=True, strict=False)
    real_buffers(model)
    models[te.component] = model
real_buffers(unet)
vae = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
del sd
pipe = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
kwargs = {"unet_config": types.SimpleNamespace(**unet.config)} if family == "sdxl" else {}
state, alphas = pipe.lora_state_dict(lora, **kwargs)
pipe.load_lora_into_unet(state, alphas, unet, adapter_name="x")
for c, m in models.items():
    if c != "unet":
        pipe.load_lora_into_text_encoder(state, alphas, m, prefix=c, adapter_name="x")
unet.fuse_lora()
unet.unload_lora()
for c, m in models.items():
    if c != "unet":
        fuse_text_encoder_lora(m)
        m = m.merge_and_unload() if hasattr(m, "merge_and_unload") else m
tensors = {f"{c}.{k}": v.contiguous() for c, m in models.items() for k, v in m.state_dict().items()
           if "lora_" not in k and v.device.type != "meta"}  # meta: absent from a partial (small) checkpoint
tensors.update(vae)
save_file(tensors, out)
"""


def _fresh(argv: list[str], target: Path, repeat: int = 1) -> tuple[float, int]:
    """Best wall / largest peak RSS over ``repeat`` runs, each onto a target that does not exist."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        os.sync()
        runs.append(run_measured(argv))
    return min(r[0] for r in runs), max(r[1] for r in runs)


def _data(name: str, code: str, family: str, small: bool) -> Path:
    """Generate once (in a child process, so this one stays small), then reuse."""
    path = scratch() / name
    if not path.exists():
        tmp = path.with_name(path.name + ".part")
        subprocess.run([sys.executable, "-c", code, family, "1" if small else "0", str(tmp)], check=True, cwd=ROOT)
        tmp.rename(path)
    return path


def run() -> None:
    small = os.environ.get("LORATOOL_BENCH_SMALL") == "1"
    cases = [("sd15", "sd1")] if small else [("sd15", "sd1"), ("sdxl", "sdxl")]
    only = os.environ.get("LORATOOL_BENCH_MERGE")
    cases = [c for c in cases if only in (None, c[0])]
    data = scratch()
    for name, family in cases:
        tag = f"{name}{'_small' if small else ''}"
        ckpt = _data(f"merge_{tag}_ckpt.safetensors", GEN_CKPT, family, small)
        lora = _data(f"merge_{tag}_lora.safetensors", GEN_LORA, family, small)
        size = ckpt.stat().st_size
        print(f"   {name}: checkpoint {size / 1e9:.2f} GB fp16, LoRA {lora.stat().st_size / 1e6:.0f} MB (kohya, rank {8 if small else 64})")
        copy, out = data / "merge_cp.safetensors", data / "merge_out.safetensors"
        t_cp, _ = _fresh(["cp", str(ckpt), str(copy)], copy, 3)
        t_cps, _ = _fresh(["sh", "-c", f"cp {ckpt} {copy} && sync {copy}"], copy, 3)
        copy.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "loratool", "merge", str(ckpt), str(lora), "-o", str(out), "--device", "cpu"]
        t, rss = _fresh(argv, out, 3)
        print(f"   cp {t_cp:.2f} s, cp + sync {t_cps:.2f} s; loratool merge {t:.2f} s = {t / t_cp:.2f}x cp, "
              f"{t / t_cps:.2f}x cp+sync (goal <= 2x); peak RSS {rss / GIB:.2f} GiB (goal <= 1.3: {'ok' if rss <= RSS_GOAL else 'OVER'})")
        out.unlink(missing_ok=True)
        t_check, rss_check = min(run_measured([sys.executable, "-m", "loratool", "check", str(lora), "--base", str(ckpt)]) for _ in range(3))
        print(f"   loratool check (headers only): {t_check:.2f} s, {rss_check / 1e6:.0f} MB RSS (goal: well under 1 s)")
        peer_out = data / "merge_peer.safetensors"
        t_peer, rss_peer = _fresh([sys.executable, "-c", PEER, family, str(ckpt), str(lora), str(peer_out)], peer_out)
        peer_out.unlink(missing_ok=True)
        print(f"   diffusers (load whole model, fuse_lora, save): {t_peer:.2f} s, peak RSS {rss_peer / GIB:.2f} GiB "
              f"-> loratool {t_peer / t:.1f}x faster, {rss_peer / max(rss, 1):.1f}x less memory")

"""``extract`` on the CPU and on a CUDA GPU, side by side, for SD1.5- and SDXL-shaped pairs.

Self-contained (torch + this repository; no diffusers, safetensors or network): for each
family it writes a base/tuned pair holding every module kohya's LoRA targets (from
loratool's catalog, real shapes and single-file keys, OpenCLIP q/k/v rows fused: SD1.5
264 modules, SDXL 986), random fp16 base values and a planted rank-64 ΔW + noise on every
module (as ``bench_extract``, without the other tensors); then times ``loratool.ops.extract.extract`` at rank 32 with the text encoders on,
``device="cpu"`` and ``device="cuda"`` (same code, randomized SVD; CUDA batched), and
prints a table: wall, seconds per GB of checkpoint read, speed-up, and each run's error
(relative Frobenius error over all modules; the two must agree).

    python bench/gpu_extract.py                 # on a machine with a GPU (< 5 min on an H200 box)
    python bench/gpu_extract.py --cpu-only --quick   # a quick local check of the script itself

The pairs go to ``--dir`` (default: a temp folder, deleted at the end). Values are made on the
GPU when there is one (seeded per key; the SDXL pair is 12 GB).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PLANTED_RANK, SCALE, NOISE = 64, 1e-3, 1e-4


def write_pair(folder: Path, family: str, quick: bool, device: str) -> tuple[Path, Path, int]:
    """base.safetensors / tuned.safetensors with every kohya target (``quick``: the first
    module of each shape per component); values made on ``device`` (a GPU makes the 12 GB
    SDXL pair in seconds), seeded per key and module. Returns the paths and module count."""
    import torch

    from fixtures.checkpoints import Entry, write_entries
    from fixtures.extract_pairs import catalog_table, kohya_targets, module_seed

    chosen, seen = [], set()
    for component, path, shape, _ in kohya_targets(family):
        if quick and (component, shape) in seen:
            continue
        seen.add((component, shape))
        chosen.append((component, path))
    table = catalog_table(family, set(chosen))
    wanted = set(chosen)

    def make(t, tuned: bool) -> torch.Tensor:  # noqa: ANN001
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(t.key.encode()))
        v = torch.empty(t.shape, device=device).uniform_(-0.1, 0.1, generator=gen)
        for p in t.pieces if tuned else ():
            module = p.key.removesuffix(".weight")
            if (p.component, module) not in wanted:
                continue
            g = torch.Generator(device=device).manual_seed(module_seed(p.component, module))
            m, n = p.shape[0], math.prod(p.shape[1:])
            a = torch.randn(m, PLANTED_RANK, generator=g, device=device)
            b = torch.randn(PLANTED_RANK, n, generator=g, device=device)
            d = (a @ b) * (SCALE / PLANTED_RANK**0.5) + torch.randn(m, n, generator=g, device=device) * NOISE
            d = d.reshape(p.shape).T if p.transposed else d.reshape(p.shape)
            part = v if p.rows is None else v[p.rows[0] : p.rows[1]]
            part += d.reshape(part.shape)
        return v.half().cpu()

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, tuned in (("base", False), ("tuned", True)):
        entries = [Entry(t.key, "F16", t.shape, lambda t=t, tuned=tuned: make(t, tuned)) for t in table]
        paths.append(write_entries(folder / f"{name}.safetensors", entries))
    return paths[0], paths[1], len(chosen)


def timed(base: Path, tuned: Path, out: Path, device: str, rank: int, exact: bool) -> tuple[float, float, int]:
    from loratool.ops.extract import extract

    t0 = time.perf_counter()
    r = extract(base, tuned, out, rank=rank, text_encoders="on", device=device, force=True, exact=exact)
    wall = time.perf_counter() - t0
    assert r.device == device, (r.device, device)
    return wall, r.summary()["error"], r.summary()["extracted"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="sd1,sdxl", help="comma-separated: sd1, sd2, sdxl")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="one module per shape (a quick check)")
    ap.add_argument("--cpu-only", action="store_true", help="skip CUDA (to check the script without a GPU)")
    ap.add_argument("--dir", type=Path, help="where the pairs are written (default: a temp folder, removed)")
    ap.add_argument("--exact", action="store_true", help="time the exact economy SVD instead of the randomized one")
    args = ap.parse_args(argv)

    import torch

    cuda = not args.cpu_only
    if cuda and not torch.cuda.is_available():
        print("torch sees no CUDA device; run with --cpu-only", file=sys.stderr)
        return 2
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="loratool-gpu-extract-"))
    gpu = torch.cuda.get_device_name(0) if cuda else "-"
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, GPU: {gpu}; rank {args.rank}, text encoders on, "
          f"{'exact' if args.exact else 'randomized'} SVD")
    if cuda:
        torch.zeros(1, device="cuda")  # CUDA context up before timing
    rows = []
    try:
        for family in args.families.split(","):
            t0 = time.perf_counter()
            base, tuned, n = write_pair(workdir / family, family, args.quick, "cuda" if cuda else "cpu")
            size = (base.stat().st_size + tuned.stat().st_size) / 1e9
            print(f"{family}: wrote the pair ({n} modules, {size:.2f} GB) in {time.perf_counter() - t0:.1f} s", flush=True)
            out = workdir / family / "lora.safetensors"
            cpu_wall, cpu_err, done = timed(base, tuned, out, "cpu", args.rank, args.exact)
            print(f"{family}: cpu {cpu_wall:.2f} s", flush=True)
            gpu_wall = gpu_err = None
            if cuda:
                gpu_wall, gpu_err, _ = timed(base, tuned, out, "cuda", args.rank, args.exact)
                print(f"{family}: cuda {gpu_wall:.2f} s", flush=True)
            rows.append((family, done, size, cpu_wall, gpu_wall, cpu_err, gpu_err))
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"| pair | modules | GB read | CPU wall | {'GPU wall | speed-up | ' if cuda else ''}error CPU{' / GPU' if cuda else ''} |")
    print(f"|---|---|---|---|{'---|---|' if cuda else ''}---|")
    for family, done, size, cpu_wall, gpu_wall, cpu_err, gpu_err in rows:
        gpu_cols = f"{gpu_wall:.2f} s | {cpu_wall / gpu_wall:.1f}x | " if gpu_wall is not None else ""
        errs = f"{cpu_err:.4f}" + (f" / {gpu_err:.4f}" if gpu_err is not None else "")
        print(f"| {family} | {done} | {size:.2f} | {cpu_wall:.2f} s | {gpu_cols}{errs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

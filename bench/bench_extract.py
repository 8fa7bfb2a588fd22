"""extract from a real-shaped SD1.5 pair at rank 32, text encoders on, CPU: loratool vs
kohya's method (PEERS-kohya.md §1), each in its own child process of the same run:
wall, peak RSS, and each one's Frobenius error over the Eckart–Young optimum.

The pair: a whole SD1.5 checkpoint (UNet, CLIP-L, VAE; fixtures/checkpoints.py, random
fp16 values) and the same checkpoint with a planted ΔW on every module kohya's LoRA
targets (192 UNet + 72 text-encoder modules): a rank-64 product of Gaussian factors (RMS
1e-3, W0's is 0.058) plus Gaussian noise (RMS 1e-4), stored in fp16. Written once,
streamed, into ``bench/_data``.

kohya's method, written here from that description: both checkpoints loaded whole and
cast to fp32 (kohya builds both models in fp32), every targeted ΔW computed and held
before the SVDs, a full ``torch.linalg.svd`` (``full_matrices=True``) per module, S folded
into U, both factors clamped at the 0.99 quantile of their signed values
(``torch.quantile``), saved in fp16 (as loratool's default) with alpha = rank. The text
encoder is extracted by both (kohya's ``--min_diff`` 0.01 check is reported, not applied).

``LORATOOL_BENCH_EXTRACT=subset`` runs a pair holding one targeted module of each shape
(plus the anchors the checkpoint reader needs): a quick check of the machinery.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, run_measured, scratch

RANK = 32
PLANTED_RANK = 64
SCALE, NOISE = 1e-3, 1e-4
MIN_DIFF = 0.01  # kohya's default --min_diff
GIB = 1 << 30
VERSION = 1  # of the generated pair (bump when the recipe changes)

# kohya's extract_lora_from_models.py as PEERS-kohya.md §1 describes it (see the docstring).
KOHYA = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
base, tuned, out, targets_json, rank, q = sys.argv[1:7]
rank, q = int(rank), float(q)
targets = json.load(open(targets_json))

def whole_fp32(path):
    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(path).items()}

org, tun = whole_fp32(base), whole_fp32(tuned)
diffs = {}
with torch.no_grad():
    for t in targets:
        w0, w1 = org[t["key"]], tun[t["key"]]
        if t["rows"]:
            w0, w1 = w0[t["rows"][0]:t["rows"][1]], w1[t["rows"][0]:t["rows"][1]]
        diffs[t["name"]] = (w1 - w0).reshape(t["shape"])
    te_max = max((diffs[t["name"]].abs().max().item() for t in targets if t["te"]), default=0.0)
    result = {}
    for t in targets:
        d = diffs.pop(t["name"])
        out_dim, in_dim = d.shape[0], d.shape[1]
        conv = d.dim() == 4
        mat = d.flatten(1) if conv and d.shape[2:] != (1, 1) else d.reshape(out_dim, -1)
        r = min(rank, mat.shape[0], mat.shape[1])
        U, S, Vh = torch.linalg.svd(mat)
        U = U[:, :r] @ torch.diag(S[:r])
        Vh = Vh[:r, :]
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), q)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        if conv:
            U = U.reshape(out_dim, r, 1, 1)
            Vh = Vh.reshape(r, in_dim, d.shape[2], d.shape[3])
        result[t["name"] + ".lora_up.weight"] = U.to(torch.float16).contiguous()
        result[t["name"] + ".lora_down.weight"] = Vh.to(torch.float16).contiguous()
        result[t["name"] + ".alpha"] = torch.tensor(float(r)).to(torch.float16)
save_file(result, out, {"ss_network_dim": str(rank), "te_max_abs_diff": repr(te_max)})
"""


def _subset() -> bool:
    return os.environ.get("LORATOOL_BENCH_EXTRACT") == "subset"


def targets(subset: bool) -> list[dict]:
    """kohya's targets (fixtures/extract_pairs.py's list): single-file key, fused rows,
    kohya name, module shape; with ``subset`` the first module of each (component, shape)."""
    from fixtures.extract_pairs import kohya_targets
    from loratool.arch import get_catalog

    catalog = get_catalog("sd1")
    out, seen = [], set()
    for component, path, shape, _ in kohya_targets("sd1"):
        if subset and (component, shape) in seen:
            continue
        seen.add((component, shape))
        spec = catalog.get(component, path)
        assert spec is not None
        out.append({"component": component, "path": path, "key": spec.ldm_key, "rows": spec.ldm_slice,
                    "name": spec.kohya_name, "shape": list(shape), "te": component != "unet"})
    return out


def write_pair(folder: str, subset: bool) -> None:
    """base.safetensors and tuned.safetensors (run in a child process: see bench/sdxl.py)."""
    from fixtures.checkpoints import checkpoint_table, select
    from fixtures.extract_pairs import module_seed, planted_delta, write_checkpoint

    wanted = {(t["component"], t["path"]) for t in targets(subset)}
    table = checkpoint_table("sd1")
    if subset:
        table = select(table, wanted)

    def delta_for(component: str, path: str, shape: tuple[int, ...]):  # noqa: ANN202
        if (component, path) not in wanted:
            return None
        return planted_delta(shape, PLANTED_RANK, module_seed(component, path), scale=SCALE, noise=NOISE)

    write_checkpoint(Path(folder) / "base.safetensors", table, "F16")
    write_checkpoint(Path(folder) / "tuned.safetensors", table, "F16", delta_for=delta_for)


def pair(subset: bool) -> Path:
    folder = scratch() / f"extract_sd15{'_subset' if subset else ''}_v{VERSION}"
    if not (folder / "tuned.safetensors").exists():
        tmp = folder.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        code = f"import sys\nfrom bench.bench_extract import write_pair\nwrite_pair(sys.argv[1], {subset})\n"
        subprocess.run([sys.executable, "-c", code, str(tmp)], check=True, cwd=ROOT)
        tmp.rename(folder)
    return folder


def _errors(folder: Path, lora: Path, modules: list[dict]) -> tuple[float, float, float]:
    """(‖error‖ over ‖optimum‖ for all modules together, worst module's ratio, max |ΔW| of
    the text encoder). ΔW from the files; the optimum from float64 Gram eigenvalues."""
    import torch
    from safetensors import safe_open

    err_sq = opt_sq = 0.0
    worst, te_max = 0.0, 0.0
    with safe_open(str(folder / "base.safetensors"), "pt") as b, safe_open(str(folder / "tuned.safetensors"), "pt") as t, \
            safe_open(str(lora), "pt") as f:
        for m in modules:
            w0, w1 = b.get_tensor(m["key"]), t.get_tensor(m["key"])
            if m["rows"]:
                w0, w1 = w0[m["rows"][0] : m["rows"][1]], w1[m["rows"][0] : m["rows"][1]]
            delta = (w1.double() - w0.double()).reshape(m["shape"][0], -1)
            if m["te"]:
                te_max = max(te_max, delta.abs().max().item())
            gram = delta @ delta.T if delta.shape[0] <= delta.shape[1] else delta.T @ delta
            eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
            opt = eig[RANK:].sum().item()
            up = f.get_tensor(f"{m['name']}.lora_up.weight").double()
            down = f.get_tensor(f"{m['name']}.lora_down.weight").double()
            k = down.shape[0]
            alpha = f.get_tensor(f"{m['name']}.alpha").item()
            err = (delta - (alpha / k) * up.reshape(-1, k) @ down.reshape(k, -1)).square().sum().item()
            err_sq, opt_sq = err_sq + err, opt_sq + opt
            worst = max(worst, (err / opt) ** 0.5)
    return (err_sq / opt_sq) ** 0.5, worst, te_max


def run() -> None:
    subset = _subset()
    folder = pair(subset)
    base, tuned = folder / "base.safetensors", folder / "tuned.safetensors"
    modules = targets(subset)
    data = scratch()
    size = base.stat().st_size + tuned.stat().st_size
    print(f"   pair: SD1.5{' subset' if subset else ''}, fp16, {size / 1e9:.2f} GB in all; {len(modules)} modules with "
          f"planted rank-{PLANTED_RANK} ΔW + noise; extracted at rank {RANK}, text encoders on, CPU")
    ours_out, kohya_out = data / "extract_ours.safetensors", data / "extract_kohya.safetensors"
    targets_json = data / "extract_targets.json"
    targets_json.write_text(json.dumps(modules))
    cli = [sys.executable, "-m", "loratool", "extract", str(base), str(tuned), "-o", str(ours_out), "--rank", str(RANK),
           "--text-encoders", "on", "--device", "cpu", "--force"]
    t_ours, rss_ours = min(run_measured(cli) for _ in range(2))
    t_kohya, rss_kohya = run_measured([sys.executable, "-c", KOHYA, str(base), str(tuned), str(kohya_out),
                                       str(targets_json), str(RANK), "0.99"])
    ratio_ours, worst_ours, te_max = _errors(folder, ours_out, modules)
    ratio_kohya, worst_kohya, _ = _errors(folder, kohya_out, modules)
    speed = t_kohya / t_ours
    print(f"   loratool extract: {t_ours:.2f} s, peak RSS {rss_ours / GIB:.2f} GiB")
    print(f"   kohya's method (whole fp32 models, full SVD, 0.99 clamp): {t_kohya:.2f} s, peak RSS {rss_kohya / GIB:.2f} GiB")
    print(f"   -> loratool {speed:.1f}x faster (goal ≥ 10x {'✔' if speed >= 10 else '✘'}), "
          f"{rss_kohya / rss_ours:.1f}x less memory (goal ≤ 2.5 GiB {'✔' if rss_ours <= 2.5 * GIB else '✘'})")
    print(f"   error / Eckart–Young optimum, all modules (worst module): loratool {ratio_ours:.4f} ({worst_ours:.4f}), "
          f"kohya {ratio_kohya:.4f} ({worst_kohya:.4f}) (goal ≤ 1.01 {'✔' if ratio_ours <= 1.01 else '✘'})")
    dropped = "would have dropped" if te_max <= MIN_DIFF else "would have kept"
    print(f"   kohya's default --min_diff {MIN_DIFF} {dropped} the text encoder (max |ΔW| {te_max:.3g})")
    for p in (ours_out, kohya_out, targets_json):
        p.unlink(missing_ok=True)

"""``loratool scan`` of a 2,000-file library: the first (header-only) scan and an incremental
re-scan, beside a baseline that opens every file with ``safetensors.safe_open`` in one
process (keys + metadata) — what a script that lists a library does.

The library is generated from the shipped fixtures (mixed formats and families, real key
names, PEFT folders as folders) in an A1111-like tree with Civitai Helper sidecars. Each
file is a variant of a fixture with its own metadata and data bytes (distinct hashes); the
tensors are laid out small-first and the large ones left as holes (a sparse file), so
2,000 real-shaped files take little disk. Goals (issue 10, 2 CPUs): first scan ≤ 10 s,
re-scan ≤ 2 s. ``BENCH_SCAN_FILES`` picks the size (default 2000; e.g. 200 for a check).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

from bench.common import ROOT, best_of, scratch

FIXTURES = ROOT / "fixtures"
SMALL = 64  # tensors up to this many bytes (alphas, scalars) are written; larger ones are holes
FOLDERS = [f"{topic}/{family}" for topic in ("characters", "styles", "concepts", "clothing", "poses")
           for family in ("sd15", "sdxl", "misc")]
VERSION = "1"  # bump when the layout changes: a cached library is rebuilt

BASELINE = """
import os, sys
from safetensors import safe_open
n = keys = 0
for folder, dirs, files in os.walk(sys.argv[1]):
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "np") as fh:
                keys += len(fh.keys())
                fh.metadata()
            n += 1
print(n, keys)
"""


def _variant(src: Path, dst: Path, index: int) -> None:
    """``src`` with its own title and a few data bytes of its own; large tensors sparse."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None) or {}
    meta["modelspec.title"] = f"{dst.stem} {index}"
    base = 8 + n
    order = sorted(header, key=lambda k: (header[k]["data_offsets"][1] - header[k]["data_offsets"][0] > SMALL, k))
    new: dict[str, object] = {"__metadata__": meta}
    chunks: list[tuple[int, bytes]] = []  # (offset in the data area, bytes to write)
    pos = 0
    marked = False
    for key in order:
        entry = header[key]
        start, end = entry["data_offsets"]
        size = end - start
        new[key] = {**entry, "data_offsets": [pos, pos + size]}
        if size <= SMALL:
            chunks.append((pos, raw[base + start : base + end]))
        elif not marked and size >= 8:  # a first element of its own: distinct data hash
            chunks.append((pos, struct.pack("<Q", index + 1)[: 2 if entry["dtype"] in ("F16", "BF16") else 4]))
            marked = True
        pos += size
    text = json.dumps(new, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for offset, data in chunks:
            fh.seek(8 + len(text) + offset)
            fh.write(data)
        fh.truncate(8 + len(text) + pos)


def library(count: int) -> Path:
    """The generated library (cached in bench/_data by size and layout version)."""
    lib = scratch() / f"scan_lib_{count}"
    marker = lib / ".complete"
    if marker.exists() and marker.read_text() == VERSION:
        return lib
    shutil.rmtree(lib, ignore_errors=True)
    sources = sorted(p for p in FIXTURES.iterdir() if p.suffix == ".safetensors" or p.is_dir())
    for i in range(count):
        src = sources[i % len(sources)]
        folder = lib / "models" / "Lora" / FOLDERS[i % len(FOLDERS)]
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{src.name.removesuffix('.safetensors')}_{i:04}"
        if src.is_dir():  # a PEFT folder stays a folder
            (folder / stem).mkdir()
            shutil.copy(src / "adapter_config.json", folder / stem / "adapter_config.json")
            _variant(src / "adapter_model.safetensors", folder / stem / "adapter_model.safetensors", i)
        else:
            _variant(src, folder / f"{stem}.safetensors", i)
        if i % 2 == 0:
            (folder / f"{stem}.civitai.info").write_text(json.dumps({"id": i, "name": stem}))
        if i % 3 == 0:
            (folder / f"{stem}.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        if i % 50 == 0:
            (folder / f"deleted_{i}.civitai.info").write_text("{}")
    marker.write_text(VERSION)
    return lib


def run() -> None:
    count = int(os.environ.get("BENCH_SCAN_FILES", "2000"))
    lib = library(count)
    db = scratch() / f"scan_{count}.sqlite3"
    cli = [sys.executable, "-m", "loratool", "scan", str(lib), "--db", str(db)]

    def fresh_scan() -> tuple[float, int]:
        for p in db.parent.glob(db.name + "*"):
            p.unlink()
        return best_of(cli, repeat=1)

    best_of([sys.executable, "-c", BASELINE, str(lib)], repeat=1)  # page cache warm
    first = min(fresh_scan() for _ in range(2))
    rescan, rss = best_of(cli, repeat=3)
    peer, peer_rss = best_of([sys.executable, "-c", BASELINE, str(lib)], repeat=3)
    jobs = os.cpu_count() or 1

    def goal(seconds: float, limit: float) -> str:
        if count != 2000:
            return f"target <= {limit:g} s applies to 2,000 files"
        return f"target <= {limit:g} s: {'met' if seconds <= limit else 'missed'}"
    print(f"   library: {count} adapters (A1111-like tree, sidecars, PEFT folders), {jobs} CPU(s)")
    print(f"   first scan, header-only, {jobs} workers: {first[0]:.2f} s, {first[1] / 2**20:.0f} MiB RSS "
          f"-> {first[0] / peer:.1f}x the baseline ({goal(first[0], 10)})")
    print(f"   re-scan, nothing changed: {rescan:.2f} s, {rss / 2**20:.0f} MiB RSS -> {rescan / peer:.2f}x the baseline "
          f"({goal(rescan, 2)})")
    print(f"   baseline, safe_open of every file in one process (keys + metadata): {peer:.2f} s, {peer_rss / 2**20:.0f} MiB RSS")
    for p in db.parent.glob(db.name + "*"):
        p.unlink()

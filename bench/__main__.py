"""Run every benchmark; each prints its own figures and ratios against a peer or baseline.

Usage: ``python -m bench [NAME...]`` (default: all). Scratch data goes to ``bench/_data``.
"""

from __future__ import annotations

import compileall
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> module with a ``run() -> None`` function. One line per benchmark.
BENCHES: dict[str, str] = {
    "inspect": "bench.bench_inspect",
    "header": "bench.bench_header",
    "hashing": "bench.bench_hashing",
    "convert": "bench.bench_convert",
    "resize": "bench.bench_resize",
    "download": "bench.bench_download",
    "merge": "bench.bench_merge",
    "catalog": "bench.bench_catalog",
    "validate": "bench.bench_validate",
    "scan": "bench.bench_scan",
    "extract": "bench.bench_extract",
}


def main(argv: list[str]) -> int:
    if argv[:1] == [IN_PROCESS]:
        return _run_here(argv[1])
    names = argv or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    # Byte-compile loratool as an installed package is: with PYTHONDONTWRITEBYTECODE set
    # (as on the development VM), every command would otherwise recompile its imports.
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "loratool", quiet=1)
    failed = 0
    for name in names:
        # Each benchmark in a fresh process: on Linux a child's peak RSS starts from its
        # parent's at fork, so one benchmark's memory would inflate the next one's figures.
        failed += subprocess.run([sys.executable, "-m", "bench", IN_PROCESS, name]).returncode != 0
    return 1 if failed else 0


IN_PROCESS = "--in-process"


def _run_here(name: str) -> int:
    module_name = BENCHES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"== {name}: not present yet")
        return 0
    print(f"== {name}", flush=True)
    os.sync()  # start each benchmark with no writeback of the previous one in flight
    t0 = time.perf_counter()
    module.run()
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

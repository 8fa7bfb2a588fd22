"""Run every benchmark; each prints its own figures and ratios against a peer or baseline.

Usage: ``python -m bench [NAME...]`` (default: all). Scratch data goes to ``bench/_data``.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

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
    names = argv or list(BENCHES)
    for name in names:
        module_name = BENCHES.get(name)
        if module_name is None:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            print(f"== {name}: not present yet")
            continue
        print(f"== {name}")
        os.sync()  # start each benchmark with no writeback of the previous one in flight
        t0 = time.perf_counter()
        module.run()
        print(f"   ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

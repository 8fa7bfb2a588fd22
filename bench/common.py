"""Helpers shared by benchmarks: scratch dir, timing, peak RSS of a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "_data"


def scratch() -> Path:
    DATA.mkdir(parents=True, exist_ok=True)
    return DATA


def run_measured(argv: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one child process, measured with wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else b""
    if status != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}… failed: {err.decode(errors='replace')[-800:]}")
    return wall, usage.ru_maxrss * 1024


def best_of(argv: list[str], repeat: int = 3) -> tuple[float, int]:
    """Best wall time over ``repeat`` runs and the largest peak RSS seen."""
    runs = [run_measured(argv) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]

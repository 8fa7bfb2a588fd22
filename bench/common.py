"""Helpers shared by benchmarks: scratch dir, timing, peak RSS of a child process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "_data"


def scratch() -> Path:
    DATA.mkdir(parents=True, exist_ok=True)
    return DATA


def run_measured(argv: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one child process (:func:`measure_child`)."""
    wall, rss, _ = measure_child(argv)
    return wall, rss


def measure_child(argv: list[str]) -> tuple[float, int, float]:
    """Wall time, peak RSS (bytes) and CPU seconds of one child process, measured with
    wait4 by the small launcher :mod:`bench.measure` (so this process's memory is not
    counted in the child's peak)."""
    proc = subprocess.run([sys.executable, "-m", "bench.measure", *argv], capture_output=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"{' '.join(argv[:3])}… could not be measured: {proc.stderr.decode(errors='replace')[-800:]}")
    result = json.loads(proc.stdout.splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}… failed: {proc.stderr.decode(errors='replace')[-800:]}")
    return result["wall"], result["rss"], result["cpu"]


def best_of(argv: list[str], repeat: int = 3) -> tuple[float, int]:
    """Best wall time over ``repeat`` runs and the largest peak RSS seen."""
    runs = [run_measured(argv) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def python_argv(code: str) -> list[str]:
    return [sys.executable, "-c", code]

"""Shared test helpers: paths, a raw safetensors writer, and running the real CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
REALWORLD = ROOT.parent / "shared" / "realworld"
LORATOOL = [sys.executable, "-m", "loratool"]


def write_raw_safetensors(path: Path, header: dict, data: bytes = b"", *, header_len: int | None = None) -> Path:
    """Write a safetensors file byte by byte (lets tests build broken ones)."""
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m loratool ARGS`` in a subprocess, as a user would."""
    return subprocess.run(
        [*LORATOOL, *args], capture_output=True, text=True, cwd=cwd or ROOT,
        env={**os.environ, **(env or {})}, timeout=300,
    )


def source_path(name: str) -> Path:
    """``fixtures/…`` or ``realworld/…`` as a path (real-world files lie beside the checkout)."""
    if name.startswith("realworld/"):
        if not REALWORLD.is_dir():
            pytest.skip(f"{REALWORLD} is absent (it lies beside the checkout in CI)")
        return REALWORLD / name.removeprefix("realworld/")
    return ROOT / name


@pytest.fixture
def realworld() -> Path:
    if not REALWORLD.is_dir():
        pytest.skip(f"{REALWORLD} is absent (it lies beside the checkout in CI)")
    return REALWORLD

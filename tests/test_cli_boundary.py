"""The CLI boundary: an unexpected exception is one line that says it is a bug, names the
file, points to --debug and exits 70; in a multi-file run the other files still come out.

The exception is injected by the test (the CLI runs in a subprocess whose decode step is
wrapped to raise for files named ``crash*``); production code has no hook for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loratool.cli.main import BUG_MARK, EXIT_BUG
from tests.conftest import FIXTURES, ROOT

INJECT = """
import loratool.ops.convert as convert_op
import loratool.ops.inspect as inspect_op
real = inspect_op.decode
def decode(source, *args, **kwargs):
    if "crash" in source.path:
        raise RuntimeError("boom\\nsecond line")
    return real(source, *args, **kwargs)
inspect_op.decode = convert_op.decode = decode
from loratool.cli.main import main
main()
"""


def run_injected(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", INJECT, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "400"}, timeout=300)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    names = {"good": "sd15_kohya_lora.safetensors", "crash": "sdxl_kohya_lora.safetensors", "other": "sd15_kohya_loha.safetensors"}
    out = {}
    for role, name in names.items():
        out[role] = tmp_path / f"{role}_{name}"
        shutil.copy(FIXTURES / name, out[role])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    out["bad"] = tmp_path / "bad.safetensors"
    return out


def assert_bug_line(line: str, path: Path) -> None:
    assert line.startswith(f"error: {path}: internal error (RuntimeError: boom second line)"), line
    assert BUG_MARK in line and "--debug" in line


def test_unexpected_error_is_one_line_naming_the_file(files: dict[str, Path]) -> None:
    result = run_injected("inspect", str(files["crash"]))
    assert result.returncode == EXIT_BUG
    (line,) = result.stderr.splitlines()
    assert_bug_line(line, files["crash"])
    assert result.stdout == ""


def test_debug_shows_the_traceback(files: dict[str, Path]) -> None:
    result = run_injected("--debug", "inspect", str(files["crash"]))
    assert result.returncode == EXIT_BUG
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError: boom" in result.stderr


def test_other_files_still_come_out_as_json(files: dict[str, Path]) -> None:
    result = run_injected("inspect", "--json", str(files["good"]), str(files["crash"]), str(files["bad"]), str(files["other"]))
    assert result.returncode == EXIT_BUG  # the worst outcome wins
    reports = json.loads(result.stdout)
    assert [r["path"] for r in reports] == [str(files["good"]), str(files["other"])]
    bug, bad = result.stderr.splitlines()
    assert_bug_line(bug, files["crash"])
    assert bad.startswith(f"error: {files['bad']}: not a safetensors file")


def test_other_files_still_come_out_as_tables(files: dict[str, Path]) -> None:
    result = run_injected("inspect", str(files["crash"]), str(files["good"]))
    assert result.returncode == EXIT_BUG
    assert str(files["good"]) in result.stdout and "kohya" in result.stdout
    (line,) = result.stderr.splitlines()
    assert_bug_line(line, files["crash"])


def test_input_errors_alone_keep_exit_1(files: dict[str, Path]) -> None:
    result = run_injected("inspect", str(files["bad"]), str(files["good"]))
    assert result.returncode == 1 and BUG_MARK not in result.stderr


def test_convert_bug_names_the_source_and_leaves_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    result = run_injected("convert", str(files["crash"]), "--to", "diffusers", "-o", str(out))
    assert result.returncode == EXIT_BUG
    (line,) = result.stderr.splitlines()
    assert_bug_line(line, files["crash"])
    assert list(out.parent.iterdir()) == []

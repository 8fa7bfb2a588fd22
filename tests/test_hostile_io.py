"""Inputs and outputs that used to end in a traceback, a hang or a mess: each now gives
one ``error: PATH: …`` line, a non-zero exit, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.civitai_server import TOKEN, CivitaiTestServer, Version, write_safetensors
from tests.conftest import FIXTURES, ROOT, run_cli

KOHYA = FIXTURES / "sdxl_kohya_lora.safetensors"
PAIR = {
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
}


def one_error(result: subprocess.CompletedProcess[str], path: Path | str, fragment: str, code: int = 1) -> None:
    """Exactly one ``error: PATH: …fragment…`` line on stderr, the exit code, no traceback."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def write_header(path: Path, raw: bytes, data: int = 0) -> Path:
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data))
    return path


# -- hostile strings and structures -------------------------------------------------------

@pytest.mark.parametrize("where", ["key", "metadata"])
def test_lone_surrogate_in_a_header(tmp_path: Path, where: str) -> None:
    """safetensors refuses a header with a lone surrogate escape; so does loratool, cleanly."""
    header: dict = dict(PAIR)
    if where == "key":
        header = {k.replace("proj_in", "proj_in\ud800"): v for k, v in header.items()}
    else:
        header["__metadata__"] = {"modelspec.title": "x\ud800"}  # a field inspect shows
    path = write_header(tmp_path / "s.safetensors", json.dumps(header).encode(), 64)
    one_error(run_cli("inspect", str(path)), path, "not valid JSON")
    one_error(run_cli("convert", str(path), "--to", "kohya", "-o", str(tmp_path / "o.safetensors")), path, "not valid JSON")
    assert not (tmp_path / "o.safetensors").exists()


def test_lone_surrogate_in_a_pickled_key(tmp_path: Path) -> None:
    path = tmp_path / "s.pt"
    torch.save({"lora_unet_x_proj_in\ud800.lora_down.weight": torch.ones(2, 4),
                "lora_unet_x_proj_in\ud800.lora_up.weight": torch.ones(4, 2)}, path)
    one_error(run_cli("inspect", str(path)), path, "is not valid Unicode")
    one_error(run_cli("convert", str(path), "--to", "diffusers", "--family", "sd1", "-o", str(tmp_path / "o.safetensors")),
              path, "is not valid Unicode")


def test_file_name_that_is_not_unicode(tmp_path: Path) -> None:
    """An undecodable file name prints with escapes instead of failing the output."""
    name = os.fsencode(tmp_path) + b"/lora\xff.safetensors"
    shutil.copy(KOHYA, name)
    wide = {**os.environ, "COLUMNS": "400"}  # the whole path on one line
    result = subprocess.run([sys.executable, "-m", "loratool", "inspect", name], capture_output=True, cwd=ROOT, timeout=120, env=wide)
    assert result.returncode == 0 and result.stderr == b""
    assert b"lora\\udcff.safetensors" in result.stdout
    result = subprocess.run([sys.executable, "-m", "loratool", "inspect", "--json", name], capture_output=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and json.loads(result.stdout)["path"] == os.fsdecode(name)


def test_header_nested_100000_levels(tmp_path: Path) -> None:
    path = write_header(tmp_path / "deep.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    one_error(run_cli("inspect", str(path)), path, "nested too deeply")
    one_error(run_cli("convert", str(path), "--to", "kohya", "-o", str(tmp_path / "o.safetensors")), path, "nested too deeply")


@pytest.mark.parametrize("zipped", [False, True])
def test_truncated_pickle(tmp_path: Path, zipped: bool) -> None:
    whole = tmp_path / "whole.pt"
    torch.save({"lora_unet_x_proj_in.lora_down.weight": torch.ones(2, 4),
                "lora_unet_x_proj_in.lora_up.weight": torch.ones(4, 2)}, whole, _use_new_zipfile_serialization=zipped)
    data = whole.read_bytes()
    cuts = sorted({len(data) * k // 8 for k in range(1, 8)} | {len(data) - 1})
    paths = []
    for cut in cuts:  # damage shows up differently depending on where the file ends
        paths.append(tmp_path / f"cut{cut}.pt")
        paths[-1].write_bytes(data[:cut])
    result = run_cli("inspect", *map(str, paths))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(paths), result.stderr
    for path, line in zip(paths, lines):
        assert line.startswith(f"error: {path}: not a readable torch file"), line
    one_error(run_cli("convert", str(paths[3]), "--to", "kohya", "-o", str(tmp_path / "o.safetensors")), paths[3],
              "not a readable torch file")


# -- special files ---------------------------------------------------------------------------

def test_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for args in (["inspect"], ["inspect", "--hashes"], ["lookup", "--quiet"]):
        result = run_cli(*args, str(fifo), env={"LORATOOL_REGISTRY": "http://127.0.0.1:9"})  # subprocess timeout: 300 s
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"error: {fifo}: is " in result.stderr and "not a regular file" in result.stderr
    one_error(run_cli("convert", str(fifo), "--to", "kohya", "-o", str(tmp_path / "o.safetensors")), fifo, "named pipe (FIFO)")


def test_fifo_in_a_folder_is_listed_and_the_rest_still_inspected(tmp_path: Path) -> None:
    shutil.copy(KOHYA, tmp_path / "good.safetensors")
    os.mkfifo(tmp_path / "pipe.pt")
    result = run_cli("inspect", "--json", str(tmp_path))
    assert result.returncode == 1
    assert [r["path"] for r in json.loads(result.stdout)] == [str(tmp_path / "good.safetensors")]
    assert result.stderr.strip() == f"error: {tmp_path / 'pipe.pt'}: is a named pipe (FIFO), not a regular file"


def test_symlink_loop_and_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    one_error(run_cli("inspect", str(tmp_path / "a.safetensors")), tmp_path / "a.safetensors", "symlink loop")
    one_error(run_cli("inspect", str(tmp_path / "gone.safetensors")), tmp_path / "gone.safetensors", "broken symlink")
    shutil.copy(KOHYA, tmp_path / "good.safetensors")
    result = run_cli("inspect", "--json", str(tmp_path))  # a folder run reports them, skips nothing
    assert result.returncode == 1
    assert [r["path"] for r in json.loads(result.stdout)] == [str(tmp_path / "good.safetensors")]
    assert sorted(result.stderr.splitlines()) == [
        f"error: {tmp_path / 'a.safetensors'}: symlink loop (too many levels of symbolic links)",
        f"error: {tmp_path / 'b.safetensors'}: symlink loop (too many levels of symbolic links)",
        f"error: {tmp_path / 'gone.safetensors'}: broken symlink (to {tmp_path / 'nowhere.safetensors'})",
    ]


# -- outputs: replacing, and folders that refuse writes ---------------------------------------

def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_force_peft_onto_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("an old file")
    result = run_cli("convert", str(KOHYA), "--to", "peft", "-o", str(out), "--force")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (out / "unet" / "adapter_config.json").is_file() and leftovers(tmp_path) == []


def test_force_peft_onto_a_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    result = run_cli("convert", str(KOHYA), "--to", "peft", "-o", str(link), "--force")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert not link.is_symlink() and (link / "unet" / "adapter_model.safetensors").is_file()
    assert [p.name for p in target.iterdir()] == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_force_file_onto_a_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target.safetensors"
    target.write_text("mine")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    result = run_cli("convert", str(KOHYA), "--to", "diffusers", "-o", str(link), "--force")
    assert result.returncode == 0, result.stderr
    assert not link.is_symlink() and link.stat().st_size > 1000 and target.read_text() == "mine"
    assert leftovers(tmp_path) == []


def without_write_permission() -> list[str]:
    """A command prefix under which a folder's mode bits really deny writing. Root ignores
    them, so as root the command runs without CAP_DAC_OVERRIDE (setpriv, util-linux)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root: setpriv is needed to drop the permission override"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    probe = subprocess.run([*without_write_permission(), "touch", str(folder / "probe")], capture_output=True)
    assert probe.returncode != 0, "the folder must really refuse writes for this test to mean anything"
    yield folder
    folder.chmod(0o755)


def run_denied(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*without_write_permission(), sys.executable, "-m", "loratool", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize(("target", "name"), [("kohya", "o.safetensors"), ("peft", "o"), ("peft", "sub/o")])
def test_convert_into_a_read_only_folder(read_only: Path, target: str, name: str) -> None:
    out = read_only / name
    one_error(run_denied("convert", str(KOHYA), "--to", target, "-o", str(out)), out, "cannot write: Permission denied")
    assert list(read_only.iterdir()) == []


def test_config_set_into_a_read_only_folder(read_only: Path) -> None:
    for xdg in (read_only, read_only.parent):  # loratool/ cannot be created; config.yaml cannot be written
        if xdg == read_only.parent:
            (xdg / "loratool").mkdir(mode=0o555)
        result = run_denied("config", "set", "default", "civitai", env={"XDG_CONFIG_HOME": str(xdg)})
        one_error(result, xdg / "loratool" / "config.yaml", "cannot write: Permission denied")
    assert list(read_only.iterdir()) == [] and list((read_only.parent / "loratool").iterdir()) == []
    (read_only.parent / "loratool").chmod(0o755)


def test_fetch_into_a_read_only_folder(read_only: Path, tmp_path: Path) -> None:
    lora = write_safetensors(tmp_path / "pixel.safetensors", 3000, seed=2)
    with CivitaiTestServer() as reg:
        reg.add_model(102, "Pixel Art", [Version(1002, 102, lora, base_model="SD 1.5")])
        env = {"LORATOOL_REGISTRY": reg.url, "LORATOOL_TOKEN": TOKEN, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
        sub = read_only / "loras"
        one_error(run_denied("fetch", "102", "-o", str(sub), "--quiet", env=env), sub, "Permission denied")
        result = run_denied("fetch", "102", "-o", str(read_only), "--quiet", env=env)
        assert result.returncode == 1 and "Permission denied" in result.stderr and len(result.stderr.splitlines()) == 1
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert list(read_only.iterdir()) == []


def test_sub_byte_factors_are_refused_by_name(tmp_path: Path) -> None:
    """F4/F6 (sub-byte) factors are valid safetensors but no arithmetic dtype: inspect and
    convert name the module and the dtype, one line each."""
    n = {"F4": 18, "F6_E2M3": 27}
    for dtype, size in n.items():
        header = {"lora_unet_conv_in.lora_down.weight": {"dtype": dtype, "shape": [1, 4, 3, 3], "data_offsets": [0, size]},
                  "lora_unet_conv_in.lora_up.weight": {"dtype": "F16", "shape": [320, 1, 1, 1], "data_offsets": [size, size + 640]}}
        path = write_header(tmp_path / f"{dtype}.safetensors", json.dumps(header).encode(), size + 640)
        one_error(run_cli("inspect", "--family", "sd1", str(path)), path, f"lora_unet_conv_in: lora_down is stored as {dtype}")
        out = tmp_path / f"{dtype}_out.safetensors"
        one_error(run_cli("convert", str(path), "--to", "kohya", "--family", "sd1", "-o", str(out)),
                  path, f"lora_unet_conv_in: lora_down is stored as {dtype}")
        assert not out.exists()


def test_writer_sizes_sub_byte_tensors_in_bits(tmp_path: Path) -> None:
    """Copied F4/F6 tensors take shape × bits / 8 bytes, so the header is the one the
    safetensors library accepts and the bytes come back as stored."""
    from loratool.io.safetensors import read_header
    from loratool.io.writer import OutTensor, atomic_path, write_safetensors

    for dtype, shape, size in (("F4", (4, 9), 18), ("F6_E2M3", (4, 9), 27), ("F4", (2, 3), 3)):
        stored = bytes(range(1, size + 1))
        src = tmp_path / "stored.bin"
        src.write_bytes(b"pad" + stored)
        out = tmp_path / f"{dtype}_{size}.safetensors"
        tensors = [OutTensor("t", dtype, shape, lambda data=stored: data, copy_from=(str(src), 3)),
                   OutTensor("u", "F16", (2,), lambda: b"\x00\x3c\x00\x40")]
        with atomic_path(out) as tmp:
            write_safetensors(tmp, tensors)
        header = read_header(out)
        t, u = header.tensors["t"], header.tensors["u"]
        assert (t.end - t.start, u.end - u.start) == (size, 4)
        data = out.read_bytes()
        assert data[t.start:t.end] == stored and data[u.start:u.end] == b"\x00\x3c\x00\x40"


def test_left_out_names_stay_on_their_line(tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # real SD1 shapes: a 320-channel 1x1 conv
    header = {
        f"{name}.lora_down.weight": {"dtype": "F16", "shape": [2, 320, 1, 1], "data_offsets": [0, 1280]},
        f"{name}.lora_up.weight": {"dtype": "F16", "shape": [320, 2, 1, 1], "data_offsets": [1280, 2560]},
        "evil\nname.weight": {"dtype": "F32", "shape": [1], "data_offsets": [2560, 2564]},
    }
    path = write_header(tmp_path / "n.safetensors", json.dumps(header).encode(), 2564)
    result = run_cli("convert", str(path), "--to", "kohya", "--family", "sd1", "--skip-unsupported", "-o", str(tmp_path / "o.safetensors"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["left out 1 module(s)/key(s):", "  evil name.weight: unrecognised key"]


def test_inspect_shows_file_text_as_text(tmp_path: Path) -> None:
    """Rich markup and terminal escapes in a path, a key or a metadata value are shown as
    visible text: no markup error, no escape sequence reaches the terminal."""
    from safetensors.torch import save_file

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{q}.lora_down.weight": torch.zeros(4, 320).half(), f"{q}.lora_up.weight": torch.zeros(320, 4).half(),
               "[/]\x1b[31mred[link=http://example.invalid]": torch.zeros(1)}
    path = tmp_path / "[bold]x[red.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "[/]\x1b]0;title\x07", "modelspec.title": "[red]x\u202e"})
    wide = {**os.environ, "COLUMNS": "400"}
    result = subprocess.run([sys.executable, "-m", "loratool", "inspect", "--keys", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120, env=wide)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = result.stdout
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    for shown in ("[bold]x[red.safetensors", "[/]\\x1b[31mred[link=http://example.invalid]", "[/]\\x1b]0;title\\x07", "[red]x\\u202e"):
        assert shown in out, shown


def test_error_lines_show_control_characters_as_escapes(tmp_path: Path) -> None:
    """A path (or key) holding ESC/OSC sequences or a bidi override reaches the error line
    as visible escapes, never as bytes a terminal acts on."""
    path = tmp_path / "\x1b]0;title\x07red\u202e.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    result = run_cli("inspect", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr and "\u202e" not in result.stderr
    line, = result.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path}/\\x1b]0;title\\x07red\\u202e.safetensors: "), line

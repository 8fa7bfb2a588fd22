"""Surveying a library: the folder walk, closable adapters (no leaked descriptors),
truncated downloads described from their header, and files that are not LoRAs named."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratool
from loratool.errors import InputError
from loratool.io.sources import open_source
from loratool.library.walk import walk
from loratool.ops.inspect import inspect, survey
from tests.conftest import FIXTURES, ROOT, run_cli


def _under_fd_limit(code: str, limit: int = 40) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child whose open-file limit is ``limit``."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_load_does_not_leak_descriptors() -> None:
    """90 loads under a 40-descriptor limit: closed explicitly, by ``with``, or dropped."""
    done = _under_fd_limit(f"""
        import os, loratool
        path = {str(FIXTURES / "sd15_kohya_lora.safetensors")!r}
        start = len(os.listdir("/proc/self/fd"))
        for i in range(90):
            if i % 3 == 0:
                with loratool.load(path) as a:
                    assert a.modules
            elif i % 3 == 1:
                a = loratool.load(path)
                next(iter(a.modules.values())).params["lora_down"].load()  # a tensor read
                a.close()
                a.close()  # idempotent
            else:
                assert loratool.load(path).modules  # never closed, dropped
        assert len(os.listdir("/proc/self/fd")) == start, os.listdir("/proc/self/fd")
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---------------------------------------------------------------------------- the walk


def _library(tmp_path: Path) -> Path:
    """An A1111-style library: one folder per model family, sidecars, a PEFT adapter
    folder, a symlink loop, a broken link, a second link to a folder, a GGUF, a FIFO."""
    lib = tmp_path / "Lora"
    (lib / "sd15" / "styles").mkdir(parents=True)
    (lib / "sdxl").mkdir()
    (lib / "empty").mkdir()
    shutil.copy(FIXTURES / "sd15_kohya_lokr.safetensors", lib / "sd15" / "lokr.safetensors")
    shutil.copy(FIXTURES / "sd15_kohya_lora.safetensors", lib / "sd15" / "styles" / "lora.safetensors")
    (lib / "sd15" / "lokr.civitai.info").write_text("{}")
    (lib / "sd15" / "lokr.preview.png").write_bytes(b"\x89PNG")
    (lib / "sd15" / "styles" / "notes.txt").write_text("trigger: foo")
    shutil.copytree(FIXTURES / "sdxl_peft", lib / "sdxl" / "my_peft")
    (lib / "sdxl" / "my_peft" / "README.md").write_text("inside an adapter folder: not walked")
    torch.save(load_file(str(FIXTURES / "sdxl_kohya_lora.safetensors")), lib / "sdxl" / "old.pt")
    (lib / "sdxl" / "model.gguf").write_bytes(b"GGUF")
    (lib / "sd15" / "styles" / "up").symlink_to("..", target_is_directory=True)  # a loop
    (lib / "sdxl" / "gone.safetensors").symlink_to("nowhere.safetensors")
    (lib / "sdxl" / "sd15_again").symlink_to(lib / "sd15", target_is_directory=True)
    (lib / "self").symlink_to("self")  # resolves to itself (ELOOP)
    os.mkfifo(lib / "sdxl" / "pipe")
    return lib


def test_walk_lists_every_entry_once_with_its_kind(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    got = [(os.path.relpath(e.path, lib), e.kind, e.reason) for e in walk([str(lib)])]
    assert got == [
        ("sd15/lokr.civitai.info", "not-adapter", "not a model file"),
        ("sd15/lokr.preview.png", "not-adapter", "not a model file"),
        ("sd15/lokr.safetensors", "adapter-file", ""),
        ("sd15/styles/lora.safetensors", "adapter-file", ""),
        ("sd15/styles/notes.txt", "not-adapter", "not a model file"),
        ("sd15/styles/up", "error", f"symlink loop: leads back to {lib / 'sd15'}"),
        ("sdxl/gone.safetensors", "error", "broken symlink (to nowhere.safetensors)"),
        ("sdxl/model.gguf", "not-adapter", "a model format loratool does not read"),
        ("sdxl/my_peft", "adapter-dir", ""),
        ("sdxl/old.pt", "adapter-file", ""),
        ("sdxl/pipe", "not-adapter", "is a named pipe (FIFO), not a regular file"),
        ("sdxl/sd15_again", "duplicate", f"same folder as {lib / 'sd15'} (walked once)"),
        ("self", "error", "symlink loop (too many levels of symbolic links)"),
    ]
    # every entry carries its root; files their size (symlinks followed)
    entries = list(walk([str(lib / "sd15" / "lokr.safetensors"), str(lib)]))
    assert entries[0].kind == "adapter-file" and entries[0].root == str(lib / "sd15" / "lokr.safetensors")
    assert entries[0].size == (FIXTURES / "sd15_kohya_lokr.safetensors").stat().st_size
    assert all(e.root == str(lib) for e in entries[1:])


def test_walk_handles_deep_trees_and_explicit_odd_paths(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    path = deep
    deep.mkdir()
    for _ in range(1100):  # deeper than Python's recursion limit
        path = path / "d"
        path.mkdir()
    shutil.copy(FIXTURES / "sd15_kohya_lora.safetensors", path / "x.safetensors")
    try:
        (found,) = list(walk([deep]))
        assert found.kind == "adapter-file" and found.path == str(path / "x.safetensors")
    finally:  # shutil.rmtree (and so pytest's cleanup) would hit the recursion limit
        subprocess.run(["rm", "-rf", str(deep)], check=True)
    note = tmp_path / "named.txt"
    note.write_text("x")
    kinds = [(e.kind, e.reason) for e in walk([note, tmp_path / "missing", FIXTURES / "sdxl_peft"])]
    assert kinds == [("adapter-file", ""), ("error", "no such file or directory"), ("adapter-dir", "")]


def test_inspect_walks_a_library(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    result = run_cli("inspect", "--json", str(lib))
    assert result.returncode == 1  # the loop, the broken link and the self-link are errors
    reports = json.loads(result.stdout)
    assert [os.path.relpath(r["path"], lib) for r in reports] == [
        "sd15/lokr.safetensors", "sd15/styles/lora.safetensors", "sdxl/my_peft", "sdxl/old.pt",
    ]
    assert [r["family"] for r in reports] == ["sd1", "sd1", "sdxl", "sdxl"]
    err = result.stderr.splitlines()
    assert sorted(line.split(":")[0] for line in err) == ["error"] * 3 + ["note"] * 4, err
    assert f"error: {lib / 'sd15/styles/up'}: symlink loop: leads back to {lib / 'sd15'}" in err
    assert f"error: {lib / 'sdxl/gone.safetensors'}: broken symlink (to nowhere.safetensors)" in err
    assert f"note: {lib / 'sdxl/model.gguf'}: a model format loratool does not read" in err
    assert f"note: {lib}: skipped 3 file(s) that are not model files (.info, .png, .txt)" in err
    (lib / "sd15" / "styles" / "up").unlink()
    human = run_cli("inspect", str(lib / "sd15"))
    assert human.returncode == 0 and human.stdout.count("complete") == 2
    assert human.stderr.strip() == f"note: {lib / 'sd15'}: skipped 3 file(s) that are not model files (.info, .png, .txt)"


def test_inspect_a_folder_without_adapters_says_so(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    result = run_cli("inspect", "--json", str(tmp_path))
    assert result.returncode == 1 and json.loads(result.stdout) == []
    assert f"error: {tmp_path}: holds no adapter (none in this folder or below it)" in result.stderr


def test_survey_is_the_python_api_of_a_folder_run(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    items = list(survey([lib]))
    assert [i.entry for i in items] == list(walk([lib]))
    assert sum(i.report is not None for i in items) == 4
    assert {os.path.basename(i.entry.path) for i in items if i.error} == {"up", "gone.safetensors", "self"}


def test_a_folder_survey_does_not_leak_descriptors(tmp_path: Path) -> None:
    for i in range(80):
        shutil.copy(FIXTURES / "sd15_kohya_dora.safetensors", tmp_path / f"{i:03}.safetensors")
    done = _under_fd_limit(f"""
        import io, json, contextlib
        from loratool.cli.main import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["inspect", "--json", {str(tmp_path)!r}])
            except SystemExit as e:
                assert not e.code, e.code
        print(len(json.loads(out.getvalue())))
    """)
    assert done.returncode == 0 and done.stdout.strip() == "80", done.stderr[-2000:]


# ---------------------------------------------------------------------------- truncated files


def _cut(src: Path, dst: Path, keep_data: int) -> Path:
    """``src`` cut ``keep_data`` bytes after its header (a broken download)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    dst.write_bytes(data[: 8 + n + keep_data])
    return dst


def test_a_truncated_file_is_described_from_its_header(tmp_path: Path) -> None:
    src = FIXTURES / "sdxl_kohya_lora.safetensors"
    cut = _cut(src, tmp_path / "half.safetensors", (src.stat().st_size // 2))
    whole = json.loads(run_cli("inspect", "--json", str(src)).stdout)
    result = run_cli("inspect", "--json", str(cut))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    for field in ("format", "variant", "family", "network_types", "components", "modules", "rank", "targets", "dtypes", "metadata"):
        assert report[field] == whole[field], field
    assert report["complete"] is False and whole["complete"] is True
    size = cut.stat().st_size
    (warning,) = [w for w in report["warnings"] if w.startswith("truncated")]
    assert f"but the file has {size}" in warning and "described from its header" in warning
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {cut}: truncated: tensor data needs ") and line.endswith(f"but the file has {size}")
    human = run_cli("inspect", str(cut))
    assert human.returncode == 1 and "sdxl" in human.stdout and "truncated" in human.stderr


def test_alphas_beyond_the_end_are_unknown_not_guessed(tmp_path: Path) -> None:
    """Cut right after the header: no alpha can be read, so none is reported."""
    cut = _cut(FIXTURES / "sd15_kohya_lora.safetensors", tmp_path / "cut.safetensors", 0)
    r = inspect(cut)
    assert r.complete is False and r.alpha == {"min": None, "max": None}
    assert r.rank == inspect(FIXTURES / "sd15_kohya_lora.safetensors").rank
    assert any(w.startswith(f"alpha of {r.modules} module(s) lies beyond the end of the file") for w in r.warnings)
    assert isinstance(r.error, InputError) and "truncated" in r.error.message


def test_truncated_files_are_only_ever_described(tmp_path: Path) -> None:
    """Loading, converting and tensor reads refuse a truncated file: missing bytes are never read."""
    cut = _cut(FIXTURES / "sd15_kohya_lora.safetensors", tmp_path / "cut.safetensors", 100)
    with pytest.raises(InputError, match="truncated"):
        loratool.load(cut)
    result = run_cli("convert", str(cut), "--to", "diffusers", "-o", str(tmp_path / "out.safetensors"))
    assert result.returncode == 1 and "truncated" in result.stderr and not (tmp_path / "out.safetensors").exists()
    source = open_source(cut, allow_truncated=True)
    try:
        (part,) = source.parts
        assert part.truncated and part.missing
        with pytest.raises(InputError, match="truncated while reading"):
            part.get(sorted(part.missing)[0])
    finally:
        source.close()


# ---------------------------------------------------------------------------- not LoRAs


def test_textual_inversion_embeddings_are_named(tmp_path: Path) -> None:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(4, 768)}, "name": "myti", "step": 3000},
               tmp_path / "a1111.pt")
    save_file({"emb_params": torch.zeros(2, 1024)}, str(tmp_path / "a1111.safetensors"))
    save_file({"clip_l": torch.zeros(3, 768), "clip_g": torch.zeros(3, 1280)}, str(tmp_path / "sdxl.safetensors"))
    torch.save({"<cat-toy>": torch.zeros(768)}, tmp_path / "learned_embeds.bin")
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 1
    assert sorted(result.stderr.splitlines()) == [
        f"error: {tmp_path / 'a1111.pt'}: a textual-inversion embedding (4 vectors, width 768: SD1), not a LoRA",
        f"error: {tmp_path / 'a1111.safetensors'}: a textual-inversion embedding (2 vectors, width 1024: SD2), not a LoRA",
        f"error: {tmp_path / 'learned_embeds.bin'}: a textual-inversion embedding (1 vector, width 768: SD1), not a LoRA",
        f"error: {tmp_path / 'sdxl.safetensors'}: a textual-inversion embedding (3 vectors, width 768 + 1280: SDXL), not a LoRA",
    ]


def test_non_sd_peft_adapters_get_peft_labels_only(tmp_path: Path) -> None:
    """A ViT adapter (LoRA with a modules_to_save head, and LoHa) is PEFT-labelled, of no
    SD family, and no kohya vocabulary leaks into its description."""
    from peft import LoHaConfig, LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    get_peft_model(ViTForImageClassification(cfg), LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])).save_pretrained(tmp_path / "lora")
    get_peft_model(ViTForImageClassification(cfg), LoHaConfig(r=4, target_modules=["query", "value"])).save_pretrained(tmp_path / "loha")
    lora, loha = inspect(tmp_path / "lora"), inspect(tmp_path / "loha")
    assert (lora.format, lora.variant, lora.family, lora.modules) == ("peft", "lora_A/lora_B", "unknown", 4)
    assert (loha.format, loha.variant, loha.family, loha.network_types) == ("peft", "hada_w1/hada_w2", "unknown", ["loha"])
    assert lora.unknown_keys == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]

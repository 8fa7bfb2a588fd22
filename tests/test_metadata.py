"""metadata show/set/strip: header-only rewrites (tensor data and AutoV3 unchanged, read
back by the reference safetensors library), hashes as kohya/A1111/modelspec define them,
privacy stripping against validate, refusals, and crash safety of --in-place."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool import load
from loratool.errors import InputError, UsageError
from loratool.io.hashing import compute_hashes
from loratool.ops.metadata import LOADER_KEYS, set_metadata, show, strip
from loratool.ops.validate import validate
from tests.conftest import FIXTURES, LORATOOL, ROOT, run_cli
from tests.lora_builders import KOHYA_META, clean_sd1, data_sha256, kohya_tensors, write

PRIVATE = {
    "ss_sd_model_name": r"C:\Users\alice\models\v1-5-pruned.safetensors",
    "ss_training_comment": "made in /home/bob/train/run3 with love",
    "ss_dataset_dirs": json.dumps({"10_alice selfies": {"n_repeats": 10, "img_count": 30}}),
    "ss_tag_frequency": json.dumps({"10_alice selfies": {"1girl": 30}}),
}


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_show_matches_the_reference_reader() -> None:
    for path in sorted(FIXTURES.glob("*.safetensors")):
        assert show(path).metadata == _meta(path)
    r = run_cli("metadata", "show", "--json", str(FIXTURES / "sd15_kohya_lora.safetensors"))
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"] == _meta(FIXTURES / "sd15_kohya_lora.safetensors")
    table = run_cli("metadata", "show", str(FIXTURES / "sd15_kohya_lora.safetensors"))
    assert "ss_network_module" in table.stdout and "networks.lora" in table.stdout


def test_set_rewrites_only_the_header(tmp_path: Path) -> None:
    src = FIXTURES / "sd15_kohya_lora.safetensors"
    before = src.read_bytes()
    out = tmp_path / "out.safetensors"
    edit = set_metadata(src, {"modelspec.author": "me", "modelspec.title": "new ✓", "ss_seed": None}, output=out)
    assert src.read_bytes() == before  # the input is never touched
    expected = {**_meta(src), "modelspec.author": "me", "modelspec.title": "new ✓"}
    del expected["ss_seed"]
    assert _meta(out) == expected
    assert (edit.added, edit.changed, edit.removed) == (["modelspec.author"], ["modelspec.title"], ["ss_seed"])
    _same_tensors(src, out)
    assert data_sha256(out) == data_sha256(src)
    assert compute_hashes(out).autov3_full == compute_hashes(src).autov3_full
    assert validate(out).codes == validate(src).codes == ["modelspec-missing"]


def test_set_cli_values_json_and_delete(tmp_path: Path) -> None:
    src = clean_sd1(tmp_path / "a.safetensors")
    values = tmp_path / "v.json"
    values.write_text(json.dumps({"modelspec.tags": ["cat", "cute"], "modelspec.license": "MIT", "ss_v2": None, "x": 3}))
    out = tmp_path / "b.safetensors"
    r = run_cli("metadata", "set", str(src), "modelspec.title=Cats=cute", "--from-json", str(values),
                "--delete", "ss_output_name", "-o", str(out))
    assert r.returncode == 0, r.stderr
    meta = _meta(out)
    assert meta["modelspec.title"] == "Cats=cute" and meta["modelspec.license"] == "MIT"
    assert json.loads(meta["modelspec.tags"]) == ["cat", "cute"] and meta["x"] == "3"
    assert "ss_v2" not in meta and "ss_output_name" not in meta
    assert r.stdout.startswith(f"wrote {out} (added: modelspec.license, modelspec.tags, x; changed: modelspec.title; removed: ss_output_name, ss_v2)")


def test_fix_hashes_as_kohya_a1111_and_modelspec_define_them(tmp_path: Path) -> None:
    src = clean_sd1(tmp_path / "a.safetensors", meta={"sshs_model_hash": "0" * 64, "modelspec.hash_sha256": "0xdead"},
                    with_hashes=False)
    assert "hash-mismatch" in validate(src).codes
    big = write(tmp_path / "big.safetensors", {**kohya_tensors(), "extra": torch.arange(600_000, dtype=torch.float32)}, KOHYA_META)
    for path in (src, big):
        out = path.with_name(path.stem + "-fixed.safetensors")
        set_metadata(path, {}, output=out, fix_hashes=True)
        meta, raw = _meta(out), out.read_bytes()
        digest = data_sha256(out)
        assert digest == data_sha256(path)
        assert meta["sshs_model_hash"] == digest and meta["modelspec.hash_sha256"] == "0x" + digest
        # A1111's old model hash of this very file: 64 KiB at 1 MiB (nothing there for small files)
        assert meta["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
        assert "hash-mismatch" not in validate(out).codes
    assert len(big.read_bytes()) > 0x110000 and _meta(src.with_name("a-fixed.safetensors"))["sshs_legacy_hash"] == "e3b0c442"


def test_fix_hashes_reproduces_kohya_on_a_real_file(tmp_path: Path, realworld: Path) -> None:
    """kohya wrote this file's hashes; recomputing them gives the same values (the file is
    under 1 MiB, so the legacy hash is of nothing, in kohya's buffer and in the file)."""
    src = realworld / "lycoris-lokr-sd1/smart_falcon_4_lokr.safetensors"
    out = tmp_path / "lokr.safetensors"
    set_metadata(src, {}, output=out, fix_hashes=True)
    old, new = _meta(src), _meta(out)
    assert new["sshs_model_hash"] == old["sshs_model_hash"] and new["sshs_legacy_hash"] == old["sshs_legacy_hash"]
    _same_tensors(src, out)


def test_legacy_hash_dropped_when_the_header_covers_it(tmp_path: Path) -> None:
    src = clean_sd1(tmp_path / "a.safetensors", meta={"modelspec.thumbnail": "data:image/png;base64," + "A" * 1_100_000})
    edit = set_metadata(src, {}, output=tmp_path / "b.safetensors", fix_hashes=True)
    assert "sshs_legacy_hash" not in _meta(tmp_path / "b.safetensors")
    assert edit.notes and "1 MiB" in edit.notes[0]


def test_strip_privacy_removes_exactly_what_validate_flags(tmp_path: Path) -> None:
    src = clean_sd1(tmp_path / "a.safetensors", meta=PRIVATE)
    flagged = {f.key for f in validate(src).findings if f.code.startswith("privacy-")}
    assert flagged == set(PRIVATE)
    out = tmp_path / "b.safetensors"
    edit = strip(src, privacy=True, output=out)
    assert sorted(edit.redacted) == ["ss_sd_model_name", "ss_training_comment"]
    assert edit.removed == ["ss_dataset_dirs", "ss_tag_frequency"]
    meta = _meta(out)
    assert meta["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert meta["ss_training_comment"] == "made in run3 with love"
    assert {k: v for k, v in meta.items() if k not in PRIVATE} == {k: v for k, v in _meta(src).items() if k not in PRIVATE}
    assert not [c for c in validate(out).codes if c.startswith("privacy-")]
    assert data_sha256(out) == data_sha256(src)


def test_strip_privacy_keeps_loader_metadata_working(tmp_path: Path) -> None:
    """A path inside diffusers' lora_adapter_metadata is redacted, not removed: the alpha
    it carries still reaches the loader."""
    src_meta = _meta(FIXTURES / "sd15_diffusers.safetensors")
    config = json.loads(src_meta["lora_adapter_metadata"])
    config["unet.base_model_name_or_path"] = "/home/dave/models/sd15"
    src = tmp_path / "d.safetensors"
    save_file(load_file(str(FIXTURES / "sd15_diffusers.safetensors")), str(src),
              metadata={**src_meta, "lora_adapter_metadata": json.dumps(config)})
    assert "privacy-path" in validate(src).codes
    out = tmp_path / "e.safetensors"
    strip(src, privacy=True, output=out)
    stripped = json.loads(_meta(out)["lora_adapter_metadata"])
    assert stripped["unet.base_model_name_or_path"] == "sd15" and stripped["unet.lora_alpha"] == 8
    assert {str(k): m.alpha for k, m in load(out).modules.items()} == {str(k): m.alpha for k, m in load(src).modules.items()}
    assert validate(out).codes == ["modelspec-missing"]


def test_strip_all_keeps_what_loaders_read(tmp_path: Path) -> None:
    for name in ("sd15_kohya_lora.safetensors", "sd15_diffusers.safetensors"):
        src = FIXTURES / name
        out = tmp_path / name
        strip(src, everything=True, output=out)
        assert _meta(out) == {k: v for k, v in _meta(src).items() if k in LOADER_KEYS}
        _same_tensors(src, out)
        before = {str(k): (m.alpha, m.rank) for k, m in load(src).modules.items()}
        assert {str(k): (m.alpha, m.rank) for k, m in load(out).modules.items()} == before
    assert "lora_adapter_metadata" in _meta(tmp_path / "sd15_diffusers.safetensors")


def test_refusals_are_one_line(tmp_path: Path) -> None:
    src = clean_sd1(tmp_path / "a.safetensors")
    pt = tmp_path / "a.pt"
    torch.save(kohya_tensors(), pt)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[:-100])
    cases = {
        ("show", str(pt)): (1, "pickle-based files have no header metadata"),
        ("show", str(tmp_path)): (1, "is a directory"),
        ("show", str(cut)): (1, "truncated"),
        ("set", str(src), "k=v"): (2, "give an output (-o OUT) or --in-place"),
        ("set", str(src), "k=v", "-o", str(src)): (2, "the output is the input"),
        ("set", str(src), "k=v", "-o", str(tmp_path / "x.safetensors"), "--in-place"): (2, "give an output"),
        ("strip", str(src), "--in-place"): (2, "choose one of --privacy or --all"),
        ("set", str(src), str(cut), "k=v", "-o", str(tmp_path / "y.safetensors")): (2, "-o takes one input"),
    }
    for args, (code, text) in cases.items():
        r = run_cli("metadata", *args)
        assert r.returncode == code and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    other = tmp_path / "b.safetensors"
    other.write_bytes(b"keep me")
    r = run_cli("metadata", "set", str(src), "k=v", "-o", str(other))
    assert r.returncode == 2 and "exists; pass --force" in r.stderr and other.read_bytes() == b"keep me"
    assert run_cli("metadata", "set", str(src), "k=v", "-o", str(other), "--force").returncode == 0
    with pytest.raises(UsageError):
        strip(src, privacy=True, everything=True, in_place=True)
    with pytest.raises(InputError):
        show(pt)


def test_in_place_keeps_mode_symlink_and_other_files(tmp_path: Path) -> None:
    a = clean_sd1(tmp_path / "a.safetensors")
    b = clean_sd1(tmp_path / "b.safetensors", meta=PRIVATE)
    os.chmod(a, 0o640)
    link = tmp_path / "link.safetensors"
    link.symlink_to(a.name)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\0\0\0\0\0\0\0{not json}      ")
    r = run_cli("metadata", "strip", "--privacy", "--in-place", str(link), str(bad), str(b))
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and str(bad) in r.stderr
    assert r.stdout.splitlines()[0] == f"wrote {link} (metadata unchanged)"
    assert link.is_symlink() and os.stat(a).st_mode & 0o777 == 0o640
    assert "ss_dataset_dirs" not in _meta(b) and not list(tmp_path.glob(".*.tmp"))


def _big_file(path: Path, size: int) -> Path:
    """A ~``size``-byte kohya-named file with real (non-sparse) data, written in chunks."""
    n = size // 2
    header = {"__metadata__": {"ss_network_module": "networks.lora", "ss_output_name": "big"},
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
                  {"dtype": "F16", "shape": [n], "data_offsets": [0, 2 * n]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(2 * n // len(chunk)):
            fh.write(chunk)
        fh.write(chunk[: 2 * n % len(chunk)])
    return path


def test_killed_in_place_rewrite_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL while the temp file is being written: the original is intact and readable."""
    src = _big_file(tmp_path / "big.safetensors", 200 * 1024 * 1024)
    data_before = data_sha256(src)
    killed = False
    for _ in range(3):
        before = hashlib.sha256(src.read_bytes()).hexdigest()
        meta_before = _meta(src)
        proc = subprocess.Popen([*LORATOOL, "metadata", "set", str(src), "modelspec.title=new", "--in-place"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if list(tmp_path.glob(".big.safetensors.*.tmp")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            killed = True
            break  # otherwise it finished first: the rewritten file is the next baseline
    assert killed, "the rewrite always finished before its temp file was seen"
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert _meta(src) == meta_before and data_sha256(src) == data_before
    for leftover in tmp_path.glob(".big.safetensors.*.tmp"):
        leftover.unlink()
    edit = set_metadata(src, {"modelspec.title": "newer"}, in_place=True)
    assert _meta(src)["modelspec.title"] == "newer" and edit.output == str(src)
    assert data_sha256(src) == data_before


def test_hostile_text_never_reaches_the_terminal_raw(tmp_path: Path) -> None:
    evil = "\x1b]0;pwned\x07\x1b[31mred\u202eabc\x9b"
    src = clean_sd1(tmp_path / "a.safetensors", meta={"modelspec.title": evil, "ss_training_comment": f"/home/{evil}/x"})
    for args in (("metadata", "show", str(src)), ("validate", "--header-only", str(src)),
                 ("metadata", "show", "--json", str(src)), ("validate", "--header-only", "--json", str(src))):
        r = run_cli(*args)
        assert not any(c in r.stdout + r.stderr for c in "\x1b\x07\u202e\x9b"), args
    assert "\\x1b]0;pwned" in run_cli("metadata", "show", str(src)).stdout
    assert json.loads(run_cli("metadata", "show", "--json", str(src)).stdout)["metadata"]["modelspec.title"] == evil

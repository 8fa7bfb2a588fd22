"""``loratool merge`` on disk: what it writes besides the weights, what it refuses, and what
a killed run or a full disk leaves behind (nothing under the output name)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fixtures.checkpoints import (
    ST_DTYPES,
    checkpoint_table,
    select,
    value,
    write_diffusers_folder,
    write_single_file,
)
from loratool.errors import UsageError
from loratool.io.safetensors import SafetensorsFile, read_header
from loratool.ops.merge import merge
from tests.conftest import LORATOOL, ROOT, run_cli, source_path

SEED = 2
LORA = "fixtures/sd15_kohya_loha.safetensors"  # 23 modules of a small SD1.5 subset


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An fp16 SD1.5 partial checkpoint holding every module the LoRA fixtures touch."""
    import loratool

    d = tmp_path_factory.mktemp("base")
    with loratool.load(source_path(LORA)) as adapter:
        mods = {(m.key.component, m.key.path) for m in adapter.modules.values()}
    table = select(checkpoint_table("sd1"), mods)
    meta = {"modelspec.title": "base", "sshs_model_hash": "0" * 64, "note": "kept"}
    return {"table": table, "single": write_single_file(d / "base.safetensors", table, "F16", SEED, metadata=meta), "dir": d}


def _lora() -> str:
    return str(source_path(LORA))


def _data_sha(path: Path) -> str:
    """AutoV3 by hand: SHA-256 of everything after the safetensors header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n :]).hexdigest().upper()


def test_output_keeps_keys_order_dtypes_and_metadata_and_records_the_merge(base: dict, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    r = run_cli("merge", str(base["single"]), f"{_lora()}:0.5:1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # piped: no progress bar
    assert "23 tensor(s) merged" in r.stdout
    src, dst = read_header(base["single"]), read_header(out)
    assert list(src.tensors) == list(dst.tensors)
    assert [(t.dtype, t.shape) for t in src.tensors.values()] == [(t.dtype, t.shape) for t in dst.tensors.values()]
    with SafetensorsFile(base["single"]) as a, SafetensorsFile(out) as b:
        changed = {k for k in a.tensors if a.read_bytes(k) != b.read_bytes(k)}
    assert len(changed) == 23
    meta = dst.metadata
    assert (meta["note"], meta["modelspec.title"]) == ("kept", "base")
    assert "sshs_model_hash" not in meta  # a hash of the old tensors would be a lie
    assert meta["modelspec.merged_from"] == "base, sd15_kohya_loha"
    record = json.loads(meta["loratool.merge"])
    assert record["loras"] == [{"name": "sd15_kohya_loha.safetensors", "autov3": _data_sha(source_path(LORA))[:12], "te": 0.5, "unet": 1.0, "modules": 23, "unplaced": 0}]


def test_dtype_casts_once_and_keeps_integer_tensors(base: dict, tmp_path: Path) -> None:
    f32, bf16 = tmp_path / "f32.safetensors", tmp_path / "bf16.safetensors"
    merge(base["single"], [_lora()], f32, dtype="fp32")
    merge(base["single"], [_lora()], bf16, dtype="bf16")
    with safe_open(str(f32), "pt") as a, safe_open(str(bf16), "pt") as b:
        for k in a.keys():  # noqa: SIM118
            x, y = a.get_tensor(k), b.get_tensor(k)
            if x.is_floating_point():
                assert x.dtype == torch.float32 and y.dtype == torch.bfloat16
                assert torch.equal(x.to(torch.bfloat16), y), k  # one rounding, from the fp32 sum
            else:
                assert torch.equal(x, y) and x.dtype == torch.int64


def test_unplaced_modules_fail_unless_allow_partial(base: dict, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    lora = str(source_path("fixtures/sd15_kohya_lora.safetensors"))  # 264 modules; the base holds few
    r = run_cli("merge", str(base["single"]), lora, "-o", str(out))
    assert r.returncode == 1 and not out.exists()
    assert "have no place in the checkpoint" in r.stderr and "lora_te_text_model_encoder_layers_0_mlp_fc1" in r.stderr
    assert "--allow-partial" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("merge", str(base["single"]), lora, "-o", str(out), "--allow-partial")
    assert r.returncode == 0 and out.exists()
    assert "left out" in r.stderr and "the checkpoint lacks this module's weight" in r.stderr


def test_wrong_family_and_usage_errors(base: dict, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    r = run_cli("merge", str(base["single"]), str(source_path("fixtures/sdxl_kohya_lora.safetensors")), "-o", str(out))
    assert r.returncode == 1 and "LoRA is sdxl, checkpoint is sd1" in r.stderr and not out.exists()
    r = run_cli("merge", str(base["single"]), f"{_lora()}:abc", "-o", str(out))
    assert r.returncode != 0 and "Traceback" not in r.stderr and not out.exists()
    r = run_cli("merge", str(base["single"]), _lora(), "-o", str(out), "--device", "cuda")
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "CUDA" in r.stderr and not out.exists()


def test_output_may_not_be_an_input(base: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.safetensors"
    shutil.copy(base["single"], ckpt)
    link, hard = tmp_path / "link.safetensors", tmp_path / "hard.safetensors"
    link.symlink_to(ckpt)
    os.link(ckpt, hard)
    lora_copy = tmp_path / "lora.safetensors"
    shutil.copy(source_path(LORA), lora_copy)
    before = ckpt.read_bytes()
    folder = write_diffusers_folder(tmp_path / "folder", "sd1", base["table"], "F16", SEED)
    cases = [(ckpt, ckpt), (ckpt, link), (ckpt, hard), (ckpt, lora_copy), (folder, folder), (folder, folder / "unet" / "o"), (folder, tmp_path)]
    for src, target in cases:
        with pytest.raises(UsageError, match="refusing to write (onto|inside) the input"):
            merge(src, [str(lora_copy)], target, force=True)
    assert ckpt.read_bytes() == before and lora_copy.read_bytes() == source_path(LORA).read_bytes()
    r = run_cli("merge", str(ckpt), _lora(), "-o", str(hard), "--force")  # the CLI: one line, exit 2
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match="already exists"):
        merge(ckpt, [_lora()], out)
    assert out.read_bytes() == b"old"
    merge(ckpt, [_lora()], out, force=True)
    assert read_header(out).tensors


def test_folder_output_mirrors_the_input_with_variants_shards_and_other_files(base: dict, tmp_path: Path) -> None:
    table = base["table"]
    folder = write_diffusers_folder(tmp_path / "f", "sd1", table, "F16", SEED, shard_bytes={"unet": 3_000_000})
    write_diffusers_folder(tmp_path / "f", "sd1", table, "F32", SEED, variant="fp32")
    out = tmp_path / "out"
    result = merge(folder, [_lora()], out)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files
    for rel in files:
        if not rel.endswith(".safetensors"):
            assert (out / rel).read_bytes() == (folder / rel).read_bytes(), rel
    # both variants merged, and to the same weights as the single file (up to their dtypes)
    single = tmp_path / "single.safetensors"
    merge(write_single_file(tmp_path / "s.safetensors", table, "F32", SEED), [_lora()], single)
    with safe_open(str(single), "pt") as s, safe_open(str(out / "text_encoder" / "model.fp32.safetensors"), "pt") as v:
        key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
        want = s.get_tensor("cond_stage_model.transformer." + key)
        assert torch.equal(v.get_tensor(key), want)
    with safe_open(str(out / "text_encoder" / "model.safetensors"), "pt") as h:
        assert (h.get_tensor(key).float() - want).abs().max() < 1e-3  # fp16 W0, fp16 result
    assert result.tensors_merged == 2 * 23
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    for key, shard in index["weight_map"].items():
        assert key in read_header(out / "unet" / shard).tensors


def test_pickled_ckpt_in_safetensors_out(base: dict, tmp_path: Path) -> None:
    table = base["table"]
    ckpt = tmp_path / "base.ckpt"
    state = {t.key: value(t, SEED).to(ST_DTYPES[t.dtype or "F16"]) for t in table}
    torch.save({"state_dict": state, "global_step": 10}, ckpt)
    out = tmp_path / "from_ckpt.safetensors"
    merge(ckpt, [_lora()], out)
    ref = tmp_path / "from_st.safetensors"
    merge(base["single"], [_lora()], ref)
    with safe_open(str(out), "pt") as a, safe_open(str(ref), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


# ----------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 checkpoint large enough (~110 MB) to be caught in the middle of writing."""
    import loratool

    with loratool.load(source_path(LORA)) as adapter:
        mods = {(m.key.component, m.key.path) for m in adapter.modules.values()}
    table = select(checkpoint_table("sd1"), mods | {("unet", "down_blocks.3.resnets.0.conv1"), ("unet", "up_blocks.0.resnets.0.conv1")})
    return write_single_file(tmp_path_factory.mktemp("big") / "big.safetensors", table, "F32", SEED)


def _start_and_catch_mid_write(ckpt: Path, out: Path) -> subprocess.Popen:
    """Start a merge; stop it (SIGSTOP) as soon as its temp file beside ``out`` has data."""
    proc = subprocess.Popen([*LORATOOL, "merge", str(ckpt), _lora(), "-o", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        temps = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        if temps and temps[0].stat().st_size > 8:
            proc.send_signal(signal.SIGSTOP)
            assert not out.exists(), "the merge finished before it could be interrupted"
            return proc
        if proc.poll() is not None:
            pytest.fail(f"merge ended early: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.001)
    proc.kill()
    pytest.fail("no temp file appeared")


def test_sigkill_mid_write_leaves_nothing_under_the_output_name(big: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    proc = _start_and_catch_mid_write(big, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    names = [p.name for p in tmp_path.iterdir()]
    assert "out.safetensors" not in names
    # only the hidden temp file may remain (nothing can clean up after SIGKILL)
    assert all(n.startswith(".out.safetensors.") and n.endswith(".tmp") for n in names), names


def test_sigterm_mid_write_cleans_up(big: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    proc = _start_and_catch_mid_write(big, out)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def _full_disk_run(ckpt: Path, mount: Path) -> subprocess.CompletedProcess[str]:
    """Merge onto a 4 MB tmpfs (a private mount namespace; unprivileged through a user
    namespace); where that is impossible, under RLIMIT_FSIZE (the kernel then fails the
    write with EFBIG instead of ENOSPC)."""
    out = mount / "out.safetensors"
    merge_cmd = " ".join([*LORATOOL, "merge", str(ckpt), _lora(), "-o", str(out)])
    script = f"mount -t tmpfs -o size=4m tmpfs {mount} || exit 97; {merge_cmd}; rc=$?; ls -A {mount}; exit $rc"
    unshare = shutil.which("unshare")
    if unshare:
        args = [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--mount"]
        r = subprocess.run([*args, "sh", "-c", script], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 97 and not r.stderr.startswith("unshare:"):
            return r
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    r = subprocess.run([*LORATOOL, "merge", str(ckpt), _lora(), "-o", str(out)], capture_output=True, text=True, cwd=ROOT, preexec_fn=limit)
    r.stdout += "\n".join(p.name for p in mount.iterdir())
    return r


def test_full_disk_is_one_error_line_and_no_file(big: Path, tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    r = _full_disk_run(big, mount)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot write" in lines[0], r.stderr
    assert "No space left on device" in lines[0] or "File too large" in lines[0]
    assert r.stdout.strip() == ""  # nothing in the (tmpfs or plain) output folder
    assert list(mount.iterdir()) == []

"""``loratool check``: verdicts, exit codes, the JSON contract, and that it reads headers only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures.checkpoints import checkpoint_table, write_single_file
from loratool.io.safetensors import read_header
from tests.conftest import run_cli, source_path

JSON_LORA_FIELDS = {
    "path", "format", "family", "fits", "verdict", "message", "placed", "unplaced",
    "lora_dtypes", "checkpoint_dtypes", "notes", "warnings",
}  # fmt: skip


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real-shaped SD1.5 and SDXL single files, header only (data region a hole)."""
    d = tmp_path_factory.mktemp("ckpt")
    return {f: write_single_file(d / f"{f}.safetensors", checkpoint_table(f), sparse=True) for f in ("sd1", "sdxl")}


def _json(*args: str) -> tuple[int, dict]:
    r = run_cli("check", *args, "--json")
    return r.returncode, json.loads(r.stdout)


def test_fitting_loras_exit_0(sparse: dict[str, Path]) -> None:
    loras = [source_path(f"fixtures/{n}") for n in ("sdxl_kohya_lora.safetensors", "sdxl_diffusers.safetensors", "sdxl_peft")]
    code, report = _json(*map(str, loras), "--base", str(sparse["sdxl"]))
    assert code == 0 and report["fits"] is True and report["errors"] == []
    ck = report["checkpoint"]
    assert (ck["layout"], ck["family"]) == ("single-file", "sdxl")
    assert set(ck["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    assert ck["components"]["unet"]["modules"] == ck["components"]["unet"]["catalog_modules"] > 1000
    for lc in report["loras"]:
        assert set(lc) == JSON_LORA_FIELDS
        assert (lc["verdict"], lc["unplaced"]) == ("fits", {})
    assert report["loras"][0]["placed"] == {"text_encoder": 8, "text_encoder_2": 12, "unet": 51}
    assert report["loras"][1]["placed"] == {"text_encoder": 4, "text_encoder_2": 8, "unet": 10}


def test_another_family_is_one_line_and_exit_1(sparse: dict[str, Path]) -> None:
    r = run_cli("check", str(source_path("fixtures/sdxl_kohya_lora.safetensors")), "--base", str(sparse["sd1"]))
    assert r.returncode == 1
    lines = [ln for ln in r.stdout.splitlines() if "sdxl_kohya_lora" in ln]
    assert len(lines) == 1 and "LoRA is sdxl, checkpoint is sd1" in lines[0]


def _kohya_sd2(path: Path) -> Path:
    """A kohya SD2 LoRA: OpenCLIP-H widths (1024) on lora_te_ and cross-attention."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for name, out, inp in (
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 1024),
    ):
        t[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=g).half()
        t[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g).half()
        t[f"{name}.alpha"] = torch.tensor(4.0).half()
    save_file(t, str(path), metadata={"ss_v2": "True"})
    return path


def test_sd2_lora_on_sd1_checkpoint_and_partial_fits(sparse: dict[str, Path], tmp_path: Path) -> None:
    sd2 = _kohya_sd2(tmp_path / "sd2.safetensors")
    stray = tmp_path / "stray.safetensors"
    with safe_open(str(source_path("fixtures/sd15_kohya_lora.safetensors")), "pt") as f:
        t = {k: f.get_tensor(k) for k in list(f.keys())[:9]}  # noqa: SIM118
    t["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 8).half()
    t["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(8, 2).half()
    t["something_else"] = torch.zeros(1)
    save_file(t, str(stray), metadata={"ss_base_model_version": "sd_v1"})
    code, report = _json(str(sd2), str(stray), str(source_path("fixtures/sd15_kohya_lora.safetensors")), "--base", str(sparse["sd1"]))
    assert code == 1 and report["fits"] is False
    sd2_r, stray_r, ok = report["loras"]
    assert (sd2_r["verdict"], sd2_r["family"]) == ("wrong-family", "sd2")
    assert sd2_r["message"] == "LoRA is sd2, checkpoint is sd1"
    assert stray_r["verdict"] == "partial"
    assert stray_r["unplaced"]["something_else"] == "unrecognised key"
    assert "no module of the sd1 catalog has this name" in stray_r["unplaced"]["lora_unet_not_a_module"]
    assert ok["verdict"] == "fits" and ok["placed"] == {"text_encoder": 72, "unet": 192}


def test_shape_mismatch_is_named(sparse: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 640).half(), f"{name}.lora_up.weight": torch.zeros(320, 4).half()},
              str(bad), metadata={"ss_base_model_version": "sd_v1"})  # fmt: skip
    code, report = _json(str(bad), "--base", str(sparse["sd1"]))
    assert code == 1
    why = report["loras"][0]["unplaced"][name]
    assert why.startswith("shape mismatch") and "[320, 640]" in why and "[320, 320]" in why


def _peft_te_without_text_model(folder: Path) -> Path:
    """A PEFT adapter saved from a CLIP whose modules lack ``text_model.`` — as
    transformers >= 5 names them (CLIPTextTransformer has that layout under 4.x)."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPTextTransformer

    from fixtures.generate import CLIP_L_CONFIG, materialise_lora

    with torch.device("meta"):
        te = CLIPTextTransformer(CLIPTextConfig(**CLIP_L_CONFIG))
    model = get_peft_model(te, LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    materialise_lora(model, 0, torch.float16)
    model.save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["auto_mapping"]["base_model_class"] = "CLIPTextModel"  # as transformers 5 records it
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_peft_text_encoder_without_text_model_is_flagged(sparse: dict[str, Path], tmp_path: Path) -> None:
    folder = _peft_te_without_text_model(tmp_path / "te5")
    keys = read_header(folder / "adapter_model.safetensors").tensors
    assert all(k.startswith("base_model.model.encoder.layers.") for k in keys)
    code, report = _json(str(folder), str(source_path("realworld/peft-te-sd15")), "--base", str(sparse["sd1"]))
    assert code == 0
    new, old = report["loras"]
    assert new["placed"] == {"text_encoder": 24}
    assert any(w.startswith("te-missing-text-model: ") for w in new["warnings"])
    assert any(w.startswith("te-transformers5: ") for w in old["warnings"])
    assert not any(w.startswith("te-missing-text-model") for w in old["warnings"])
    assert not any(w.startswith("te-transformers5") for w in new["warnings"])


def test_bad_input_exit_2_and_other_loras_still_reported(sparse: dict[str, Path], tmp_path: Path) -> None:
    r = run_cli("check", str(tmp_path / "missing.safetensors"), str(source_path("fixtures/sd15_kohya_lora.safetensors")), "--base", str(sparse["sd1"]), "--json")
    assert r.returncode == 2
    report = json.loads(r.stdout)
    assert report["loras"][0]["verdict"] == "fits"
    assert report["errors"][0]["path"].endswith("missing.safetensors")
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    bad_base = run_cli("check", str(source_path("fixtures/sd15_kohya_lora.safetensors")), "--base", str(source_path("fixtures/sd15_kohya_lora.safetensors")))
    assert bad_base.returncode == 2 and "LoRA adapter, not a checkpoint" in bad_base.stderr
    usage = run_cli("check", str(source_path("fixtures/sd15_kohya_lora.safetensors")))
    assert usage.returncode == 2


SPY = r"""
import json, os, sys
from loratool.ops.check import check
lora, ckpt = sys.argv[1:3]
check([lora], ckpt)  # imports and catalogs warm
target = os.stat(ckpt)
reads = []
def spy(name, real):
    def wrapper(fd, *args):
        st = os.fstat(fd)
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
            reads.append((name, args[-1] if name != "read" else os.lseek(fd, 0, os.SEEK_CUR)))
        return real(fd, *args)
    return wrapper
for name in ("pread", "preadv", "read"):
    setattr(os, name, spy(name, getattr(os, name)))
def rchar():
    with open("/proc/self/io") as fh:
        return int(fh.read().split("rchar: ")[1].split()[0])
before = rchar()
report = check([lora], ckpt)
after = rchar()
print(json.dumps({"rchar": after - before, "reads": reads, "fits": report.fits, "torch": "torch" in sys.modules}))
"""


def test_check_reads_headers_only(sparse: dict[str, Path]) -> None:
    """On a 6.9 GB SDXL checkpoint whose data region is a hole: no read lands past its header
    (os-level reads spied), and the bytes read (/proc/self/io rchar) are the two headers
    and the LoRA's alpha scalars, not tensor data. torch is never imported."""
    ckpt = sparse["sdxl"]
    lora = source_path("fixtures/sdxl_kohya_lora.safetensors")
    assert ckpt.stat().st_size > 6e9 and ckpt.stat().st_blocks * 512 < 10e6  # a hole
    out = subprocess.run([sys.executable, "-c", SPY, str(lora), str(ckpt)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    data_start = read_header(ckpt).data_start
    assert result["fits"] is True and result["torch"] is False
    assert [r for r in result["reads"] if r[1] >= data_start] == []
    lora_header = read_header(lora).data_start
    alphas = sum(1 for k in read_header(lora).tensors if k.endswith(".alpha"))
    assert result["rchar"] <= data_start + lora_header + 2 * alphas + 64 * 1024, result["rchar"]
    assert os.path.getsize(lora) - lora_header > 64 * 1024  # reading the LoRA's data would show

"""inspect's ``loader_notes`` (issue 7 §9): when a file's strength depends on metadata
A1111/ComfyUI never read, or its keys are ones they do not load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loratool.ops.convert import convert
from loratool.ops.inspect import inspect
from tests.conftest import FIXTURES, run_cli, source_path

ATTENTION = re.compile(r"^unet\..*\.attn\d\.(to_q|to_k|to_v|to_out\.0)\.lora_A\.weight$")


def _notes(path: Path) -> list[str]:
    return inspect(path).loader_notes


def test_kohya_files_need_no_note() -> None:
    for name in ("sd15_kohya_lora", "sdxl_kohya_lora", "sd15_kohya_lokr", "sd15_kohya_dora"):
        assert _notes(FIXTURES / f"{name}.safetensors") == []


def test_diffusers_file_with_metadata_alpha_is_flagged(tmp_path: Path) -> None:
    src = FIXTURES / "sd15_diffusers.safetensors"  # rank 4, lora_alpha 8 in lora_adapter_metadata
    report = inspect(src)
    notes = report.loader_notes
    assert any(f"strength of {report.modules} module(s)" in n and "alpha/rank = 2" in n for n in notes)
    assert any("A1111 loads kohya-named keys only" in n for n in notes)
    with safe_open(str(src), "pt") as f:
        attention = [k for k in f.keys() if ATTENTION.match(k)]  # noqa: SIM118
    assert any(f"ComfyUI does not load {len(attention)} of {report.modules}" in n for n in notes)
    assert "convert --to kohya" in notes[-1]
    # our diffusers output folds alpha into the factors: no strength note, the key notes stay
    convert(src, "diffusers", tmp_path / "folded.safetensors")
    folded = _notes(tmp_path / "folded.safetensors")
    assert not any("strength" in n for n in folded) and any("ComfyUI does not load" in n for n in folded)
    convert(src, "diffusers", tmp_path / "kept.safetensors", keep_factors=True)
    assert any("alpha/rank = 2" in n for n in _notes(tmp_path / "kept.safetensors"))
    # kohya output: nothing to say
    convert(src, "kohya", tmp_path / "k.safetensors")
    assert _notes(tmp_path / "k.safetensors") == []


def test_save_lora_adapter_layout_is_flagged(tmp_path: Path) -> None:
    """Bare keys + unprefixed metadata (diffusers' save_lora_adapter): ComfyUI maps bare
    UNet keys, and ignores the metadata that sets alpha."""
    path = tmp_path / "pytorch_lora_weights.safetensors"
    mod = "down_blocks.0.attentions.0.proj_in"
    save_file(
        {f"{mod}.lora_A.weight": torch.randn(4, 320, 1, 1), f"{mod}.lora_B.weight": torch.randn(320, 4, 1, 1)},
        str(path), {"format": "pt", "lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 16, "target_modules": [mod]})},
    )
    notes = inspect(path, family="sd1").loader_notes
    assert any("strength of 1 module(s)" in n and "alpha/rank = 4" in n for n in notes)
    assert not any("ComfyUI does not load" in n for n in notes)  # proj_in is not attention


@pytest.mark.parametrize("name", ["fixtures/sd15_peft_te", "fixtures/sdxl_peft", "realworld/peft-unet-sd15"])
def test_peft_folders_are_flagged(name: str) -> None:
    notes = inspect(source_path(name), family="sd1" if "te" in name else None).loader_notes
    assert any("PEFT adapter folder" in n for n in notes) and "convert --to kohya" in notes[-1]


def test_human_output_and_json_carry_the_notes() -> None:
    path = str(FIXTURES / "sd15_diffusers.safetensors")
    human = run_cli("inspect", path)
    assert human.returncode == 0 and "loaders" in human.stdout and "A1111" in human.stdout
    report = json.loads(run_cli("inspect", "--json", path).stdout)
    assert report["loader_notes"] == inspect(path).loader_notes

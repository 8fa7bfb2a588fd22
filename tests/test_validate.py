"""validate: one file made to fail each finding code, the clean file that passes, the
fixtures and real-world files without false errors, the CLI contract, and the README table."""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratool.ops.findings import CODES
from loratool.ops.validate import OUTLIER_RATIO, ValidationReport, adapter_paths, validate
from tests.conftest import FIXTURES, ROOT, run_cli, write_raw_safetensors
from tests.lora_builders import (
    BLOCK,
    KOHYA_META,
    SD1_MODULES,
    SDXL_MODULES,
    clean_sd1,
    clip_peft_config,
    data_sha256,
    kohya_tensors,
    peft_dir,
    write,
)

Tensors = dict[str, torch.Tensor]
Q = BLOCK + "attn1_to_q"


def _set(key: str, value: torch.Tensor) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[key] = value
    return edit


def _drop(*keys: str) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        for k in keys:
            del t[k]
    return edit


class _Payload:
    """Unpickling this runs code: a weights-only loader must refuse it."""

    def __reduce__(self):  # noqa: ANN204
        return (print, ("this must never run",))


def _truncated(tmp: Path) -> Path:
    path = clean_sd1(tmp / "cut.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 5000])
    return path


def _trailing(tmp: Path) -> Path:
    path = clean_sd1(tmp / "trailing.safetensors", with_hashes=False)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 64)
    return path


def _sdxl_mixed(tmp: Path) -> Path:
    modules = {**SDXL_MODULES, "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_k": (1280, 1280)}
    meta = {**KOHYA_META, "ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models", "modelspec.resolution": "1024x1024"}
    return write(tmp / "mixed.safetensors", kohya_tensors(modules), meta, with_hashes=True)


def _outlier(t: Tensors) -> None:
    t[Q + ".lora_up.weight"] = t[Q + ".lora_up.weight"] * 1000


def _ia3(tmp: Path) -> Path:
    t = kohya_tensors()
    t[Q.replace("attn1_to_q", "attn1_to_k") + ".weight"] = torch.ones(320, dtype=torch.float16) * 0.1
    t[Q.replace("attn1_to_q", "attn1_to_k") + ".on_input"] = torch.tensor(0, dtype=torch.float16)
    for p in ("lora_down.weight", "lora_up.weight", "alpha"):
        del t[Q.replace("attn1_to_q", "attn1_to_k") + "." + p]
    return write(tmp / "ia3.safetensors", t, KOHYA_META, with_hashes=True)


def _loha(tmp: Path) -> Path:
    t = kohya_tensors()
    g = torch.Generator().manual_seed(3)
    for p in ("lora_down.weight", "lora_up.weight"):
        del t[f"{Q}.{p}"]
    for i in (1, 2):
        t[f"{Q}.hada_w{i}_a"] = (torch.randn(320, 4, generator=g) * 0.1).half()
        t[f"{Q}.hada_w{i}_b"] = (torch.randn(4, 320, generator=g) * 0.1).half()
    return write(tmp / "loha.safetensors", t, KOHYA_META, with_hashes=True)


def _pickle(tmp: Path, obj: object, name: str) -> Path:
    path = tmp / name
    torch.save(obj, path)
    return path


def _private(tmp: Path) -> Path:
    meta = {
        "ss_sd_model_name": r"C:\Users\alice\stable-diffusion\models\v1-5-pruned.safetensors",
        "ss_training_comment": "trained from /home/bob/datasets/cats on my box",
        "ss_datasets": json.dumps([{"subsets": [{"image_dir": "10_cats", "class_tokens": "cat"}],
                                    "tag_frequency": {"10_cats": {"cat": 3}}}]),
        "ss_network_args": json.dumps({"preset": r"\\nas\share\presets\full.toml"}),
        "ss_output_name": "~carol/loras/out",
    }
    return clean_sd1(tmp / "private.safetensors", meta=meta)


# code -> (builder(tmp) -> path, validate kwargs, the exact codes expected)
CASES: dict[str, tuple[Callable[[Path], Path], dict, set[str]]] = {
    "unreadable": (lambda tmp: tmp / "missing.safetensors", {}, {"unreadable"}),
    "header-invalid": (lambda tmp: write_raw_safetensors(tmp / "bad.safetensors", {}, header_len=4) and
                       _corrupt_json(tmp / "bad.safetensors"), {}, {"header-invalid"}),
    "truncated": (_truncated, {}, {"truncated"}),
    "layout-invalid": (_trailing, {}, {"layout-invalid"}),  # refused like the safetensors library: nothing else is read
    "not-an-adapter": (lambda tmp: write(tmp / "embedding.safetensors", {"emb_params": torch.zeros(2, 768)}), {},
                       {"not-an-adapter"}),
    "duplicate-module": (lambda tmp: clean_sd1(tmp / "dup.safetensors", lambda t: t.update({
        k.replace("lora_te_", "lora_te1_"): v.clone() for k, v in t.items() if "layers_0_self_attn_q_proj" in k})), {},
        {"duplicate-module"}),
    "incomplete-module": (lambda tmp: clean_sd1(tmp / "half.safetensors", _drop(Q + ".lora_up.weight")), {},
                          {"incomplete-module"}),
    "factor-shape-mismatch": (lambda tmp: clean_sd1(tmp / "rank.safetensors", _set(Q + ".lora_up.weight", torch.zeros(320, 8).half())),
                              {}, {"factor-shape-mismatch"}),
    "invalid-module": (lambda tmp: clean_sd1(tmp / "ints.safetensors", lambda t: t.update(
        {Q + ".lora_up.weight": t[Q + ".lora_up.weight"].to(torch.int16)})), {}, {"invalid-module"}),
    "target-shape-mismatch": (lambda tmp: clean_sd1(tmp / "shape.safetensors", _set(Q + ".lora_up.weight", torch.randn(640, 4).half() * 0.02)),
                              {}, {"target-shape-mismatch"}),
    "unresolved-module": (lambda tmp: clean_sd1(tmp / "extra.safetensors", lambda t: t.update(
        {k.replace("transformer_blocks_0", "transformer_blocks_1"): v.clone() for k, v in t.items() if k.startswith(Q)})), {},
        {"unresolved-module"}),
    "unknown-keys": (lambda tmp: clean_sd1(tmp / "junk.safetensors", _set("optimizer_state_step", torch.zeros(1))), {},
                     {"unknown-keys"}),
    "mixed-dtypes": (lambda tmp: clean_sd1(tmp / "dtypes.safetensors", lambda t: t.update(
        {Q + ".lora_up.weight": t[Q + ".lora_up.weight"].float()})), {}, {"mixed-dtypes"}),
    "family-unknown": (lambda tmp: peft_dir(tmp / "te", {f"text_model.encoder.layers.{i}.self_attn.q_proj": (768, 768) for i in range(2)},
                                            clip_peft_config()), {}, {"family-unknown", "te-transformers5"}),
    "non-finite": (lambda tmp: clean_sd1(tmp / "nan.safetensors", lambda t: (
        t[Q + ".lora_up.weight"].__setitem__((0, 0), math.nan),
        t.__setitem__(BLOCK + "attn1_to_k.alpha", torch.tensor(math.inf).half()))), {}, {"non-finite"}),
    "zero-module": (lambda tmp: clean_sd1(tmp / "zero.safetensors", _set(Q + ".lora_up.weight", torch.zeros(320, 4).half())), {},
                    {"zero-module"}),
    "outlier-module": (lambda tmp: clean_sd1(tmp / "boom.safetensors", _outlier), {}, {"outlier-module"}),
    "alpha-nonpositive": (lambda tmp: clean_sd1(tmp / "alpha0.safetensors", lambda t: t.update({
        Q + ".alpha": torch.tensor(-2.0).half(), BLOCK + "attn1_to_k.alpha": torch.tensor(0.0).half()})), {},
        {"alpha-nonpositive"}),
    "alpha-absurd": (lambda tmp: clean_sd1(tmp / "alpha_big.safetensors", _set(Q + ".alpha", torch.tensor(1000.0).half())), {},
                     {"alpha-absurd", "outlier-module"}),  # the same module: scale 250 vs 0.5
    "meta-dim-mismatch": (lambda tmp: clean_sd1(tmp / "dim.safetensors", meta={"ss_network_dim": "8"}), {}, {"meta-dim-mismatch"}),
    "meta-alpha-mismatch": (lambda tmp: clean_sd1(tmp / "alpha_meta.safetensors", meta={"ss_network_alpha": "4"}), {},
                            {"meta-alpha-mismatch"}),
    "meta-family-mismatch": (lambda tmp: clean_sd1(tmp / "fam.safetensors", meta={
        "ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}), {},
        {"meta-family-mismatch"}),
    "hash-mismatch": (lambda tmp: clean_sd1(tmp / "hash.safetensors", meta={"sshs_model_hash": "0" * 64}, with_hashes=False), {},
                      {"hash-mismatch", "modelspec-missing"}),
    "modelspec-missing": (lambda tmp: write(tmp / "bare.safetensors", kohya_tensors()), {}, {"modelspec-missing"}),
    "privacy-path": (_private, {}, {"privacy-path", "privacy-dataset-names"}),
    "privacy-dataset-names": (lambda tmp: clean_sd1(tmp / "dirs.safetensors", meta={
        "ss_dataset_dirs": json.dumps({"20_cats": {"n_repeats": 20, "img_count": 12}})}), {}, {"privacy-dataset-names"}),
    "pickle-refused": (lambda tmp: _pickle(tmp, kohya_tensors(), "lora.pt"), {}, {"pickle-refused"}),
    "pickle-unsafe": (lambda tmp: _pickle(tmp, {"x": _Payload()}, "evil.ckpt"), {"allow_pickle": True}, {"pickle-unsafe"}),
    "pickle-file": (lambda tmp: _pickle(tmp, kohya_tensors(), "lora.pt"), {"allow_pickle": True}, {"pickle-file"}),
    "te-missing-text-model": (lambda tmp: peft_dir(tmp / "te5", {f"encoder.layers.{i}.self_attn.q_proj": (768, 768) for i in range(2)},
                                                   clip_peft_config(base_model_name_or_path="runwayml/stable-diffusion-v1-5")),
                              {}, {"te-missing-text-model"}),  # decoded as CLIP (widths + base model): sd1
    "te-transformers5": (lambda tmp: peft_dir(tmp / "te4", {f"text_model.encoder.layers.{i}.self_attn.q_proj": (768, 768) for i in range(2)},
                                              clip_peft_config(base_model_name_or_path="runwayml/stable-diffusion-v1-5")),
                         {}, {"te-transformers5"}),
    "mixed-sdxl-names": (_sdxl_mixed, {}, {"mixed-sdxl-names"}),
    "diffusers-unsupported": (_loha, {}, {"diffusers-unsupported"}),
    "comfyui-unsupported": (_ia3, {}, {"comfyui-unsupported", "diffusers-unsupported"}),
}


def _corrupt_json(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 4) + b"{nop" + b"\0" * 16)
    return path


def test_every_code_has_a_case() -> None:
    assert set(CASES) == set(CODES)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cases")


@pytest.mark.parametrize("code", sorted(CASES))
def test_file_made_to_fail_each_check(code: str, case_dir: Path) -> None:
    build, kwargs, expected = CASES[code]
    folder = case_dir / code
    folder.mkdir()
    report = validate(build(folder), **kwargs)
    assert set(report.codes) == expected, [f.to_json() for f in report.findings]
    mine = [f for f in report.findings if f.code == code]
    assert mine and all(f.message and "\n" not in f.message for f in mine)
    json.dumps(report.to_json(), allow_nan=False)
    assert report.failed(strict=True) == (CODES[code].severity != "info" or any(
        CODES[c].severity != "info" for c in expected))


def test_clean_file_has_no_findings(tmp_path: Path) -> None:
    path = clean_sd1(tmp_path / "clean.safetensors")
    report = validate(path)
    assert report.findings == [] and report.data_checked
    assert report.data_sha256 == data_sha256(path)
    assert report.adapter["family"] == "sd1" and report.adapter["modules"] == len(SD1_MODULES)


def test_messages_name_what_is_wrong(case_dir: Path) -> None:
    reports = {code: validate(CASES[code][0](case_dir / f"m-{code}"), **CASES[code][1])
               for code in ("truncated", "privacy-path", "duplicate-module", "outlier-module", "non-finite")
               if (case_dir / f"m-{code}").mkdir() is None}

    def messages(code: str) -> list[str]:
        return [f.message for f in reports[code].findings if f.code == code]

    trunc = messages("truncated")[0]
    assert "kohya sd1 adapter (lora, 15 modules, rank 4)" in trunc
    assert reports["truncated"].adapter["complete"] is False and reports["truncated"].adapter["modules"] == 15
    private = {f.key: f.message for f in reports["privacy-path"].findings if f.code == "privacy-path"}
    assert set(private) == {"ss_sd_model_name", "ss_training_comment", "ss_network_args", "ss_output_name"}
    assert "'alice'" in private["ss_sd_model_name"] and "'bob'" in private["ss_training_comment"]
    assert "'carol'" in private["ss_output_name"] and r"\\nas\share" in private["ss_network_args"]
    names = [f for f in reports["privacy-path"].findings if f.code == "privacy-dataset-names"]
    assert [f.key for f in names] == ["ss_datasets"] and "10_cats" in names[0].message
    dup = messages("duplicate-module")[0]
    assert "same module" in dup and all(f"{p}_text_model_encoder_layers_0_self_attn_q_proj" in dup for p in ("lora_te", "lora_te1"))
    outliers = [f for f in reports["outlier-module"].findings if f.code == "outlier-module"]
    assert [f.key for f in outliers] == [Q]
    ratio = float(re.search(r"(\d+)× the median", outliers[0].message).group(1))
    assert ratio >= OUTLIER_RATIO
    bad = {f.key for f in reports["non-finite"].findings if f.code == "non-finite"}
    assert bad == {Q + ".lora_up.weight", BLOCK + "attn1_to_k.alpha"}


def test_outlier_norm_is_exact(tmp_path: Path) -> None:
    """The Gram-matrix norm equals ‖up @ down‖·scale formed explicitly (torch as oracle)."""
    from loratool.formats.decode import decode
    from loratool.io.safetensors import read_header
    from loratool.io.sources import open_source
    from loratool.ops.tensor_stats import scan_safetensors

    path = clean_sd1(tmp_path / "n.safetensors")
    source = open_source(path)
    adapter = decode(source)
    stats = scan_safetensors(read_header(path), list(adapter.modules.values()))
    source.close()
    t = kohya_tensors()
    for m in adapter.modules.values():
        up = t[m.source_name + ".lora_up.weight"].float().flatten(1)
        down = t[m.source_name + ".lora_down.weight"].float().flatten(1)
        expected = float(torch.linalg.matrix_norm(up @ down)) * 2.0 / 4
        assert stats.norms[m.key] == pytest.approx(expected, rel=1e-4)


def test_lora_te1_on_sd1_is_fine(tmp_path: Path) -> None:
    """diffusers' convert_state_dict_to_kohya writes lora_te1_ even for SD1; every loader reads it."""
    t = {k.replace("lora_te_", "lora_te1_"): v for k, v in kohya_tensors().items()}
    report = validate(write(tmp_path / "te1.safetensors", t, KOHYA_META, with_hashes=True))
    assert report.findings == []


def test_onetrainer_modelspec_hash_is_accepted(tmp_path: Path) -> None:
    """OneTrainer hashes tensors in sorted-key order: with alphas in F32 and weights in F16
    the file order differs, and that value is still right."""
    import hashlib

    t = kohya_tensors()
    t.update({k: v.float() for k, v in t.items() if k.endswith(".alpha")})
    sorted_hash = hashlib.sha256(b"".join(t[k].reshape(-1).view(torch.uint8).numpy().tobytes() for k in sorted(t))).hexdigest()
    path = write(tmp_path / "ot.safetensors", t, {**KOHYA_META, "modelspec.hash_sha256": "0x" + sorted_hash})
    assert sorted_hash != data_sha256(path)
    assert "hash-mismatch" not in validate(path).codes
    path = write(tmp_path / "wrong.safetensors", t, {**KOHYA_META, "modelspec.hash_sha256": "0x" + "ab" * 32})
    assert validate(path).codes == ["hash-mismatch"]  # alphas are not weights: no mixed-dtypes


def test_header_only_skips_the_data(case_dir: Path) -> None:
    (case_dir / "h").mkdir()
    path = clean_sd1(case_dir / "h" / "nan.safetensors", _set(Q + ".lora_up.weight", torch.full((320, 4), math.nan).half()))
    report = validate(path, read_data=False)
    assert not report.data_checked and report.data_sha256 is None and "non-finite" not in report.codes


EXPECTED_FIXTURES: dict[str, set[str]] = {
    "sd15_diffusers.safetensors": {"modelspec-missing"},
    "sd15_kohya_dora.safetensors": {"modelspec-missing"},
    "sd15_kohya_dora_inaxis.safetensors": {"modelspec-missing"},
    "sd15_kohya_locon.safetensors": {"modelspec-missing"},
    "sd15_kohya_loha.safetensors": {"modelspec-missing", "diffusers-unsupported"},
    "sd15_kohya_lokr.safetensors": {"modelspec-missing", "diffusers-unsupported"},
    "sd15_kohya_lora.safetensors": {"modelspec-missing"},
    "sdxl_diffusers.safetensors": {"modelspec-missing"},
    "sdxl_kohya_diffusers_named.safetensors": {"modelspec-missing"},
    "sdxl_kohya_lora.safetensors": {"modelspec-missing"},
    "sd15_peft_te": {"family-unknown", "te-transformers5"},  # CLIP-L fits sd1 and sdxl
    "sd15_peft_unet_dora": set(),
    "sdxl_peft": set(),
}
# Real files: what each one gets, and why (see ../shared/realworld/README.md).
EXPECTED_REALWORLD: dict[str, set[str]] = {
    "diffusers-attnproc-sd1": set(),
    "diffusers-attnproc-sd1/pytorch_lora_weights.safetensors": {"modelspec-missing"},
    "diffusers-sd15/pytorch_lora_weights.safetensors": {"modelspec-missing"},
    # 3 UNet modules whose lokr_w2_a is all zeros; ss_dataset_dirs/ss_tag_frequency name
    # the kohya folders ("16_smf girl"…); diffusers cannot load LoKr.
    "lycoris-lokr-sd1/smart_falcon_4_lokr.safetensors": {
        "zero-module", "modelspec-missing", "privacy-dataset-names", "diffusers-unsupported"},
    # adapter_config.json names the trainer's E:\huggingface_cache\… folder.
    "peft-te-sd15": {"privacy-path", "te-transformers5"},
    "peft-unet-sd15": set(),
}


def test_fixtures_validate_without_false_errors() -> None:
    names = sorted(p.name for p in FIXTURES.iterdir() if p.suffix == ".safetensors" or p.is_dir())
    assert set(names) == set(EXPECTED_FIXTURES)
    for name in names:
        report = validate(FIXTURES / name)
        assert set(report.codes) == EXPECTED_FIXTURES[name], (name, [f.to_json() for f in report.findings])
        assert report.counts["error"] == 0 and report.data_checked


def test_realworld_files_validate_without_false_errors(realworld: Path) -> None:
    for name, expected in EXPECTED_REALWORLD.items():
        report = validate(realworld / name)
        assert set(report.codes) == expected, (name, [f.to_json() for f in report.findings])
        assert report.counts["error"] == 0
    lokr = validate(realworld / "lycoris-lokr-sd1/smart_falcon_4_lokr.safetensors")
    assert lokr.data_sha256 == lokr_embedded(realworld)  # kohya's embedded hash is right
    zero = next(f for f in lokr.findings if f.code == "zero-module")
    assert zero.message.startswith("3 module(s)") and zero.key == "lora_unet_down_blocks_0_resnets_0_conv1"


def lokr_embedded(realworld: Path) -> str:
    from loratool.io.safetensors import read_header

    return read_header(realworld / "lycoris-lokr-sd1/smart_falcon_4_lokr.safetensors").metadata["sshs_model_hash"]


def test_folder_is_walked_recursively(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    clean_sd1(tmp_path / "a" / "b" / "one.safetensors")
    peft_dir(tmp_path / "a" / "peft", {"text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}, clip_peft_config())
    (tmp_path / "a" / "notes.txt").write_text("x")
    _pickle(tmp_path, kohya_tensors(), "old.ckpt")
    found = adapter_paths(tmp_path)
    assert found == [tmp_path / "a" / "b" / "one.safetensors", tmp_path / "a" / "peft", tmp_path / "old.ckpt"]


def test_cli_exit_codes_and_several_paths(tmp_path: Path) -> None:
    clean = clean_sd1(tmp_path / "clean.safetensors")
    warn = clean_sd1(tmp_path / "warn.safetensors", meta={"ss_network_dim": "8"})
    broken = _truncated(tmp_path)
    both = run_cli("validate", str(broken), str(clean))  # reads the data: NaN/Inf, norms, hashes
    assert both.returncode == 1 and "truncated" in both.stdout and f"ok {clean}" in both.stdout
    quick = ["validate", "--header-only"]  # header checks only: no torch, quick
    assert run_cli(*quick, str(clean), str(warn)).returncode == 0
    strict = run_cli(*quick, "--strict", str(warn))
    assert strict.returncode == 1 and "meta-dim-mismatch" in strict.stdout
    assert run_cli(*quick, "--family", "sd9", str(clean)).returncode == 2
    assert run_cli("validate").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(*quick, str(empty))
    assert r.returncode == 1 and r.stderr.strip() == f"error: {empty}: no LoRA files under this folder"


def test_cli_json_is_strict_and_documented(tmp_path: Path) -> None:
    nan = clean_sd1(tmp_path / "nan.safetensors", _set(Q + ".alpha", torch.tensor(math.nan).half()))
    r = run_cli("validate", "--header-only", "--json", str(nan))
    assert r.returncode == 1
    report = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert set(report) == {"path", "ok", "counts", "findings", "adapter", "data_checked", "data_sha256"}
    assert report["ok"] is False and report["counts"]["error"] >= 1
    assert {"code": "non-finite", "severity": "error", "message": f"{Q}.alpha = nan", "key": f"{Q}.alpha"} in report["findings"]
    folder = run_cli("validate", "--header-only", "--json", str(tmp_path))
    assert [x["path"] for x in json.loads(folder.stdout)] == [str(nan)]
    readme = (ROOT / "README.md").read_text()
    for field in report:
        assert f"| `{field}` |" in readme, field


def test_pickles_are_refused_unless_allowed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"x": _Marker(str(marker))}, fh)
    refused = run_cli("validate", str(path))
    assert refused.returncode == 1 and "pickle-refused" in refused.stdout
    assert validate(path, allow_pickle=True).codes == ["pickle-unsafe"]
    assert not marker.exists()


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def test_readme_documents_every_code() -> None:
    readme = (ROOT / "README.md").read_text()
    table = dict(re.findall(r"^\| `([a-z0-9-]+)` \| (error|warning|info) \|", readme, flags=re.M))
    assert {k: v for k, v in table.items() if k in CODES} == {c: CODES[c].severity for c in CODES}
    assert set(CODES) <= set(table)


def test_validate_imports_no_torch_without_data(tmp_path: Path) -> None:
    path = clean_sd1(tmp_path / "x.safetensors")
    code = ("import sys; from loratool.ops.validate import validate; r = validate(sys.argv[1], read_data=False); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r.counts)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_report_round_trips_as_strict_json() -> None:
    report = ValidationReport("x")
    assert json.loads(json.dumps(report.to_json(), allow_nan=False))["counts"] == {"error": 0, "warning": 0, "info": 0}


def test_big_tensor_order_and_partner_reads(tmp_path: Path) -> None:
    """Factors far apart in the file (ups first, downs last, blocks of 16 MiB between)
    give the same result as adjacent ones."""
    from loratool.ops import tensor_stats

    t = kohya_tensors()
    filler = {"zz_unused_filler": torch.zeros(9 * 1024 * 1024, dtype=torch.float16)}
    path = tmp_path / "far.safetensors"
    save_file({**t, **filler}, str(path))
    old = tensor_stats.BLOCK
    tensor_stats.BLOCK = 64 * 1024  # force many blocks and out-of-block partner reads
    try:
        far = validate(path)
    finally:
        tensor_stats.BLOCK = old
    near = validate(path)
    assert far.data_sha256 == near.data_sha256 == data_sha256(path)
    assert far.codes == near.codes == ["modelspec-missing", "unknown-keys"]


NOT_PATHS = [
    "https://github.com/Stability-AI/generative-models", "sd-scripts/48d368fa", "fate/grand order", "1/2",
    "w/o background", "runwayml/stable-diffusion-v1-5", r".*layers\.(0|1)\.self_attn", "stable-diffusion-v1/lora",
    "(512, 512)", r"smart falcon \(umamusume\)", "AC/DC", "and/or", "hf://org/repo/file", "x: /y", "/",
]
PATHS = {  # text -> (path found, user named, text after redaction)
    r"C:\Users\alice\m.safetensors": (r"C:\Users\alice\m.safetensors", "alice", "m.safetensors"),
    r"C:\Users\John Smith\Pictures\set": (r"C:\Users\John Smith\Pictures\set", "John Smith", "set"),
    "D:/datasets/cats": ("D:/datasets/cats", None, "cats"),
    r"\\nas\share\x": (r"\\nas\share\x", None, "x"),
    "made in /home/bob/x today": ("/home/bob/x", "bob", "made in x today"),
    "/Users/carol/Desktop/lora": ("/Users/carol/Desktop/lora", "carol", "lora"),
    "~/loras/x": ("~/loras/x", None, "x"),
    "~dave/x": ("~dave/x", "dave", "x"),
    "file:///home/erin/x": ("file:///home/erin/x", "erin", "x"),
    "/content/drive/MyDrive/lora": ("/content/drive/MyDrive/lora", None, "lora"),
    "/home/frank": ("/home/frank", "frank", ""),
}


def test_privacy_patterns() -> None:
    from loratool.ops.privacy import find_paths, privacy_hits, redact_paths, user_in

    assert {s: find_paths(s) for s in NOT_PATHS} == {s: [] for s in NOT_PATHS}
    for text, (path, user, redacted) in PATHS.items():
        assert find_paths(text) == [path], text
        assert user_in(path) == user and redact_paths(text) == redacted, text
    thumb = {"modelspec.thumbnail": "data:image/png;base64,/9j/4AAQSkZJRg/abc/def", "x": "data:a/b/c"}
    assert privacy_hits(thumb) == []
    nested = privacy_hits({"ss_datasets": json.dumps([{"subsets": [{"image_dir": "/home/gina/set"}]}])})
    assert [(h.kind, h.user) for h in nested] == [("path", "gina"), ("dataset-names", None)]

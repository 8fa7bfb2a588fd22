"""Smoke suite: every CLI command end to end, as a user runs it, in the venv that runs this.

``make smoke`` runs it in the runtime-only venv that ``make demo`` builds (no numpy, no
test extras), so a runtime dependency that only the test extras bring fails here. It
needs nothing but the runtime dependencies: not pytest (it is not a test module; pytest
checks in ``test_smoke_table.py`` that the table below covers every command).

    python tests/smoke.py [--runtime-only] [-k TEXT]... [--list]

Each :class:`Step` is one ``loratool`` run: its argv (a shell-like string whose
``{fixtures}``, ``{work}`` and ``{registry}`` are filled in after splitting), the exit
code it must end with, and an optional check of its output. Every run also fails on a
traceback, a "this is a bug" line, or a Python warning. Steps run in table order in one
scratch folder, so a step may read what an earlier one wrote. To cover a new command,
add rows to ``STEPS``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loratool.cli.main import BUG_MARK, COMMANDS  # noqa: E402
from tests.civitai_server import TOKEN, CivitaiTestServer, Faults, Version, write_safetensors  # noqa: E402

TEST_ONLY_PACKAGES = ("numpy", "pytest", "hypothesis", "diffusers", "transformers", "peft")


@dataclass(frozen=True)
class Run:
    """What one step produced."""

    code: int
    stdout: str
    stderr: str
    work: Path


Check = Callable[[Run], "str | None"]  # a complaint, or None when the output is right


@dataclass(frozen=True)
class Step:
    """One ``loratool`` run: arguments, expected exit code, optional output check."""

    args: str
    code: int = 0
    check: Check | None = None
    stdin: str | None = None

    @property
    def command(self) -> str:
        """The subcommand this step exercises ("" for a top-level option such as --help)."""
        return next((a for a in shlex.split(self.args) if not a.startswith("-")), "")

    def argv(self, places: dict[str, str]) -> list[str]:
        return [a.format(**places) for a in shlex.split(self.args)]


# -- checks ---------------------------------------------------------------------------------

def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def stdout_has(*texts: str) -> Check:
    return lambda r: next((f"stdout lacks {t!r}" for t in texts if t not in r.stdout), None)


def json_out(test: Callable[[Any], bool], what: str) -> Check:
    """stdout is strict JSON (no NaN/Infinity) and ``test`` holds for it."""
    def check(r: Run) -> str | None:
        try:
            data = _strict_json(r.stdout)
        except ValueError as exc:
            return f"stdout is not strict JSON: {exc}"
        return None if test(data) else f"JSON output: expected {what}"
    return check


def error_line(fragment: str) -> Check:
    """stderr is exactly one ``error: …`` line containing ``fragment``."""
    def check(r: Run) -> str | None:
        lines = r.stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith("error: ") or fragment not in lines[0]:
            return f"expected one 'error: …{fragment}…' line on stderr"
        return None
    return check


def exists(*relpaths: str, present: bool = True) -> Check:
    """Files (relative to the scratch folder) that must (or must not) exist afterwards."""
    def check(r: Run) -> str | None:
        wrong = [p for p in relpaths if (r.work / p).exists() != present]
        return f"{'missing' if present else 'should not exist'}: {', '.join(wrong)}" if wrong else None
    return check


def all_of(*checks: Check) -> Check:
    return lambda r: next((c for c in (check(r) for check in checks) if c), None)


# -- the table ------------------------------------------------------------------------------

def _reports(n: int, key: str = "family") -> Callable[[Any], bool]:
    return lambda d: isinstance(d, list) and len(d) == n and all(key in x for x in d)


STEPS: list[Step] = [
    Step("--help", check=stdout_has(*COMMANDS)),
    Step("--version", check=stdout_has("loratool")),
    # inspect: one file, a folder, several paths, JSON, hashes, keys, pickles
    Step("inspect {fixtures}/sd15_kohya_lora.safetensors", check=stdout_has("kohya", "sd1")),
    Step("inspect {fixtures}", check=stdout_has("sdxl", "lokr", "dora")),
    Step("inspect --json {fixtures}", check=json_out(lambda d: isinstance(d, list) and len(d) >= 10, "≥ 10 reports")),
    Step("inspect {fixtures}/sdxl_peft {fixtures}/sd15_diffusers.safetensors {fixtures}/sd15_peft_te",
         check=stdout_has("peft", "diffusers")),
    Step("inspect --json --hashes {fixtures}/sdxl_kohya_lora.safetensors",
         check=json_out(lambda d: {"sha256", "autov3"} <= set(d["hashes"]), "sha256 and autov3 hashes")),
    Step("inspect --hashes {fixtures}/sd15_peft_unet_dora", check=stdout_has("sha256")),
    Step("inspect --keys {fixtures}/sd15_peft_te", check=stdout_has("base_model.model.text_model")),
    Step("inspect {work}/lora.bin {work}/lora.pt", check=stdout_has("lora.bin", "lora.pt", "sdxl")),
    # inspect: expected failures, one line each, the good file still reported
    Step("inspect --json {work}/bad.safetensors {fixtures}/sd15_kohya_lora.safetensors", code=1,
         check=all_of(error_line("not a safetensors file"), json_out(_reports(1), "one report"))),
    Step("inspect {work}/missing.safetensors", code=1, check=error_line("no such file")),
    Step("inspect {work}/evil.pt", code=1, check=all_of(error_line("refused to unpickle"), exists("pwned", present=False))),
    Step("inspect {work}/pipe.safetensors", code=1, check=error_line("named pipe (FIFO)")),
    Step("inspect {work}/loop.safetensors", code=1, check=error_line("symlink loop")),
    Step("inspect --json {work}/cut.pt {work}/lora.pt", code=1,
         check=all_of(error_line("not a readable torch file"), json_out(_reports(1), "one report"))),
    # convert: each target, with and without --dtype, from safetensors, folders and pickles
    Step("convert {fixtures}/sd15_diffusers.safetensors --to kohya -o {work}/kohya.safetensors", check=stdout_has("verified")),
    Step("convert {fixtures}/sd15_diffusers.safetensors --to kohya --dtype bf16 -o {work}/kohya_bf16.safetensors",
         check=stdout_has("verified")),
    Step("convert {fixtures}/sdxl_kohya_lora.safetensors --to diffusers -o {work}/diffusers.safetensors",
         check=stdout_has("verified")),
    Step("convert {fixtures}/sd15_kohya_lora.safetensors --to diffusers -o {work}/folded.safetensors",
         check=all_of(stdout_has("alpha/rank folded"), stdout_has("verified"))),
    Step("convert {fixtures}/sd15_kohya_lora.safetensors --to diffusers --keep-factors -o {work}/kept.safetensors",
         check=stdout_has("max |ΔW difference| = 0 over")),
    Step("convert {fixtures}/sdxl_peft --to diffusers --dtype fp32 -o {work}/diffusers_fp32.safetensors",
         check=stdout_has("verified")),
    Step("convert {fixtures}/sdxl_kohya_lora.safetensors --to peft -o {work}/peft", check=stdout_has("verified")),
    Step("convert {fixtures}/sd15_peft_te --family sd1 --to peft --dtype bf16 -o {work}/peft_bf16",
         check=stdout_has("verified")),
    Step("convert {work}/lora.bin --to diffusers -o {work}/from_bin.safetensors", check=stdout_has("verified")),
    Step("convert {work}/lora.pt --to kohya --dtype fp16 -o {work}/from_pt.safetensors", check=stdout_has("verified")),
    Step("inspect --json {work}/kohya_bf16.safetensors {work}/diffusers_fp32.safetensors {work}/peft_bf16",
         check=json_out(lambda d: [r["format"].split()[0] for r in d] == ["kohya", "diffusers", "peft"],
                        "kohya, diffusers, peft")),
    # convert: expected failures
    Step("convert {fixtures}/sdxl_kohya_lora.safetensors --to diffusers -o {work}/diffusers.safetensors", code=2,
         check=error_line("already exists")),
    Step("convert {work}/bad.safetensors --to kohya -o {work}/never.safetensors", code=1,
         check=all_of(error_line("not a safetensors file"), exists("never.safetensors", present=False))),
    # registry commands, against the loopback registry
    Step("search art", check=stdout_has("Pixel Art")),
    Step("search style --json", check=json_out(lambda d: [m["id"] for m in d] == [101], "model 101 only")),
    Step("info 102", check=stdout_has("pixel.safetensors")),
    Step("info --version 1002 --json", check=json_out(lambda d: d["files"][0]["name"] == "pixel.safetensors", "pixel.safetensors")),
    Step("lookup --json {work}/registry/pixel.safetensors {work}/kohya.safetensors",
         check=json_out(lambda d: [r["found"] for r in d] == [True, False], "found, not found")),
    Step("fetch 102 -o {work}/downloads --json",
         check=all_of(json_out(lambda d: d["status"] == "downloaded", "status downloaded"), exists("downloads/pixel.safetensors"))),
    Step("fetch 101 -o {work}/downloads --quiet", check=exists("downloads/animeStyle.safetensors")),
    Step("fetch --version 1003 -o {work}/downloads", code=1,
         check=all_of(error_line("SHA256 mismatch"), exists("downloads/broken.safetensors", present=False))),
    Step("config set registries.local.url {registry}", check=stdout_has("registries.local.url")),
    Step("config set registries.local.token -", stdin="a-token\n", check=stdout_has("<set>")),
    Step("config show --json --registry local",
         check=json_out(lambda d: d["active"]["name"] == "local" and d["active"]["token"] == "<set>", "the local registry")),
    Step("config path", check=stdout_has("config.yaml")),
    Step("config set nonsense x", code=2, check=error_line("unknown config key")),
    # check and merge, on a partial SD1 checkpoint holding the LoHa's modules (prepare())
    Step("check {fixtures}/sd15_kohya_loha.safetensors --base {work}/sd1.safetensors", check=stdout_has("fits")),
    Step("check --json {fixtures}/sd15_kohya_loha.safetensors --base {work}/sd1.safetensors",
         check=json_out(lambda d: d["fits"] is True, "fits: true")),
    Step("check {fixtures}/sdxl_kohya_lora.safetensors --base {work}/sd1.safetensors", code=1),
    Step("check {work}/missing.safetensors --base {work}/sd1.safetensors", code=2),
    Step("merge {work}/sd1.safetensors {fixtures}/sd15_kohya_loha.safetensors:0.5:1 -o {work}/merged.safetensors --device cpu",
         check=exists("merged.safetensors")),
    Step("merge {work}/sd1.safetensors {fixtures}/sd15_kohya_loha.safetensors -o {work}/merged.safetensors", code=2,
         check=error_line("already exists")),
    Step("merge {work}/sd1.safetensors {fixtures}/sd15_kohya_lora.safetensors -o {work}/partial.safetensors", code=1,
         check=exists("partial.safetensors", present=False)),
    Step("merge {work}/sd1.safetensors {fixtures}/sd15_kohya_lora.safetensors -o {work}/partial.safetensors --allow-partial",
         check=exists("partial.safetensors")),
    # resize and merge-loras (new factors go through the writer: no numpy needed)
    Step("resize {fixtures}/sd15_kohya_locon.safetensors --rank 1 -o {work}/r1.safetensors", check=stdout_has("verified")),
    Step("resize --json {fixtures}/sd15_diffusers.safetensors --dynamic fro --threshold 0.9 --to peft -o {work}/fro_peft",
         check=json_out(lambda d: d["verified"] and d["summary"]["resized"] >= 1, "verified, ≥ 1 module resized")),
    Step("resize {fixtures}/sd15_kohya_lokr.safetensors --rank 8 --svd-full --dtype bf16 -o {work}/lokr_r8.safetensors",
         check=stdout_has("23 refactored")),
    Step("resize {fixtures}/sd15_kohya_loha.safetensors --rank 8 -o {work}/never.safetensors", code=1,
         check=all_of(error_line("--svd-full"), exists("never.safetensors", present=False))),
    Step("resize {fixtures}/sd15_kohya_lora.safetensors -o {work}/never.safetensors", code=2, check=error_line("--rank")),
    Step("merge-loras {fixtures}/sdxl_kohya_lora.safetensors:0.8 {fixtures}/sdxl_diffusers.safetensors:-0.5 {fixtures}/sdxl_peft "
         "-o {work}/merged_loras.safetensors", check=stdout_has("verified")),
    Step("merge-loras --json {fixtures}/sd15_kohya_locon.safetensors {fixtures}/sd15_kohya_loha.safetensors:0.5 --mode svd "
         "--rank 4 --to peft -o {work}/merged_svd", check=json_out(lambda d: d["verified"] and d["mode"] == "svd", "verified svd")),
    Step("merge-loras {fixtures}/sd15_kohya_lora.safetensors {fixtures}/sdxl_kohya_lora.safetensors -o {work}/never.safetensors",
         code=1, check=error_line("different families")),
    Step("merge-loras {fixtures}/sd15_kohya_lora.safetensors --mode svd -o {work}/never.safetensors", code=2,
         check=error_line("--rank")),
    # extract, from a small generated base/tuned pair (prepare())
    Step("extract {work}/pair/base.safetensors {work}/pair/tuned.safetensors -o {work}/x.safetensors --rank 8 --text-encoders on",
         check=exists("x.safetensors")),
    Step("extract {work}/pair/base.safetensors {work}/pair/tuned.safetensors -o {work}/x_peft --rank 4 --to peft --json",
         check=json_out(lambda d: isinstance(d, dict), "an object")),
    Step("extract {work}/pair/base.safetensors {work}/pair/tuned.safetensors -o {work}/pair/base.safetensors --rank 8 --force",
         code=2),
    Step("extract {work}/pair/base.safetensors {fixtures}/sd15_kohya_lora.safetensors -o {work}/y.safetensors --rank 4",
         code=1, check=exists("y.safetensors", present=False)),
    # validate and metadata
    Step("validate {fixtures}/sd15_kohya_lora.safetensors", check=stdout_has("ok")),
    Step("validate --json {fixtures}", check=json_out(lambda d: isinstance(d, list) and len(d) >= 10, "≥ 10 reports")),
    Step("validate --strict {fixtures}/sd15_peft_te"),
    Step("validate --header-only {fixtures}/sdxl_peft"),
    Step("validate {work}/lora.pt", code=1),
    Step("validate --family sd9 {fixtures}/sdxl_peft", code=2),
    Step("metadata show {fixtures}/sd15_kohya_lora.safetensors", check=stdout_has("ss_network_dim")),
    Step("metadata show --json {fixtures}/sd15_diffusers.safetensors", check=json_out(lambda d: isinstance(d, dict), "an object")),
    Step("metadata set {fixtures}/sd15_kohya_lora.safetensors modelspec.author=smoke -o {work}/meta.safetensors --fix-hashes",
         check=exists("meta.safetensors")),
    Step("metadata strip --privacy --in-place {work}/meta.safetensors"),
    Step("metadata strip --all {work}/meta.safetensors -o {work}/meta_min.safetensors", check=exists("meta_min.safetensors")),
    Step("validate {work}/meta_min.safetensors"),
    Step("metadata set {fixtures}/sd15_kohya_lora.safetensors k=v", code=2),
    # scan: a catalog of the fixtures, queries, JSON Lines
    Step("scan {fixtures} --db {work}/catalog.db", check=stdout_has("sdxl")),
    Step("scan {fixtures} --db {work}/catalog.db --json --hashes",
         check=lambda r: None if all(_strict_json(x) for x in r.stdout.splitlines()) else "not JSON Lines"),
    Step("scan --db {work}/catalog.db --query family=sd1", check=stdout_has("sd15_kohya_lora")),
    Step("scan --db {work}/catalog.db --query rank>>", code=2),
]


# -- running --------------------------------------------------------------------------------

TRACEBACK = "Traceback (most recent call last)"
PY_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ", re.MULTILINE)


def judge(step: Step, run: Run) -> str | None:
    """Why a run failed, or None. Checks every run for the things no run may show."""
    for stream, text in (("stdout", run.stdout), ("stderr", run.stderr)):
        if TRACEBACK in text:
            return f"traceback on {stream}"
        if BUG_MARK in text:
            return f"an internal error on {stream}"
    if PY_WARNING.search(run.stderr):
        return "a Python warning on stderr"
    if run.code != step.code:
        return f"exit code {run.code}, expected {step.code}"
    return step.check(run) if step.check else None


def loratool_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m loratool``."""
    script = Path(sys.executable).parent / "loratool"
    return [str(script)] if script.exists() else [sys.executable, "-m", "loratool"]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def prepare(work: Path) -> None:
    """Inputs the table needs beyond the fixtures: pickles, broken files, registry files."""
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # a plain install has none
    import torch
    from safetensors.torch import load_file

    state = load_file(str(ROOT / "fixtures" / "sdxl_kohya_diffusers_named.safetensors"))
    torch.save(state, work / "lora.bin")  # zip-based
    torch.save(state, work / "lora.pt", _use_new_zipfile_serialization=False)  # raw pickle
    (work / "bad.safetensors").write_bytes(struct.pack("<Q", 4) + b"{nope")
    (work / "evil.pt").write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": _Evil(work / "pwned")}))
    (work / "cut.pt").write_bytes((work / "lora.pt").read_bytes()[:5000])  # a truncated raw pickle
    os.mkfifo(work / "pipe.safetensors")
    (work / "loop.safetensors").symlink_to(work / "loop2.safetensors")
    (work / "loop2.safetensors").symlink_to(work / "loop.safetensors")
    subprocess.run([sys.executable, str(ROOT / "fixtures" / "checkpoints.py"), "sd1", str(work / "sd1.safetensors"),
                    "--catalog", "--lora", str(ROOT / "fixtures" / "sd15_kohya_loha.safetensors")],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "fixtures" / "extract_pairs.py"), "sd1", str(work / "pair"),
                    "--catalog", "--modules", "4", "--rank", "8"], check=True, capture_output=True)
    reg = work / "registry"
    reg.mkdir()
    write_safetensors(reg / "animeStyle.safetensors", 60_000, seed=1)
    write_safetensors(reg / "pixel.safetensors", 30_000, seed=2)
    write_safetensors(reg / "broken.safetensors", 30_000, seed=3)


@contextmanager
def registry(work: Path) -> Iterator[CivitaiTestServer]:
    with CivitaiTestServer() as server:
        reg = work / "registry"
        server.add_model(101, "Anime Style", [Version(1001, 101, reg / "animeStyle.safetensors",
                                                      faults=Faults(require_auth=True))])
        server.add_model(102, "Pixel Art", [Version(1002, 102, reg / "pixel.safetensors", base_model="SD 1.5")])
        server.add_model(103, "Broken", [Version(1003, 103, reg / "broken.safetensors", hashes={"SHA256": "AB" * 32})])
        yield server


def run_steps(steps: list[Step]) -> int:
    """Run ``steps`` in a scratch folder; print one line per step; return failures."""
    failures = 0
    with tempfile.TemporaryDirectory(prefix="loratool-smoke-") as tmp:
        work = Path(tmp)
        prepare(work)
        with registry(work) as server:
            places = {"fixtures": str(ROOT / "fixtures"), "work": str(work), "registry": server.url}
            env = {**os.environ, "LORATOOL_REGISTRY": server.url, "LORATOOL_TOKEN": TOKEN,
                   "LORATOOL_BACKOFF_BASE": "0.01", "XDG_CONFIG_HOME": str(work / "xdg"), "COLUMNS": "200"}
            env.pop("CIVITAI_API_TOKEN", None)
            for step in steps:
                started = time.monotonic()
                try:
                    p = subprocess.run([*loratool_command(), *step.argv(places)], input=step.stdin or "",
                                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
                    run = Run(p.returncode, p.stdout, p.stderr, work)
                    problem = judge(step, run)
                except subprocess.TimeoutExpired:
                    run, problem = Run(-1, "", "", work), "timed out"
                took = time.monotonic() - started
                print(f"{'ok  ' if problem is None else 'FAIL'} {took:5.1f}s  loratool {step.args}", flush=True)
                if problem is not None:
                    failures += 1
                    print(f"      {problem}\n      exit {run.code}\n{_tail('stdout', run.stdout)}{_tail('stderr', run.stderr)}")
    return failures


def _tail(name: str, text: str, lines: int = 15) -> str:
    kept = text.splitlines()[-lines:]
    return "".join(f"      {name}| {line}\n" for line in kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-only", action="store_true",
                        help="fail if a test-only package is importable (proves the venv is a plain install)")
    parser.add_argument("-k", dest="only", action="append", default=[], help="run steps whose argv contains TEXT")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    args = parser.parse_args(argv)
    steps = [s for s in STEPS if not args.only or any(k in s.args for k in args.only)]
    if args.list:
        for s in steps:
            print(f"{s.code}  loratool {s.args}")
        return 0
    present = [name for name in TEST_ONLY_PACKAGES if importlib.util.find_spec(name) is not None]
    print(f"smoke: {sys.executable}; test-only packages present: {', '.join(present) or 'none'}")
    if args.runtime_only and present:
        print("smoke: --runtime-only, but this venv has test-only packages; build it with `make demo`")
        return 1
    failures = run_steps(steps)
    print(f"smoke: {len(steps) - failures} of {len(steps)} steps passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

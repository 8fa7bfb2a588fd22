"""The finding codes of ``loratool validate``: one table, mirrored by the README.

A code is a stable contract for scripts and CI: its severity and meaning never change
silently (a test holds every code here against the README table and against the test
file made to produce it). Severities:

* ``error``   — the file is broken or will not do what it says in some loader;
* ``warning`` — it works, but something is wrong or leaks (exit 1 only with ``--strict``);
* ``info``    — worth knowing before publishing; never changes the exit code.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

SEVERITIES = ("error", "warning", "info")
MAX_PER_CODE = 10  # findings listed per code; the rest are counted in one more line


@dataclass(frozen=True)
class Code:
    severity: str
    category: str
    description: str


CODES: dict[str, Code] = {
    # structure
    "unreadable": Code("error", "structure", "the path cannot be read (missing, permission denied, not a file or adapter folder)"),
    "header-invalid": Code("error", "structure", "not a valid safetensors/torch file: the header fails the reader's checks"),
    "truncated": Code("error", "structure", "tensor data is cut short; the header still says what the file was meant to be"),
    "layout-invalid": Code("error", "structure", "gaps or trailing bytes in the data area: the reference safetensors library refuses the file"),
    "not-an-adapter": Code("error", "structure", "readable, but holds no LoRA tensors (a checkpoint, an embedding…)"),
    "duplicate-module": Code("error", "structure", "the same module (or parameter) under two spellings; loaders apply one, both or fail"),
    "incomplete-module": Code("error", "structure", "a module with part of its factors (e.g. lora_down without lora_up)"),
    "factor-shape-mismatch": Code("error", "structure", "a module's factors disagree on their shared dimension (up/down rank, LoHa/LoKr factors)"),
    "invalid-module": Code("error", "structure", "a module whose stored values cannot be used: integer or sub-byte factors, a boolean alpha, an alpha out of float32 range"),
    "target-shape-mismatch": Code("error", "structure", "a module's name is in the family's catalog but its shape does not fit that layer"),
    "unresolved-module": Code("warning", "structure", "a module that resolves to no layer of the detected family; loaders ignore it"),
    "unknown-keys": Code("warning", "structure", "tensors that belong to no recognised module; loaders ignore (or reject) them"),
    "mixed-dtypes": Code("info", "structure", "the adapter's weight tensors are stored in more than one dtype"),
    "family-unknown": Code("info", "structure", "the base-model family could not be determined, so modules cannot be checked against a catalog"),
    # numbers
    "non-finite": Code("error", "numbers", "NaN or Inf in a tensor (weights or alpha)"),
    "zero-module": Code("warning", "numbers", "a module whose weight change is exactly zero (does nothing)"),
    "outlier-module": Code("warning", "numbers", "a module whose ‖ΔW‖·scale is far above the file's own distribution (exploded training)"),
    "alpha-nonpositive": Code("error", "numbers", "alpha ≤ 0: a negative alpha flips the module; 0 means rank to kohya/A1111 but 0 to ComfyUI"),
    "alpha-absurd": Code("warning", "numbers", "alpha/rank outside [1/1024, 16]"),
    # metadata vs reality
    "meta-dim-mismatch": Code("warning", "metadata", "ss_network_dim disagrees with the ranks of the tensors"),
    "meta-alpha-mismatch": Code("warning", "metadata", "ss_network_alpha disagrees with the alphas of the tensors"),
    "meta-family-mismatch": Code("warning", "metadata", "ss_base_model_version / ss_v2 / modelspec.architecture / base_model_name_or_path name another family than the tensors"),
    "hash-mismatch": Code("warning", "metadata", "an embedded hash (sshs_model_hash, modelspec.hash_sha256) is not the hash of the tensor data"),
    "modelspec-missing": Code("info", "metadata", "modelspec fields a publisher should fill (MUST/SHOULD of the SAI model spec) are missing"),
    # privacy
    "privacy-path": Code("warning", "privacy", "an absolute path (often with the user name) in a metadata value or adapter config"),
    "privacy-dataset-names": Code("info", "privacy", "metadata names the training dataset folders"),
    # safety
    "pickle-refused": Code("error", "safety", "a pickle-based file (.pt/.ckpt/.bin), not opened without --allow-pickle"),
    "pickle-unsafe": Code("error", "safety", "a pickle that needs more than plain tensors (it could run code); refused"),
    "pickle-file": Code("warning", "safety", "a pickle-based file, read weights-only; publish safetensors instead"),
    # interop traps
    "te-missing-text-model": Code("warning", "interop", "text-encoder module paths lack CLIP's text_model. level (saved under transformers 5): other loaders match none of them"),
    "te-transformers5": Code("info", "interop", "a PEFT text-encoder adapter with text_model. paths loads as a silent no-op under transformers 5"),
    "mixed-sdxl-names": Code("warning", "interop", "kohya SDXL UNet keys in both SGM and diffusers naming: diffusers silently drops the SGM ones"),
    "diffusers-unsupported": Code("info", "interop", "network types diffusers cannot load from a kohya-format SD file (LoHa, LoKr, …)"),
    "comfyui-unsupported": Code("info", "interop", "IA3 modules, which ComfyUI does not load"),
}


@dataclass(frozen=True)
class Finding:
    """One thing validate found: a code from :data:`CODES`, a one-line message, and the
    tensor key, module or metadata key it is about (when there is one)."""

    code: str
    message: str
    key: str | None = None

    @property
    def severity(self) -> str:
        return CODES[self.code].severity

    def to_json(self) -> dict[str, str | None]:
        return {"code": self.code, "severity": self.severity, "message": self.message, "key": self.key}


class Collector:
    """Findings, at most :data:`MAX_PER_CODE` per code plus one line counting the rest."""

    def __init__(self) -> None:
        self.items: list[Finding] = []
        self.extra: Counter[str] = Counter()

    def add(self, code: str, message: str, key: str | None = None) -> None:
        assert code in CODES, code
        if sum(f.code == code for f in self.items) >= MAX_PER_CODE:
            self.extra[code] += 1
        else:
            self.items.append(Finding(code, message, key))

    def group(self, code: str, what: str, names: list[str], key: str | None = None) -> None:
        """One finding for many items: ``N what: a, b, c, …``."""
        if names:
            shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
            self.add(code, f"{len(names)} {what}: {shown}", key or names[0])

    def findings(self) -> list[Finding]:
        out = list(self.items)
        for code, n in self.extra.items():
            out.append(Finding(code, f"… and {n} more {code} finding(s)"))
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return sorted(out, key=lambda f: order[f.severity])  # stable: checks' order kept

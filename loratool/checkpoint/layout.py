"""Where a checkpoint's weights live: its files, each key's component, and how a catalog
module's weight is spelled there. Reads headers only; never imports torch for safetensors.

Layouts (FORMATS.md §2-§3):

* ``single-file``: one file with LDM/SGM names as A1111/Forge/ComfyUI use it: the UNet
  under ``model.diffusion_model.``, the text encoders under the prefixes the family
  configs name (``cond_stage_model.transformer.``, ``cond_stage_model.model.`` (SD2
  OpenCLIP), ``conditioner.embedders.0/1.…``), the VAE under ``first_stage_model.``.
* ``unet-only``: one file holding a UNet alone: LDM-named under ``diffusion_model.`` or with
  no prefix, or diffusers-named (``down_blocks.…``) with no prefix.
* ``diffusers``: a folder with one subfolder per component (``unet/``, ``text_encoder/``,
  ``text_encoder_2/``, ``vae/``…), each holding ``diffusion_pytorch_model[.VARIANT].safetensors``
  or ``model[.VARIANT].safetensors``, or shards listed in ``….safetensors.index.json``
  (``.bin`` weights are read through ``weights_only`` loading).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from loratool import jsonstrict
from loratool.arch.families import FAMILY_CONFIGS
from loratool.arch.spec import ModuleSpec
from loratool.arch.unet import UNET_LDM_PREFIX
from loratool.errors import InputError
from loratool.io.sources import Part, open_weights_file

VAE_PREFIX = "first_stage_model."
UNET_COMPONENT = "unet"

# Single-file key prefix -> component (text encoders as the family configs place them).
SINGLE_FILE_PREFIXES: dict[str, str] = {UNET_LDM_PREFIX: UNET_COMPONENT, VAE_PREFIX: "vae"}
for _cfg in FAMILY_CONFIGS.values():
    for _te in _cfg.text_encoders:
        SINGLE_FILE_PREFIXES.setdefault(_te.ldm_prefix, _te.component)

# First segment of a UNet-only file's keys -> its naming.
LDM_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
DIFFUSERS_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.", "add_embedding.")
DIT_ROOTS = ("joint_blocks.", "double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks.")
LORA_KEY = re.compile(r"(^lora_(unet|te\d?)_|\.lora_(A|B|down|up)\b|\.(hada|lokr)_w\d|\.alpha$)")

# Diffusers folder weights: <stem>[.<variant>].safetensors[.index.json] or pickled .bin.
FOLDER_WEIGHTS = re.compile(
    r"^(?P<stem>diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[A-Za-z0-9_-]+))?"
    r"\.(?P<ext>safetensors|bin)(?P<index>\.index\.json)?$"
)
SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")


@dataclass(frozen=True)
class Naming:
    """How a component spells a catalog module's weight key.

    ``ldm``: the catalog's single-file key, with ``strip`` removed from its front and
    ``prefix`` put there instead (UNet-only files); fused q/k/v rows and the transposed
    projection apply. ``diffusers``: ``prefix + path + ".weight"`` (and, for CLIP, the same
    without ``text_model.``, as transformers 5 saves it).
    """

    style: str
    strip: str = ""
    prefix: str = ""

    def weight_keys(self, spec: ModuleSpec) -> tuple[str, ...]:
        if self.style == "ldm":
            return (self.prefix + spec.ldm_key.removeprefix(self.strip),)
        keys = [f"{self.prefix}{spec.path}.weight"]
        if spec.path.startswith("text_model."):
            keys.append(f"{self.prefix}{spec.path.removeprefix('text_model.')}.weight")
        return tuple(keys)


@dataclass
class WeightsFile:
    """One weights file of a checkpoint (header read; tensors loaded on demand)."""

    path: str
    relpath: str  # relative to the checkpoint folder; the file name for single files
    component: str | None  # folder component; None when one file holds several
    variant: str | None
    part: Part = field(repr=False)

    @property
    def safetensors(self) -> bool:
        return self.part.raw is not None


@dataclass
class Layout:
    """The files of a checkpoint and how each component is named in them."""

    kind: str  # single-file | unet-only | diffusers
    root: str
    files: list[WeightsFile]  # the selected variant
    namings: dict[str, Naming]
    variants: tuple[str | None, ...] = (None,)
    all_files: list[WeightsFile] = field(default_factory=list)  # every variant
    other_files: list[str] = field(default_factory=list)  # non-weight files (folders)
    single_prefixes: dict[str, str] = field(default_factory=dict)  # key prefix -> component

    def component_of(self, file: WeightsFile, key: str) -> tuple[str | None, str]:
        """(component, name below the component) of a stored key; component None when the
        key belongs to none (extras such as ``alphas_cumprod``)."""
        if file.component is not None:
            return file.component, key
        for prefix, component in self.single_prefixes.items():
            if key.startswith(prefix):
                return component, key[len(prefix) :]
        return None, key

    def close(self) -> None:
        for f in self.all_files or self.files:
            f.part.close()


def open_layout(path: str | os.PathLike[str], variant: str | None = None) -> Layout:
    """Find the weights of the checkpoint at ``path`` (file or diffusers folder)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or directory")
    if p.is_dir():
        return _folder(p, variant)
    part = open_weights_file(p)
    wf = WeightsFile(str(p), p.name, None, None, part)
    try:
        return _single(p, wf)
    except BaseException:
        part.close()
        raise


def _single(p: Path, wf: WeightsFile) -> Layout:
    keys = list(wf.part.tensors)
    if not keys:
        raise InputError(p, "holds no tensors")
    if sum(bool(LORA_KEY.search(k)) for k in keys) > len(keys) // 2:
        raise InputError(p, "is a LoRA adapter, not a checkpoint")
    present = {c: pre for pre, c in SINGLE_FILE_PREFIXES.items() if any(k.startswith(pre) for k in keys)}
    if UNET_COMPONENT in present or any(c != "vae" for c in present):
        used = {pre: c for pre, c in SINGLE_FILE_PREFIXES.items() if present.get(c) == pre}
        namings = {c: Naming("ldm") for c in used.values() if c != "vae"}
        return Layout("single-file", str(p), [wf], namings, all_files=[wf], single_prefixes=used)
    for prefix, naming in (("diffusion_model.", Naming("ldm", strip="model.")), ("", Naming("ldm", strip=UNET_LDM_PREFIX))):
        body = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
        if len(body) == len(keys) and any(k.startswith(LDM_UNET_ROOTS + DIT_ROOTS) for k in body):
            return Layout("unet-only", str(p), [wf], {UNET_COMPONENT: naming}, all_files=[wf], single_prefixes={prefix: UNET_COMPONENT})
    if any(k.startswith(DIFFUSERS_UNET_ROOTS) for k in keys):
        return Layout("unet-only", str(p), [wf], {UNET_COMPONENT: Naming("diffusers")}, all_files=[wf], single_prefixes={"": UNET_COMPONENT})
    raise InputError(
        p,
        f"no checkpoint layout loratool knows (keys such as {keys[0]!r}; expected model.diffusion_model./"
        "cond_stage_model./conditioner. single-file keys, a UNet-only file, or a diffusers folder)",
    )


def _folder(root: Path, variant: str | None) -> Layout:
    found: dict[str, dict[str | None, list[Path]]] = {}  # component -> variant -> files
    others: list[str] = []
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(root)
        m = FOLDER_WEIGHTS.match(SHARD.sub(r".\1", f.name))
        if len(rel.parts) != 2 or m is None:
            others.append(str(rel))
            continue
        component, var = rel.parts[0], m.group("variant")
        if m.group("index"):
            others.append(str(rel))  # copied; its shards are found on their own
            continue
        found.setdefault(component, {}).setdefault(var, []).append(f)
    if UNET_COMPONENT not in found and not any(c.startswith("text_encoder") for c in found):
        raise InputError(root, "not a diffusers folder: no unet/ or text_encoder/ weights (and not a LoRA folder loratool can merge into)")
    variants = sorted({v for per in found.values() for v in per}, key=lambda v: (v is not None, v or ""))
    if variant is not None and variant not in variants:
        raise InputError(root, f"no {variant!r} variant (has {', '.join(v or 'default' for v in variants)})")
    files: list[WeightsFile] = []
    all_files: list[WeightsFile] = []
    try:
        for component, per in found.items():
            chosen = variant if variant in per else (None if None in per else sorted(per, key=str)[0])
            for var, paths in per.items():
                for f in paths:
                    wf = WeightsFile(str(f), str(f.relative_to(root)), component, var, open_weights_file(f))
                    all_files.append(wf)
                    if var == chosen:
                        files.append(wf)
    except BaseException:
        for wf in all_files:
            wf.part.close()
        raise
    namings = {c: Naming("diffusers") for c in found if c != "vae"}
    return Layout("diffusers", str(root), files, namings, tuple(variants), all_files, others)


def read_index(path: Path) -> dict:
    """A ``*.safetensors.index.json`` (for rewriting it)."""
    try:
        return jsonstrict.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise InputError(path, f"unreadable shard index: {exc.__class__.__name__}") from None

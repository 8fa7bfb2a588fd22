"""``merge``: bake LoRAs into a checkpoint, streaming one output tensor at a time.

For every checkpoint tensor some LoRA module lands on (``loratool.ops.fit``):

    W ← W0 + Σᵢ mᵢ·ΔWᵢ(W0)          (LoRA, LoCon, Tucker, LoHa, LoKr, IA3, GLoRA, full, norm)
    then, in the order given:  W ← DoRA(W, ΔWⱼ, Mⱼ, mⱼ)   or   W ← OFTⱼ(W, mⱼ)

each ΔW with its module's own scale and mᵢ the LoRA's UNet or text-encoder weight; the
plain deltas are summed first, every ΔW computed against the checkpoint's W0; each DoRA
(or OFT/BOFT) module is then applied to the weight accumulated so far. Bias changes
(``lora_up_bias``, ``diff_b``, ``b_norm``) add to the layer's bias. ΔW and the sum are
fp32 (on the GPU with ``device="cuda"``), cast once to the output dtype (default: each
tensor's own). Every other tensor is copied byte for byte (``copy_file_range``), keys,
order, dtypes and header metadata kept; the header also records what was merged.

Every LoRA module is merged or reported: unplaced modules make the merge fail, naming
them, unless ``allow_partial``. The output (a file, or a folder mirroring a diffusers
folder) appears only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool import __version__
from loratool.checkpoint import Checkpoint, StoredTensor, open_checkpoint
from loratool.checkpoint.layout import WeightsFile, read_index
from loratool.errors import ConversionError, InputError, OutputError, UsageError
from loratool.io.hashing import AUTOV3_STORED, CHUNK, autov3_start
from loratool.io.writer import OutTensor, atomic_path, write_safetensors
from loratool.networks import NETWORK_TYPES, add_delta, apply_dora, delta_bias, delta_weight
from loratool.ops.device import DEVICES, resolve_device, torch_threads
from loratool.ops.fit import Fit, Placed, fit, load_for
from loratool.ops.output import refuse_onto_inputs

if TYPE_CHECKING:
    import torch

DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
# Header fields a merge makes stale (hashes of the tensor data).
STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge and its weights: ``te`` for the text encoders, ``unet`` for the
    UNet, as A1111's ``<lora:NAME:TE:UNET>``."""

    path: str
    te: float = 1.0
    unet: float = 1.0

    def weight_for(self, component: str) -> float:
        return self.te if component in TEXT_ENCODERS else self.unet


def parse_lora_arg(arg: str) -> LoraSpec:
    """``PATH[:TE[:UNET]]`` in A1111's ``<lora:NAME:TE:UNET>`` order (one number sets both:
    UNET defaults to TE), or named ``PATH:te=T:unet=U``. A path that exists is taken whole."""
    if os.path.exists(arg):
        return LoraSpec(arg)
    parts = arg.split(":")
    values: list[str] = []
    while len(parts) > 1 and len(values) < 2 and _is_weight(parts[-1]):
        values.insert(0, parts.pop())
    named = dict(v.split("=", 1) for v in values if "=" in v)
    positional = [float(v) for v in values if "=" not in v]
    te = float(named["te"]) if "te" in named else positional[0] if positional else 1.0
    unet = float(named["unet"]) if "unet" in named else positional[1] if len(positional) > 1 else te
    return LoraSpec(":".join(parts), te, unet)


def _is_weight(text: str) -> bool:
    name, eq, number = text.partition("=")
    if eq and name not in ("te", "unet"):
        return False
    try:
        return math.isfinite(float(number if eq else text))
    except ValueError:
        return False


@dataclass
class MergedLora:
    """What one LoRA contributed."""

    path: str
    format: str
    te: float
    unet: float
    modules: int
    unplaced: dict[str, str]
    autov3: str | None = None


@dataclass
class MergeResult:
    """What a merge wrote."""

    checkpoint: str
    output: str
    family: str
    layout: str
    device: str
    dtype: str | None
    loras: list[MergedLora]
    files: list[str] = field(default_factory=list)
    tensors_merged: int = 0
    tensors_copied: int = 0  # byte for byte
    tensors_cast: int = 0  # untouched, but read and cast (--dtype, or a pickled input)
    bytes_written: int = 0

    @property
    def unplaced(self) -> dict[str, dict[str, str]]:
        return {x.path: x.unplaced for x in self.loras if x.unplaced}


def merge(
    checkpoint: str | os.PathLike[str],
    loras: Sequence[LoraSpec | str],
    output: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    device: str = "cpu",
    allow_partial: bool = False,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge ``loras`` into ``checkpoint``, writing ``output``; see the module docstring.

    ``loras`` are :class:`LoraSpec` or ``PATH[:TE[:UNET]]`` strings. ``dtype`` (fp16, bf16,
    fp32) casts every floating tensor of the output; ``device`` is cpu, cuda or auto.
    ``progress(done_bytes, total_bytes)`` is called as the output is written."""
    specs = [s if isinstance(s, LoraSpec) else parse_lora_arg(s) for s in loras]
    if not specs:
        raise UsageError(None, "give at least one LoRA to merge")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(None, f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise UsageError(None, f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    out = Path(output)
    ckpt = open_checkpoint(checkpoint)
    fits: list[Fit] = []
    try:
        _check_output(ckpt, [s.path for s in specs], out, force)
        if not ckpt.supported:
            raise InputError(ckpt.path, f"is {ckpt.family}; loratool merges into sd1, sd2, sdxl and sdxl-refiner checkpoints")
        for s in specs:
            fits.append(_fit(s, ckpt))
        _refuse_unplaced(fits, allow_partial)
        plan = _plan(specs, fits)
        dev = resolve_device(device)  # imports torch: only once everything has been checked
        result = MergeResult(
            ckpt.path, str(out), ckpt.family, ckpt.layout, dev, dtype,
            [MergedLora(s.path, f.adapter.format, s.te, s.unet, len(f.placed), f.unplaced, _autov3(s.path)) for s, f in zip(specs, fits)],
        )
        record = _record(ckpt, result)
        try:
            _write(ckpt, plan, out, DTYPES.get(dtype or ""), dev, record, result, progress)
        except OSError as exc:
            raise OutputError(out, f"cannot write: {exc.strerror or exc}") from None
    finally:
        for f in fits:
            f.adapter.close()
        ckpt.close()
    return result


# ------------------------------------------------------------------------ checks


def _check_output(ckpt: Checkpoint, loras: list[str], out: Path, force: bool) -> None:
    """The output may be no input, nor inside or around one (:func:`refuse_onto_inputs`);
    an existing output needs ``force`` and must be of the kind written."""
    refuse_onto_inputs([ckpt.path, *(f.path for f in ckpt.all_files), *loras], out)
    if out.exists() or out.is_symlink():
        if not force:
            raise UsageError(out, "already exists (use --force to replace it)")
        if ckpt.layout == "diffusers" and not out.is_dir():
            raise UsageError(out, "is a file; merging a diffusers folder writes a folder")
        if ckpt.layout != "diffusers" and out.is_dir():
            raise UsageError(out, "is a folder; merging a single-file checkpoint writes one file")


def _fit(spec: LoraSpec, ckpt: Checkpoint) -> Fit:
    adapter, same = load_for(spec.path, ckpt)
    f = fit(adapter, ckpt, same)
    if not f.family_ok or not f.placed:
        adapter.close()
        why = f.message if not f.family_ok else f"no module of this LoRA has a place in the checkpoint ({_reasons(f.unplaced)})"
        raise ConversionError(spec.path, why)
    return f


def _refuse_unplaced(fits: list[Fit], allow_partial: bool) -> None:
    if allow_partial:
        return
    for f in fits:
        if f.unplaced:
            raise ConversionError(
                f.adapter.path,
                f"{len(f.unplaced)} module(s)/key(s) have no place in the checkpoint: {_reasons(f.unplaced)}; "
                "--allow-partial merges the rest",
            )


def _reasons(unplaced: dict[str, str]) -> str:
    groups: dict[str, list[str]] = {}
    for name, why in unplaced.items():
        groups.setdefault(why, []).append(name)
    return "; ".join(f"{why} ({len(n)}: {', '.join(n[:2])}{', …' if len(n) > 2 else ''})" for why, n in groups.items())


def _autov3(path: str) -> str | None:
    """AutoV3 (12 hex digits, as Civitai shows it) of a LoRA's weights file; a folder's one
    weights file for PEFT/diffusers folders. Only the data area is hashed."""
    from loratool.io.sources import open_source

    source = open_source(path)
    source.close()
    if len(source.parts) != 1 or not source.parts[0].path.endswith(".safetensors"):
        return None
    weights = source.parts[0].path
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        start = autov3_start(fh.read(8), os.fstat(fh.fileno()).st_size)
        if start is None:
            return None
        fh.seek(start)
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:AUTOV3_STORED].upper()


def _record(ckpt: Checkpoint, result: MergeResult) -> dict[str, str]:
    """Header fields recording the merge (kohya's ``modelspec.merged_from`` plus ours)."""
    titles = [Path(ckpt.path).stem, *(Path(x.path).stem for x in result.loras)]
    previous = ckpt.metadata.get("modelspec.merged_from")
    detail = {
        "tool": f"loratool {__version__}",
        "checkpoint": Path(ckpt.path).name,
        "family": ckpt.family,
        "loras": [
            {"name": Path(x.path).name, "autov3": x.autov3, "te": x.te, "unet": x.unet, "modules": x.modules, "unplaced": len(x.unplaced)}
            for x in result.loras
        ],
        "dtype": result.dtype,
    }
    return {
        "modelspec.merged_from": ", ".join([*([previous] if previous else []), *titles]),
        "loratool.merge": json.dumps(detail, separators=(",", ":"), allow_nan=False),
    }


# ------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Contribution:
    """One LoRA module's change to one stored tensor."""

    placed: Placed
    multiplier: float
    part: str  # "weight" | "bias"


def _plan(specs: list[LoraSpec], fits: list[Fit]) -> dict[tuple[str | None, str], list[Contribution]]:
    """Stored-tensor slot -> the changes to it, in the order the LoRAs were given."""
    plan: dict[tuple[str | None, str], list[Contribution]] = {}
    for spec, f in zip(specs, fits):
        for p in f.placed:
            m = spec.weight_for(p.module.key.component)
            if p.weight:
                plan.setdefault(p.ref.tensor.slot, []).append(Contribution(p, m, "weight"))
            if p.bias and p.ref.bias is not None:
                plan.setdefault(p.ref.bias.slot, []).append(Contribution(p, m, "bias"))
    return plan


# ------------------------------------------------------------------------ writing


def _write(
    ckpt: Checkpoint,
    plan: dict[tuple[str | None, str], list[Contribution]],
    out: Path,
    dtype: str | None,
    device: str,
    record: dict[str, str],
    result: MergeResult,
    progress: Callable[[int, int], None] | None,
) -> None:
    files = ckpt.all_files
    ahead = _Ahead()
    jobs = [(f, _out_tensors(ckpt, f, plan, dtype, device, result, ahead)) for f in files]
    total = sum(t.nbytes for _, ts in jobs for t in ts)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        result.bytes_written = done
        if progress is not None:
            progress(done, total)

    folder = ckpt.layout == "diffusers"
    with torch_threads(device), ahead, atomic_path(out, directory=folder) as tmp:
        for f, tensors in jobs:
            dest = _safetensors_name(tmp / f.relpath) if folder else tmp
            dest.parent.mkdir(parents=True, exist_ok=True)
            changed = any(t.copy_from is None for t in tensors)
            meta = {k: v for k, v in f.part.metadata.items() if not (changed and k in STALE_METADATA)}
            meta.update(record)
            write_safetensors(dest, tensors, meta, progress=advance)
            result.files.append(str(out / dest.relative_to(tmp)) if folder else str(out))
        if folder:
            _copy_others(ckpt, tmp, dtype)


def _safetensors_name(path: Path) -> Path:
    """A folder's pickled weights (``….bin``) are written as safetensors, as diffusers and
    transformers name them (``diffusion_pytorch_model.safetensors``, ``model.safetensors``)."""
    if path.suffix != ".bin":
        return path
    return path.with_name(path.name.replace("pytorch_model", "model", 1) if path.name.startswith("pytorch_model") else path.name).with_suffix(".safetensors")


def _copy_others(ckpt: Checkpoint, tmp: Path, dtype: str | None) -> None:
    """Configs, tokenizer, scheduler and shard indexes, as they are (an index gets the new
    total size when ``dtype`` changes it)."""
    root = Path(ckpt.path)
    for rel in ckpt.other_files:
        src, dest = root / rel, tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".safetensors.index.json") and dtype is not None:
            index = read_index(src)
            index.setdefault("metadata", {})["total_size"] = _index_size(ckpt, index, dtype)
            dest.write_text(json.dumps(index, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        else:
            shutil.copy2(src, dest)


def _index_size(ckpt: Checkpoint, index: dict[str, Any], dtype: str) -> int:
    from loratool.io.safetensors import DTYPE_SIZES

    sizes = {}
    for f in ckpt.all_files:
        for t in ckpt.file_tensors(f):
            sizes[(os.path.basename(f.path), t.key)] = (t.dtype, math.prod(t.shape))
    total = 0
    for key, shard in index.get("weight_map", {}).items():
        st, n = sizes.get((shard, key), ("F32", 0))
        total += DTYPE_SIZES[dtype if st in FLOAT_DTYPES else st] * n
    return total


def _out_tensors(
    ckpt: Checkpoint,
    f: WeightsFile,
    plan: dict[tuple[str | None, str], list[Contribution]],
    dtype: str | None,
    device: str,
    result: MergeResult,
    ahead: _Ahead,
) -> list[OutTensor]:
    out = []
    for t in ckpt.file_tensors(f):
        target = dtype if dtype is not None and t.dtype in FLOAT_DTYPES else t.dtype
        contribs = plan.get(t.slot)
        if contribs:
            result.tensors_merged += 1
            out.append(OutTensor(t.key, target, t.shape, ahead.add(_job(ckpt, t, contribs, target, device))))
        elif target == t.dtype and t.offset is not None:
            result.tensors_copied += 1
            out.append(OutTensor(t.key, target, t.shape, lambda t=t: ckpt.raw(t), copy_from=(t.file, t.offset)))
        else:
            result.tensors_cast += 1
            out.append(OutTensor(t.key, target, t.shape, lambda t=t, d=target: _cast(ckpt.read(t), d)))
    return out


def _cast(tensor: torch.Tensor, st_dtype: str) -> torch.Tensor:

    return tensor.to(_torch_dtype(st_dtype)).contiguous()


def _torch_dtype(st_dtype: str) -> torch.dtype:
    import torch

    from loratool.io.safetensors import TORCH_DTYPES

    return getattr(torch, TORCH_DTYPES[st_dtype])


class _Buffers:
    """Memory reused from one merged tensor to the next. A fresh tensor per step would be
    page-faulted in anew each time (large allocations are mmap'd and handed back on free),
    which costs more than the arithmetic."""

    def __init__(self) -> None:
        self._bufs: dict[str, bytearray] = {}

    def bytes(self, slot: str, nbytes: int) -> memoryview:
        buf = self._bufs.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._bufs[slot] = bytearray(nbytes)
        return memoryview(buf)[:nbytes]

    def tensor(self, slot: str, st_dtype: str, shape: tuple[int, ...]) -> tuple[memoryview, torch.Tensor]:
        """A buffer of the slot and a tensor of this dtype and shape over the same memory."""
        import torch

        from loratool.io.safetensors import DTYPE_SIZES

        nbytes = DTYPE_SIZES[st_dtype] * math.prod(shape)
        view = self.bytes(slot, nbytes)
        if not nbytes:
            return view, torch.empty(shape, dtype=_torch_dtype(st_dtype))
        return view, torch.frombuffer(view, dtype=torch.uint8).view(_torch_dtype(st_dtype)).view(shape)


class _Ahead:
    """Computes each merged tensor one step ahead on a worker thread, so its arithmetic
    overlaps the writing (and kernel copies) before it. Two buffer sets alternate: the
    writer has written tensor i-1's bytes before it asks for tensor i, which is when tensor
    i+1 starts into i-1's set."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[_Buffers], memoryview]] = []
        self.buffers = (_Buffers(), _Buffers())
        self.pending: dict[int, Future[memoryview]] = {}
        self.pool: ThreadPoolExecutor | None = None

    def add(self, job: Callable[[_Buffers], memoryview]) -> Callable[[], memoryview]:
        i = len(self.jobs)
        self.jobs.append(job)
        return lambda: self.get(i)

    def get(self, i: int) -> memoryview:
        self._submit(i)
        fut = self.pending.pop(i)
        self._submit(i + 1)
        return fut.result()

    def _submit(self, i: int) -> None:
        if i < len(self.jobs) and i not in self.pending:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="loratool-merge")
            self.pending[i] = self.pool.submit(self.jobs[i], self.buffers[i % 2])

    def __enter__(self) -> _Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _job(
    ckpt: Checkpoint, t: StoredTensor, contribs: list[Contribution], st_dtype: str, device: str
) -> Callable[[_Buffers], memoryview]:
    """Read, merge in fp32, cast once; the bytes live in the given buffers until written."""

    def run(buffers: _Buffers) -> memoryview:
        import torch

        raw, stored = buffers.tensor("in", t.dtype, t.shape)
        ckpt.read_into(t, raw)
        if device == "cpu":
            value = buffers.tensor("work", "F32", t.shape)[1]
            value.copy_(stored)
        else:
            value = stored.to(device=device, dtype=torch.float32)
        if contribs[0].part == "weight":
            _apply_weights(value, contribs, device)
        else:
            _apply_biases(value, contribs, device)
        out, result = buffers.tensor("out", st_dtype, t.shape)
        result.copy_(value)
        return out

    return run


def _tensors(c: Contribution, device: str) -> dict[str, torch.Tensor]:
    tensors = {k: ref.load() for k, ref in c.placed.module.params.items()}
    return tensors if device == "cpu" else {k: v.to(device) for k, v in tensors.items()}


def _view(value: torch.Tensor, c: Contribution) -> torch.Tensor:
    """The module's part of a stored tensor, as a view (rows of a fused tensor, transposed)."""
    ref = c.placed.ref
    view = value if ref.rows is None else value[ref.rows[0] : ref.rows[1]]
    return view.T if ref.transposed and c.part == "weight" else view


def _apply_weights(value: torch.Tensor, contribs: list[Contribution], device: str) -> None:
    """W ← W0 + Σ m·ΔW(W0), then each DoRA/OFT module on the sum, per module slice, in
    place (W0 is copied only when a ΔW depends on it)."""
    groups: dict[tuple[Any, ...], list[Contribution]] = {}
    for c in contribs:
        groups.setdefault((c.placed.ref.rows, c.placed.ref.transposed), []).append(c)
    for items in groups.values():
        view = _view(value, items[0])
        shape = tuple(view.shape)
        later = [c for c in items if c.placed.module.dora or NETWORK_TYPES[c.placed.module.network_type].merge is not None]
        linear = [c for c in items if c not in later]
        needs_w0 = any(NETWORK_TYPES[c.placed.module.network_type].needs_base for c in linear) or any(
            c.placed.module.dora and NETWORK_TYPES[c.placed.module.network_type].needs_base for c in later
        )
        w0 = view.clone() if needs_w0 and linear else view
        for c in linear:
            m = c.placed.module
            core = {k: v for k, v in _tensors(c, device).items() if k != "dora_scale"}
            # ΔW is linear in its scale: the LoRA weight rides along (one pass fewer)
            add_delta(view, m.network_type, core, m.alpha, base_weight=w0, scale=m.scale * c.multiplier)
        for c in later:
            m = c.placed.module
            tensors = _tensors(c, device)
            if m.dora:
                core = {k: v for k, v in tensors.items() if k != "dora_scale"}
                dw = delta_weight(m.network_type, core, m.alpha, shape, base_weight=w0, scale=m.scale)
                merged = apply_dora(view, dw, tensors["dora_scale"], m.dora_axis or "out", c.multiplier)
            else:
                merge_fn = NETWORK_TYPES[m.network_type].merge
                assert merge_fn is not None
                merged = merge_fn(view, tensors, m.alpha, c.multiplier)
            view.copy_(merged)


def _apply_biases(value: torch.Tensor, contribs: list[Contribution], device: str) -> None:
    """b ← b0 + Σ m·Δb over the modules' rows."""
    for c in contribs:
        m = c.placed.module
        db = delta_bias(m.network_type, _tensors(c, device), m.alpha)
        if db is not None:
            view = _view(value, c)
            view += c.multiplier * db.reshape(view.shape)


"""The :class:`Checkpoint`: a base model's tensors, its family, and every catalog module's
weight located in it. Opening reads headers only (torch is not imported for safetensors);
tensors are read one at a time, on demand, with ``pread``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING

from loratool import arch
from loratool.arch.spec import ModuleSpec
from loratool.checkpoint.detect import detect
from loratool.checkpoint.layout import Layout, WeightsFile, open_layout
from loratool.errors import InputError, UsageError
from loratool.formats.family import ALL_FAMILIES, SD_FAMILIES

if TYPE_CHECKING:
    import torch

# Catalog components (the rest, e.g. the VAE, is carried along unchanged).
MODEL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as stored: its file, key, dtype (safetensors spelling) and shape."""

    file: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int | None = None  # absolute byte offset of its data (safetensors only)
    component: str | None = None  # the folder component of its file (None: single file)

    @property
    def nbytes(self) -> int:
        from loratool.io.safetensors import DTYPE_SIZES

        return DTYPE_SIZES[self.dtype] * prod(self.shape)

    @property
    def slot(self) -> tuple[str | None, str]:
        """(component, key): the same for this tensor in every variant/shard of a folder."""
        return self.component, self.key


@dataclass(frozen=True)
class WeightRef:
    """Where one catalog module's weight (and bias) lives in a checkpoint.

    ``rows`` is the row range inside a fused tensor (OpenCLIP's q/k/v ``in_proj_weight``),
    ``transposed`` marks a weight stored as Wᵀ (SGM's ``text_projection``). ``bias`` is
    the layer's bias tensor when it has one (for fused rows: ``in_proj_bias``, same rows).
    """

    spec: ModuleSpec
    tensor: StoredTensor
    rows: tuple[int, int] | None = None
    transposed: bool = False
    bias: StoredTensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The module's weight shape as stored (after the row slice and the transpose)."""
        shape = self.tensor.shape
        if self.rows is not None:
            shape = (self.rows[1] - self.rows[0], *shape[1:])
        return shape[::-1] if self.transposed else shape

    @property
    def fit(self) -> str:
        """``exact``; ``reshape`` (same element count: a 1×1 conv stored for a linear or the
        reverse); ``mismatch``."""
        if self.shape == self.spec.shape:
            return "exact"
        return "reshape" if prod(self.shape) == prod(self.spec.shape) else "mismatch"


@dataclass
class Resolution:
    """The catalog against the checkpoint: found modules, absent ones, wrong shapes."""

    refs: dict[tuple[str, str], WeightRef] = field(default_factory=dict)  # (component, path)
    missing: list[ModuleSpec] = field(default_factory=list)
    mismatched: list[WeightRef] = field(default_factory=list)


class Checkpoint:
    """A base model checkpoint (single file, UNet-only file or diffusers folder), read lazily.

    Use :func:`open_checkpoint`; close it (or use ``with``). ``family`` comes from keys and
    shapes (``family_evidence`` says why); ``catalog`` is that family's module catalog (None
    for families loratool has none for, e.g. SD3/Flux, which are named but not merged).
    """

    def __init__(self, path: str | os.PathLike[str], *, family: str | None = None, variant: str | None = None) -> None:
        if family is not None and family not in ALL_FAMILIES:
            raise UsageError(None, f"unknown family {family!r}; choose from {', '.join(ALL_FAMILIES)}")
        self.path = str(path)
        self._layout: Layout = open_layout(path, variant)
        try:
            self._files = {f.path: f for f in self._layout.all_files}
            self._stored: dict[str, list[StoredTensor]] = {}
            self._index: dict[str | None, dict[str, StoredTensor]] = {}
            self._owned: dict[str | None, list[StoredTensor]] = {}  # component -> its tensors
            for f in self._layout.files:
                for t in self.file_tensors(f):
                    self._index.setdefault(f.component, {})[t.key] = t
                    self._owned.setdefault(self.component_of(t)[0], []).append(t)
            self.metadata: dict[str, str] = {}
            for f in self._layout.files:
                self.metadata.update(f.part.metadata)
            self.warnings: list[str] = []
            self._detect(family)
            self.resolution = self._resolve()
            self._check_coverage()
        except BaseException:
            self._layout.close()
            raise
        self._cache: tuple[tuple[str, str], torch.Tensor] | None = None
        self._fds: dict[str, int] = {}

    # ------------------------------------------------------------------ description

    @property
    def layout(self) -> str:
        """``single-file``, ``unet-only`` or ``diffusers``."""
        return self._layout.kind

    @property
    def variants(self) -> tuple[str | None, ...]:
        """Weight variants of a diffusers folder (``None`` = no suffix, ``"fp16"``…)."""
        return self._layout.variants

    @property
    def files(self) -> list[WeightsFile]:
        """The weights files read (the selected variant)."""
        return self._layout.files

    @property
    def all_files(self) -> list[WeightsFile]:
        """Every weights file, all variants."""
        return self._layout.all_files

    @property
    def other_files(self) -> list[str]:
        """Non-weight files of a folder (configs, tokenizer, scheduler, shard indexes)."""
        return self._layout.other_files

    @property
    def components(self) -> tuple[str, ...]:
        """Catalog components present (``unet``, ``text_encoder``, ``text_encoder_2``)."""
        return tuple(c for c in MODEL_COMPONENTS if c in self._owned)

    def component_tensors(self, component: str | None) -> list[StoredTensor]:
        """The stored tensors of one component (``vae``…; None: those of no component)."""
        return self._owned.get(component, [])

    @property
    def catalog(self) -> arch.Catalog | None:
        return arch.get_catalog(self.family) if self.family in arch.FAMILIES else None

    @property
    def supported(self) -> bool:
        """Whether loratool has a catalog for this family (can check and merge into it)."""
        return self.catalog is not None

    def tensors(self) -> Iterator[StoredTensor]:
        """Every stored tensor, file by file, in storage order."""
        for f in self._layout.files:
            yield from self.file_tensors(f)

    def file_tensors(self, f: WeightsFile) -> list[StoredTensor]:
        """A file's tensors in storage order (pickles: as listed)."""
        out = self._stored.get(f.path)
        if out is None:
            out = [StoredTensor(f.path, k, e.dtype, tuple(e.shape), e.offset, f.component) for k, e in f.part.tensors.items()]
            if f.safetensors:
                out.sort(key=lambda t: (t.offset or 0, t.key))
            self._stored[f.path] = out
        return out

    def component_of(self, t: StoredTensor) -> tuple[str | None, str]:
        """(component, name below its prefix) of a stored tensor."""
        return self._layout.component_of(self._files[t.file], t.key)

    def get(self, component: str | None, key: str) -> StoredTensor | None:
        """The stored tensor at (component, key); component None for single files."""
        return self._index.get(component, {}).get(key)

    # -------------------------------------------------------------------- family

    def _detect(self, family: str | None) -> None:
        weights = [
            (c, self.component_of(t)[1], t.shape) for c in MODEL_COMPONENTS for t in self.component_tensors(c)
        ]
        verdict = detect(weights, self.metadata)
        self.family_evidence = [f"{self.layout} layout", *verdict.evidence]
        self.warnings.extend(verdict.warnings)
        chosen = family or verdict.family
        if family:
            self.family_evidence.append(f"family {family} given")
        elif chosen == "unknown":
            chosen = self._best_catalog(verdict.candidates or SD_FAMILIES)
        self.family = chosen

    def _best_catalog(self, candidates: tuple[str, ...]) -> str:
        """The candidate family whose catalog places the most modules (ties: unknown)."""
        scores = {}
        for fam in candidates:
            if fam in arch.FAMILIES:
                self.family = fam
                scores[fam] = len(self._resolve().refs)
        if not scores:
            return "unknown"
        best = max(scores.values())
        top = [f for f, n in scores.items() if n == best]
        if best == 0 or len(top) > 1:
            return "unknown"
        self.family_evidence.append(f"catalog fit: {best} modules of the {top[0]} catalog found")
        return top[0]

    # ---------------------------------------------------------------- resolution

    def locate(self, spec: ModuleSpec) -> WeightRef | None:
        """Where a catalog module's weight is stored, or None when the checkpoint lacks it."""
        naming = self._layout.namings.get(spec.component)
        if naming is None:
            return None
        space = self._index.get(self._space(spec.component), {})
        for key in naming.weight_keys(spec):
            t = space.get(key)
            if t is None:
                continue
            ldm = naming.style == "ldm"
            rows = spec.ldm_slice if ldm else None
            transposed = spec.ldm_transposed if ldm else False
            return WeightRef(spec, t, rows, transposed, None if transposed else space.get(_bias_key(key)))
        return None

    def _space(self, component: str) -> str | None:
        return component if self.layout == "diffusers" else None

    def _resolve(self) -> Resolution:
        res = Resolution()
        catalog = self.catalog
        if catalog is None:
            return res
        for spec in catalog:
            if spec.component not in self._owned:
                continue
            ref = self.locate(spec)
            if ref is None:
                res.missing.append(spec)
            elif ref.fit == "mismatch":
                res.mismatched.append(ref)
            else:
                res.refs[(spec.component, spec.path)] = ref
        return res

    def _check_coverage(self) -> None:
        res = self.resolution
        if self.family in ("sd3", "flux"):
            self.warnings.append(f"{self.family} checkpoints are recognised, not supported (no module catalog)")
        if res.missing:
            names = ", ".join(f"{s.component}.{s.path}" for s in res.missing[:3])
            self.warnings.append(f"{len(res.missing)} {self.family} module(s) are not in the checkpoint, e.g. {names}")
        if res.mismatched:
            r = res.mismatched[0]
            self.warnings.append(
                f"{len(res.mismatched)} module(s) have another shape than the {self.family} catalog's, "
                f"e.g. {r.tensor.key} {list(r.shape)} (expected {list(r.spec.shape)})"
            )

    def module_refs(self, component: str | None = None) -> list[WeightRef]:
        """Located catalog modules (of one component, or all) in storage order."""
        refs = [r for r in self.resolution.refs.values() if component in (None, r.spec.component)]
        return sorted(refs, key=lambda r: (r.tensor.file, r.tensor.offset or 0, r.tensor.key, r.rows or (0, 0)))

    # ------------------------------------------------------------------- tensors

    def read(self, t: StoredTensor) -> torch.Tensor:
        """A stored tensor as stored (its own dtype), read on its own."""
        return self._files[t.file].part.get(t.key)

    def read_into(self, t: StoredTensor, buf: memoryview) -> None:
        """Read a stored tensor's bytes into ``buf`` (writable, exactly ``t.nbytes``): a
        buffer reused from tensor to tensor spares a fresh, page-faulted allocation each."""
        if len(buf) != t.nbytes:
            raise ValueError(f"{t.key}: buffer of {len(buf)} bytes for {t.nbytes}")
        if not len(buf):
            return
        if t.offset is None:  # pickle: already in memory
            import torch

            src = self.read(t).contiguous().reshape(-1).view(torch.uint8)
            torch.frombuffer(buf, dtype=torch.uint8).copy_(src)
            return
        fd = self._fds.get(t.file)
        if fd is None:
            fd = self._fds[t.file] = os.open(t.file, os.O_RDONLY)
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], t.offset + done)
            if n == 0:
                raise InputError(t.file, f"truncated while reading tensor {t.key!r}")
            done += n

    def raw(self, t: StoredTensor) -> bytes:
        """A stored tensor's bytes exactly as stored (safetensors files only)."""
        part = self._files[t.file].part
        if part.raw is None:
            raise InputError(t.file, "pickled file: no raw tensor bytes")
        return part.raw(t.key)

    def _read_f32(self, t: StoredTensor) -> torch.Tensor:
        """fp32 copy of a stored tensor; the last one is kept, so q/k/v rows read it once."""
        import torch

        slot = (t.file, t.key)
        if self._cache is None or self._cache[0] != slot:
            self._cache = None
            self._cache = (slot, self.read(t).to(torch.float32))
        return self._cache[1]

    def read_weight(self, ref: WeightRef, device: str | torch.device | None = None) -> torch.Tensor:
        """A module's weight in fp32, as the module holds it: rows cut, transpose undone,
        in the catalog's shape (a 1×1 conv stored for a linear is reshaped)."""
        import torch

        w = self._read_f32(ref.tensor)
        if ref.rows is not None:
            w = w[ref.rows[0] : ref.rows[1]]
        if ref.transposed:
            w = w.T
        w = w.clone(memory_format=torch.contiguous_format).reshape(ref.spec.shape)  # never the cached one
        return w if device is None else w.to(device)

    def read_bias(self, ref: WeightRef, device: str | torch.device | None = None) -> torch.Tensor | None:
        """A module's bias in fp32 (its rows of a fused bias), or None when it has none."""
        import torch

        if ref.bias is None:
            return None
        b = self.read(ref.bias).to(torch.float32)
        if ref.rows is not None:
            b = b[ref.rows[0] : ref.rows[1]].clone()
        return b if device is None else b.to(device)

    def close(self) -> None:
        self._cache = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._layout.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, {self.layout}, {self.family})"


def _bias_key(weight_key: str) -> str:
    if weight_key.endswith("in_proj_weight"):
        return weight_key[: -len("weight")] + "bias"
    return weight_key.removesuffix(".weight") + ".bias"


def open_checkpoint(
    path: str | os.PathLike[str], *, family: str | None = None, variant: str | None = None
) -> Checkpoint:
    """Open a base-model checkpoint (single file, UNet-only file or diffusers folder).

    Reads headers only. ``family`` overrides detection; ``variant`` picks a diffusers
    folder's weight variant (default: the unsuffixed files, else the only variant).
    """
    return Checkpoint(path, family=family, variant=variant)

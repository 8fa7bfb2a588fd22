"""``extract``: a LoRA from a fine-tuned checkpoint, by a truncated SVD of ΔW = W′ − W0.

* Inputs: BASE and TUNED, each a single file, a UNet-only file or a diffusers folder, in
  any mix of fp16/bf16/fp32 (:func:`loratool.checkpoint.pair_checkpoints` matches them
  module by module and refuses another family, a missing module or another shape before
  any tensor is read). Both are read tensor by tensor with ``pread`` on one reader thread
  each, a few modules ahead of the arithmetic, and hashed (AutoV3) in the same pass
  (:mod:`.extract_io`); memory is bounded by a few of the largest weights plus the
  batches waiting for their SVD and the (small) factors.
* Modules: those kohya's LoRA targets (PEERS-kohya.md §0-§1): in the UNet, every linear
  and 1×1 conv of the ``Transformer2DModel`` blocks (attention q/k/v/out, feed-forward,
  ``proj_in``/``proj_out``); in the text encoders, ``CLIPAttention`` (q/k/v/out) and
  ``CLIPMLP`` (fc1/fc2), OpenCLIP's fused q/k/v rows included. With a conv rank > 0, also
  the ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` modules, as kohya's
  ``conv_dim`` adds them: 3×3 convs at the conv rank, and — like kohya — their linears
  (``time_emb_proj``) and 1×1 convs (``conv_shortcut``) at the linear rank.
* Factors: ΔW ``[out, in·kh·kw]`` in fp32 on the chosen device; a randomized truncated SVD
  (range finder, oversampling, :data:`POWER_ITERS` power iterations) batched over
  same-shaped modules (:mod:`.extract_svd`; on the CPU only the smallest), or an
  exact economy SVD (``exact``; also for ``--dynamic cumulative``, which needs the whole
  spectrum, and for ``--dynamic`` without a rank cap). Rank: fixed (``rank`` for linear
  and 1×1, ``conv_rank`` for 3×3, capped by the matrix), or per module by ``dynamic``/
  ``threshold`` from the singular values (ratio/fro/cumulative, fro against the exact
  ‖ΔW‖_F), capped by those ranks. ``up = U·√S``, ``down = √S·Vh`` (an fp16 output keeps
  precision on both sides), alpha = rank so the scale is exactly 1; an optional
  ``clamp_quantile`` clamps both factors to the quantile of their |values|.
* Skipped and listed, never silently: modules whose ΔW is exactly zero, or negligible:
  ‖ΔW‖_F ≤ τ·‖W0‖_F with τ = :data:`NEGLIGIBLE` (1e-6) when both checkpoints store the
  module in one dtype, else the unit roundoff of the coarser dtype (fp16 2⁻¹¹, bf16 2⁻⁸):
  converting a weight from one dtype into the other moves it by up to that much, so such a
  ΔW cannot be told from the conversion (``skip_below`` sets τ).
* Text encoders: ``on``, ``off``, or ``auto`` (default): extracted when some text-encoder
  ΔW element exceeds ``min_diff`` in magnitude (kohya's ``--min_diff`` 0.01, the modules
  read until one does), and the decision is stated either way.
* Output: kohya (default), diffusers or PEFT through the encoders, written atomically and
  re-read (every module's factors exactly as computed, at scale 1). Metadata: kohya's
  ``ss_*`` (network module/dim/alpha/args, ``ss_sd_model_name`` = the base), ``modelspec.*``
  (title, architecture, a description naming both inputs with their AutoV3) and
  ``loratool.extract`` (JSON: both inputs' names and AutoV3 hashes, ranks, method, clamp,
  text-encoder decision). AutoV3 of a diffusers folder: the AutoV3 of each weights file
  read (the selected variant's), by path inside the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool import __version__
from loratool.arch import ModuleSpec
from loratool.checkpoint import Checkpoint, ModulePair, open_checkpoint, pair_checkpoints
from loratool.errors import ConversionError, InputError, UsageError
from loratool.formats.encode import DTYPES, MODELSPEC_ARCH, TARGETS
from loratool.model import Adapter, AdapterModule, ModuleKey, TensorRef
from loratool.ops.device import DEVICES, resolve_device, torch_threads
from loratool.ops.output import check_output, check_rank_options, writable, write_adapter

if TYPE_CHECKING:
    import torch

    from loratool.ops.extract_io import HashingReader
    from loratool.ops.extract_svd import Solved

DYNAMIC_METHODS = ("ratio", "fro", "cumulative")  # loratool.lowrank.RANK_METHODS, without importing torch
TEXT_ENCODER_MODES = ("auto", "on", "off")
DEFAULT_MIN_DIFF = 0.01  # kohya's --min_diff
NEGLIGIBLE = 1e-6  # ‖ΔW‖/‖W0‖ at or below which a module is skipped (same dtypes)
EXTRACT_METADATA_KEY = "loratool.extract"
# Power iterations of the randomized SVD (sketch width 2×rank). Measured on flat spectra cut
# at rank 32 (power laws σᵢ ∝ i^-0.5 and i^-1, rank-64 + noise; 320² to 3072×768): error
# within 0.13 % of the Eckart–Young optimum with 2, 1.1 % with 1, 0.02 % with 3.
POWER_ITERS = 2
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# Enclosing blocks (diffusers/transformers classes) whose modules kohya's LoRA targets.
ATTENTION_BLOCKS = frozenset({"Transformer2DModel", "CLIPAttention", "CLIPMLP"})
CONV_BLOCKS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})  # with a conv rank
# Batches waiting for their SVD: bytes per batch, and in all (float32 ΔW matrices).
# On a GPU a batch is one kernel per step. On the CPU batching saved nothing measurable
# (BLAS/LAPACK loop over the batch; stacking costs a copy; SD1.5 at rank 32: 8.4 s user
# unbatched, 8.6 s with 16 MiB batches), so only the smallest matrices are batched there.
BATCH_BYTES = {"cpu": 4 << 20, "cuda": 1 << 30}
PENDING_BYTES = {"cpu": 64 << 20, "cuda": 4 << 30}
RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024", "sdxl-refiner": "1024x1024"}
IMPLEMENTATION = {"sd1": "diffusers", "sd2": "diffusers"}  # kohya's; SDXL: the encoder's default


@dataclass
class ModuleExtract:
    """One module of the extraction: what it kept, or why it was skipped."""

    name: str  # kohya name
    component: str
    path: str
    kind: str  # linear | conv1x1 | conv3x3
    shape: list[int]
    rank: int | None  # None when skipped
    retained: float | None  # ‖ΔW_k‖_F / ‖ΔW‖_F
    error: float | None  # ‖ΔW − up·down‖_F / ‖ΔW‖_F, factors as written
    delta_norm: float | None  # ‖ΔW‖_F (None: not measured)
    relative: float | None  # ‖ΔW‖_F / ‖W0‖_F
    max_abs: float | None  # max |ΔW|
    skipped: str | None = None  # why it was left out


@dataclass
class TextEncoderDecision:
    """Whether the text encoders were extracted, and why."""

    mode: str  # auto | on | off
    extracted: bool
    components: list[str]
    max_abs_diff: float | None  # max |ΔW| over the text-encoder modules read
    min_diff: float
    message: str


@dataclass
class Input:
    """One of the two checkpoints."""

    path: str
    layout: str
    family: str
    dtypes: list[str]  # of the weights compared
    autov3: str | dict[str, str | None] | None  # a folder: per weights file


@dataclass
class ExtractResult:
    """What ``extract`` wrote and how well each module's LoRA matches its ΔW."""

    base: Input
    tuned: Input
    output: str
    target: str
    family: str
    device: str
    method: str  # randomized | exact
    rank: int | None
    conv_rank: int
    dynamic: str | None
    threshold: float | None
    dtype: str
    clamp_quantile: float | None
    text_encoders: TextEncoderDecision
    files: list[str] = field(default_factory=list)
    modules: list[ModuleExtract] = field(default_factory=list)  # extracted and skipped, in storage order
    verified: bool = False

    @property
    def extracted(self) -> list[ModuleExtract]:
        return [m for m in self.modules if m.skipped is None]

    @property
    def skipped(self) -> list[ModuleExtract]:
        return [m for m in self.modules if m.skipped is not None]

    def summary(self) -> dict[str, Any]:
        """Totals over the extracted modules; ``retained`` and ``error`` are relative to
        the ‖ΔW‖_F of all of them together (each module weighted by its ΔW)."""
        done = self.extracted
        worst = min(done, key=lambda m: m.retained or 0.0, default=None)
        sq = [(m.delta_norm or 0.0) ** 2 for m in done]
        total = sum(sq)
        kept = sum((m.retained or 0.0) ** 2 * w for m, w in zip(done, sq))
        err = sum((m.error or 0.0) ** 2 * w for m, w in zip(done, sq))
        return {
            "extracted": len(done), "skipped": len(self.skipped),
            "ranks": sorted({m.rank for m in done if m.rank is not None}),
            "retained": (kept / total) ** 0.5 if total else 1.0,
            "error": (err / total) ** 0.5 if total else 0.0,
            "min_retained": worst.retained if worst else None,
            "min_retained_module": worst.name if worst else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "base": asdict(self.base), "tuned": asdict(self.tuned), "output": self.output,
            "files": self.files, "target": self.target, "family": self.family, "device": self.device,
            "method": self.method, "rank": self.rank, "conv_rank": self.conv_rank, "dynamic": self.dynamic,
            "threshold": self.threshold, "dtype": self.dtype, "clamp_quantile": self.clamp_quantile,
            "text_encoders": asdict(self.text_encoders), "summary": self.summary(),
            "modules": [asdict(m) for m in self.modules], "verified": self.verified,
        }


# ------------------------------------------------------------------------- entry point


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    rank: int | None = None,
    conv_rank: int = 0,
    dynamic: str | None = None,
    threshold: float | None = None,
    device: str = "auto",
    dtype: str = "fp16",
    clamp_quantile: float | None = None,
    text_encoders: str = "auto",
    min_diff: float = DEFAULT_MIN_DIFF,
    target: str = "kohya",
    exact: bool = False,
    skip_below: float | None = None,
    force: bool = False,
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Extract the LoRA that takes ``base`` to ``tuned`` and write it at ``output``; see the
    module docstring. ``rank`` is required unless ``dynamic`` (then it caps the rank);
    ``progress(done, total)`` counts modules read."""
    _check_options(rank, conv_rank, dynamic, threshold, device, dtype, clamp_quantile, text_encoders, min_diff,
                   target, skip_below)
    out = check_output([base, tuned], output, target, force)
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        if not b.supported:
            raise InputError(b.path, f"is {b.family}; loratool extracts from sd1, sd2, sdxl and sdxl-refiner checkpoints")
        pairs, te_components = _pairs(b, t, text_encoders)
        caps = {id(p): c for p in pairs if (c := target_cap(p.spec, rank, conv_rank)) is not None}
        pairs = [p for p in pairs if id(p) in caps]
        if not pairs:
            raise InputError(b.path, "no module that kohya's LoRA targets is in both checkpoints")
        dev = resolve_device(device)
        method = "exact" if exact or dynamic == "cumulative" or (dynamic is not None and rank is None) else "randomized"
        job = _Extraction(b, t, pairs, caps, dev, method, dynamic, threshold, dtype, clamp_quantile, skip_below, progress)
        with torch_threads(dev):
            te = job.run(text_encoders, te_components, min_diff)
            result = ExtractResult(
                job.input(b, "base"), job.input(t, "tuned"), str(out), target, b.family, dev, method, rank, conv_rank,
                dynamic, threshold, dtype, clamp_quantile, te, modules=job.records,
            )
            if not result.extracted:
                raise ConversionError(t.path, f"nothing to extract: {_why_empty(result)}")
            result.files = _write(job, result, out, target, verify)
    return result


def _write(job: _Extraction, result: ExtractResult, out: Path, target: str, verify: bool) -> list[str]:
    """Encode, write atomically, re-read and check (the output appears only if it holds)."""
    adapter, modules = job.adapter(out, result)
    keep, refused = writable(adapter, modules, target)
    if refused:
        raise ConversionError(out, f"{target} cannot hold {len(refused)} module(s), e.g. {next(iter(refused.items()))}")

    def check(tmp: Path) -> None:
        _verify(tmp, result.family, keep, job.factors)
        result.verified = True

    return write_adapter(adapter, keep, target, out, extra_metadata=_extra_metadata(result), verify=check if verify else None)


def _check_options(
    rank: int | None, conv_rank: int, dynamic: str | None, threshold: float | None, device: str, dtype: str,
    clamp: float | None, text_encoders: str, min_diff: float, target: str, skip_below: float | None,
) -> None:
    if conv_rank < 0:
        raise UsageError(None, f"--conv-rank must be ≥ 0 (0 leaves the 3×3 convs out), got {conv_rank}")
    if dynamic is not None and dynamic not in DYNAMIC_METHODS:
        raise UsageError(None, f"unknown --dynamic {dynamic!r}; choose from {', '.join(DYNAMIC_METHODS)}")
    check_rank_options(rank, dynamic, threshold)
    choices = {"--device": (device, DEVICES), "--dtype": (dtype, tuple(DTYPES)), "--to": (target, TARGETS),
               "--text-encoders": (text_encoders, TEXT_ENCODER_MODES)}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise UsageError(None, f"unknown {flag} {value!r}; choose from {', '.join(allowed)}")
    if clamp is not None and not 0.0 < clamp <= 1.0:
        raise UsageError(None, f"--clamp-quantile must be in (0, 1], got {clamp}")
    if not min_diff >= 0.0:
        raise UsageError(None, f"--min-diff must be ≥ 0, got {min_diff}")
    if skip_below is not None and not skip_below >= 0.0:
        raise UsageError(None, f"--skip-below must be ≥ 0, got {skip_below}")


# ----------------------------------------------------------------------- selection


def module_kind(spec: ModuleSpec) -> str:
    """``linear``, ``conv1x1`` or ``conv3x3`` (any kernel larger than 1×1)."""
    if spec.kind == "linear":
        return "linear"
    return "conv1x1" if prod(spec.shape[2:]) == 1 else "conv3x3"


def target_cap(spec: ModuleSpec, rank: int | None, conv_rank: int) -> int | None:
    """The rank cap of a module kohya's LoRA targets; None for modules it does not (or
    for 3×3 convs with conv rank 0). ``rank`` None means uncapped (dynamic ranks)."""
    if spec.kind not in ("linear", "conv"):
        return None
    if spec.block in ATTENTION_BLOCKS:
        cap = rank
    elif spec.block in CONV_BLOCKS and conv_rank > 0:
        cap = conv_rank if module_kind(spec) == "conv3x3" else rank
    else:
        return None
    full = min(spec.shape[0], prod(spec.shape[1:]))
    return full if cap is None else min(cap, full)


def _pairs(b: Checkpoint, t: Checkpoint, mode: str) -> tuple[list[ModulePair], list[str]]:
    """Module pairs of the components compared, and the text-encoder components among them."""
    both_te = [c for c in TEXT_ENCODERS if c in b.components and c in t.components]
    if mode == "on":
        for ckpt in (b, t):
            if not any(c in ckpt.components for c in TEXT_ENCODERS):
                raise UsageError(ckpt.path, "--text-encoders on, but this checkpoint has no text encoder")
        te = [c for c in TEXT_ENCODERS if c in b.components or c in t.components]
    else:
        te = both_te if mode == "auto" else []
    unet = ["unet"] if "unet" in b.components or "unet" in t.components else []
    return pair_checkpoints(b, t, unet + te), te


# ------------------------------------------------------------------------- the work


@dataclass
class _Extraction:
    base: Checkpoint
    tuned: Checkpoint
    pairs: list[ModulePair]
    caps: dict[int, int]
    device: str
    method: str
    dynamic: str | None
    threshold: float | None
    dtype: str
    clamp: float | None
    skip_below: float | None
    progress: Callable[[int, int], None] | None
    records: list[ModuleExtract] = field(default_factory=list)
    factors: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hashes: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def run(self, mode: str, te_components: list[str], min_diff: float) -> TextEncoderDecision:
        from loratool.ops.extract_io import HashingReader

        readers = HashingReader(self.base), HashingReader(self.tuned)
        try:
            te_pairs = [p for p in self.pairs if p.spec.component in te_components]
            probed: dict[int, float] = {}
            if mode == "auto" and te_pairs:
                probed = self._probe(readers, te_pairs, min_diff)
            te_on = bool(te_pairs) and (mode == "on" or any(v > min_diff for v in probed.values()))
            work = [p for p in self.pairs if te_on or p.spec.component not in te_components]
            self._extract(readers, work)
            te_max = [r.max_abs for r in self.records if r.component in te_components and r.max_abs is not None]
            te_max += [] if te_on else list(probed.values())
            decision = _decision(mode, te_on, te_components if te_on else [], max(te_max, default=None), min_diff,
                                 bool(te_components))
            if not te_on:
                why = f"text encoder not extracted (max |ΔW| ≤ {min_diff:g})"
                self.records += [self._record(p, None, probed.get(id(p)), why) for p in te_pairs]
                order = {(p.spec.component, p.spec.path): i for i, p in enumerate(self.pairs)}
                self.records.sort(key=lambda r: order[(r.component, r.path)])
            return decision
        finally:
            for r in readers:
                r.close()

    def _stream(
        self, readers: tuple[HashingReader, HashingReader], pairs: list[ModulePair], finish: bool,
    ) -> Iterator[tuple[ModulePair, tuple[torch.Tensor, float], torch.Tensor]]:
        """(pair, (base weight, ‖W0‖_F), tuned weight) in order, read ahead on two threads;
        on the CPU both come in fp32, the tuned one as a fresh copy (ΔW is computed in it),
        elsewhere as stored. With ``finish``, the files' hashes are completed after the last
        read."""
        import torch

        from loratool.ops.extract_io import Prefetch

        rb, rt = readers
        f32 = torch.float32

        cpu = self.device == "cpu"

        def base(p: ModulePair) -> tuple[torch.Tensor, float]:
            w = rb.weight(p.base, f32 if cpu else None)  # ΔW = tuned − base is an fp32 subtraction
            return w, torch.linalg.vector_norm(w, dtype=f32).item()

        def tuned(p: ModulePair) -> torch.Tensor:
            w = rt.weight(p.tuned)
            return w.to(f32, copy=True) if cpu else w

        fb = Prefetch(base, pairs, after=rb.finish if finish else None)
        ft = Prefetch(tuned, pairs, after=rt.finish if finish else None)
        try:
            yield from zip(pairs, fb, ft)
            if finish:
                self.hashes["base"] = fb.wait()  # type: ignore[assignment]
                self.hashes["tuned"] = ft.wait()  # type: ignore[assignment]
        finally:
            fb.close()
            ft.close()

    def _delta(self, base: tuple[torch.Tensor, float], wt: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
        """ΔW (fp32, on the device; in place of the tuned copy on the CPU), ‖ΔW‖_F, ‖W0‖_F,
        max |ΔW|."""
        import torch

        wb, w0 = base
        if converts_on_readers(self.device):
            delta = wt.sub_(wb)
        else:  # as stored (half the bytes to move), converted on the device
            delta = wt.to(self.device, torch.float32, copy=True).sub_(wb.to(self.device))
        lo, hi = torch.aminmax(delta)
        norm, lo_, hi_ = torch.stack([torch.linalg.vector_norm(delta), lo, hi]).tolist()
        return delta, norm, w0, max(-lo_, hi_)

    def _probe(self, readers: tuple[HashingReader, HashingReader], pairs: list[ModulePair], min_diff: float) -> dict[int, float]:
        """max |ΔW| of text-encoder modules in order, up to the first beyond ``min_diff``."""
        found: dict[int, float] = {}
        for p, wb, wt in self._stream(readers, pairs, finish=False):
            found[id(p)] = self._delta(wb, wt)[3]
            if found[id(p)] > min_diff:
                break
        return found

    def _extract(self, readers: tuple[HashingReader, HashingReader], work: list[ModulePair]) -> None:
        from loratool.ops.extract_svd import Batcher, SolveSettings

        settings = SolveSettings(self.method, self.dynamic, self.threshold, self.clamp, _torch_dtype(self.dtype),
                                 power_iters=POWER_ITERS)
        batcher = Batcher(settings, *_batch_budget(self.device))
        waiting: dict[int, tuple[ModulePair, ModuleExtract]] = {}

        def take(done: list[Solved]) -> None:
            for s in done:
                p, rec = waiting.pop(s.index)
                rec.rank, rec.retained, rec.error = s.rank, s.retained, s.error
                self.factors[ModuleKey(p.spec.component, p.spec.path)] = (s.up, s.down)

        for i, (p, wb, wt) in enumerate(self._stream(readers, work, finish=True)):
            delta, norm, w0, max_abs = self._delta(wb, wt)
            del wb, wt
            tau = self._negligible(p)
            rec = self._record(p, (norm, w0), max_abs, None)
            if norm == 0.0:
                rec.skipped = "identical in both checkpoints"
            elif norm <= tau * w0:
                rec.skipped = f"negligible: ‖ΔW‖/‖W0‖ = {norm / w0:.2g} ≤ {tau:.2g}"
            self.records.append(rec)
            if rec.skipped is None:
                waiting[i] = (p, rec)
                take(batcher.add(i, delta, self.caps[id(p)], norm * norm))
            del delta
            if self.progress is not None:
                self.progress(i + 1, len(work))
        take(batcher.flush())

    def _negligible(self, p: ModulePair) -> float:
        from loratool.ops.verify import UNIT_ROUNDOFF

        if self.skip_below is not None:
            return self.skip_below
        db, dt = p.base.tensor.dtype, p.tuned.tensor.dtype
        if db == dt:
            return NEGLIGIBLE
        return max(NEGLIGIBLE, UNIT_ROUNDOFF.get(db, 0.0), UNIT_ROUNDOFF.get(dt, 0.0))

    def _record(self, p: ModulePair, norms: tuple[float, float] | None, max_abs: float | None, skipped: str | None) -> ModuleExtract:
        spec = p.spec
        norm, w0 = norms if norms is not None else (None, None)
        relative = None if norm is None else norm / w0 if w0 else float("inf") if norm else 0.0
        return ModuleExtract(
            spec.kohya_name, spec.component, spec.path, module_kind(spec), list(spec.shape), None, None, None,
            _finite(norm), _finite(relative), _finite(max_abs), skipped,
        )

    def input(self, ckpt: Checkpoint, which: str) -> Input:
        hashes = self.hashes.get(which, {})
        autov3: str | dict[str, str | None] | None = dict(hashes)
        if ckpt.layout != "diffusers":
            autov3 = next(iter(hashes.values()), None)
        dtypes = sorted({(p.base if which == "base" else p.tuned).tensor.dtype for p in self.pairs})
        return Input(ckpt.path, ckpt.layout, ckpt.family, dtypes, autov3)

    # ------------------------------------------------------------------- output

    def adapter(self, out: Path, result: ExtractResult) -> tuple[Adapter, list[AdapterModule]]:
        """The extracted modules as an in-memory adapter the encoders can write."""
        st_dtype = DTYPES[self.dtype]
        store: dict[str, torch.Tensor] = {}
        modules: dict[ModuleKey, AdapterModule] = {}
        specs = {(p.spec.component, p.spec.path): p.spec for p in self.pairs}
        for rec in result.extracted:
            spec = specs[(rec.component, rec.path)]
            key = ModuleKey(spec.component, spec.path)
            up, down = self.factors[key]
            k = up.shape[1]
            conv = spec.kind == "conv"
            shapes = {"lora_down": (k, *spec.shape[1:]) if conv else (k, spec.shape[1]),
                      "lora_up": (spec.shape[0], k, 1, 1) if conv else (spec.shape[0], k)}
            params = {}
            for name, value in (("lora_down", down), ("lora_up", up)):
                ref_key = f"{spec.kohya_name}.{name}"
                store[ref_key] = value.reshape(shapes[name])
                params[name] = TensorRef(ref_key, st_dtype, shapes[name], store.__getitem__)
            modules[key] = AdapterModule(
                key=key, params=params, network_type="locon" if rec.kind == "conv3x3" else "lora", alpha=float(k),
                source_name=spec.kohya_name, resolved=True, extra={"target": spec.target, "shape": spec.shape},
            )
        adapter = Adapter(
            path=str(out), format="extracted", variant="", family=self.base.family,
            family_evidence=[f"extracted from {self.base.path} ({self.base.family})"], modules=modules,
            metadata=_metadata(out, result),
        )
        return adapter, list(modules.values())


def converts_on_readers(device: str) -> bool:
    """Whether the reader threads hand over fp32 weights (CPU work) or the stored ones
    (moved to the device as stored: half the bytes for fp16/bf16)."""
    return device == "cpu"


def _batch_budget(device: str) -> tuple[int, int]:
    """(bytes per batch, bytes pending in all) for the device; on a GPU at most 1/16 and
    1/4 of its free memory."""
    if device == "cpu":
        return BATCH_BYTES["cpu"], PENDING_BYTES["cpu"]
    import torch

    free, _ = torch.cuda.mem_get_info()
    return min(BATCH_BYTES["cuda"], free // 16), min(PENDING_BYTES["cuda"], free // 4)


def _torch_dtype(dtype: str) -> torch.dtype:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def _finite(x: float | None) -> float | None:
    """JSON-safe: NaN/inf (a zero W0) become None."""
    return x if x is not None and x == x and abs(x) != float("inf") else None


def _decision(mode: str, extracted: bool, components: list[str], max_abs: float | None, min_diff: float,
              present: bool) -> TextEncoderDecision:
    if not present:
        message = "text encoder: not in both checkpoints, not extracted"
    elif mode == "on":
        message = "text encoder: extracted (--text-encoders on)"
    elif mode == "off":
        message = "text encoder: not extracted (--text-encoders off)"
    elif extracted:
        message = f"text encoder differs (max |ΔW| {max_abs:.3g}): extracted"
    else:
        message = (f"text encoder identical within {min_diff:g} (max |ΔW| {max_abs or 0.0:.3g}): not extracted — "
                   "pass --text-encoders on to force")
    return TextEncoderDecision(mode, extracted, components, max_abs, min_diff, message)


def _why_empty(result: ExtractResult) -> str:
    """Why every module was skipped: counts per reason."""
    labels = {"identical": "identical to the base", "negligible": "negligible", "text encoder": "text encoder not extracted"}
    counts: dict[str, int] = {}
    for m in result.skipped:
        label = next((v for k, v in labels.items() if (m.skipped or "").startswith(k)), m.skipped or "")
        counts[label] = counts.get(label, 0) + 1
    return "every targeted module was skipped (" + "; ".join(f"{label}: {n}" for label, n in sorted(counts.items())) + ")"


# ------------------------------------------------------------------------- metadata


def _method_text(result: ExtractResult) -> str:
    ranks = f"rank {result.rank}" if result.dynamic is None else (
        f"{result.dynamic} {result.threshold:g}" + (f" capped at rank {result.rank}" if result.rank else ""))
    conv = f", conv rank {result.conv_rank}" if result.conv_rank else ""
    clamp = f", clamped at the {result.clamp_quantile:g} |value| quantile" if result.clamp_quantile is not None else ""
    return f"{ranks}{conv}, {result.method} SVD{clamp}"


def _hash_text(inp: Input) -> str:
    if isinstance(inp.autov3, dict):
        parts = [f"{k} {v}" for k, v in inp.autov3.items() if v]
        return f" (AutoV3 {', '.join(parts)})" if parts else ""
    return f" (AutoV3 {inp.autov3})" if inp.autov3 else ""


def _metadata(out: Path, result: ExtractResult) -> dict[str, str]:
    """kohya's ss_* and modelspec.* fields (the encoders add architecture and version)."""
    fixed = result.dynamic is None
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(result.rank) if fixed else "Dynamic",
        "ss_network_alpha": str(float(result.rank)) if fixed and result.rank else "Dynamic",
        "ss_network_args": json.dumps(
            {"conv_dim": str(result.conv_rank), "conv_alpha": str(float(result.conv_rank))} if result.conv_rank else {}, allow_nan=False),
        "ss_sd_model_name": Path(result.base.path).name,
        "modelspec.title": out.stem,
        "modelspec.resolution": RESOLUTION[result.family],
        "modelspec.description": (
            f"LoRA extracted by loratool {__version__} from {Path(result.tuned.path).name}{_hash_text(result.tuned)} "
            f"against {Path(result.base.path).name}{_hash_text(result.base)}: {_method_text(result)}"
        ),
    }
    if result.family in IMPLEMENTATION:
        meta["modelspec.implementation"] = IMPLEMENTATION[result.family]
    meta["modelspec.architecture"] = MODELSPEC_ARCH[result.family] + "/lora"
    return meta


def _extra_metadata(result: ExtractResult) -> dict[str, str]:
    record = {
        "tool": f"loratool {__version__}",
        "base": {"name": Path(result.base.path).name, "layout": result.base.layout, "autov3": result.base.autov3},
        "tuned": {"name": Path(result.tuned.path).name, "layout": result.tuned.layout, "autov3": result.tuned.autov3},
        "rank": result.rank, "conv_rank": result.conv_rank, "method": result.method, "dynamic": result.dynamic,
        "threshold": result.threshold, "clamp_quantile": result.clamp_quantile, "dtype": result.dtype,
        "text_encoders": result.text_encoders.message,
        "skipped": len(result.skipped),
    }
    return {EXTRACT_METADATA_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)}


# ----------------------------------------------------------------------- verification


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit patterns (compared as integers: several times faster
    than ``torch.equal`` on fp16)."""
    import torch

    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = ints.get(a.element_size())
    return torch.equal(a.view(view), b.view(view)) if view else torch.equal(a, b)


def _verify(path: Path, family: str, modules: list[AdapterModule], factors: dict[ModuleKey, tuple[Any, Any]]) -> None:
    """Re-read the written adapter: every module present at scale 1 with exactly the
    factors computed, and nothing else."""
    from loratool.formats.decode import decode
    from loratool.io.sources import open_source

    source = open_source(path)
    try:
        written = decode(source, family=family)
        wrong: list[str] = []
        for m in modules:
            o = written.modules.get(m.key)
            up, down = factors[m.key]
            if o is None or not {"lora_up", "lora_down"} <= set(o.params) or abs(o.scale - 1.0) > 1e-6:
                wrong.append(f"{m.source_name} (missing, or not at scale 1)")
                continue
            got_up = o.params["lora_up"].load().reshape(up.shape)
            got_down = o.params["lora_down"].load().reshape(down.shape)
            if not (_same_bits(got_up, up) and _same_bits(got_down, down)):
                wrong.append(f"{m.source_name} (factors differ)")
        extra = set(written.modules) - {m.key for m in modules}
        if extra:
            wrong.append(f"{len(extra)} module(s) not extracted, e.g. {sorted(map(str, extra))[0]}")
        if written.unknown_keys:
            wrong.append(f"unrecognised keys, e.g. {written.unknown_keys[0]}")
    finally:
        source.close()
    if wrong:
        raise ConversionError(path, f"verification failed: {len(wrong)} problem(s), e.g. {wrong[0]}; nothing was written")

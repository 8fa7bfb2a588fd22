"""One streamed pass over a safetensors file's data: NaN/Inf, module norms and the data hash.

The data area is read front to back in blocks of whole tensors (about 16 MiB, or one
tensor when it is larger) with ``pread``; a worker thread hashes each block while the
main thread checks its tensors (torch on one thread), so the pass costs about one SHA-256
of the file. A
module's tensors are processed together: those outside the current block are read with
``pread`` there and then (they usually sit right beside each other), so memory stays
bounded by one block plus one module, whatever the tensor order.

Per module, ``‖ΔW‖_F · scale`` is computed without forming ΔW for LoRA:
``‖U D‖_F² = trace((UᵀU)(DDᵀ))`` with two r×r Gram matrices, whose diagonals also give
each factor's sum of squares (a NaN or Inf anywhere makes it non-finite). Other types
form ΔW one module at a time with :func:`loratool.networks.delta_weight`; types whose ΔW
depends on the base weight (IA3, GLoRA, OFT, BOFT) get no norm. DoRA's magnitude is
not part of the norm.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loratool.errors import InputError
from loratool.io.hashing import AUTOV3_HEADER_CAP
from loratool.io.safetensors import TORCH_DTYPES, SafetensorsHeader, TensorInfo, open_input
from loratool.model import AdapterModule, ModuleKey
from loratool.networks import NETWORK_TYPES, delta_weight

if TYPE_CHECKING:
    import torch

BLOCK = 16 * 1024 * 1024
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
GRAM_TYPES = frozenset({"lora", "locon"})


@dataclass
class DataStats:
    """What the data pass found. ``norms`` maps each module to ‖ΔW‖_F·|scale| (None when
    it depends on the base weight); ``failed`` maps modules whose math failed to why."""

    nonfinite: dict[str, int] = field(default_factory=dict)
    norms: dict[ModuleKey, float | None] = field(default_factory=dict)
    failed: dict[ModuleKey, str] = field(default_factory=dict)
    data_sha256: str | None = None  # SHA-256 of everything after the header (kohya's sshs_model_hash)
    autov3: str | None = None  # Civitai's AutoV3 (the same, except for headers ≥ 16 MiB)


def _torch_tensor(raw: memoryview | bytearray, info: TensorInfo, offset: int = 0) -> torch.Tensor:
    """A view of stored bytes as a tensor (copied only when misaligned for its dtype)."""
    import torch

    dtype = getattr(torch, TORCH_DTYPES[info.dtype])
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    if offset % dtype.itemsize:
        raw = bytearray(raw)
    return torch.frombuffer(raw, dtype=dtype).reshape(info.shape)


def _sumsq(t: torch.Tensor) -> float:
    import torch

    return float(torch.sum(torch.square(t.to(torch.float32)), dtype=torch.float32))


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN/Inf elements of a float tensor."""
    import torch

    return int((~torch.isfinite(t)).sum())


def _check_finite(t: torch.Tensor, sumsq: float) -> int:
    """0 when ``sumsq`` is finite; otherwise count exactly (it may be an overflow)."""
    return 0 if math.isfinite(sumsq) else count_nonfinite(t)


def _gram_norm(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(‖a @ b‖_F, ‖a‖², ‖b‖²) for a ``[m, r]`` and b ``[r, n]`` without forming a @ b."""
    import torch

    a, b = a.to(torch.float32), b.to(torch.float32)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    g_a, g_b = a.T @ a, b @ b.T
    sq = float((g_a * g_b).sum())
    norm = math.sqrt(max(sq, 0.0)) if math.isfinite(sq) else math.inf
    return norm, float(torch.trace(g_a)), float(torch.trace(g_b))


def _lokr_norm(t: Mapping[str, torch.Tensor]) -> float:
    """‖kron(W1, W2)‖_F = ‖W1‖_F · ‖W2‖_F, each factor full or low-rank (W2 maybe Tucker)."""
    import torch

    def full(x: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(x.to(torch.float32).reshape(-1)))

    w1 = full(t["lokr_w1"]) if "lokr_w1" in t else _gram_norm(t["lokr_w1_a"], t["lokr_w1_b"])[0]
    if "lokr_w2" in t:
        w2 = full(t["lokr_w2"])
    elif "lokr_t2" in t:
        core, w_a, w_b = (t[k].to(torch.float32) for k in ("lokr_t2", "lokr_w2_a", "lokr_w2_b"))
        w2 = full(torch.einsum("i j ..., i p, j q -> p q ...", core, w_a, w_b.reshape(w_b.shape[0], -1)))
    else:
        w2 = _gram_norm(t["lokr_w2_a"], t["lokr_w2_b"])[0]
    return w1 * w2


def module_stats(m: AdapterModule, tensors: Mapping[str, torch.Tensor]) -> tuple[float | None, dict[str, int]]:
    """(‖ΔW‖_F·|scale| or None, {param: NaN/Inf count}) for one module's loaded tensors."""
    import torch

    floats = {p: t for p, t in tensors.items() if t.is_floating_point()}
    sums: dict[str, float] = {}
    norm: float | None = None
    if m.network_type in GRAM_TYPES and "lora_mid" not in tensors:
        norm, sums["lora_up"], sums["lora_down"] = _gram_norm(floats["lora_up"], floats["lora_down"])
    for p, t in floats.items():
        if p not in sums:
            sums[p] = _sumsq(t)
    bad = {p: n for p, sq in sums.items() if (n := _check_finite(floats[p], sq))}
    ntype = NETWORK_TYPES[m.network_type]
    if norm is None:
        if m.network_type == "lokr":
            norm = _lokr_norm(floats)
        elif ntype.needs_base or ntype.delta is None:
            return None, bad
        else:
            params = {p: t for p, t in tensors.items() if p != "dora_scale"}
            dw = delta_weight(m.network_type, params, m.alpha, scale=1.0)
            norm = float(torch.linalg.vector_norm(dw.reshape(-1)))
    return _scaled(norm, m), bad


def _scaled(norm: float, m: AdapterModule) -> float:
    return norm * abs(m.scale) if math.isfinite(norm) else norm


@dataclass
class _Block:
    start: int
    end: int
    tensors: list[TensorInfo]


def _blocks(header: SafetensorsHeader) -> Iterator[_Block]:
    """Contiguous reads covering the data area, each ending on a tensor boundary."""
    pos = header.data_start
    current: list[TensorInfo] = []
    begin = pos
    for info in sorted(header.tensors.values(), key=lambda t: (t.start, t.end)):
        if current and info.end - begin > BLOCK:
            yield _Block(begin, pos, current)
            current, begin = [], pos
        current.append(info)
        pos = max(pos, info.end)
    if current:
        yield _Block(begin, pos, current)
    while pos < header.file_size:  # bytes after the last tensor still count for the hash
        end = min(pos + BLOCK, header.file_size)
        yield _Block(pos, end, [])
        pos = end


def _pread_into(fd: int, buf: bytearray, offset: int, path: str) -> None:
    view = memoryview(buf)
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InputError(path, "truncated while reading tensor data")
        done += n


class _Hasher:
    """SHA-256 of the data area (and Civitai's AutoV3 when it differs) on a worker thread."""

    def __init__(self, header: SafetensorsHeader, fd: int) -> None:
        self.data = hashlib.sha256()
        self.civitai: Any = None
        if header.header_len >= AUTOV3_HEADER_CAP:  # Civitai hashes from byte 8 then
            self.civitai = hashlib.sha256(os.pread(fd, header.data_start - 8, 8))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratool-validate-hash")
        self.pending: Future[None] | None = None

    def _update(self, buf: bytearray) -> None:
        self.data.update(buf)
        if self.civitai is not None:
            self.civitai.update(buf)

    def submit(self, buf: bytearray) -> None:
        self.wait()
        self.pending = self.pool.submit(self._update, buf)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()


def scan_safetensors(
    header: SafetensorsHeader, modules: list[AdapterModule], progress: Callable[[int], None] | None = None
) -> DataStats:
    """Check every tensor of one safetensors file and hash its data area in one pass."""
    owner: dict[str, AdapterModule] = {}
    for m in modules:
        for ref in m.params.values():
            if ref.key in header.tensors:
                owner[ref.key] = m
    stats = DataStats()
    done: set[str] = set()
    fh = open_input(header.path)
    hasher = _Hasher(header, fh.fileno())
    threads = _one_torch_thread()
    try:
        fd = fh.fileno()
        for block in _blocks(header):
            buf = bytearray(block.end - block.start)
            _pread_into(fd, buf, block.start, header.path)
            hasher.submit(buf)
            view = memoryview(buf)
            for info in block.tensors:
                if info.name in done:
                    continue
                m = owner.get(info.name)
                if m is None:
                    at = info.start - block.start
                    _loose_tensor(stats, info, view[at : at + info.nbytes], at)
                    done.add(info.name)
                    continue
                tensors = {}
                for p, ref in m.params.items():
                    t_info = header.tensors[ref.key]
                    if block.start <= t_info.start and t_info.end <= block.end:
                        at = t_info.start - block.start
                        tensors[p] = _torch_tensor(view[at : at + t_info.nbytes], t_info, at)
                    else:  # elsewhere in the file: read it now, once
                        own = bytearray(t_info.nbytes)
                        _pread_into(fd, own, t_info.start, header.path)
                        tensors[p] = _torch_tensor(own, t_info)
                    done.add(ref.key)
                _module(stats, m, tensors)
            del view
            if progress is not None:
                progress(block.end - block.start)
        hasher.wait()
    finally:
        _restore_torch_threads(threads)
        hasher.close()
        fh.close()
    stats.data_sha256 = hasher.data.hexdigest()
    stats.autov3 = (hasher.civitai or hasher.data).hexdigest()
    return stats


def scan_loaded(modules: list[AdapterModule]) -> DataStats:
    """The same checks for tensors a source holds in memory (weights-only pickles)."""
    stats = DataStats()
    threads = _one_torch_thread()
    try:
        for m in modules:
            _module(stats, m, {p: ref.load() for p, ref in m.params.items()})
    finally:
        _restore_torch_threads(threads)
    return stats


def _one_torch_thread() -> int:
    """Run the per-module math on one thread (the hash worker has the other core; torch's
    thread pool costs more than it gains on r×r matrices, badly so on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


def _restore_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _module(stats: DataStats, m: AdapterModule, tensors: dict[str, torch.Tensor]) -> None:
    try:
        norm, bad = module_stats(m, tensors)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        stats.failed[m.key] = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        bad = {}
        for p, t in tensors.items():
            if t.is_floating_point() and (n := _check_finite(t, _sumsq(t))):
                bad[p] = n
        norm = None
    stats.norms[m.key] = norm
    for p, n in bad.items():
        stats.nonfinite[m.params[p].key] = n


def _loose_tensor(stats: DataStats, info: TensorInfo, raw: memoryview, offset: int) -> None:
    """A tensor outside every module (alpha, unknown keys): only NaN/Inf matter."""
    if info.dtype not in FLOAT_DTYPES or info.numel == 0:
        return
    t = _torch_tensor(raw, info, offset)
    n = _check_finite(t, _sumsq(t))
    if n:
        stats.nonfinite[info.name] = n


def sorted_keys_sha256(header: SafetensorsHeader) -> str:
    """SHA-256 of every tensor's bytes in sorted-key order (OneTrainer's modelspec.hash_sha256)."""
    digest = hashlib.sha256()
    with open_input(header.path) as fh:
        for name in sorted(header.tensors):
            info = header.tensors[name]
            data = os.pread(fh.fileno(), info.nbytes, info.start)
            if len(data) < info.nbytes:
                raise InputError(header.path, f"truncated while reading tensor {name!r}")
            digest.update(data)
    return digest.hexdigest()

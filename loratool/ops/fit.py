"""Where each module of a LoRA lands in a checkpoint: shared by ``check`` and ``merge``.

A LoRA is read in the checkpoint's family (its own detection first: another detected
family is refused as a whole). Each module is either *placed* on the checkpoint tensor that
holds its weight (and bias), or *unplaced* with the reason: not in the family's catalog
(name, or name with another shape), a component the checkpoint does not have, a module
the checkpoint lacks, a bias change for a layer without a bias. Unrecognised keys are
unplaced too. Header-only: no tensor data of the checkpoint is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from loratool import arch
from loratool.checkpoint import Checkpoint, WeightRef
from loratool.formats.weight_shape import weight_io
from loratool.model import Adapter, AdapterModule
from loratool.ops.inspect import load

# Parameters that change the layer's bias, and the weight parameter a type may do without.
BIAS_PARAMS = frozenset({"lora_up_bias", "diff_b", "b_norm"})
OPTIONAL_WEIGHT = {"full": "diff", "norm": "w_norm"}
KNOWN_FAMILIES = (*arch.FAMILIES, "sd3", "flux")


@dataclass(frozen=True)
class Placed:
    """One LoRA module on the checkpoint weight that holds it."""

    module: AdapterModule
    ref: WeightRef
    weight: bool  # changes the weight
    bias: bool  # changes the bias

    @property
    def name(self) -> str:
        return self.module.source_name or str(self.module.key)


@dataclass
class Fit:
    """A LoRA against a checkpoint: what lands where, and what cannot."""

    adapter: Adapter
    family_ok: bool
    placed: list[Placed] = field(default_factory=list)
    unplaced: dict[str, str] = field(default_factory=dict)  # module or key -> reason
    message: str = ""

    @property
    def fits(self) -> bool:
        return self.family_ok and bool(self.placed) and not self.unplaced


def load_for(path: str | os.PathLike[str], ckpt: Checkpoint) -> tuple[Adapter, bool]:
    """Read a LoRA for this checkpoint: (adapter, family agrees). A LoRA whose own detection
    names no family (e.g. a CLIP-L text-encoder LoRA: SD1 or SDXL) is read as the
    checkpoint's family; one detected as another family is returned as it is. The caller
    closes the adapter."""
    adapter = load(path)
    if adapter.family == ckpt.family:
        return adapter, True
    if adapter.family in KNOWN_FAMILIES:
        return adapter, False
    adapter.close()
    return load(path, family=ckpt.family), True


def fit(adapter: Adapter, ckpt: Checkpoint, family_ok: bool = True) -> Fit:
    """Place every module of ``adapter`` (read in the checkpoint's family) in ``ckpt``."""
    result = Fit(adapter, family_ok)
    if not family_ok:
        result.message = f"LoRA is {adapter.family}, checkpoint is {ckpt.family}"
        return result
    catalog = ckpt.catalog
    present = set(ckpt.components)
    for m in adapter.modules.values():
        name = m.source_name or str(m.key)
        reason = _unresolved_reason(m, catalog) if not m.resolved else None
        if reason is None and m.key.component not in present:
            reason = f"the checkpoint has no {m.key.component}"
        if reason is None:
            reason, placed = _place(m, ckpt)
            if placed is not None:
                result.placed.append(placed)
                continue
        result.unplaced[name] = reason or "not placed"
    for key in adapter.unknown_keys:
        result.unplaced.setdefault(key, "unrecognised key")
    n = len(result.placed)
    result.message = (
        f"{n} module(s) placed" if result.fits
        else f"{len(result.unplaced)} of {n + len(result.unplaced)} module(s)/key(s) have no place in the checkpoint"
        if result.unplaced else "nothing to place"
    )
    return result


def _place(m: AdapterModule, ckpt: Checkpoint) -> tuple[str | None, Placed | None]:
    key = (m.key.component, m.key.path)
    ref = ckpt.resolution.refs.get(key)
    if ref is None:
        wrong = next((r for r in ckpt.resolution.mismatched if (r.spec.component, r.spec.path) == key), None)
        if wrong is not None:
            return f"the checkpoint holds {wrong.tensor.key} as {list(wrong.shape)}, not {list(wrong.spec.shape)}", None
        return "the checkpoint lacks this module's weight", None
    params = set(m.params)
    weight = m.network_type not in OPTIONAL_WEIGHT or OPTIONAL_WEIGHT[m.network_type] in params
    bias = bool(params & BIAS_PARAMS)
    if bias and ref.bias is None:
        return f"changes a bias, but {ref.tensor.key} has none", None
    return None, Placed(m, ref, weight, bias)


def _unresolved_reason(m: AdapterModule, catalog: arch.Catalog | None) -> str:
    """Why decoding found no catalog module: an unknown name, or a known one with another shape."""
    family = catalog.family if catalog is not None else "checkpoint's"
    spec = None
    if catalog is not None:
        name = m.source_name
        spec = catalog.resolve_kohya(name) or catalog.resolve_ldm(name) or catalog.get(m.key.component, m.key.path)
    if spec is None:
        return f"no module of the {family} catalog has this name"
    out_f, in_f = weight_io(m.network_type, {k: v.shape for k, v in m.params.items()})
    return f"shape mismatch: the LoRA's weight is [{out_f}, {in_f}], {spec.component}.{spec.path} is {list(spec.shape)}"

"""Match a base and a fine-tuned checkpoint module by module (for ``extract``).

The two may be in different layouts and dtypes (a single file against a diffusers folder,
fp16 against bf16); they must be of one supported family and hold every catalog module of
the components compared with the same shape. The first thing that does not fit is named
and nothing is paired.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from loratool.arch.spec import ModuleSpec
from loratool.checkpoint.reader import Checkpoint, WeightRef
from loratool.errors import InputError


@dataclass(frozen=True)
class ModulePair:
    """One catalog module in both checkpoints."""

    spec: ModuleSpec
    base: WeightRef
    tuned: WeightRef


def pair_checkpoints(
    base: Checkpoint, tuned: Checkpoint, components: Iterable[str] | None = None
) -> list[ModulePair]:
    """Every catalog module of ``components`` (default: those both hold) in both
    checkpoints, in the base's storage order (modules neither holds are left out; the
    checkpoints' warnings name them). Raises :class:`InputError` naming the first mismatch:
    another family, an unsupported family, a component or module one of them lacks, a
    shape that differs."""
    if not base.supported:
        raise InputError(base.path, f"no module catalog for {base.family} checkpoints")
    if tuned.family != base.family:
        raise InputError(tuned.path, f"is {tuned.family}, the base {base.path} is {base.family}")
    wanted = tuple(components) if components is not None else tuple(c for c in base.components if c in tuned.components)
    for c in wanted:
        for ckpt in (base, tuned):
            if c not in ckpt.components:
                raise InputError(ckpt.path, f"has no {c}")
    pairs: list[ModulePair] = []
    for ref in base.module_refs():
        spec = ref.spec
        if spec.component not in wanted:
            continue
        other = tuned.resolution.refs.get((spec.component, spec.path))
        if other is None:
            raise InputError(tuned.path, f"lacks {spec.component}.{spec.path}, which the base has (or holds it with another shape)")
        pairs.append(ModulePair(spec, ref, other))
    extra = [k for k in tuned.resolution.refs if k[0] in wanted and k not in base.resolution.refs]
    if extra:
        raise InputError(base.path, f"lacks {extra[0][0]}.{extra[0][1]}, which the tuned checkpoint has (or holds it with another shape)")
    return pairs

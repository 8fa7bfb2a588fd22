"""The normalised adapter: what every format decodes to and encodes from.

Module names are canonical: ``component`` is a diffusers component name (``unet``,
``text_encoder``, ``text_encoder_2``, ``transformer``…) and ``path`` is the module's dotted
``named_modules()`` path inside it, spelled as diffusers/HF name it with CLIP's
``text_model.`` level kept (FORMATS.md §9). Parameter names are canonical too: the
kohya/LyCORIS spellings without ``.weight`` (``lora_down``, ``lora_up``, ``lora_mid``,
``hada_w1_a``…, ``lokr_w1``…, ``dora_scale``, ``diff``, ``diff_b``, ``w_norm``, ``b_norm``,
``oft_blocks``, ``rescale``, ``a1``…, ``weight``/``on_input`` for IA3) plus
``lora_up_bias`` for PEFT's ``lora_B.bias``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class TensorRef:
    """A tensor in a source file, known by key, dtype and shape; loaded on demand."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    loader: Callable[[str], torch.Tensor] = field(repr=False, compare=False)
    raw_loader: Callable[[str], bytes] | None = field(default=None, repr=False, compare=False)
    location: tuple[str, int] | None = None  # (file, byte offset) of the stored bytes

    def load(self) -> torch.Tensor:
        return self.loader(self.key)

    def raw(self) -> bytes | None:
        """The stored bytes (little-endian, ``dtype``), or None if the source has no such view."""
        return self.raw_loader(self.key) if self.raw_loader else None


@dataclass(frozen=True, order=True)
class ModuleKey:
    """A module's canonical identity: component and dotted path."""

    component: str
    path: str

    def __str__(self) -> str:
        return f"{self.component}.{self.path}"


@dataclass
class AdapterModule:
    """One adapted module: its tensors (lazy), alpha and network type.

    ``alpha`` is the kohya-convention alpha, so that ``scale == alpha / rank`` for every
    source format (decoders fold PEFT's ``lora_alpha``, patterns and rsLoRA into it);
    ``None`` means absent (scale 1).
    """

    key: ModuleKey
    params: dict[str, TensorRef]
    network_type: str
    alpha: float | None = None
    source_name: str = ""
    resolved: bool = False
    dora_axis: str | None = None  # "out" (PEFT, LyCORIS ≥3.2) or "in" (older LyCORIS)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.params

    @property
    def rank(self) -> int | None:
        from loratool.networks import rank_of

        return rank_of(self.network_type, {k: v.shape for k, v in self.params.items()})

    @property
    def effective_alpha(self) -> float | None:
        """Alpha with "absent" made explicit as the rank (None for rank-less types)."""
        if self.alpha is not None:
            return self.alpha
        rank = self.rank
        return float(rank) if rank is not None else None

    @property
    def scale(self) -> float:
        """alpha/rank, or the source format's own scale where kohya's rule has none
        (``extra["scale"]``: PEFT LoKr with both factors full)."""
        from loratool.networks import scale_of

        if "scale" in self.extra:
            return self.extra["scale"]
        return scale_of(
            self.network_type, {k: v.shape for k, v in self.params.items()}, self.alpha
        )


@dataclass
class Adapter:
    """A whole adapter file or folder, normalised."""

    path: str
    format: str
    variant: str
    family: str
    family_evidence: list[str]
    modules: dict[ModuleKey, AdapterModule]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    unknown_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    complete: bool = True
    # Modules whose keys were recognised but whose values cannot be used (shapes that do
    # not fit together, integer factors, an alpha that is NaN/Inf or beyond float32…):
    # source module name -> why. They are not in ``modules``.
    invalid_modules: dict[str, str] = field(default_factory=dict)
    # Of those, what is wrong with each: "shape" (factors that do not join, a dora_scale
    # that fits neither axis, an alpha of several values), "nonfinite" (a NaN/Inf alpha or
    # scale) or "value" (integer factors, a boolean alpha, out of float32 range…).
    invalid_kinds: dict[str, str] = field(default_factory=dict)

    _closer: Callable[[], None] | None = field(default=None, init=False, repr=False, compare=False)

    def attach(self, closer: Callable[[], None]) -> None:
        """Hand the adapter the function that releases its source's open files."""
        self._closer = closer

    def close(self) -> None:
        """Release the source's open file handles (idempotent). Module tensors stay
        readable: a later ``TensorRef.load()`` opens the file again until the next close."""
        if self._closer is not None:
            self._closer()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The per-family catalog: every targetable module and the lookup tables over its names."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cache

from loratool.arch.clip import text_encoder_modules
from loratool.arch.families import FAMILIES, FAMILY_CONFIGS, FamilyConfig
from loratool.arch.raw import RawModule
from loratool.arch.spec import ModuleSpec
from loratool.arch.unet import unet_modules


def flatten(prefix: str, path: str) -> str:
    """kohya's flattened name: ``prefix + "_" + path`` with every ``.`` made ``_``."""
    return f"{prefix}_{path.replace('.', '_')}"


class Catalog:
    """All LoRA-targetable modules of one family, with dictionary lookups by every name.

    Build it with :func:`get_catalog`; lookups never guess where underscores were dots.
    """

    def __init__(
        self, family: str, modules: Iterable[ModuleSpec], ldm_aliases: dict[str, ModuleSpec]
    ) -> None:
        self.family = family
        self.modules: tuple[ModuleSpec, ...] = tuple(modules)
        self._by_path: dict[tuple[str, str], ModuleSpec] = {}
        self._by_kohya: dict[str, ModuleSpec] = {}
        for spec in self.modules:
            _put(self._by_path, (spec.component, spec.path), spec, family)
            for name in spec.kohya_names:
                _put(self._by_kohya, name, spec, family)
        self._by_ldm = ldm_aliases
        groups: dict[str, list[ModuleSpec]] = {}
        for spec in self.modules:
            groups.setdefault(spec.component, []).append(spec)
        self._by_component = {c: tuple(specs) for c, specs in groups.items()}

    def __repr__(self) -> str:
        return f"Catalog({self.family!r}, {len(self.modules)} modules)"

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[ModuleSpec]:
        return iter(self.modules)

    def get(self, component: str, path: str) -> ModuleSpec | None:
        """The module at a diffusers component and dotted path, or None."""
        return self._by_path.get((component, path))

    def resolve_kohya(self, lora_name: str) -> ModuleSpec | None:
        """The module a kohya flattened name (no ``.param`` suffix) refers to, or None."""
        return self._by_kohya.get(lora_name)

    def resolve_ldm(self, dotted: str) -> ModuleSpec | None:
        """The module at a dotted single-file path, or None.

        Accepts ``[model.]diffusion_model.<LDM/SGM path>``, the checkpoint's text-encoder
        paths (``cond_stage_model.…``, ``conditioner.embedders.N.…``; for OpenCLIP's fused
        attention, ``…attn.q_proj``/``k_proj``/``v_proj``), and ComfyUI's
        ``text_encoders.<clip_l|clip_g|clip_h>.transformer.<HF path>``. A trailing
        ``.weight`` is tolerated.
        """
        if dotted.startswith("model.diffusion_model."):
            dotted = dotted[len("model.") :]
        spec = self._by_ldm.get(dotted)
        if spec is None and dotted.endswith(".weight"):
            spec = self._by_ldm.get(dotted[: -len(".weight")])
        return spec

    def kohya_name(self, spec: ModuleSpec) -> str:
        """The spelling loratool writes for this module."""
        return spec.kohya_names[0]

    def components(self) -> tuple[str, ...]:
        """The family's components in catalog order (``unet`` first)."""
        return tuple(self._by_component)

    def of(self, component: str) -> tuple[ModuleSpec, ...]:
        """The modules of one component."""
        return self._by_component.get(component, ())


def _put(table: dict, key: object, spec: ModuleSpec, family: str) -> None:
    other = table.setdefault(key, spec)
    if other is not spec:
        raise RuntimeError(f"{family}: name {key!r} means both {other.path} and {spec.path}")


def _unet_names(cfg: FamilyConfig, raw: RawModule) -> tuple[str, ...]:
    by_naming = {
        "diffusers": flatten(cfg.unet_kohya_prefix, raw.path),
        "ldm": flatten(cfg.unet_kohya_prefix, raw.ldm_path or ""),
    }
    first = by_naming.pop(cfg.unet_kohya_naming)
    return (first, *by_naming.values())


def _build(cfg: FamilyConfig) -> Catalog:
    specs: list[ModuleSpec] = []
    aliases: dict[str, ModuleSpec] = {}

    def add(component: str, raw: RawModule, names: tuple[str, ...]) -> None:
        spec = ModuleSpec(
            component=component,
            path=raw.path,
            kind=raw.kind,
            shape=raw.shape,
            ldm_key=raw.ldm_key,
            ldm_slice=raw.ldm_slice,
            ldm_transposed=raw.ldm_transposed,
            kohya_names=names,
            target=raw.target,
            block=raw.block,
        )
        specs.append(spec)
        for alias in raw.ldm_paths:
            _put(aliases, alias, spec, cfg.name)

    for raw in unet_modules(cfg.unet):
        add("unet", raw, _unet_names(cfg, raw))
    for te in cfg.text_encoders:
        for raw in text_encoder_modules(te):
            add(te.component, raw, tuple(flatten(p, raw.path) for p in te.kohya_prefixes))
    return Catalog(cfg.name, specs, aliases)


@cache
def get_catalog(family: str) -> Catalog:
    """The (cached) catalog of a family in :data:`FAMILIES`; ValueError for others."""
    cfg = FAMILY_CONFIGS.get(family)
    if cfg is None:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return _build(cfg)


def kohya_prefixes(family: str) -> dict[str, str]:
    """component -> the kohya prefix loratool writes (``lora_unet``, ``lora_te1``…)."""
    cfg = FAMILY_CONFIGS.get(family)
    if cfg is None:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    out = {"unet": cfg.unet_kohya_prefix}
    out.update((te.component, te.kohya_prefixes[0]) for te in cfg.text_encoders)
    return out

"""Building a family's module catalog from data is cheap: time each build, beside the
baseline it replaces (diffusers' and transformers' own models built on the meta device
just to list their modules). Moved here from a wall-time assert in the tests."""

from __future__ import annotations

import time

REPEAT = 5


def _best(fn) -> float:  # type: ignore[no-untyped-def]
    runs = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs)


def run() -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from loratool.arch import FAMILIES
    from loratool.arch.catalog import _build
    from loratool.arch.families import FAMILY_CONFIGS
    from tests.test_arch import TE_CONFIGS, UNET_CONFIGS

    def models(family: str) -> int:
        with torch.device("meta"):
            mods = list(UNet2DConditionModel(**UNET_CONFIGS[family]).named_modules())
            for (fam, _), (cls, cfg) in TE_CONFIGS.items():
                if fam == family:
                    mods += list(cls(CLIPTextConfig(**cfg)).named_modules())
        return len(mods)

    for family in FAMILIES:
        ours = _best(lambda f=family: _build(FAMILY_CONFIGS[f]))
        peer = _best(lambda f=family: models(f))
        print(f"   {family}: catalog build {ours * 1000:.1f} ms vs meta-device models {peer * 1000:.0f} ms"
              f" -> {peer / ours:.0f}x (goal: build < 50 ms)")

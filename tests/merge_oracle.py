"""The ecosystem's own fuse, as an oracle for ``loratool merge`` (a helper module for tests).

diffusers/transformers models are built from the published configs on the meta device and
given real but uninitialised storage (``to_empty``: no page is touched); LoRAs are loaded
with diffusers' loaders (kohya and diffusers files) or PEFT (PEFT folders); only the
adapted layers get base weights — the same seeded values the real-shaped test checkpoint
holds (fixtures/checkpoints.py) — and diffusers' ``fuse_lora`` / ``fuse_text_encoder_lora``
(or ``set_adapters`` weights, for several LoRAs) merges them. The fused layers are then
compared with the tensors ``loratool merge`` wrote, through the single-file table (fused
q/k/v rows, transposed projection) — never through loratool's own catalog.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import fuse_text_encoder_lora, set_adapters_for_text_encoder
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from fixtures.checkpoints import FAMILIES, CkptTensor, Piece, checkpoint_table, piece_value, select
from tests.test_convert_oracles import _assert_clean, _strict_loading

PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@dataclass(frozen=True)
class Input:
    """One LoRA for the oracle: how to load it (diffusers | peft) and its weights."""

    path: Path
    loader: str = "diffusers"
    te: float = 1.0
    unet: float = 1.0


def build_models(family: str) -> dict[str, torch.nn.Module]:
    """UNet + text encoders of a family, meta-built, with uninitialised CPU storage."""
    import transformers

    fam = FAMILIES[family]
    with torch.device("meta"):
        models: dict[str, torch.nn.Module] = {"unet": UNet2DConditionModel(**fam.unet)}
        for te in fam.text_encoders:
            cls = getattr(transformers, te.model_class)
            models[te.component] = cls(transformers.CLIPTextConfig(**te.config))
    return {c: m.to_empty(device="cpu") for c, m in models.items()}


def load(models: dict[str, torch.nn.Module], family: str, lora: Input, adapter: str) -> None:
    """Inject one LoRA into the models the way its ecosystem does."""
    with _strict_loading() as messages:
        if lora.loader == "peft":
            folders = [(c, lora.path / c) for c in models if (lora.path / c / "adapter_config.json").exists()]
            for component, sub in folders or [(_peft_component(lora.path), lora.path)]:
                PeftModel.from_pretrained(models[component], sub, adapter_name=adapter)
        else:
            pipe = PIPELINES[family]
            kwargs = {"unet_config": types.SimpleNamespace(**models["unet"].config)} if family.startswith("sdxl") else {}
            state_dict, alphas, meta = pipe.lora_state_dict(str(lora.path), return_lora_metadata=True, **kwargs)
            if any(k.startswith("unet.") for k in state_dict):
                pipe.load_lora_into_unet(state_dict, alphas, models["unet"], adapter_name=adapter, metadata=meta)
            for component in models:
                if component != "unet" and any(k.startswith(component + ".") for k in state_dict):
                    pipe.load_lora_into_text_encoder(
                        state_dict, alphas, models[component], prefix=component, adapter_name=adapter, metadata=meta
                    )
    _assert_clean(messages)


def _peft_component(folder: Path) -> str:
    import json

    auto = json.loads((folder / "adapter_config.json").read_text()).get("auto_mapping") or {}
    return {"UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder", "CLIPTextModelWithProjection": "text_encoder_2"}.get(
        auto.get("base_model_class", ""), "text_encoder"
    )


def adapted(models: dict[str, torch.nn.Module]) -> dict[tuple[str, str], BaseTunerLayer]:
    """(component, module path) -> the LoRA layer, for every adapted layer."""
    out = {}
    for component, model in models.items():
        for name, mod in model.named_modules():
            if isinstance(mod, BaseTunerLayer) and any(getattr(mod, n, None) for n in mod.adapter_layer_names):
                out[(component, name.removeprefix("base_model.model."))] = mod
    return out


def pieces(table: list[CkptTensor]) -> dict[tuple[str, str], tuple[CkptTensor, Piece]]:
    return {(p.component, p.key): (t, p) for t in table for p in t.pieces}


def set_base_weights(layers: dict[tuple[str, str], BaseTunerLayer], table: list[CkptTensor], seed: int, dtype: torch.dtype) -> None:
    """Give each adapted layer the checkpoint's values (rounded through its stored dtype)."""
    where = pieces(table)
    with torch.no_grad():
        for (component, path), layer in layers.items():
            base = layer.get_base_layer()
            for param in ("weight", "bias"):
                target = getattr(base, param, None)
                if target is None:
                    continue
                t, p = where[(component, f"{path}.{param}")]
                target.copy_(piece_value(t, p, seed).to(dtype).to(torch.float32).reshape(target.shape))


def fuse(models: dict[str, torch.nn.Module], inputs: list[Input]) -> None:
    """diffusers' fuse: ``fuse_lora(lora_scale)`` for one LoRA; ``set_adapters`` weights for several."""
    names = [f"l{i}" for i in range(len(inputs))]
    for component, model in models.items():
        te = component != "unet"
        weights = [x.te if te else x.unet for x in inputs]
        if len(inputs) == 1:
            (fuse_text_encoder_lora(model, lora_scale=weights[0]) if te else model.fuse_lora(lora_scale=weights[0]))
            continue
        present = [n for n in names if any(n in getattr(m, "lora_A", {}) for m in model.modules() if isinstance(m, BaseTunerLayer))]
        if not present:
            continue
        ws = [w for n, w in zip(names, weights) if n in present]
        if te:
            set_adapters_for_text_encoder(present, model, ws)
            fuse_text_encoder_lora(model, adapter_names=present)
        else:
            model.set_adapters(present, weights=ws)
            model.fuse_lora(adapter_names=present)


def partial_table(family: str, layers: dict[tuple[str, str], BaseTunerLayer]) -> list[CkptTensor]:
    return select(checkpoint_table(family), layers)


def compare(out: Path, layers: dict[tuple[str, str], BaseTunerLayer], table: list[CkptTensor], rtol: float) -> int:
    """Each fused layer's weight equals what loratool wrote for it; returns the count."""
    where = pieces(table)
    n = 0
    with safe_open(str(out), "pt") as f:
        for (component, path), layer in sorted(layers.items()):
            t, p = where[(component, f"{path}.weight")]
            got = f.get_tensor(t.key).to(torch.float32)
            if p.rows is not None:
                got = got[p.rows[0] : p.rows[1]]
            if p.transposed:
                got = got.T
            want = layer.get_base_layer().weight.detach().to(torch.float32)
            got = got.reshape(want.shape)
            diff = (got - want).abs().max().item()
            scale = want.abs().max().item()
            assert diff <= rtol * scale, f"{component}.{path}: max |loratool - diffusers fuse| = {diff:.3g} (max |W| {scale:.3g})"
            n += 1
    return n

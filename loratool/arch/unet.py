"""The modules of a ``UNet2DConditionModel`` layout, with their LDM/SGM names.

Block rules: FORMATS.md §2.1 (transformer internals, same in both worlds) and §3
(``input_blocks``/``middle_block``/``output_blocks`` indices, resnet internals).
"""

from __future__ import annotations

from collections.abc import Iterator

from loratool.arch.families import UNetConfig
from loratool.arch.raw import RawModule

UNET_LDM_PREFIX = "model.diffusion_model."

# (diffusers name, LDM name) of the parts of a resnet; FORMATS.md §3.2.
_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_TARGET = {"norm1": "resnet.norm1", "norm2": "resnet.norm2"}


def _unet(
    path: str, ldm: str, kind: str, shape: tuple[int, ...], target: str, block: str
) -> RawModule:
    return RawModule(
        path=path,
        kind=kind,
        shape=shape,
        target=target,
        block=block,
        ldm_key=f"{UNET_LDM_PREFIX}{ldm}.weight",
        ldm_paths=(f"diffusion_model.{ldm}",),
        ldm_path=ldm,
    )


def _resnet(path: str, ldm: str, cin: int, cout: int, temb: int) -> Iterator[RawModule]:
    parts: list[tuple[str, str, tuple[int, ...]]] = [
        ("norm1", "norm", (cin,)),
        ("conv1", "conv", (cout, cin, 3, 3)),
        ("time_emb_proj", "linear", (cout, temb)),
        ("norm2", "norm", (cout,)),
        ("conv2", "conv", (cout, cout, 3, 3)),
    ]
    if cin != cout:
        parts.append(("conv_shortcut", "conv", (cout, cin, 1, 1)))
    for name, kind, shape in parts:
        yield _unet(
            f"{path}.{name}",
            f"{ldm}.{_RESNET_LDM[name]}",
            kind,
            shape,
            _RESNET_TARGET.get(name, name),
            "ResnetBlock2D",
        )


def _transformer_block(c: int, ctx: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """Modules of one BasicTransformerBlock (names identical in diffusers and LDM)."""
    parts: list[tuple[str, str, tuple[int, ...]]] = [("norm1", "norm", (c,))]
    for attn, kv_in in (("attn1", c), ("attn2", ctx)):
        parts += [
            (f"{attn}.to_q", "linear", (c, c)),
            (f"{attn}.to_k", "linear", (c, kv_in)),
            (f"{attn}.to_v", "linear", (c, kv_in)),
            (f"{attn}.to_out.0", "linear", (c, c)),
        ]
        parts.append(("norm2" if attn == "attn1" else "norm3", "norm", (c,)))
    parts += [("ff.net.0.proj", "linear", (8 * c, c)), ("ff.net.2", "linear", (c, 4 * c))]
    return parts


def _transformer(path: str, ldm: str, c: int, depth: int, cfg: UNetConfig) -> Iterator[RawModule]:
    proj_kind, proj_shape = ("linear", (c, c)) if cfg.linear_proj else ("conv", (c, c, 1, 1))
    block = "Transformer2DModel"
    yield _unet(f"{path}.norm", f"{ldm}.norm", "norm", (c,), "norm", block)
    yield _unet(f"{path}.proj_in", f"{ldm}.proj_in", proj_kind, proj_shape, "proj_in", block)
    parts = _transformer_block(c, cfg.context_dim)
    for k in range(depth):
        for name, kind, shape in parts:
            sub = f"transformer_blocks.{k}.{name}"
            yield _unet(f"{path}.{sub}", f"{ldm}.{sub}", kind, shape, name, block)
    yield _unet(f"{path}.proj_out", f"{ldm}.proj_out", proj_kind, proj_shape, "proj_out", block)


def unet_modules(cfg: UNetConfig) -> Iterator[RawModule]:
    """Every Linear, Conv2d and norm of a ``UNet2DConditionModel`` with this layout."""
    ch, n, per = cfg.channels, len(cfg.channels), cfg.layers_per_block
    temb, c0 = cfg.time_embed_dim, cfg.channels[0]
    top = "UNet2DConditionModel"
    yield _unet("conv_in", "input_blocks.0.0", "conv", (c0, cfg.in_channels, 3, 3), "conv_in", top)
    for name, ldm, shape in (
        ("linear_1", "time_embed.0", (temb, c0)),
        ("linear_2", "time_embed.2", (temb, temb)),
    ):
        yield _unet(
            f"time_embedding.{name}",
            ldm,
            "linear",
            shape,
            f"time_embedding.{name}",
            "TimestepEmbedding",
        )
    if cfg.adm_in is not None:
        for name, ldm, shape in (
            ("linear_1", "label_emb.0.0", (temb, cfg.adm_in)),
            ("linear_2", "label_emb.0.2", (temb, temb)),
        ):
            yield _unet(
                f"add_embedding.{name}",
                ldm,
                "linear",
                shape,
                f"add_embedding.{name}",
                "TimestepEmbedding",
            )

    for i, c in enumerate(ch):
        for j in range(per):
            idx = i * (per + 1) + j + 1
            cin = (ch[i - 1] if i else c) if j == 0 else c
            yield from _resnet(
                f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", cin, c, temb
            )
            if cfg.attention[i]:
                yield from _transformer(
                    f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", c, cfg.depth[i], cfg
                )
        if i < n - 1:
            yield _unet(
                f"down_blocks.{i}.downsamplers.0.conv",
                f"input_blocks.{(i + 1) * (per + 1)}.0.op",
                "conv",
                (c, c, 3, 3),
                "downsamplers.conv",
                "Downsample2D",
            )

    cm = ch[-1]
    yield from _resnet("mid_block.resnets.0", "middle_block.0", cm, cm, temb)
    yield from _transformer("mid_block.attentions.0", "middle_block.1", cm, cfg.mid_depth, cfg)
    yield from _resnet("mid_block.resnets.1", "middle_block.2", cm, cm, temb)

    rev, rev_att, rev_depth = ch[::-1], cfg.attention[::-1], cfg.depth[::-1]
    prev = rev[0]
    for i, c in enumerate(rev):
        skip_in = rev[min(i + 1, n - 1)]
        for j in range(per + 1):
            idx = i * (per + 1) + j
            cin = (prev if j == 0 else c) + (skip_in if j == per else c)
            yield from _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", cin, c, temb)
            if rev_att[i]:
                yield from _transformer(
                    f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", c, rev_depth[i], cfg
                )
        if i < n - 1:
            slot = 2 if rev_att[i] else 1
            yield _unet(
                f"up_blocks.{i}.upsamplers.0.conv",
                f"output_blocks.{i * (per + 1) + per}.{slot}.conv",
                "conv",
                (c, c, 3, 3),
                "upsamplers.conv",
                "Upsample2D",
            )
        prev = c

    yield _unet("conv_norm_out", "out.0", "norm", (c0,), "conv_norm_out", top)
    yield _unet("conv_out", "out.2", "conv", (cfg.out_channels, c0, 3, 3), "conv_out", top)

"""The real-shaped checkpoints the tests and benchmarks generate (fixtures/checkpoints.py)
are what diffusers' own single-file converters read back into its models, key for key.

Each single-file tensor is stood in for by a tiny tensor whose values name it (fused
in_proj rows and the transposed projection get real row counts / shapes), diffusers'
converters map the stand-ins to diffusers names, and every diffusers model tensor must
come out of the single-file tensor and rows the table says, with nothing left over.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu

from fixtures.checkpoints import (
    FAMILIES,
    UNET_PREFIX,
    VAE_CONFIG,
    CkptTensor,
    checkpoint_table,
    meta_shapes,
)


def _stand_in(t: CkptTensor, ident: int) -> torch.Tensor:
    if any(p.rows for p in t.pieces):  # q/k/v rows: row i holds ident*1e6 + i
        return (ident * 1_000_000 + torch.arange(t.shape[0], dtype=torch.float64)).reshape(-1, *([1] * (len(t.shape) - 1)))
    if t.key.endswith("text_projection") and not t.pieces:  # its row count tells diffusers the width
        return torch.full((t.shape[0], 1), float(ident), dtype=torch.float64)
    if any(p.transposed for p in t.pieces):
        return torch.arange(t.shape[0] * t.shape[1], dtype=torch.float64).reshape(t.shape) + ident * 1e7
    if len(t.shape) == 4 and t.key.startswith("first_stage_model.") and ".attn_1." in t.key:
        return torch.full((1, 1, 1, 1), float(ident), dtype=torch.float64)  # diffusers squeezes 1x1 convs
    return torch.full((1,), float(ident), dtype=torch.float64)


def _expected(t: CkptTensor, stand_in: torch.Tensor, piece) -> torch.Tensor:
    v = stand_in
    if piece.rows:
        v = v[piece.rows[0] : piece.rows[1]]
    if piece.transposed:
        v = v.T
    return v


def _check(converted: dict[str, torch.Tensor], table: list[CkptTensor], stand: dict[str, torch.Tensor], component: str, model: dict) -> None:
    pieces = {p.key: (t, p) for t in table for p in t.pieces if p.component == component}
    assert set(pieces) == set(model), "table pieces are not the model's state dict"
    assert {k: p.shape for k, (_, p) in pieces.items()} == model
    missing = set(model) - set(converted)
    assert not missing, f"diffusers' converter did not produce {sorted(missing)[:5]}"
    for key, (t, p) in pieces.items():
        got = converted[key].reshape(-1)
        want = _expected(t, stand[t.key], p).reshape(-1)
        assert torch.equal(got, want), f"{key} does not come from {t.key} {p.rows or ''}"
    # anything else diffusers produced must come from tensors the table marks unused
    unused = {t.key for t in table if not t.pieces}
    for key in set(converted) - set(model):
        assert any(torch.equal(converted[key].reshape(-1)[:1], stand[u].reshape(-1)[:1]) for u in unused), key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_file_table_is_what_diffusers_reads(family: str) -> None:
    fam = FAMILIES[family]
    table = checkpoint_table(family)
    assert len({t.key for t in table}) == len(table)
    stand = {t.key: _stand_in(t, i) for i, t in enumerate(table)}
    unet = sfu.convert_ldm_unet_checkpoint(stand, fam.unet)
    _check(unet, table, stand, "unet", meta_shapes("unet", fam.unet))
    vae = sfu.convert_ldm_vae_checkpoint(stand, VAE_CONFIG)
    _check(vae, table, stand, "vae", meta_shapes("vae", VAE_CONFIG))
    for te in fam.text_encoders:
        if te.layout == "hf":
            converted = sfu.convert_ldm_clip_checkpoint({k: v for k, v in stand.items() if k.startswith(te.prefix)})
        else:
            model = SimpleNamespace(config=SimpleNamespace(hidden_size=te.config["hidden_size"]))
            ours = {k: v for k, v in stand.items() if k.startswith(te.prefix)}
            converted = sfu.convert_open_clip_checkpoint(model, ours, prefix=te.prefix)
        converted.pop("text_model.embeddings.position_ids", None)  # a buffer transformers rebuilds
        _check(converted, table, stand, te.component, meta_shapes(te.model_class, te.config))
    # every tensor is either a diffusers tensor or a known extra
    assert all(t.pieces or t.key.startswith(("alphas", "betas", "sqrt", "cond_stage", "conditioner")) for t in table)
    assert all(t.key.startswith((UNET_PREFIX, "first_stage_model.", "cond_stage_model.", "conditioner.", "alphas", "betas", "sqrt")) for t in table)

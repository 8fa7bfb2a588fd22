"""Base-model checkpoints as an input: one reader for ``check``, ``merge`` and ``extract``.

:func:`open_checkpoint` reads a single-file checkpoint (LDM/SGM names, as A1111, Forge and
ComfyUI use them), a UNet-only file (LDM- or diffusers-named) or a diffusers folder
(per-component files, fp16/bf16 variants, shards), and ``.ckpt``/``.pt``/``.bin`` files
through ``weights_only`` loading (a pickled checkpoint is necessarily loaded whole; a
zip-based one is memory-mapped). Headers only until tensors are asked for; then one
tensor at a time.

The :class:`Checkpoint` knows its family (from keys and shapes, with evidence) and where
every module of that family's catalog (:mod:`loratool.arch`) is stored: a
:class:`WeightRef` per module, with OpenCLIP's fused q/k/v rows and SGM's transposed
``text_projection`` handled; :meth:`Checkpoint.read_weight` returns a module's weight in
fp32 as the module holds it. :func:`pair_checkpoints` matches a base and a fine-tuned
checkpoint module by module, refusing pairs that do not fit.

Importing this package does not import torch.
"""

from loratool.checkpoint.pair import ModulePair, pair_checkpoints
from loratool.checkpoint.reader import (
    Checkpoint,
    Resolution,
    StoredTensor,
    WeightRef,
    open_checkpoint,
)

__all__ = [
    "Checkpoint",
    "ModulePair",
    "Resolution",
    "StoredTensor",
    "WeightRef",
    "open_checkpoint",
    "pair_checkpoints",
]

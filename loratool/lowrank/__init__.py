"""Low-rank linear algebra shared by ``resize``, ``merge-loras`` and ``extract``.

Pure torch, float32, on the device of the inputs (CPU in CI, CUDA when given CUDA
tensors); nothing here knows about files, formats or network types.

* :mod:`.svd` — the exact SVD of a product ``up @ down`` (or of a sum of such products)
  without forming it (QR of both factors, SVD of the small core); a randomized truncated
  SVD (Halko–Martinsson–Tropp range finder with power iterations) and an exact economy
  SVD, both batched over ``[..., m, n]``.
* :mod:`.rank` — choosing a rank from singular values (fixed, ``ratio``, ``fro``,
  ``cumulative``) and the retained Frobenius norm of a truncation.
* :mod:`.factors` — splitting a truncated SVD into LoRA factors (√S on each side),
  folding a signed scale into a factor pair, and an |value| quantile clamp that works
  beyond ``torch.quantile``'s input-size limit.

Importing this package imports torch.
"""

from loratool.lowrank.factors import abs_quantile, clamp_quantile, fold_scale, split_factors
from loratool.lowrank.rank import RANK_METHODS, Retention, retention, select_rank
from loratool.lowrank.svd import (
    SVD,
    exact_svd,
    product_norm,
    product_svd,
    product_svdvals,
    randomized_svd,
    stack_factors,
    truncated_svd,
)

__all__ = [
    "RANK_METHODS",
    "SVD",
    "Retention",
    "abs_quantile",
    "clamp_quantile",
    "exact_svd",
    "fold_scale",
    "product_norm",
    "product_svd",
    "product_svdvals",
    "randomized_svd",
    "retention",
    "select_rank",
    "split_factors",
    "stack_factors",
    "truncated_svd",
]

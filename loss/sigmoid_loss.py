"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), made label-aware, over the global batch.

With L2-normalized image features u, text features v, scale t (already exponentiated), bias b and
the global batch of N pairs, every (image i, text j) is a binary problem with logit x_ij = t u_i.v_j + b
and target q_ij = 1 if y_i == y_j (pairs sharing a label are positives, as in UniCL), else 0:

    L = 1/N * sum_i sum_j -log sigmoid(z_ij x_ij),   z_ij = 2 q_ij - 1

normalized as SigLIP: summed over the texts, averaged over the images of the global batch. With mixup
the targets are soft, q = W (loss/targets.py), and each term is the binary cross-entropy
-q log sigmoid(x) - (1 - q) log sigmoid(-x); for q in {0, 1} that is the term above.

The code evaluates each term as softplus(x) - q x (equal to both forms) with gradient sigmoid(x) - q.
For negatives (q = 0, nearly all pairs) that is exact; a positive's term loses at most the rounding
of x to the subtraction, an absolute error below ulp(x).

Memory and distribution as the UniCL loss: rank r evaluates its images' rows against all gathered texts
in T x T tiles (``_TiledSigmoid``), forward keeps only a running sum, backward recomputes each tile. A row
needs no statistic of other rows, so there is no column pass: rank r's share is the sum over its rows,
the shares add up to N * L, and the gather's backward sums the text gradients over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from utils.distributed import all_gather_with_grad

from .base import GlobalBatchLoss, spans
from .targets import GlobalTargets


class SigmoidLoss(GlobalBatchLoss):
    """Label-aware sigmoid loss: ``forward(image_features, text_features, targets, logit_scale, logit_bias)``.

    ``logit_scale`` is already exponentiated (t), ``logit_bias`` is b. Value and gradient as every loss of
    the family (:class:`~loss.base.GlobalBatchLoss`).
    """

    logit_params = ("logit_scale", "logit_bias")

    def local_sum(self, img: Tensor, txt: Tensor, targets: GlobalTargets, params: Sequence[Tensor],
                  sizes: List[int], tile: int) -> Tensor:
        """Sum of the terms of this rank's images against every text of the global batch."""
        scale, bias = params
        all_txt = all_gather_with_grad(txt, sizes)
        return _TiledSigmoid.apply(img, all_txt, scale, bias, _PairTargets.of(targets), tile)


@dataclass(frozen=True)
class _PairTargets:
    """Builds the target tile q of any rows (this rank's images) and columns (all texts)."""

    row_labels: Tensor
    col_labels: Tensor
    row_partner_labels: Optional[Tensor] = None
    row_lam: Optional[Tensor] = None

    @classmethod
    def of(cls, targets: GlobalTargets) -> "_PairTargets":
        own = targets.own
        if not targets.mixed:
            return cls(targets.labels[own], targets.labels)
        return cls(targets.labels[own], targets.labels, targets.partner_labels[own], targets.lam[own])

    def tile(self, rows: slice, cols: slice, dtype: torch.dtype) -> Tensor:
        columns = self.col_labels[cols].unsqueeze(0)
        q = (self.row_labels[rows].unsqueeze(1) == columns).to(dtype)
        if self.row_lam is None:
            return q
        lam = self.row_lam[rows].to(dtype).unsqueeze(1)
        partner = (self.row_partner_labels[rows].unsqueeze(1) == columns).to(dtype)
        return q.mul_(lam).add_(partner.mul_(1 - lam))


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)), stable for any x and without torch's linear cut-off above 20 (off by exp(-x))."""
    # exp of anything below the floor would be subnormal (slow on CPU) and add less than it to log1p.
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0
    return x.clamp_min(0).add_(x.abs().neg_().clamp_min_(floor).exp_().log1p_())


class _TiledSigmoid(torch.autograd.Function):
    """``sum_ij softplus(x_ij) - q_ij x_ij`` with ``x = scale * queries @ keys.T + bias``, never holding x.

    Backward recomputes each tile's ``G = sigmoid(x) - q``: dqueries = scale G keys, dkeys = scale G^T
    queries, dscale = sum_i queries_i . (G keys)_i, dbias = sum G.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, queries: Tensor, keys: Tensor, scale: Tensor, bias: Tensor, pairs: _PairTargets, tile: int
    ) -> Tensor:
        scaled = queries * scale
        total = queries.new_zeros(())
        for r, c, logits in _logit_tiles(scaled, keys, bias, tile):
            total += _softplus(logits).sum() - pairs.tile(r, c, logits.dtype).mul_(logits).sum()
        ctx.save_for_backward(queries, keys, scale, bias)
        ctx.pairs, ctx.tile = pairs, tile
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        queries, keys, scale, bias = ctx.saved_tensors
        scaled = queries * scale
        grad_scaled = torch.zeros_like(queries)
        grad_keys = torch.zeros_like(keys)
        grad_bias = queries.new_zeros(())
        # A backward called under autocast would otherwise recompute the logits in bf16/fp16.
        with torch.autocast(device_type=queries.device.type, enabled=False):
            for r, c, logits in _logit_tiles(scaled, keys, bias, ctx.tile):
                probs = logits.sigmoid_().sub_(ctx.pairs.tile(r, c, logits.dtype))
                grad_scaled[r].addmm_(probs, keys[c])
                grad_keys[c].addmm_(probs.t(), scaled[r])
                grad_bias += probs.sum()
        # x = (scale * q) @ k.T + b, so dx/dq = scale * dx/d(scale * q) and dx/dscale = q . dx/d(scale * q).
        grad_scale = (queries * grad_scaled).sum() * grad
        return grad_scaled.mul_(scale * grad), grad_keys.mul_(grad), grad_scale, grad_bias * grad, None, None


def _logit_tiles(scaled: Tensor, keys: Tensor, bias: Tensor, tile: int):
    """(rows, columns, logits tile) over ``scaled @ keys.T + bias``, one fresh tile at a time."""
    for c in spans(keys.shape[0], tile):
        for r in spans(scaled.shape[0], tile):
            yield r, c, torch.mm(scaled[r], keys[c].t()).add_(bias)

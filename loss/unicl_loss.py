"""UniCL loss: bidirectional contrastive learning in image-text-label space.

Every pair (image i, text i) carries a label y_i: a class id for image-label
data, a fresh id per caption for image-text data. Pairs sharing a label are all
positives of each other, so for image-text data the loss reduces to CLIP's.

With L2-normalized image features u, text features v, an exponentiated logit
scale s and the global batch of N pairs (all ranks concatenated in rank order):

    P(i)     = {k : y_k == y_i}
    l_i2t(i) = -1/|P(i)| * sum_{k in P(i)} log softmax_j(s u_i.v_j)[k]
             = logsumexp_j(s u_i.v_j) - s u_i . mean_{k in P(i)} v_k
    l_t2i(j) = the same with the roles of u and v swapped
    L        = (mean_i l_i2t(i) + mean_j l_t2i(j)) / 2

The code evaluates the second line of l_i2t: the positive term is one dot
product with the mean feature of the row's label group.

CLIP (``unique_pairs``, TRAIN.LOSS clip): each pair's label is its position in
the global batch, so every P(i) is {i}. Mixup (MixedTargets, loss/targets.py):
the 0/1 rows and columns of the positive mask become the soft weights
W = Y~ Y^T, each row (image -> text) and each column (text -> image) normalized
to sum 1; the positive term stays a dot product with a weighted combination of
at most two label groups (``_soft_positives``).

Memory. The logsumexp terms are the row and column log-sum-exps of the N x N
logit matrix S = s U V^T. They are computed tile by tile (``_TiledLogSumExp``):
forward keeps only the per-row and per-column statistics, backward recomputes
each tile. No B x N matrix is ever held, so the memory the loss adds is linear
in the batch (features, their gradients, two tiles), not quadratic.

Distributed: rank r evaluates the rows of S that belong to its images (its
images against all gathered texts, one GEMM per tile). That gives the row
log-sum-exps of its images and a partial log-sum-exp over its rows for every
column; one all_gather of these (2 numbers per column) completes the column
statistics on every rank. Rank r's share L_r (its rows' l_i2t plus its texts' l_t2i, over
2N) sums over ranks to L. The gradient of the log-sum-exp terms w.r.t. every
logit of rank r's rows is computed on rank r; the gather's backward sums the
text-feature gradients over ranks, so the gradients add up to exactly dL.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from utils.distributed import all_gather_no_grad, all_gather_with_grad, get_world_size

from .base import GlobalBatchLoss, resolve_tile_size, spans
from .targets import GlobalTargets

__all__ = ["UniCLLoss", "resolve_tile_size"]


class UniCLLoss(GlobalBatchLoss):
    """Unified image-text-label contrastive loss over the global batch (see the module docstring).

    ``forward(image_features, text_features, targets, logit_scale)``; the value is the global loss and
    the gradient this rank's share times world_size (see :class:`GlobalBatchLoss`). The column
    statistics cost one all_gather of 2 numbers per pair of the global batch.

    Args:
        tile_size: edge T of the T x T logit tiles the loss is computed in; 0 chooses it from the device
            (see :func:`resolve_tile_size`). Any value gives the same loss and gradients.
        unique_pairs: ignore the labels, each pair its own class: CLIP's loss (``TRAIN.LOSS clip``).
    """

    # mean over images of l_i2t plus mean over texts of l_t2i, halved
    terms_per_pair = 2

    def local_sum(self, img: Tensor, txt: Tensor, targets: GlobalTargets, params: Sequence[Tensor],
                  sizes: List[int], tile: int) -> Tensor:
        """Sum of l_i2t over this rank's images plus l_t2i over this rank's texts."""
        (scale,) = params
        all_img, all_txt = _gather_features(img, txt, sizes)
        log_sum_exps = _TiledLogSumExp.apply(img, all_txt, scale, targets.own, tile)
        positives = _soft_positives if targets.mixed else _positives
        return log_sum_exps - scale * positives(img, txt, all_img, all_txt, targets)


def _positives(img: Tensor, txt: Tensor, all_img: Tensor, all_txt: Tensor, targets: GlobalTargets) -> Tensor:
    """sum_i u_i . (mean text feature of i's label group) + sum_j v_j . (mean image feature of j's group)."""
    _, group, counts = torch.unique(targets.labels, return_inverse=True, return_counts=True)
    own_group = group[targets.own]
    return (img * _group_means(all_txt, group, counts)[own_group]).sum() + (
        txt * _group_means(all_img, group, counts)[own_group]
    ).sum()


def _soft_positives(img: Tensor, txt: Tensor, all_img: Tensor, all_txt: Tensor, targets: GlobalTargets) -> Tensor:
    """The positive terms with the mixup weights W = Y~ Y^T (loss/targets.py) as soft targets.

    Image i's row of W, normalized to sum 1, is its target distribution over the texts, so its positive
    term is u_i . sum_j W_ij v_j / sum_j W_ij. Row i only weighs two label groups, so with G(c) the sum and
    n(c) the count of the texts labelled c:

        sum_j W_ij v_j = lam_i G(y_i) + (1 - lam_i) G(y_p(i)),   sum_j W_ij = lam_i n(y_i) + (1 - lam_i) n(y_p(i))

    Text j's column is its target distribution over the images: v_j . H(y_j) / C(y_j), with H(c) the sum
    of lam_i u_i over images whose own label is c plus (1 - lam_i) u_i over images whose partner's is c,
    and C(c) the same sum of weights. O(N D) memory, like the unmixed group means; exact.
    """
    n = targets.labels.shape[0]
    values, group = torch.unique(torch.cat([targets.labels, targets.partner_labels]), return_inverse=True)
    own_group, partner_group, groups = group[:n], group[n:], values.shape[0]
    lam = targets.lam.to(img.dtype)
    rest = 1 - lam

    text_sums = all_txt.new_zeros(groups, all_txt.shape[1]).index_add(0, own_group, all_txt)
    text_counts = lam.new_zeros(groups).index_add(0, own_group, torch.ones_like(lam))
    mine = targets.own
    a, b, lam_o, rest_o = own_group[mine], partner_group[mine], lam[mine], rest[mine]
    row_sums = lam_o[:, None] * text_sums[a] + rest_o[:, None] * text_sums[b]
    row_weights = lam_o * text_counts[a] + rest_o * text_counts[b]  # >= 1: both groups hold a text

    image_sums = (all_img.new_zeros(groups, all_img.shape[1]).index_add(0, own_group, lam[:, None] * all_img)
                  .index_add(0, partner_group, rest[:, None] * all_img))
    image_weights = lam.new_zeros(groups).index_add(0, own_group, lam).index_add(0, partner_group, rest)
    # A text whose label no image carries any weight of (its image fully replaced by a cutmix box) has no
    # positive: its sums are 0, and the floor keeps 0 / 0 from making a NaN.
    column_weights = image_weights[a].clamp_min(torch.finfo(img.dtype).tiny)
    return (img * row_sums).sum(1).div(row_weights).sum() + (txt * image_sums[a]).sum(1).div(column_weights).sum()


def _gather_features(img: Tensor, txt: Tensor, sizes: List[int]) -> Tuple[Tensor, Tensor]:
    """Image and text features of all ranks, in rank order, with gradients through the gather."""
    if len(sizes) == 1:
        # The concatenation below would copy both modalities (and their gradients) for nothing.
        return img, txt
    # One gather for both modalities: half the collectives, and a single
    # backward all_reduce whose order cannot differ between ranks.
    dim = img.shape[1]
    return all_gather_with_grad(torch.cat([img, txt], dim=1), sizes).split(dim, dim=1)


def _group_means(features: Tensor, group: Tensor, counts: Tensor) -> Tensor:
    """Mean feature of each label group, ``[num_groups, D]``.

    Averaging the positives' log-probabilities equals a dot product with the
    mean positive feature (the log-softmax is linear in the logit up to the
    shared logsumexp). So instead of a dense B x N target mask (O(B*N) memory,
    quadratic in the global batch) only O(N*D) group sums are needed, and the
    result is exact, not an approximation.
    """
    sums = features.new_zeros(counts.shape[0], features.shape[1]).index_add(0, group, features)
    return sums / counts.unsqueeze(1).to(features.dtype)


class _TiledLogSumExp(torch.autograd.Function):
    """Row plus column log-sum-exps of ``S = scale * queries @ keys.T``, never holding S.

    Returns ``sum_i logsumexp_j S_ij + sum_{j in own} logsumexp_i' S_i'j``, where the column
    log-sum-exps run over the rows of every rank (the global batch) and ``own`` are the columns
    of this rank's texts. In one process the rows are all rows and ``own`` all columns.

    Backward returns, for this rank's rows of S, the gradient of all row and all column terms:
    ``G = softmax_rows(S) + softmax_columns(S)``. Summed over ranks that is the gradient of the
    global sum, whichever rank's value holds a column term.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, queries: Tensor, keys: Tensor, scale: Tensor, own: slice, tile: int
    ) -> Tensor:
        rows, cols = _logsumexp_stats(queries * scale, keys, tile)
        cols = _combine_over_ranks(cols)
        ctx.save_for_backward(queries, keys, scale, *rows, *cols)
        ctx.tile = tile
        (row_peak, row_log_total), (col_peak, col_log_total) = rows, cols
        return row_peak.sum() + row_log_total.sum() + col_peak[own].sum() + col_log_total[own].sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        queries, keys, scale, row_peak, row_log_total, col_peak, col_log_total = ctx.saved_tensors
        grad_scaled_queries, grad_keys = _logsumexp_grads(
            queries * scale, keys, (row_peak, row_log_total), (col_peak, col_log_total), ctx.tile
        )
        # S = (scale * q) @ k.T, so dS/dq = scale * dS/d(scale * q) and dS/dscale = q . dS/d(scale * q).
        grad_scale = (queries * grad_scaled_queries).sum() * grad
        grad_queries = grad_scaled_queries.mul_(scale * grad)
        return grad_queries, grad_keys.mul_(grad), grad_scale, None, None


# A log-sum-exp kept as (peak, log_total), its value peak + log_total. Subtracting the two parts one
# after the other keeps the precision of S - lse: with logits of order 100 (logit scale 100) a rounded
# fp32 sum peak + log_total is off by up to 4e-6, which exp turns into a relative error of the softmax.
_LogSumExp = Tuple[Tensor, Tensor]


def _exp_floor(like: Tensor, lowest: Callable[[], float]) -> Optional[float]:
    """Lower clamp for exponents (exp of anything below would be subnormal or 0), or None if unneeded.

    CPU exp is ~20x slower on inputs whose result is subnormal or underflows (common at logit scale
    100). exp(floor) is ~3 * the smallest normal number, so clamping changes each softmax term by
    less than that, far below the rounding error of any sum that contains the peak term 1. When
    ``lowest()``, a lower bound on every exponent, is above the floor, clamping would change nothing
    and its pass over each tile is skipped (normalized features and logit scales up to ~40).
    GPUs take no such penalty, so there is no clamp and no bound to compute: the bound's ``.item()``
    would make every training step wait for the GPU.
    """
    if like.device.type != "cpu":
        return None
    floor = math.log(torch.finfo(like.dtype).tiny) + 1.0
    return floor if lowest() < floor else None


def _logit_bound(scaled_queries: Tensor, keys: Tensor) -> float:
    """An upper bound on every |logit|: |q . k| <= |q| |k|."""
    return (scaled_queries.norm(dim=1).max() * keys.norm(dim=1).max()).item()


class _TileBuffers:
    """Two reusable T x T scratch tiles; smaller views of them serve the ragged last tiles."""

    def __init__(self, rows: int, cols: int, like: Tensor) -> None:
        self.logits = like.new_empty(rows * cols)
        self.work = like.new_empty(rows * cols)

    def views(self, rows: int, cols: int) -> Tuple[Tensor, Tensor]:
        n = rows * cols
        return self.logits[:n].view(rows, cols), self.work[:n].view(rows, cols)


def _logsumexp_stats(scaled_queries: Tensor, keys: Tensor, tile: int) -> Tuple[_LogSumExp, _LogSumExp]:
    """Row log-sum-exps of ``scaled_queries @ keys.T`` and its column log-sum-exps over these rows.

    One GEMM per tile serves both directions; each running statistic is updated online.
    """
    n_rows, n_cols = scaled_queries.shape[0], keys.shape[0]
    row_peak = scaled_queries.new_full((n_rows,), -math.inf)
    col_peak = scaled_queries.new_full((n_cols,), -math.inf)
    row_total = scaled_queries.new_zeros(n_rows)
    col_total = scaled_queries.new_zeros(n_cols)
    buffers = _TileBuffers(min(tile, n_rows), min(tile, n_cols), scaled_queries)
    # Exponents are logits minus a running peak, so at least -2 * bound.
    floor = _exp_floor(scaled_queries, lambda: -2 * _logit_bound(scaled_queries, keys))
    for c in spans(n_cols, tile):
        for r in spans(n_rows, tile):
            logits, work = buffers.views(r.stop - r.start, c.stop - c.start)
            torch.mm(scaled_queries[r], keys[c].t(), out=logits)
            _accumulate(row_peak[r], row_total[r], logits, 1, work, floor)
            _accumulate(col_peak[c], col_total[c], logits, 0, work, floor)
    return (row_peak, row_total.log_()), (col_peak, col_total.log_())


def _accumulate(
    peak: Tensor, total: Tensor, logits: Tensor, dim: int, work: Tensor, floor: Optional[float]
) -> None:
    """Fold ``sum(exp(logits), dim)`` into the running ``total * exp(peak)``, in place; ``work`` is scratch."""
    new_peak = torch.maximum(peak, logits.amax(dim))
    tile_total = _exp_(torch.sub(logits, new_peak.unsqueeze(dim), out=work), floor).sum(dim)
    total.mul_((peak - new_peak).exp_()).add_(tile_total)
    peak.copy_(new_peak)


def _combine_over_ranks(cols: _LogSumExp) -> _LogSumExp:
    """Column log-sum-exps over the rows of all ranks, from each rank's ones over its own rows."""
    world = get_world_size()
    if world == 1:
        return cols
    peaks, log_totals = all_gather_no_grad(torch.stack(cols).unsqueeze(0), [1] * world).unbind(1)
    peak = peaks.amax(0)
    return peak, (peaks - peak + log_totals).exp_().sum(0).log_()


def _logsumexp_grads(
    scaled_queries: Tensor, keys: Tensor, rows: _LogSumExp, cols: _LogSumExp, tile: int
) -> Tuple[Tensor, Tensor]:
    """Gradients of (all row + all column log-sum-exps) w.r.t. ``scaled_queries`` and ``keys``.

    Per tile of logits S: G = exp(S - row_lse) + exp(S - col_lse), then dQ += G K and dK += G^T Q.
    """
    n_rows, n_cols = scaled_queries.shape[0], keys.shape[0]
    grad_queries = torch.zeros_like(scaled_queries)
    grad_keys = torch.zeros_like(keys)
    buffers = _TileBuffers(min(tile, n_rows), min(tile, n_cols), scaled_queries)
    # Exponents are logits minus a log-sum-exp, so at least -bound - the largest log-sum-exp.
    floor = _exp_floor(scaled_queries, lambda: -_logit_bound(scaled_queries, keys) - max(
        (rows[0] + rows[1]).max().item(), (cols[0] + cols[1]).max().item()))
    for c in spans(n_cols, tile):
        for r in spans(n_rows, tile):
            logits, probs = buffers.views(r.stop - r.start, c.stop - c.start)
            torch.mm(scaled_queries[r], keys[c].t(), out=logits)
            _softmax(logits, rows[0][r], rows[1][r], 1, probs, floor)
            probs.add_(_softmax(logits, cols[0][c], cols[1][c], 0, logits, floor))
            grad_queries[r].addmm_(probs, keys[c])
            grad_keys[c].addmm_(probs.t(), scaled_queries[r])
    return grad_queries, grad_keys


def _softmax(
    logits: Tensor, peak: Tensor, log_total: Tensor, dim: int, out: Tensor, floor: Optional[float]
) -> Tensor:
    """``exp(logits - lse)`` along ``dim`` into ``out`` (which may be ``logits`` itself)."""
    return _exp_(torch.sub(logits, peak.unsqueeze(dim), out=out).sub_(log_total.unsqueeze(dim)), floor)


def _exp_(exponents: Tensor, floor: Optional[float]) -> Tensor:
    """``exp`` in place, exponents first clamped to ``floor`` unless it is None (see ``_exp_floor``)."""
    if floor is not None:
        exponents.clamp_min_(floor)
    return exponents.exp_()

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

Distributed: rank r only evaluates its own rows (its images against all
gathered texts) and its own columns (its texts against all gathered images),
i.e. B_local x N logits. Its share L_r = (sum of its l_i2t + l_t2i) / (2N)
sums over ranks to L, and the gathers propagate cross-rank gradient terms, so
the gradient of sum_r L_r is exactly that of L.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from utils.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_sum,
    gather_sizes,
    get_rank,
    get_world_size,
)


class UniCLLoss(nn.Module):
    """Unified image-text-label contrastive loss over the global batch.

    ``forward`` returns a scalar whose **value** is the global loss L (identical
    on every rank, so ``loss.item()`` on rank 0 logs L) and whose **gradient**
    is ``world_size * dL_r``. DDP averages parameter gradients over ranks, and
    the average of ``world_size * dL_r`` is ``sum_r dL_r = dL``, so after
    ``loss.backward()`` every rank holds exactly the gradient of the global
    loss. Without DDP (single process, world_size 1) both are plain L.

    The value/gradient split costs one extra scalar all_reduce per step.
    """

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        labels: Tensor,
        logit_scale: Tensor,
    ) -> Tensor:
        """Compute the loss for this rank's slice of the global batch.

        Args:
            image_features: ``[B, D]`` L2-normalized image embeddings of this rank.
            text_features: ``[B, D]`` L2-normalized text embeddings of this rank.
            labels: ``[B]`` integer global label ids (same id => positive pair).
            logit_scale: scalar, already exponentiated temperature inverse.
        """
        _check_inputs(image_features, text_features, labels, logit_scale)
        # Under autocast the matmul would run in bf16/fp16; logsumexp over
        # thousands of logits needs fp32 to stay accurate, so autocast is
        # switched off and inputs are upcast (float64 stays float64).
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            dtype = torch.promote_types(
                torch.promote_types(image_features.dtype, text_features.dtype), torch.float32
            )
            img = image_features.to(dtype)
            txt = text_features.to(dtype)
            scale = logit_scale.to(dtype).reshape(())
            # NCCL can only gather tensors that live on the GPU.
            labels = labels.to(img.device)
            sizes = gather_sizes(labels.shape[0], img.device)
            local_sum = _local_loss_sum(img, txt, labels, scale, sizes)

        per_rank = local_sum / (2 * sum(sizes))
        grad_path = per_rank * get_world_size()
        global_value = all_reduce_sum(per_rank)
        # Value of global_value, gradient of grad_path (see class docstring).
        return grad_path + (global_value - grad_path).detach()


def _check_inputs(image: Tensor, text: Tensor, labels: Tensor, scale: Tensor) -> None:
    # Shape errors would otherwise surface as broadcasting surprises or, in the
    # distributed case, as a hang inside a collective.
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(
            f"image and text features must both be [B, D], got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    if labels.shape != (image.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape [{image.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(scale.shape)}")


def _local_loss_sum(img: Tensor, txt: Tensor, labels: Tensor, scale: Tensor, sizes: List[int]) -> Tensor:
    """Sum of l_i2t over this rank's images plus l_t2i over this rank's texts."""
    dim = img.shape[1]
    # One gather for both modalities: half the collectives, and a single
    # backward all_reduce whose order cannot differ between ranks.
    all_img, all_txt = all_gather_with_grad(torch.cat([img, txt], dim=1), sizes).split(dim, dim=1)
    all_labels = all_gather_no_grad(labels, sizes)

    _, group, counts = torch.unique(all_labels, return_inverse=True, return_counts=True)
    start = sum(sizes[: get_rank()])
    own_group = group[start : start + labels.shape[0]]

    i2t = _directional_loss(img, all_txt, _group_means(all_txt, group, counts)[own_group], scale)
    t2i = _directional_loss(txt, all_img, _group_means(all_img, group, counts)[own_group], scale)
    return i2t.sum() + t2i.sum()


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


def _directional_loss(queries: Tensor, keys: Tensor, positive_means: Tensor, scale: Tensor) -> Tensor:
    """Per-query loss logsumexp_j(s q.k_j) - s q.mean(positive keys), shape ``[B]``."""
    logits = scale * queries @ keys.t()
    return torch.logsumexp(logits, dim=1) - scale * (queries * positive_means).sum(dim=1)

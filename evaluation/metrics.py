"""Classification metrics over a score matrix, all in percent, as the ELEVATER benchmark reports them.

Every metric takes `scores` `[N, C]` (higher means more likely; logits or probabilities give the same
result) and integer `targets` `[N]`, and is looked up by name in `METRICS`.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor

Metric = Callable[[Tensor, Tensor], float]
METRICS: Dict[str, Metric] = {}


def register_metric(name: str) -> Callable[[Metric], Metric]:
    def wrap(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn
    return wrap


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f'unknown metric {name!r}; known: {", ".join(sorted(METRICS))}')
    return METRICS[name]


def _check(scores: Tensor, targets: Tensor) -> None:
    if scores.ndim != 2 or targets.shape != (scores.shape[0],) or scores.shape[0] == 0:
        raise ValueError(f'scores must be [N, C] and targets [N] with N > 0, got {tuple(scores.shape)} '
                         f'and {tuple(targets.shape)}')


def _topk_accuracy(scores: Tensor, targets: Tensor, k: int) -> float:
    _check(scores, targets)
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return 100.0 * (top == targets[:, None]).any(dim=1).double().mean().item()


@register_metric('accuracy')
def accuracy(scores: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy; among tied top scores the lowest class index is the prediction (torch.argmax)."""
    _check(scores, targets)
    return 100.0 * (scores.argmax(dim=1) == targets).double().mean().item()


@register_metric('accuracy_top5')
def accuracy_top5(scores: Tensor, targets: Tensor) -> float:
    return _topk_accuracy(scores, targets, 5)


@register_metric('mean_per_class')
def mean_per_class(scores: Tensor, targets: Tensor) -> float:
    """Top-1 recall of each class that occurs in `targets`, averaged with equal weight per class."""
    _check(scores, targets)
    correct = (scores.argmax(dim=1) == targets).double()
    classes = targets.unique()
    return 100.0 * torch.stack([correct[targets == c].mean() for c in classes]).mean().item()


def _average_precision_11point(scores: Tensor, positive: Tensor) -> float:
    """VOC-2007 AP: mean over recall levels 0, 0.1, ..., 1 of the best precision at that recall or more.
    Items with equal scores are ranked as one block, so the result does not depend on their order."""
    order = scores.argsort(descending=True)
    scores, positive = scores[order].double(), positive[order].double()
    true_positives = positive.cumsum(0)
    ranked = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    block_end = torch.ones(len(scores), dtype=torch.bool)
    block_end[:-1] = scores[1:] != scores[:-1]  # precision/recall exist only after a whole tie block
    precision = (true_positives / ranked)[block_end]
    recall = (true_positives / positive.sum())[block_end]
    levels = torch.linspace(0, 1, 11, dtype=torch.float64)
    best = [precision[recall >= level - 1e-12].max().item() if (recall >= level - 1e-12).any() else 0.0
            for level in levels]
    return sum(best) / len(best)


@register_metric('map_11point')
def map_11point(scores: Tensor, targets: Tensor) -> float:
    """11-point interpolated AP of each class that occurs in `targets` (one class against the rest),
    averaged over those classes."""
    _check(scores, targets)
    classes = targets.unique()
    return 100.0 * sum(_average_precision_11point(scores[:, c], targets == c) for c in classes.tolist()) \
        / len(classes)


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of `values` in ascending order, ties sharing their mean rank."""
    _, group, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()
    return (last_rank - (counts.double() - 1) / 2)[group]


@register_metric('roc_auc')
def roc_auc(scores: Tensor, targets: Tensor) -> float:
    """Binary ROC-AUC of class 1 against class 0, scored by `scores[:, 1] - scores[:, 0]` (the log-odds for
    logits): the probability that a random positive outscores a random negative, ties counting one half."""
    _check(scores, targets)
    if scores.shape[1] != 2:
        raise ValueError(f'roc_auc is for two classes, got {scores.shape[1]}')
    positive = targets == 1
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    if num_positive == 0 or num_negative == 0:
        raise ValueError('roc_auc needs both classes among the targets')
    ranks = _average_ranks((scores[:, 1] - scores[:, 0]).double())
    u = ranks[positive].sum().item() - num_positive * (num_positive + 1) / 2
    return 100.0 * u / (num_positive * num_negative)

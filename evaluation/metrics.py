"""Classification metrics over a score matrix, all in percent, as the ELEVATER benchmark reports them.

Every metric takes logits `scores` `[N, C]` (higher means more likely) and integer `targets` `[N]` in
`0..C-1`, and is looked up by name in `METRICS`. ELEVATER scores softmax probabilities; the metrics that only
compare the classes of one image (accuracy, top-5, mean per class, two-class ROC-AUC) give the same result for
logits or probabilities, while `map_11point`, which ranks images within a class, applies the softmax itself.
Each metric equals its scikit-learn counterpart (`accuracy_score` and `balanced_accuracy_score` of the
argmax, `top_k_accuracy_score` on untied scores, `roc_auc_score`, ELEVATER's 11-point AP over
`precision_recall_curve`); the tests check this. A target outside 0..C-1 is an error, not a silent miss.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor

from .errors import EvaluationInputError

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
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f'targets must be integer class indices, got dtype {targets.dtype}')
    # An index outside 0..C-1 would silently count as a miss (or, for -1, wrap to the last class), so a
    # label file that does not fit the class list would give a plausible but wrong number.
    num_classes = scores.shape[1]
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise EvaluationInputError(f'target {bad} is outside the {num_classes} classes of the scores '
                                   f'(valid: 0..{num_classes - 1})')


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
    """Top-5 accuracy (every class when there are at most five)."""
    return _topk_accuracy(scores, targets, 5)


@register_metric('mean_per_class')
def mean_per_class(scores: Tensor, targets: Tensor) -> float:
    """Top-1 recall of each class that occurs in `targets`, averaged with equal weight per class."""
    _check(scores, targets)
    correct = (scores.argmax(dim=1) == targets).double()
    classes = targets.unique()
    return 100.0 * torch.stack([correct[targets == c].mean() for c in classes]).mean().item()


_STEPS = 10  # recall levels 0, 1/10, ..., 10/10


def _average_precision_11point(probabilities: Tensor, positive: Tensor) -> float:
    """ELEVATER's 11-point AP of one class from float64 `probabilities` `[N]` and a boolean `positive` `[N]`
    with at least one True."""
    order = probabilities.argsort(descending=True)
    ranked, hits = probabilities[order], positive[order].long()
    true_positives = hits.cumsum(0)
    # precision_recall_curve has one point per distinct score, taken after the whole tie block
    block_end = torch.ones(len(ranked), dtype=torch.bool, device=ranked.device)
    block_end[:-1] = ranked[1:] != ranked[:-1]
    seen = torch.arange(1, len(ranked) + 1, device=ranked.device)[block_end]
    true_positives = true_positives[block_end]
    precision = true_positives.double() / seen.double()
    # Recall t/10 is reached when 10 * TP >= t * P: exact in integers, and the same choice ELEVATER's float
    # comparison makes, as its np.linspace levels are the nearest double to t/10 or just below it.
    levels = torch.arange(1, _STEPS + 1, device=ranked.device)
    reached = _STEPS * true_positives[None, :] >= levels[:, None] * hits.sum()
    best = precision[None, :].expand_as(reached).masked_fill(~reached, 0.0).max(dim=1).values
    # level 0 always takes the curve's closing (recall 0, precision 1) point
    return (1.0 + best.sum().item()) / (_STEPS + 1)


@register_metric('map_11point')
def map_11point(scores: Tensor, targets: Tensor) -> float:
    """ELEVATER's 11-point mAP. Takes logits: it applies the softmax itself (in float64), because ELEVATER
    ranks softmax probabilities, and across images a class's probability orders them differently from its
    logit; probabilities passed in would be softmaxed a second time and give another number.

    For each class that occurs in `targets` (the others are skipped, as ELEVATER drops all-zero target
    columns), the precision-recall points are scikit-learn's `precision_recall_curve` of that class against
    the rest: one point per distinct probability (a tie block counts as one) plus the closing (recall 0,
    precision 1). The interpolated precision at recall t in {0, 0.1, ..., 1} is the best precision at recall
    >= t; AP is their mean, and the result the mean AP over the classes."""
    _check(scores, targets)
    probabilities = scores.double().softmax(dim=1)
    classes = targets.unique().tolist()
    return 100.0 * sum(_average_precision_11point(probabilities[:, c], targets == c) for c in classes) \
        / len(classes)


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of `values` in ascending order, ties sharing their mean rank."""
    _, group, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()
    return (last_rank - (counts.double() - 1) / 2)[group]


@register_metric('roc_auc')
def roc_auc(scores: Tensor, targets: Tensor) -> float:
    """Binary ROC-AUC of class 1 against class 0, scored by `scores[:, 1] - scores[:, 0]` (the log-odds for
    logits, which orders images as ELEVATER's softmax probability of class 1 does): the probability that a
    random positive outscores a random negative, ties counting one half."""
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

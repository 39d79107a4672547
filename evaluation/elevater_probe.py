"""The ELEVATER linear probe (Li et al., NeurIPS 2022; `vision_benchmark/evaluation/full_model_finetune.py` of
the ELEVATER toolkit with its UniCL/CLIP model configs), run on cached features.

The head: `BatchNorm1d(affine=False)` over the (L2-normalized) image features, then `Linear(D, C)`; its
logit scale is exp(0) = 1 (the toolkit's LOGIT_SCALE_INIT 'none'). The Linear starts at PyTorch's default
initialization or, with the text-initialised head, at the normalized class embeddings with a zero bias. It is
trained with cross-entropy by SGD (momentum 0.9, no Nesterov, constant learning rate, L2 weight decay on
weight and bias), batch 64, reshuffled every epoch, a last batch of one skipped.

The search: for every learning rate in `logspace(-6, -1, 6)`, the coarse-to-fine weight-decay search of
`evaluation.search`, each point trained 10 epochs on the train part and scored by its best epoch on the
validation part; the learning rate with the best score wins (ties: the smaller). The validation part is the
first ceil(20 %) of each class of the training images, in their order. The final head is trained 50 epochs
(10 + 40) on train + validation, and the reported number is the best epoch's metric on the test split: the
toolkit's reporting rule, recorded as `report_rule: best_epoch_on_test`.

Every run of the toolkit sees the same batch order (its loader's generator is seeded with 0 for each run),
so here all heads of a search round train together on the same batches, which is the same computation.
Where this differs from the toolkit, on purpose: the random Linear initialization comes from a generator
seeded per (learning rate, weight decay) rather than from the global stream; a head whose scores stop being
finite scores 0 (the toolkit's metric on NaN probabilities is undefined); a class with one training image is
not moved to the validation part (the toolkit would take it and train without that class).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import get_metric
from .search import WeightDecaySearch, search_together

Split = Tuple[Tensor, Tensor]  # (features [N, D], labels [N])

REPORT_RULE = 'best_epoch_on_test'


@dataclass
class ElevaterSettings:
    learning_rates: Sequence[float] = tuple(np.logspace(-6, -1, 6).tolist())
    epochs: int = 10  # per search run (TRAIN.END_EPOCH)
    final_epochs: int = 50  # the final run (TRAIN.END_EPOCH + TRAIN.EXTRA_FINAL_TRAIN_EPOCH = 10 + 40)
    batch_size: int = 64
    momentum: float = 0.9
    validation_fraction: float = 0.2
    seed: int = 0  # batch order and the random Linear initialization


def first_part_of_each_class(labels: Tensor, fraction: float = 0.2) -> Tuple[Tensor, Tensor]:
    """(train, validation) indices: the first ceil(fraction x n) images of every class, in order, are the
    validation part; a class's only image stays in train."""
    held = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        held.append(members[:min(math.ceil(fraction * len(members)), len(members) - 1)])
    held_mask = torch.zeros(len(labels), dtype=torch.bool)
    held_mask[torch.cat(held)] = True
    return (~held_mask).nonzero().flatten(), held_mask.nonzero().flatten()


class _BatchNorm:
    """BatchNorm1d(affine=False) with PyTorch's defaults (momentum 0.1, eps 1e-5): batch statistics while
    training, running statistics for evaluation. Shared by all heads: they see the same batches."""

    def __init__(self, dim: int, device: torch.device):
        self.mean = torch.zeros(dim, device=device)
        self.var = torch.ones(dim, device=device)

    def train(self, x: Tensor) -> Tensor:
        mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        self.mean = 0.9 * self.mean + 0.1 * mean
        self.var = 0.9 * self.var + 0.1 * x.var(dim=0, unbiased=True)
        return (x - mean) / torch.sqrt(var + 1e-5)

    def eval(self, x: Tensor) -> Tensor:
        return (x - self.mean) / torch.sqrt(self.var + 1e-5)


def _initial_heads(points: Sequence[Tuple[float, float]], num_classes: int, dim: int, text_weight: Optional[Tensor],
                   seed: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """`[G, C, D]` weights and `[G, C]` biases: the class embeddings and zero, or nn.Linear's default
    initialization (uniform in +-1/sqrt(D)) from a generator seeded by the point."""
    if text_weight is not None:
        weight = text_weight.float().to(device).expand(len(points), -1, -1).clone()
        return weight, torch.zeros(len(points), num_classes, device=device)
    bound = 1 / math.sqrt(dim)
    weights, biases = [], []
    for lr, wd in points:
        point = hashlib.sha256(f'{seed}/{float(lr).hex()}/{float(wd).hex()}'.encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(point[:8], 'little') >> 1)
        weights.append((torch.rand(num_classes, dim, generator=generator) * 2 - 1) * bound)
        biases.append((torch.rand(num_classes, generator=generator) * 2 - 1) * bound)
    return torch.stack(weights).to(device), torch.stack(biases).to(device)


def train_heads(train: Split, evaluation: Split, num_classes: int, points: Sequence[Tuple[float, float]],
                epochs: int, settings: ElevaterSettings, metric: str, text_weight: Optional[Tensor] = None
                ) -> Tuple[Tensor, List[Tensor]]:
    """Train one head per (learning rate, weight decay) in `points` for `epochs` epochs and score each after
    every epoch on `evaluation`: returns the scores `[G, epochs]` and each epoch's evaluation logits `[G, N, C]`
    (kept only for a single head, where the final run needs them)."""
    features, labels = train[0].float(), train[1].to(train[0].device).long()
    device = features.device
    weight, bias = _initial_heads(points, num_classes, features.shape[1], text_weight, settings.seed, device)
    lrs = torch.tensor([lr for lr, _ in points], device=device)[:, None, None]
    decays = torch.tensor([wd for _, wd in points], device=device)[:, None, None]
    momentum_w, momentum_b = torch.zeros_like(weight), torch.zeros_like(bias)
    first_step = True
    norm = _BatchNorm(features.shape[1], device)
    metric_fn = get_metric(metric)
    eval_targets = evaluation[1].cpu().long()
    generator = torch.Generator().manual_seed(settings.seed)
    scores = torch.zeros(len(points), epochs, dtype=torch.float64)
    kept_logits: List[Tensor] = []
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(device)
        for start in range(0, len(features), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            if len(batch) == 1:  # the toolkit skips a last batch of one (BatchNorm cannot train on it)
                continue
            weight.requires_grad_(True)
            bias.requires_grad_(True)
            x = norm.train(features[batch])
            logits = torch.einsum('bd,gcd->gbc', x, weight) + bias[:, None, :]
            loss = F.cross_entropy(logits.reshape(-1, num_classes), labels[batch].repeat(len(points)),
                                   reduction='sum') / len(batch)
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
            with torch.no_grad():
                weight, bias = weight.detach(), bias.detach()
                # torch.optim.SGD: coupled L2 decay, then momentum whose buffer starts at the first gradient
                grad_w, grad_b = grad_w + decays * weight, grad_b + decays[:, :, 0] * bias
                if first_step:
                    momentum_w, momentum_b = grad_w, grad_b
                else:
                    momentum_w = settings.momentum * momentum_w + grad_w
                    momentum_b = settings.momentum * momentum_b + grad_b
                first_step = False
                weight, bias = weight - lrs * momentum_w, bias - lrs[:, :, 0] * momentum_b
        with torch.no_grad():
            x = norm.eval(evaluation[0].float().to(device))
            logits = (torch.einsum('nd,gcd->gnc', x, weight) + bias[:, None, :]).cpu()
        for g in range(len(points)):
            finite = bool(torch.isfinite(logits[g]).all())
            scores[g, epoch] = metric_fn(logits[g], eval_targets) if finite else 0.0
        if len(points) == 1:
            kept_logits.append(logits[0])
    return scores, kept_logits


@dataclass
class ElevaterOutcome:
    lr: float
    weight_decay: float
    value: float  # the best epoch's test metric
    value_last_epoch: float
    best_epoch: int  # 1-based
    test_scores: Tensor  # the best epoch's test logits
    curve: List[float]  # the test metric after every final epoch
    search: List[Dict[str, float]]  # every (lr, weight decay) trained, with its best validation epoch's metric
    num_search_train: int
    num_search_val: int
    num_train: int


def elevater_probe(train: Split, test: Split, num_classes: int, metric: str, settings: ElevaterSettings,
                   text_weight: Optional[Tensor] = None, merge_validation: bool = True) -> ElevaterOutcome:
    """Search on a split of `train`, train the final head on all of `train` (only its train part when
    `merge_validation` is off, as the toolkit does for 1-shot), report its best test epoch."""
    kept, held = first_part_of_each_class(train[1].cpu(), settings.validation_fraction)
    kept, held = kept.to(train[0].device), held.to(train[0].device)
    search_train, search_val = (train[0][kept], train[1][kept]), (train[0][held], train[1][held])
    if len(held) == 0:
        raise ValueError('the ELEVATER search needs a validation part: every class has a single training image')
    searches = [WeightDecaySearch() for _ in settings.learning_rates]
    visited: List[Dict[str, float]] = []

    def score(pairs: List[Tuple[int, int]]) -> List[float]:
        points = [(settings.learning_rates[n], searches[n].grid[i]) for n, i in pairs]
        best = train_heads(search_train, search_val, num_classes, points, settings.epochs, settings, metric,
                           text_weight)[0].max(dim=1).values.tolist()
        visited.extend({'lr': lr, 'weight_decay': wd, 'value': v} for (lr, wd), v in zip(points, best))
        return best

    search_together(searches, score)
    best_lr, best_wd, best_score = 0.0, 0.0, 0.0
    for lr, search in zip(settings.learning_rates, searches):
        wd, value = search.best
        if best_score < value:  # the toolkit's comparison: a later learning rate must score strictly higher
            best_lr, best_wd, best_score = lr, wd, value
    final_train = train if merge_validation else search_train
    curve, logits = train_heads(final_train, test, num_classes, [(best_lr, best_wd)], settings.final_epochs,
                                settings, metric, text_weight)
    curve = curve[0].tolist()
    best_epoch = max(range(len(curve)), key=lambda e: (curve[e], -e))  # the first epoch with the best value
    return ElevaterOutcome(lr=best_lr, weight_decay=best_wd, value=curve[best_epoch], value_last_epoch=curve[-1],
                           best_epoch=best_epoch + 1, test_scores=logits[best_epoch], curve=curve, search=visited,
                           num_search_train=len(kept), num_search_val=len(held), num_train=len(final_train[1]))

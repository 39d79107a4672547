"""Linear probe on frozen features, the ELEVATER protocol: a linear classifier (optionally starting from the
zero-shot classifier) trained with a learning rate and an L2 weight decay searched on a validation split,
then refit on train + validation and scored on the test split.

Everything here runs on cached feature tensors, never on images, so the whole search takes seconds on a CPU
for datasets of tens of thousands of images. All grid points train together: their heads share each
mini-batch in one matrix product, and each has its own optimizer group.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import FeatureCache
from .data import image_folder
from .encoder import Encoder
from .metrics import accuracy, get_metric
from .zeroshot import Templates, class_embeddings, dataset_classnames

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATES = (1e-3, 1e-2, 1e-1)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class ProbeSettings:
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS
    epochs: int = 30
    batch_size: int = 256
    seed: int = 0


@dataclass
class HeadInit:
    """Starting weights `[C, D]` and bias `[C]`; zeros unless given (e.g. the zero-shot classifier)."""
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None

    def tensors(self, num_classes: int, dim: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        weight = self.weight.float().clone() if self.weight is not None else torch.zeros(num_classes, dim)
        bias = self.bias.float().clone() if self.bias is not None else torch.zeros(num_classes)
        weight, bias = weight.to(device), bias.to(device)
        if weight.shape != (num_classes, dim) or bias.shape != (num_classes,):
            raise ValueError(f'initial head {tuple(weight.shape)} / {tuple(bias.shape)} does not fit '
                             f'{num_classes} classes x {dim} features')
        return weight, bias


def balanced_split(labels: Tensor, fraction: float = 0.2, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """(kept, held out) indices: `fraction` of every class held out (at least one image of each class that
    has two or more), drawn with a seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:n_held])
        kept.append(members[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def train_heads(features: Tensor, labels: Tensor, num_classes: int, grid: Sequence[Tuple[float, float]],
                settings: ProbeSettings, init: HeadInit = HeadInit()) -> List[Tuple[Tensor, Tensor]]:
    """One linear head per (learning rate, weight decay) in `grid`, trained on the same mini-batches:
    cross-entropy + wd/2 * ||W||^2 (the bias is not decayed), Adam, cosine learning-rate decay. Runs on the
    features' device."""
    features, labels = features.float(), labels.to(features.device).long()
    weight0, bias0 = init.tensors(num_classes, features.shape[1], features.device)
    weights = [weight0.clone().requires_grad_(True) for _ in grid]
    biases = [bias0.clone().requires_grad_(True) for _ in grid]
    optimizer = torch.optim.Adam([{'params': [w, b], 'lr': lr} for (lr, _), w, b in zip(grid, weights, biases)])
    decays = torch.tensor([wd for _, wd in grid], dtype=torch.float32, device=features.device)
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(features) / settings.batch_size)
    total_steps, step = settings.epochs * steps_per_epoch, 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(features), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            stacked_w, stacked_b = torch.stack(weights), torch.stack(biases)  # [G, C, D], [G, C]
            logits = torch.einsum('bd,gcd->gbc', features[batch], stacked_w) + stacked_b[:, None, :]
            target = labels[batch].repeat(len(grid))
            # Sum over heads of each head's mean cross-entropy: the heads' gradients stay independent.
            loss = F.cross_entropy(logits.reshape(-1, num_classes), target, reduction='sum') / len(batch)
            loss = loss + (decays * stacked_w.pow(2).sum(dim=(1, 2))).sum() / 2
            for group, (lr, _) in zip(optimizer.param_groups, grid):
                group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return [(w.detach(), b.detach()) for w, b in zip(weights, biases)]


def head_scores(features: Tensor, head: Tuple[Tensor, Tensor]) -> Tensor:
    """`[N, C]` logits, on the CPU where the metrics run."""
    weight, bias = head
    return (features.float().to(weight.device) @ weight.T + bias).cpu()


@dataclass
class LinearProbeResult:
    metric: str
    value: float  # the metric on the test split, percent
    top1: float
    lr: float
    weight_decay: float
    num_train: int  # images the final head was fit on (train + validation)
    num_test: int
    search: List[Dict[str, float]] = field(default_factory=list)  # every grid point's validation metric


def search_hyperparameters(train: Tuple[Tensor, Tensor], val: Tuple[Tensor, Tensor], num_classes: int,
                           metric: str, settings: ProbeSettings, init: HeadInit = HeadInit()
                           ) -> Tuple[Tuple[float, float], List[Dict[str, float]]]:
    """The (lr, weight decay) whose head scores best on `val`. Ties go to the larger weight decay, then the
    smaller learning rate: the more conservative fit."""
    grid = [(lr, wd) for lr in settings.learning_rates for wd in settings.weight_decays]
    heads = train_heads(*train, num_classes, grid, settings, init)
    metric_fn = get_metric(metric)
    search = [{'lr': lr, 'weight_decay': wd, 'value': metric_fn(head_scores(val[0], head), val[1].cpu())}
              for (lr, wd), head in zip(grid, heads)]
    best = max(search, key=lambda r: (r['value'], r['weight_decay'], -r['lr']))
    return (best['lr'], best['weight_decay']), search


def linear_probe(train: Tuple[Tensor, Tensor], val: Tuple[Tensor, Tensor], test: Tuple[Tensor, Tensor],
                 num_classes: int, metric: str = 'accuracy', settings: ProbeSettings = ProbeSettings(),
                 init: HeadInit = HeadInit()) -> LinearProbeResult:
    """Search on (train, val), refit on train + val with the chosen values, score on test. Each split is
    (features `[N, D]`, labels `[N]`)."""
    (lr, wd), search = search_hyperparameters(train, val, num_classes, metric, settings, init)
    logger.info(f'linear probe: lr {lr:g}, weight decay {wd:g} chosen on {len(val[1])} validation images '
                f'({metric} {max(r["value"] for r in search):.2f})')
    features, labels = torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])
    head, = train_heads(features, labels, num_classes, [(lr, wd)], settings, init)
    scores, targets = head_scores(test[0], head), test[1].cpu()
    return LinearProbeResult(metric=metric, value=get_metric(metric)(scores, targets),
                             top1=accuracy(scores, targets), lr=lr, weight_decay=wd,
                             num_train=len(labels), num_test=len(test[1]), search=search)


# ----------------------------------------------------------------------------------------------------
# From image folders
# ----------------------------------------------------------------------------------------------------
INIT_HEADS = ('zero', 'text')


def run_linear_probe(encoder: Encoder, train_path: str, val_path: str, test_path: Optional[str] = None,
                     metric: str = 'accuracy', settings: ProbeSettings = ProbeSettings(), init_head: str = 'zero',
                     classnames_file: Optional[str] = None, templates: Templates = 'imagenet',
                     cache: Optional[FeatureCache] = None) -> LinearProbeResult:
    """The ELEVATER protocol on ImageFolder trees with the same class folders. With a test split the search
    uses `val_path`; without one it uses a class-balanced 20% of train, and the result is on `val_path`.
    `init_head='text'` starts every head from the zero-shot classifier (logit scale x class embeddings)."""
    if init_head not in INIT_HEADS:
        raise ValueError(f'init_head must be one of {INIT_HEADS}, got {init_head!r}')
    get_metric(metric)  # an unknown metric fails before any feature is extracted
    cache = cache or FeatureCache(None)
    folders = {name: image_folder(path) for name, path in
               (('train', train_path), ('val', val_path), ('test', test_path)) if path}
    for name, folder in folders.items():
        if folder.classes != folders['train'].classes:
            raise ValueError(f'the {name} split {folder.root} has other class folders than train '
                             f'{folders["train"].root}')
    # The heads train where the features are: on the GPU when there is one.
    splits = {name: (encoder.cached_images(folder.paths, folder.labels, cache, desc=f'{name} features'),
                     torch.tensor(folder.labels, device=encoder.device)) for name, folder in folders.items()}
    if 'test' in splits:
        search_train, search_val, test = splits['train'], splits['val'], splits['test']
    else:
        kept, held = (i.to(encoder.device) for i in balanced_split(splits['train'][1].cpu(), seed=settings.seed))
        search_train = tuple(t[kept] for t in splits['train'])
        search_val = tuple(t[held] for t in splits['train'])
        test = splits['val']
    init = HeadInit()
    if init_head == 'text':
        classnames = dataset_classnames(folders['train'], classnames_file)
        init = HeadInit(weight=encoder.logit_scale * class_embeddings(encoder, classnames, templates))
    return linear_probe(search_train, search_val, test, len(folders['train'].classes), metric, settings, init)

"""Linear probes on frozen image features, under one of two protocols:

- `default`: a tuned multinomial logistic regression (`evaluation.logistic`): the weight decay chosen by the
  coarse-to-fine search on held-out data, the head refit with it and reported as fit (never on a best test
  epoch). Scores like scikit-learn's `LogisticRegressionCV` on the same features (bench/linear_probe.py).
- `elevater`: the ELEVATER benchmark's procedure exactly (`evaluation.elevater_probe`), for numbers that sit
  next to published ELEVATER / UniCL / CLIP tables.

Both run on cached features, never on images. `shots` (ELEVATER's 5 / 20 / 50-shot) samples K training images
per class with each seed; several seeds report their mean and standard deviation.
"""
from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from utils.checkpoint import save_atomic
from utils.distributed import get_rank

from .cache import FeatureCache
from .checks import check_same_classes
from .data import LabeledImages, image_folder
from .elevater_probe import REPORT_RULE as ELEVATER_REPORT_RULE
from .elevater_probe import ElevaterSettings, elevater_probe
from .encoder import Encoder
from .errors import EvaluationInputError
from .logistic import MAX_ITERATIONS, LinearHead, fit_logistic
from .metrics import accuracy, get_metric
from .search import WeightDecaySearch, search_together
from .zeroshot import Templates, class_embeddings, dataset_classnames

logger = logging.getLogger(__name__)

Split = Tuple[Tensor, Tensor]  # (features [N, D], labels [N])
INIT_HEADS = ('zero', 'text')
VALIDATION_FRACTION = 0.2
# log10 bounds of the default protocol's weight-decay grid. With a mean loss the useful decay shrinks like
# 1 / (training images): ELEVATER's 1e-6 floor was the best point on the demo's 1,280 images (the optimum
# lay near 1e-8), so the grid reaches 1e-10, enough for ImageNet-sized sets.
DEFAULT_WEIGHT_DECAY_RANGE = (-10, 2)


@dataclass
class ProbeSettings:
    protocol: str = 'default'
    shots: Optional[int] = None  # training images per class; None: all
    seeds: Sequence[int] = (0,)  # one run per seed: the few-shot sample and the default protocol's hold-out split
    max_iterations: int = MAX_ITERATIONS  # default protocol: L-BFGS iterations per fit
    search_folds: int = 5  # default protocol without a test split: cross-validation folds of its search
    warm_start: bool = True  # default protocol: each fit starts at the nearest weight decay's solution
    elevater: ElevaterSettings = field(default_factory=ElevaterSettings)


@dataclass
class ZeroShotHead:
    """The zero-shot classifier of a dataset: normalized class embeddings `[C, D]` and the model's logit scale."""
    embeddings: Tensor
    logit_scale: float


@dataclass
class LinearProbeResult:
    """One probe run (one seed). `value` is the metric on the report split, percent."""
    protocol: str
    report_rule: str
    metric: str
    value: float
    top1: float
    lr: Optional[float]  # None for the default protocol (it has no learning rate)
    weight_decay: float
    seed: int
    num_train: int  # images the final head was fit on
    num_search_train: int
    num_search_val: int
    num_test: int
    search: List[Dict[str, float]] = field(default_factory=list)  # every point tried, with its validation metric
    extra: Dict[str, object] = field(default_factory=dict)  # protocol-specific facts (e.g. ELEVATER's curve)
    test_scores: Optional[Tensor] = None  # `[N, C]` logits on the report split; not written to JSON

    def summary(self) -> Dict[str, object]:
        keys = ('seed', 'value', 'top1', 'lr', 'weight_decay', 'num_train', 'num_search_train', 'num_search_val',
                'num_test')
        return {**{k: getattr(self, k) for k in keys}, **self.extra, 'search': self.search}


@dataclass
class LinearProbeReport:
    """All seeds' runs of one probe; `value` / `top1` are their means, `std` the sample standard deviation."""
    protocol: str
    report_rule: str
    metric: str
    shots: Optional[int]
    runs: List[LinearProbeResult]
    splits: Dict[str, str]  # what each role used: e.g. {'search': 'val', 'report': 'test'}

    @property
    def value(self) -> float:
        return statistics.fmean(r.value for r in self.runs)

    @property
    def std(self) -> float:
        return statistics.stdev(r.value for r in self.runs) if len(self.runs) > 1 else 0.0

    @property
    def top1(self) -> float:
        return statistics.fmean(r.top1 for r in self.runs)

    def summary(self) -> Dict[str, object]:
        """The JSON of `evaluate.py linear-probe`: the mean over seeds first, every run after; with a single
        seed its lr, weight decay and image counts also at the top level."""
        content: Dict[str, object] = {
            'protocol': self.protocol, 'report_rule': self.report_rule, 'metric': self.metric, 'value': self.value,
            'std': self.std, 'top1': self.top1, 'shots': self.shots, 'seeds': [r.seed for r in self.runs],
            'splits': self.splits, 'num_test': self.runs[0].num_test}
        if len(self.runs) == 1:
            run = self.runs[0]
            content.update(lr=run.lr, weight_decay=run.weight_decay, num_train=run.num_train,
                           num_search_train=run.num_search_train, num_search_val=run.num_search_val)
        content['runs'] = [r.summary() for r in self.runs]
        return content


# ----------------------------------------------------------------------------------------------------
# Which images each role uses: decided from the labels alone, before any feature is extracted
# ----------------------------------------------------------------------------------------------------
def few_shot_indices(labels: Tensor, shots: int, seed: int) -> Tensor:
    """`shots` images of every class drawn with `seed` (all of a class that has fewer), in dataset order."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values


def balanced_split(labels: Tensor, fraction: float = VALIDATION_FRACTION, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """(kept, held out) indices: round(fraction x n) random images of every class held out, at least one
    where a class has two or more, never a class's only image (training would lose the class)."""
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(members[:n_held])
        kept.append(members[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def class_folds(labels: Tensor, folds: int, seed: int = 0) -> List[Tuple[Tensor, Tensor]]:
    """Stratified k-fold (kept, held out) index pairs: each class's images, in a seeded order, dealt to the
    folds in turn; a class's only image is never held out."""
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.full((len(labels),), -1, dtype=torch.long)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) > 1:
            fold_of[members[torch.randperm(len(members), generator=generator)]] = torch.arange(len(members)) % folds
    return [((fold_of != k).nonzero().flatten(), (fold_of == k).nonzero().flatten()) for k in range(folds)]


@dataclass
class RunPlan:
    """Rows of the training split's features one seed trains on."""
    seed: int
    train_rows: Tensor
    shots: Optional[int] = None  # images drawn per class (None: all)
    merge_validation: bool = True  # ELEVATER's 1-shot runs train the final head on the train part only


def plan_runs(train_labels: Tensor, settings: ProbeSettings) -> List[RunPlan]:
    """One plan per seed. ELEVATER turns 1-shot into 2-shot without merging the validation image back (a
    1-shot class has nothing to validate on)."""
    shots, merge = settings.shots, True
    if settings.protocol == 'elevater' and shots == 1:
        shots, merge = 2, False
        logger.info('ELEVATER protocol: 1-shot runs draw 2 images per class and train the final head on one')
    return [RunPlan(seed, few_shot_indices(train_labels, shots, seed) if shots else torch.arange(len(train_labels)),
                    shots, merge) for seed in settings.seeds]


def _check_can_hold_out(labels: Tensor, where: str) -> None:
    counts = torch.bincount(labels)
    if counts.max() < 2:
        raise EvaluationInputError(f'{where}: every class has at most one training image, so no validation part '
                                   'can be held out for the search; give more images per class (or --shots >= 2), '
                                   'or a --val-path and a --test-path')


# ----------------------------------------------------------------------------------------------------
# The protocols, on features
# ----------------------------------------------------------------------------------------------------
def default_probe(train: Split, search_splits: Sequence[Tuple[Split, Split]], test: Split, num_classes: int,
                  metric: str, settings: ProbeSettings, seed: int, zeroshot: Optional[ZeroShotHead] = None
                  ) -> LinearProbeResult:
    """Search the weight decay on `search_splits` ((fit part, scored part) pairs: a point's score is its mean
    over them), refit on `train`, score `test`."""
    prior = (LinearHead(zeroshot.logit_scale * zeroshot.embeddings, torch.zeros(num_classes))
             if zeroshot is not None else None)
    metric_fn = get_metric(metric)
    search = WeightDecaySearch(*DEFAULT_WEIGHT_DECAY_RANGE)
    visited: List[Dict[str, float]] = []

    fitted: List[Dict[int, LinearHead]] = [{} for _ in search_splits]  # per fold: grid index -> its head

    def start(fold: int, index: int) -> Optional[LinearHead]:
        """The warm start of a fit: the fold's head at the nearest weight decay fit so far (the stronger one
        on a tie); None (the prior) for the first."""
        if not settings.warm_start or not fitted[fold]:
            return None
        return fitted[fold][min(fitted[fold], key=lambda i: (abs(i - index), -i))]

    def score(pairs: List[Tuple[int, int]]) -> List[float]:
        values = {}
        # From the strongest weight decay down: each fit starts at a solution of the same fold that is close.
        for index in sorted({index for _, index in pairs}, reverse=True):
            folds = []
            for fold, (fit, held) in enumerate(search_splits):
                head = fit_logistic(*fit, num_classes, search.grid[index], prior,
                                    max_iterations=settings.max_iterations, init=start(fold, index))
                fitted[fold][index] = head
                folds.append(metric_fn(head.scores(held[0]), held[1].cpu()))
            values[index] = statistics.fmean(folds)
        visited.extend({'weight_decay': search.grid[index], 'value': values[index]} for _, index in pairs)
        return [values[index] for _, index in pairs]

    search_together([search], score)
    weight_decay, _ = search.best
    if weight_decay in (search.grid[0], search.grid[-1]):
        logger.warning(f'linear probe: the weight decay search chose the edge of its grid ({weight_decay:g}); '
                       'the best value may lie beyond it')
    # The final fit starts at the mean of the folds' heads for the chosen weight decay (as scikit-learn's refit).
    peak = search.peak_index % len(search.grid)  # -1 (nothing scored above 0) is the last point
    chosen = [fitted[fold][peak] for fold in range(len(search_splits))]
    init = (LinearHead(torch.stack([h.weight for h in chosen]).mean(0), torch.stack([h.bias for h in chosen]).mean(0))
            if settings.warm_start else None)
    head = fit_logistic(*train, num_classes, weight_decay, prior, max_iterations=settings.max_iterations, init=init)
    scores, targets = head.scores(test[0]), test[1].cpu()
    return LinearProbeResult('default', 'final_head', metric, metric_fn(scores, targets), accuracy(scores, targets),
                             None, weight_decay, seed, len(train[1]), len(search_splits[0][0][1]),
                             len(search_splits[0][1][1]), len(targets), visited,
                             extra={'search_folds': len(search_splits)}, test_scores=scores)


def run_default(train: Split, splits: Dict[str, Split], num_classes: int, metric: str, settings: ProbeSettings,
                plan: RunPlan, zeroshot: Optional[ZeroShotHead] = None) -> LinearProbeResult:
    """With a test split: search on val, refit on train + val. Without: search by stratified k-fold
    cross-validation on train (`search_folds`; 1: one random 20 % of each class held out), refit on all of
    train (the result is then on val)."""
    if 'test' in splits:
        search_splits = [(train, splits['val'])]
        train = (torch.cat([train[0], splits['val'][0]]), torch.cat([train[1], splits['val'][1]]))
    else:
        labels = train[1].cpu()
        parts = (class_folds(labels, settings.search_folds, plan.seed) if settings.search_folds > 1
                 else [balanced_split(labels, VALIDATION_FRACTION, plan.seed)])
        search_splits = [tuple((train[0][i.to(train[0].device)], train[1][i.to(train[0].device)]) for i in part)
                         for part in parts]
    report = splits['test' if 'test' in splits else 'val']
    return default_probe(train, search_splits, report, num_classes, metric, settings, plan.seed, zeroshot)


def run_elevater(train: Split, splits: Dict[str, Split], num_classes: int, metric: str, settings: ProbeSettings,
                 plan: RunPlan, zeroshot: Optional[ZeroShotHead] = None) -> LinearProbeResult:
    """The search split is carved from train whatever other splits exist; a val split beside a test split
    is not used (the toolkit ignores the benchmark's own val sets too)."""
    report = splits['test' if 'test' in splits else 'val']
    # The toolkit's text-initialised head is the normalized class embeddings with logit scale exp(0) = 1.
    outcome = elevater_probe(train, report, num_classes, metric, settings.elevater,
                             zeroshot.embeddings if zeroshot is not None else None, plan.merge_validation)
    targets = report[1].cpu()
    return LinearProbeResult('elevater', ELEVATER_REPORT_RULE, metric, outcome.value,
                             accuracy(outcome.test_scores, targets), outcome.lr, outcome.weight_decay, plan.seed,
                             outcome.num_train, outcome.num_search_train, outcome.num_search_val, len(targets),
                             outcome.search, extra={'best_epoch': outcome.best_epoch,
                                                    'value_last_epoch': outcome.value_last_epoch,
                                                    'curve': outcome.curve},
                             test_scores=outcome.test_scores)


ProtocolRunner = Callable[[Split, Dict[str, Split], int, str, ProbeSettings, RunPlan, Optional[ZeroShotHead]],
                          LinearProbeResult]
PROTOCOLS: Dict[str, ProtocolRunner] = {'default': run_default, 'elevater': run_elevater}


def holds_out_from_train(protocol: str, has_test: bool) -> bool:
    return protocol == 'elevater' or not has_test


def splits_used(protocol: str, has_test: bool, merge_validation: bool = True, folds: int = 1) -> Dict[str, str]:
    """What each role of the probe used, for the results file."""
    report = 'test' if has_test else 'val'
    if protocol == 'elevater':
        final = 'train' if merge_validation else 'train without its validation part (1-shot)'
        return {'search': 'train, scored on the first 20% of each class', 'final': final, 'report': report}
    if has_test:
        return {'search': 'train, scored on val', 'final': 'train + val', 'report': 'test'}
    search = (f'train, {folds}-fold cross-validation by class' if folds > 1
              else 'train, scored on a random 20% of each class')
    return {'search': search, 'final': 'train', 'report': 'val'}


def probe_features(splits: Dict[str, Split], num_classes: int, metric: str, settings: ProbeSettings,
                   zeroshot: Optional[ZeroShotHead] = None, plans: Optional[List[RunPlan]] = None
                   ) -> LinearProbeReport:
    """The probe on extracted features: `splits` holds `train` and `val`, and `test` when there is one; the
    result is on `test`, else on `val`. `plans` (default: drawn from the train labels) say which train rows
    each seed uses."""
    if settings.protocol not in PROTOCOLS:
        raise EvaluationInputError(f'unknown protocol {settings.protocol!r}; known: {", ".join(PROTOCOLS)}')
    train_x, train_y = splits['train']
    if plans is None:
        plans = plan_runs(train_y.cpu(), settings)
    runs = []
    for plan in plans:
        rows = plan.train_rows.to(train_x.device)
        run = PROTOCOLS[settings.protocol]((train_x[rows], train_y[rows]), splits, num_classes, metric, settings,
                                           plan, zeroshot)
        if settings.shots:
            run.extra['train_rows'] = plan.train_rows.tolist()  # rows of features_train.pt this seed trained on
        runs.append(run)
    used = splits_used(settings.protocol, 'test' in splits, plans[0].merge_validation, settings.search_folds)
    return LinearProbeReport(settings.protocol, runs[0].report_rule, metric, plans[0].shots, runs, used)


# ----------------------------------------------------------------------------------------------------
# From image folders
# ----------------------------------------------------------------------------------------------------
def save_features(output: str, splits: Dict[str, Split], folders: Dict[str, LabeledImages],
                  rows: Dict[str, Tensor]) -> List[str]:
    """`OUT/features_<split>.pt` = `{'features': float [N, D], 'labels': int64 [N], 'paths': [N]}`: the raw
    features the heads are trained on, before any normalization a protocol applies."""
    written = []
    if get_rank() != 0:
        return written
    for name, (features, labels) in splits.items():
        path = os.path.join(output, f'features_{name}.pt')
        save_atomic({'features': features.float().cpu(), 'labels': labels.long().cpu(),
                     'paths': [folders[name].paths[i] for i in rows[name].tolist()]}, path)
        written.append(path)
    return written


def run_linear_probe(encoder: Encoder, train_path: str, val_path: str, test_path: Optional[str] = None,
                     metric: str = 'accuracy', settings: ProbeSettings = ProbeSettings(), init_head: str = 'zero',
                     classnames_file: Optional[str] = None, templates: Templates = 'imagenet',
                     cache: Optional[FeatureCache] = None, save_features_to: Optional[str] = None
                     ) -> LinearProbeReport:
    """The probe on ImageFolder trees with the same class folders (see `probe_features` for the roles of the
    splits). `init_head='text'` starts from the zero-shot classifier. Every check on the folders and the
    plan runs before any image is read; with few-shot runs only the sampled training images are encoded."""
    if init_head not in INIT_HEADS:
        raise EvaluationInputError(f'init_head must be one of {INIT_HEADS}, got {init_head!r}')
    get_metric(metric)
    cache = cache or FeatureCache(None)
    folders = {name: image_folder(path) for name, path in
               (('train', train_path), ('val', val_path), ('test', test_path)) if path}
    check_same_classes(folders)
    train_labels = torch.tensor(folders['train'].labels)
    plans = plan_runs(train_labels, settings)
    if holds_out_from_train(settings.protocol, 'test' in folders):
        for plan in plans:
            _check_can_hold_out(train_labels[plan.train_rows], folders['train'].root)
    rows = {name: torch.arange(len(folder)) for name, folder in folders.items()}
    if settings.shots:  # encode only the images some seed trains on
        used = torch.cat([plan.train_rows for plan in plans]).unique()
        rows['train'] = used
        for plan in plans:  # train_rows now index the encoded subset
            plan.train_rows = torch.searchsorted(used, plan.train_rows)
    splits = {}
    for name, folder in folders.items():
        paths = [folder.paths[i] for i in rows[name].tolist()]
        labels = [folder.labels[i] for i in rows[name].tolist()]
        # The heads train where the features are: on the GPU when there is one.
        splits[name] = (encoder.cached_images(paths, labels, cache, desc=f'{name} features'),
                        torch.tensor(labels, device=encoder.device))
    if save_features_to:
        for path in save_features(save_features_to, splits, folders, rows):
            logger.info(f'saved {path}')
    zeroshot = None
    if init_head == 'text':
        classnames = dataset_classnames(folders['train'], classnames_file)
        zeroshot = ZeroShotHead(class_embeddings(encoder, classnames, templates), encoder.logit_scale.item())
    return probe_features(splits, len(folders['train'].classes), metric, settings, zeroshot, plans)

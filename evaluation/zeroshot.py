"""Zero-shot classification as the official evaluation does it: a class embedding is the renormalized mean
over prompt templates of the normalized text features; logits are `logit_scale.exp() * image @ class.T`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from data.classnames import resolve_classnames, resolve_templates
from data.prompts import split_synonyms
from data.text_prefix import zeroshot_prefix

from .data import LabeledImages, image_folder
from .encoder import Encoder
from .metrics import accuracy, accuracy_top5, get_metric

Templates = Union[str, Sequence[str]]  # 'imagenet', 'single', a file, or the templates themselves


def dataset_classnames(images: LabeledImages, explicit: Optional[str] = None) -> List[str]:
    """Class names of an ImageFolder tree (see `resolve_classnames`); of a line listing synonyms
    ("dog; doggy"), the first."""
    lines = resolve_classnames(len(images.classes), folder=images.root, explicit=explicit,
                               folder_names=images.classes)
    return [split_synonyms(line)[0] for line in lines]


def class_embeddings(encoder: Encoder, classnames: Sequence[str], templates: Templates) -> Tensor:
    """`[C, D]`: per class, the renormalized mean of its templates' normalized text features. Each prompt
    gets the DATA.TEXT_PREFIX of the kind DATA.TEXT_PREFIX_ZEROSHOT names (none when prefixes are off)."""
    templates = resolve_templates(templates) if isinstance(templates, str) else list(templates)
    prefix = zeroshot_prefix(encoder.config)
    texts = [prefix + template.format(name) for name in classnames for template in templates]
    means = encoder.texts(texts, desc='class embeddings').view(len(classnames), len(templates), -1).mean(dim=1)
    return means / means.norm(dim=-1, keepdim=True)


@dataclass
class ZeroShotResult:
    top1: float
    top5: float
    num_images: int
    num_classes: int
    metric: str
    value: float  # `metric` in percent
    predictions: List[Dict] = field(default_factory=list)  # in dataset order, when asked for


def run_zeroshot(encoder: Encoder, data_path: str, classnames_file: Optional[str] = None,
                 templates: Templates = 'imagenet', metric: str = 'accuracy',
                 keep_predictions: bool = False, logit_scale: Optional[float] = None) -> ZeroShotResult:
    """Zero-shot evaluation on the ImageFolder tree `data_path` (also main.py's validation). Under torchrun
    each rank encodes a disjoint share of the prompts and images; every rank returns the same result.
    `logit_scale` replaces the model's (ELEVATER scores every model at 100): it changes no argmax, but the
    softmax that `map_11point` ranks images by."""
    metric_fn = get_metric(metric)
    images = image_folder(data_path)
    classes = class_embeddings(encoder, dataset_classnames(images, classnames_file), templates)
    scale = encoder.logit_scale if logit_scale is None else logit_scale
    logits = (scale * encoder.images(images.paths, desc='zero-shot') @ classes.T).cpu()
    targets = torch.tensor(images.labels)
    result = ZeroShotResult(top1=accuracy(logits, targets), top5=accuracy_top5(logits, targets),
                            num_images=len(images), num_classes=len(images.classes), metric=metric,
                            value=metric_fn(logits, targets))
    if keep_predictions:
        scores, top = logits.topk(min(5, logits.shape[1]), dim=1)
        result.predictions = [{'path': path, 'label': label, 'top5': t, 'scores': s} for path, label, t, s in
                              zip(images.relative_paths(), images.labels, top.tolist(), scores.tolist())]
    return result

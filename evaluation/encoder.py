"""A frozen UniCL model with everything evaluation needs to run it: tokenizer, config (transform, context
length), device, autocast dtype, batch size, and the checkpoint file for feature-cache keys."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from configs import load_config
from data.transforms import build_eval_transform
from model import UniCLModel, build_tokenizer, build_unicl_model
from model.checkpoint import load_pretrained
from utils.checkpoint import resolve_source
from utils.precision import autocast_dtype

from .cache import FeatureCache, feature_key
from .data import ImageItem
from .features import image_features, text_features

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode inside, the previous mode after (main.py validates mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class Encoder:
    model: UniCLModel
    tokenizer: Any
    config: Any
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    batch_size: Optional[int] = None  # images per batch and process; None: DATA.BATCH_SIZE
    num_workers: Optional[int] = None  # None: DATA.NUM_WORKERS
    checkpoint: Optional[str] = None  # the local checkpoint file, when the weights came from one
    transform_mode: Optional[str] = None  # a name of data.transforms.EVAL_TRANSFORMS; None: the default

    def __post_init__(self):
        self.transform = build_eval_transform(self.config, self.transform_mode)

    def with_transform(self, mode: Optional[str]) -> 'Encoder':
        """This encoder with eval transform `mode` (None: the default): a copy sharing the model, so a suite
        switches transforms per dataset without reloading the weights."""
        return dataclasses.replace(self, transform_mode=mode)

    def images(self, items: Sequence[ImageItem], desc: str = 'image features') -> Tensor:
        """`[N, D]` normalized image embeddings in `items` order, on every rank."""
        with eval_mode(self.model):
            return image_features(self.model, items, self.transform, self.device,
                                  self.batch_size or self.config.DATA.BATCH_SIZE,
                                  self.config.DATA.NUM_WORKERS if self.num_workers is None else self.num_workers,
                                  self.amp_dtype, desc)

    def cached_images(self, paths: Sequence[str], labels: Sequence[int], cache: FeatureCache,
                      desc: str = 'image features') -> Tensor:
        """`images(paths)`, read from / written to `cache` when the weights came from a checkpoint file."""
        if self.checkpoint is None or cache.directory is None:
            return self.images(paths, desc)
        key = feature_key(cache.checkpoint_sha256(self.checkpoint), self.config.dump(), self.transform,
                          self.amp_dtype, paths, labels)
        return cache.get_or_compute(key, lambda: self.images(paths, desc), self.device, desc)

    def texts(self, texts: Sequence[str], desc: str = 'text features') -> Tensor:
        """`[T, D]` normalized text embeddings in `texts` order, on every rank."""
        with eval_mode(self.model):
            return text_features(self.model, self.tokenizer, texts, self.device,
                                 self.config.MODEL.TEXT_ENCODER.CONTEXT_LENGTH, amp_dtype=self.amp_dtype, desc=desc)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.detach().exp().float()


def load_encoder(cfg: str, checkpoint: str, device: torch.device, opts: Optional[list] = None,
                 amp: Optional[str] = None, batch_size: Optional[int] = None,
                 num_workers: Optional[int] = None, transform: Optional[str] = None) -> Encoder:
    """The model of config file `cfg` with the weights of `checkpoint` (a path or URL, any layout that
    `load_pretrained` reads). `amp` overrides the config's AMP_OPT_LEVEL (same reading as training);
    `transform` names the eval transform (see `data.transforms.build_eval_transform`)."""
    config = load_config(cfg, opts)
    model = build_unicl_model(config).to(device)
    path = resolve_source(checkpoint)
    report = load_pretrained(model, path, config.MODEL.IMAGE_ENCODER.TYPE)
    logger.info(f'loaded {checkpoint} ({len(report.unexpected)} unexpected keys ignored)')
    dtype = autocast_dtype(config.AMP_OPT_LEVEL if amp is None else amp, device)
    return Encoder(model.eval(), build_tokenizer(config.MODEL.TEXT_ENCODER), config, device, dtype, batch_size,
                   num_workers, checkpoint=path, transform_mode=transform)

"""`build_train_loader`: the one entry point training needs."""
from __future__ import annotations

import logging
from typing import Any, List, Optional

import torch

from configs import ConfigError

from . import jpeg_region
from .classnames import training_templates
from .crop_decode import CropDecoder
from .gpu_decode import build_batched_decode_pipeline
from .loader import LoaderSetup, TrainLoader
from .sources import Source, build_source
from .specs import source_specs
from .text_prefix import TextPrefix
from .transforms import TrainPipeline, build_train_pipeline

logger = logging.getLogger(__name__)


def _weights(sources: List[Source]) -> List[float]:
    """The configured WEIGHTs, or else the sources' sizes (as if they were concatenated)."""
    if all(s.spec.weight is not None for s in sources):
        return [float(s.spec.weight) for s in sources]
    unknown = [s.name for s in sources if s.num_samples is None]
    if unknown:
        raise ValueError(f'sources {unknown} do not know their size: give them NUM_SAMPLES, or give every '
                         f'source a WEIGHT (and set DATA.EPOCH_SAMPLES)')
    return [float(s.num_samples) for s in sources]


def _epoch_samples(config, sources: List[Source]) -> int:
    if config.DATA.EPOCH_SAMPLES:
        return config.DATA.EPOCH_SAMPLES
    unknown = [s.name for s in sources if s.num_samples is None]
    if unknown:
        raise ValueError(f'sources {unknown} do not know their size: set DATA.EPOCH_SAMPLES (or their NUM_SAMPLES)')
    return sum(s.num_samples for s in sources)


def _pipeline(config, device: Optional[torch.device]) -> TrainPipeline:
    """The training transform split for the loader; with DATA.DECODE_DEVICE cuda the batched decode on the
    training device (data/gpu_decode.py), which must then be a CUDA device."""
    if config.DATA.DECODE_DEVICE != 'cuda':
        return build_train_pipeline(config)
    if not torch.cuda.is_available() or device is None or torch.device(device).type != 'cuda':
        where = 'torch has no CUDA device' if not torch.cuda.is_available() else f'the training device is {device}'
        raise ConfigError(f"DATA.DECODE_DEVICE 'cuda' decodes on the training GPU, but {where}; "
                         f"use DATA.DECODE_DEVICE 'cpu'")
    return build_batched_decode_pipeline(config)


def build_train_loader(config, tokenizer: Any, rank: int, world_size: int,
                       device: Optional[torch.device] = None) -> TrainLoader:
    """This rank's training loader over the sources of `config.DATA` (see data/specs.py), with
    DATA.BATCH_SIZE samples per batch and DATA.EPOCH_SAMPLES // (BATCH_SIZE * world_size) batches per
    epoch. `tokenizer` is called per batch as the official code does (padding to CONTEXT_LENGTH). The
    images arrive normalised on `device` (default: the CPU): for a GPU the workers send uint8 and the images
    are normalised on it after the copy, for the CPU the workers normalise whole batches (data/normalize.py);
    with DATA.DECODE_DEVICE cuda the workers send the JPEG files' bytes, decoded on `device` (data/gpu_decode.py)."""
    pipeline = _pipeline(config, device)  # first: a refused DECODE_DEVICE before scanning the sources
    sources = [build_source(spec) for spec in source_specs(config)]
    global_batch = config.DATA.BATCH_SIZE * world_size
    epoch_samples = _epoch_samples(config, sources)
    steps = epoch_samples // global_batch
    if steps == 0:
        raise ValueError(f'an epoch of {epoch_samples} samples is less than one global batch of {global_batch} '
                         f'(DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} x {world_size} processes)')
    context_length = config.MODEL.TEXT_ENCODER.CONTEXT_LENGTH
    text_prefix = TextPrefix.from_config(config)
    text_prefix.check_fits(tokenizer, context_length)
    setup = LoaderSetup(
        sources, _weights(sources), pipeline.transform, tokenizer,
        context_length, training_templates(), config.DATA.BATCH_SIZE, steps,
        rank, world_size, config.DATA.NUM_WORKERS, config.SEED, config.DATA.MERGE_CAPTIONS, text_prefix,
        decode=pipeline.decode, finish=pipeline.finish,
        # A CPU device has no copy to shrink: the workers normalise whole batches, cheaper than image by image.
        finish_in_workers=device is None or torch.device(device).type == 'cpu', stack=pipeline.stack)
    loader = TrainLoader(setup, pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
                         log_bad_samples=config.DATA.LOG_BAD_SAMPLES, device=device)
    logger.info('training data:\n' + loader.describe())
    if isinstance(pipeline.decode, CropDecoder) and pipeline.decode.native:
        logger.info(f'training JPEGs: {jpeg_region.describe()}; other formats decoded whole by Pillow')
    return loader

"""The training loader: mixed sources -> (images, tokens, labels) batches, sharded, seeded and resumable.

Batch `step` of an epoch is built whole by one loader worker: worker w of W builds steps start+w,
start+w+W, ..., and torch's DataLoader hands the workers' batches out round-robin, i.e. in step order.
What goes into a batch is a function of (SEED, epoch, step, rank), not of timing:

- the per-source counts come from `MixingPlan` at the global step (epoch * steps_per_epoch + step);
- a map-style source's k-th sample on this rank sits at position k * world_size + rank of its endless
  seeded order (`SampleOrder`), so ranks read disjoint samples and any step's samples are computable;
- a stream source is read by slot rank * W + (step mod W); within a pass the slots read disjoint pieces
  of shards, every piece once per pass (see WebDatasetSource), and the position each batch leaves its
  slot at travels back with the batch;
- augmentations and prompt draws are seeded per (SEED, global step, rank).

So the loader's state is (epoch, step) plus the stream positions, and resuming reproduces the batches
an uninterrupted run would have produced (for the same world size and DATA.NUM_WORKERS; a map-style
source also for a different NUM_WORKERS).
"""
from __future__ import annotations

import copy
import logging
import random
from collections import Counter, defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from model.tokenizer import tokenize
from utils.dataloader import StopSafeDataLoader
from utils.distributed import all_gather_object, get_world_size

from .decode import decode_image
from .labels import LabelSpace
from .mixing import MixingPlan
from .normalize import stack_images
from .order import SampleOrder, derive_seed, seeded_global_rngs
from .prompts import class_prompt
from .sources import BadSample, MapSource, Record, Source, StreamSource
from .sources.base import EMPTY_CAPTION, StreamPosition
from .text_prefix import TextPrefix

logger = logging.getLogger(__name__)

# This many unusable samples in a row from one source stop the run: the source is broken, not noisy.
MAX_BAD_IN_A_ROW = 50

Batch = Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]


class LoaderSetup:
    """Everything a worker needs to build any batch; fixed for the whole run."""

    def __init__(self, sources: List[Source], weights: List[float], transform: Callable, tokenizer: Any,
                 context_length: int, templates: List[str], batch_size: int, steps_per_epoch: int,
                 rank: int, world_size: int, num_workers: int, seed: int, merge_captions: bool,
                 text_prefix: TextPrefix = TextPrefix(),
                 decode: Callable[[Record], Any] = decode_image, finish: Optional[Callable] = None,
                 finish_in_workers: bool = False, stack: Callable = stack_images):
        # decode: record -> the image `transform` starts from; stack: (the transform's outputs, shared=
        # whether the batch leaves the worker as it is) -> (batch, erasing); finish: (batch, erasing,
        # device) -> the normalised batch (data/transforms.TrainPipeline), run by the training process right
        # after the copy to the device or, with finish_in_workers, by the workers on the CPU.
        self.sources, self.decode, self.transform, self.tokenizer = sources, decode, transform, tokenizer
        self.finish, self.finish_in_workers, self.stack = finish, finish_in_workers, stack
        self.context_length, self.templates, self.text_prefix = context_length, templates, text_prefix
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = num_workers
        self.slots_per_rank = max(num_workers, 1)  # stream slots: one per worker (the main process if 0)
        self.weights = [w / sum(weights) for w in weights]
        self.plan = MixingPlan(weights, batch_size)
        self.labels = LabelSpace(sources, world_size, batch_size, merge_captions)
        # Per-source seeds so that two sources of equal size are not read in the same order.
        self.source_seeds = [derive_seed(seed, i, 0x736f75) for i in range(len(sources))]
        self.orders = {i: SampleOrder(s.num_samples, self.source_seeds[i])
                       for i, s in enumerate(sources) if isinstance(s, MapSource)}

    def fresh_position(self, epoch: int) -> StreamPosition:
        return [epoch, 0, 0]


class BatchStream(IterableDataset):
    """One epoch of one rank's batches from `start_step` on, each with an info dict."""

    def __init__(self, setup: LoaderSetup, epoch: int, start_step: int,
                 positions: Dict[str, List[Optional[StreamPosition]]]):
        super().__init__()
        self.setup, self.epoch, self.start_step, self.positions = setup, epoch, start_step, positions

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor, Dict]]:
        setup = self.setup
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers != setup.slots_per_rank:
            raise RuntimeError(f'BatchStream runs in {num_workers} workers but was set up for {setup.slots_per_rank}')
        first = self.start_step + worker
        residue = first % setup.slots_per_rank
        streams = {}
        for i, source in enumerate(setup.sources):
            if isinstance(source, StreamSource):
                position = self.positions[source.name][residue] or setup.fresh_position(self.epoch)
                streams[i] = source.iterate(setup.rank * setup.slots_per_rank + residue,
                                            setup.world_size * setup.slots_per_rank, setup.source_seeds[i],
                                            list(position))
        for step in range(first, setup.steps_per_epoch, setup.slots_per_rank):
            yield self._batch(step, residue, streams)

    def _batch(self, step: int, residue: int, streams: Dict[int, Iterator]):
        setup = self.setup
        global_step = self.epoch * setup.steps_per_epoch + step
        starts, counts = setup.plan.cumulative(global_step), setup.plan.counts(global_step)
        images, texts, labels, where = [], [], [], []
        info = {'step': step, 'residue': residue, 'where': where, 'bad': [], 'positions': {}}
        rng = random.Random(derive_seed(setup.seed, global_step, setup.rank, 1))
        with seeded_global_rngs(derive_seed(setup.seed, global_step, setup.rank, 0)):
            for i, source in enumerate(setup.sources):
                for k in range(starts[i], starts[i] + counts[i]):
                    slot = len(images)
                    if i in streams:
                        image, text, label, origin = self._from_stream(i, streams[i], global_step, slot, rng, info)
                    else:
                        image, text, label, origin = self._from_map(i, k, global_step, slot, rng, info)
                    images.append(setup.transform(image))
                    texts.append(text)
                    labels.append(label)
                    where.append(origin)
        tokens = tokenize(setup.tokenizer, texts, setup.context_length)
        finished_here = setup.finish is not None and setup.finish_in_workers
        # float, uint8 + erased patches (data/normalize.py) or encoded
        pixels, erasing = setup.stack(images, shared=not finished_here)
        if finished_here:
            pixels, erasing = setup.finish(pixels, erasing), None
        info['erasing'] = erasing
        return pixels, tokens, torch.tensor(labels, dtype=torch.int64), info

    def _use(self, i: int, record: Record, global_step: int, slot: int, rng: random.Random):
        """(image, text, label, where) of a record; raises BadSample when it cannot be used. The one place a
        training text gets its DATA.TEXT_PREFIX; a caption's label comes from the caption without it."""
        setup, source = self.setup, self.setup.sources[i]
        if source.is_labeled:
            image = setup.decode(record)
            text = class_prompt(source.class_names[record.class_index], setup.templates, rng)
            return (image, setup.text_prefix.label + text, setup.labels.class_label(i, record.class_index),
                    record.where)
        caption = (record.caption or '').strip()
        if not caption:
            raise BadSample(EMPTY_CAPTION, record.where)
        image = setup.decode(record)
        return (image, setup.text_prefix.caption + caption,
                setup.labels.caption_label(caption, global_step, setup.rank, slot), record.where)

    def _from_map(self, i: int, k: int, global_step: int, slot: int, rng: random.Random, info: Dict):
        setup, source = self.setup, self.setup.sources[i]
        index = setup.orders[i][k * setup.world_size + setup.rank]
        for attempt in range(MAX_BAD_IN_A_ROW):
            try:
                return self._use(i, source.read(index), global_step, slot, rng)
            except BadSample as bad:
                info['bad'].append((source.name, bad.reason, str(bad)))
            # A seeded stand-in keeps the batch full and the run reproducible.
            index = random.Random(derive_seed(setup.seed, global_step, setup.rank, slot, attempt)).randrange(
                source.num_samples)
        raise RuntimeError(_too_many_bad(source, info))

    def _from_stream(self, i: int, stream: Iterator, global_step: int, slot: int, rng: random.Random, info: Dict):
        source = self.setup.sources[i]
        for _ in range(MAX_BAD_IN_A_ROW):
            item, info['positions'][source.name] = next(stream)
            try:
                if isinstance(item, BadSample):
                    raise item
                return self._use(i, item, global_step, slot, rng)
            except BadSample as bad:
                info['bad'].append((source.name, bad.reason, str(bad)))
        raise RuntimeError(_too_many_bad(source, info))


def _too_many_bad(source: Source, info: Dict) -> str:
    last = [message for name, _, message in info['bad'] if name == source.name][-3:]
    return (f'data source {source.describe()}: {MAX_BAD_IN_A_ROW} unusable samples in a row, e.g. '
            + '; '.join(last))


def _as_is(batch):
    # Batches are built whole in the dataset; the DataLoader must not convert them.
    return batch


class TrainLoader:
    """Iterable over one epoch of `(images, tokens, labels)` for this rank; the images normalised float32,
    on `device` when one is given (the CPU otherwise).

    - `len(loader)`: batches per epoch.
    - `set_epoch(e)`: select epoch e; the position goes back to step 0 unless e is the current epoch (so
      `load_state_dict` then `set_epoch` of the same epoch resumes mid-epoch). Iterating a finished
      epoch without `set_epoch` moves on to the next one. `seek(e, step)` goes to a given batch.
    - `state_dict()` / `load_state_dict()`: the data position (epoch, next step, stream positions,
      bad-sample totals) as plain lists, dicts and numbers. The state reflects the batches handed out,
      not the ones prefetched. With stream sources under torch.distributed, `state_dict()` gathers the
      stream positions of all ranks, so it is a collective: call it on every rank (any rank's result can
      then be loaded by all). Resuming exactly needs the same world size and DATA.NUM_WORKERS.
    - `start_step`: the step the next iteration starts at.
    - `skipped(total=False)`: bad samples skipped on this rank, {source: {reason: count}}, for the
      current epoch or (total=True) the whole run.
    """

    def __init__(self, setup: LoaderSetup, pin_memory: bool = False, log_bad_samples: int = 10,
                 device: Optional[torch.device] = None):
        self.setup, self.pin_memory, self.log_bad_samples = setup, pin_memory, log_bad_samples
        self.device = device  # where setup.finish puts (and normalises) the images
        self._epoch, self._step = 0, 0
        self._positions: Dict[str, List[Optional[StreamPosition]]] = {
            s.name: [None] * setup.slots_per_rank for s in setup.sources if isinstance(s, StreamSource)}
        self._skipped_epoch: Dict[str, Counter] = defaultdict(Counter)
        self._skipped_total: Dict[str, Counter] = defaultdict(Counter)
        self._logged = 0

    def __len__(self) -> int:
        return self.setup.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def start_step(self) -> int:
        return self._step

    def seek(self, epoch: int, step: int) -> None:
        """Continue at batch `step` of `epoch` (a resume that converted its position to a new batch layout).
        Stream positions stay as loaded: they say where each slot goes on reading, not which step it is at."""
        if not 0 <= step <= len(self):
            raise ValueError(f'step {step} is outside an epoch of {len(self)} batches')
        if epoch != self._epoch:
            self._skipped_epoch.clear()
        self._epoch, self._step = epoch, step

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._step = epoch, 0
            self._skipped_epoch.clear()

    def __iter__(self) -> Iterator[Batch]:
        for images, tokens, labels, _ in self.iter_with_info():
            yield images, tokens, labels

    def iter_with_info(self) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor, Dict]]:
        """As iterating the loader, with a fourth item per batch: {'step', 'where' (each sample's path or
        shard#key), 'bad' ((source, reason, message) of the samples skipped for it), ...}."""
        if self._step >= len(self):
            self.set_epoch(self._epoch + 1)
        stream = BatchStream(self.setup, self._epoch, self._step, copy.deepcopy(self._positions))
        loader = StopSafeDataLoader(stream, batch_size=None, num_workers=self.setup.num_workers,
                                    collate_fn=_as_is, pin_memory=self.pin_memory,
                                    generator=torch.Generator().manual_seed(self.setup.seed))
        for images, tokens, labels, info in loader:
            if info['step'] != self._step:
                raise RuntimeError(f'loader delivered step {info["step"]}, expected {self._step}')
            self._step += 1  # before yielding: a state_dict taken while this batch trains points past it
            for name, position in info['positions'].items():
                self._positions[name][info['residue']] = list(position)
            self._count_bad(info['bad'])
            erasing = info.pop('erasing')
            if self.setup.finish is not None:  # right after the copy to the device (data/normalize.py)
                images = self.setup.finish(images, erasing, self.device)
            yield images, tokens, labels, info

    def _count_bad(self, bad: List[Tuple[str, str, str]]) -> None:
        for name, reason, message in bad:
            self._skipped_epoch[name][reason] += 1
            self._skipped_total[name][reason] += 1
            if self._logged < self.log_bad_samples:
                self._logged += 1
                logger.warning(f'rank {self.setup.rank}: skipped a bad sample of {name}: {message}'
                               + ('; further ones are only counted' if self._logged == self.log_bad_samples else ''))

    def skipped(self, total: bool = False) -> Dict[str, Dict[str, int]]:
        counts = self._skipped_total if total else self._skipped_epoch
        return {name: dict(reasons) for name, reasons in counts.items() if reasons}

    def _layout(self) -> Dict[str, Any]:
        setup = self.setup
        return {'world_size': setup.world_size, 'num_workers': setup.num_workers, 'batch_size': setup.batch_size,
                'steps_per_epoch': setup.steps_per_epoch, 'sources': [s.name for s in setup.sources],
                'stream_positions': {s.name: s.position_format for s in setup.sources if isinstance(s, StreamSource)}}

    def state_dict(self) -> Dict[str, Any]:
        positions = copy.deepcopy(self._positions)
        by_rank = {str(self.setup.rank): positions}
        if positions and get_world_size() > 1:
            by_rank = {str(rank): p for rank, p in all_gather_object((self.setup.rank, positions))}
        return {'epoch': self._epoch, 'step': self._step, 'stream_positions': by_rank,
                'skipped_total': self.skipped(total=True), 'skipped_epoch': self.skipped(), 'layout': self._layout()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        layout = self._layout()
        if state.get('layout') != layout:
            logger.warning(f'data position saved with {state.get("layout")}, now {layout}: the batches from '
                           f'here on differ from those of an uninterrupted run')
        self._epoch, self._step = int(state['epoch']), int(state['step'])
        self._skipped_total = defaultdict(Counter, {n: Counter(r) for n, r in state.get('skipped_total', {}).items()})
        self._skipped_epoch = defaultdict(Counter, {n: Counter(r) for n, r in state.get('skipped_epoch', {}).items()})
        saved = state.get('stream_positions', {}).get(str(self.setup.rank), {})
        # Stream positions are only meaningful for the same split of shards into slots and the same meaning
        # of a position.
        keys = ('world_size', 'num_workers', 'stream_positions')
        same_slots = {k: (state.get('layout') or {}).get(k) for k in keys} == {k: layout[k] for k in keys}
        for name, slots in self._positions.items():
            if same_slots and len(saved.get(name) or []) == len(slots):
                self._positions[name] = [list(p) if p is not None else None for p in saved[name]]
            else:
                self._positions[name] = [None] * len(slots)
                logger.warning(f'no saved position of stream {name} for rank {self.setup.rank}: '
                               f'it restarts from a fresh shard order')

    def describe(self) -> str:
        """A few lines for the log: sources, their share of each batch, label ranges, epoch size."""
        setup = self.setup
        lines = [f'{len(self)} steps per epoch of {setup.batch_size} x {setup.world_size} samples; '
                 f'{setup.labels.num_classes} classes, caption labels from {setup.labels.num_classes} on']
        for source, weight in zip(setup.sources, setup.weights):
            lines.append(f'  {source.describe()}: {100 * weight:.1f}% of each batch')
        if setup.text_prefix != TextPrefix():
            lines.append(f'  text prefixes (DATA.TEXT_PREFIX): {setup.text_prefix.label!r} before class prompts, '
                         f'{setup.text_prefix.caption!r} before captions')
        return '\n'.join(lines)

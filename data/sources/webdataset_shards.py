"""Image-text pairs in webdataset tar shards, as img2dataset writes them: `KEY.jpg|jpeg|png|webp` +
`KEY.txt` (+ `KEY.json`, ignored), optionally `SHARD_stats.json` beside each shard."""
from __future__ import annotations

import glob
import json
import os
import random
from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
from braceexpand import braceexpand

from .base import (BROKEN_SHARD, MISSING, NO_IMAGE, BadSample, Record, SourceSpec, StreamPosition,
                   StreamSource, register_source)

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')


def expand_shards(pattern: str) -> List[str]:
    """Shard urls of '::'-joined parts (webdataset's convention), each a folder (its *.tar, sorted), a
    brace pattern or a url, e.g. 'gcc3m::gcc12m' or 'cc3m/{00000..00331}.tar::pipe:curl -s URL'."""
    return [url for part in pattern.split('::') if part for url in _expand_part(part)]


def _expand_part(part: str) -> List[str]:
    if os.path.isdir(part):
        return sorted(glob.glob(os.path.join(part, '*.tar')))
    return list(braceexpand(part))


def _is_local(url: str) -> bool:
    return '://' not in url and not url.startswith('pipe:')


def _stats_successes(shards: List[str]) -> Optional[int]:
    """img2dataset's per-shard `_stats.json` sample counts, when every shard has one."""
    total = 0
    for shard in shards:
        stats = os.path.splitext(shard)[0] + '_stats.json'
        if not (_is_local(shard) and os.path.isfile(stats)):
            return None
        with open(stats, encoding='utf-8') as f:
            total += int(json.load(f)['successes'])
    return total


@register_source('webdataset')
class WebDatasetSource(StreamSource):
    """Shards are dealt out to the slots (rank x worker) after one seeded shuffle, so slots read disjoint
    data; with fewer shards than slots, the slots sharing a shard take every k-th sample of it. A slot
    cycles through its shards endlessly, in a new order each pass, and shuffles each shard through a
    buffer that empties at the shard's end, so a position (pass, shard, samples emitted) can be
    replayed exactly by re-reading only that one shard."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.shards = expand_shards(spec.path)
        if not self.shards:
            raise ValueError(f'data source {spec.name!r}: no shards match {spec.path}')
        local = [s for s in self.shards if _is_local(s)]
        if local and len(local) == len(self.shards) and not any(os.path.isfile(s) for s in local):
            raise ValueError(f'data source {spec.name!r}: none of the {len(local)} shards of {spec.path} exists')
        self.shuffle_buffer = max(1, spec.shuffle_buffer)
        self._num_samples = spec.num_samples if spec.num_samples is not None else _stats_successes(self.shards)

    @property
    def num_samples(self) -> Optional[int]:
        return self._num_samples

    def _assignment(self, slot: int, num_slots: int, seed: int) -> Tuple[List[str], int, int]:
        """(this slot's shards, k, r): the slot keeps the samples whose index in a shard is r mod k."""
        shuffled = [self.shards[i] for i in np.random.default_rng([seed]).permutation(len(self.shards))]
        if len(shuffled) >= num_slots:
            return shuffled[slot::num_slots], 1, 0
        shard = slot % len(shuffled)
        return [shuffled[shard]], len(range(shard, num_slots, len(shuffled))), slot // len(shuffled)

    def iterate(self, slot: int, num_slots: int, seed: int,
                position: StreamPosition) -> Iterator[Tuple[Union[Record, BadSample], StreamPosition]]:
        shards, modulus, remainder = self._assignment(slot, num_slots, seed)
        pass_, start, emitted = position
        while True:
            order = np.random.default_rng([seed, slot, pass_]).permutation(len(shards))
            whole_pass, records = start == 0 and emitted == 0, 0
            for i in range(start, len(shards)):
                rng = random.Random(f'{seed}/{slot}/{pass_}/{i}')
                items = self._shard_items(shards[order[i]], modulus, remainder, rng)
                for n, item in enumerate(items, 1):
                    if n > emitted:
                        records += isinstance(item, Record)
                        yield item, [pass_, i, n]
                emitted = 0
            if whole_pass and records == 0:
                raise RuntimeError(f'data source {self.name!r}: a full pass over {len(shards)} shard(s) of '
                                   f'{self.spec.path} gave no sample with an image')
            pass_, start = pass_ + 1, 0

    def _shard_items(self, url: str, modulus: int, remainder: int,
                     rng: random.Random) -> Iterator[Union[Record, BadSample]]:
        # Imported here: it takes seconds to import, and runs without shards do not need it.
        from webdataset.tariterators import tarfile_samples

        errors: List[Exception] = []
        samples = tarfile_samples([{'url': url}], handler=_collect(errors))
        buffer: List[Union[Record, BadSample]] = []
        for index, sample in enumerate(samples):
            yield from self._errors(url, errors, remainder)
            if index % modulus != remainder:
                continue
            item = self._record(sample)
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            yield item
        yield from self._errors(url, errors, remainder)
        if remainder == 0 and _cut_short(url):
            yield BadSample(BROKEN_SHARD, url, 'truncated: no end-of-archive blocks; its last members are lost')
        rng.shuffle(buffer)
        yield from buffer

    @staticmethod
    def _errors(url: str, errors: List[Exception], remainder: int) -> Iterator[BadSample]:
        # Slots sharing a shard all see its errors; only the first reports them, so each counts once.
        for exc in errors:
            if remainder == 0:
                reason = MISSING if isinstance(exc, FileNotFoundError) else BROKEN_SHARD
                # webdataset appends the stream and url to the exception's args; the message comes first
                yield BadSample(reason, url, f'{type(exc).__name__}: {exc.args[0] if exc.args else exc}')
        errors.clear()

    @staticmethod
    def _record(sample: dict) -> Union[Record, BadSample]:
        where = f"{sample.get('__url__')}#{sample.get('__key__')}"
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image is None:
            return BadSample(NO_IMAGE, where)
        text = sample.get('txt')
        return Record(image, where, caption=text.decode('utf-8', errors='replace') if text else '')


def _cut_short(url: str) -> bool:
    """Whether a local tar file lacks the two zero blocks that end every complete archive. Python's tarfile
    reads a file cut inside a member header as a clean, shorter archive; this catches that case."""
    if not os.path.isfile(url):
        return False  # remote shards: truncation shows as a read error, if at all
    size = os.path.getsize(url)
    if size % 512 or size < 1024:
        return True
    with open(url, 'rb') as f:
        f.seek(size - 1024)
        return any(f.read(1024))


def _collect(errors: List[Exception]) -> Callable[[Exception], bool]:
    def handler(exc: Exception) -> bool:
        errors.append(exc)
        return True  # go on with the next member or shard
    return handler

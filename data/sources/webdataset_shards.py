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
    """Shards are read as pieces: a shard whole, or, with fewer shards than slots (rank x worker), split
    into k sample-wise parts (the samples whose index in the shard is r mod k) so that there are at least as
    many pieces as slots. Pass p is a seeded permutation of all pieces; the passes laid end to end make one
    endless sequence, and slot s reads its pieces s, s + S, s + 2S, ... of it. Every slot reads at the same
    pace, so every piece is read once per pass whatever the shard and slot counts: each sample's reading
    rate is the same (dealing shards to slots once for the run read some slots' shards twice as often as
    others'). A piece is shuffled through a buffer that empties at its end, so a position (pass, piece,
    samples emitted) is replayed exactly by re-reading only that piece."""

    position_format = 2  # [pass, piece, emitted] in the sequence of pieces (1: in the slot's own shards)

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

    def iterate(self, slot: int, num_slots: int, seed: int,
                position: StreamPosition) -> Iterator[Tuple[Union[Record, BadSample], StreamPosition]]:
        parts = -(-num_slots // len(self.shards))  # pieces per shard: at least one piece per slot and pass
        pieces = len(self.shards) * parts
        pass_, index, emitted = position
        at = pass_ * pieces + index  # place in the endless sequence of pieces
        if emitted == 0:  # a fresh position (saved ones have emitted >= 1): this slot's next piece
            at += (slot - at) % num_slots
        order, order_pass, empty_in_a_row = None, -1, 0
        while True:
            pass_, index = divmod(at, pieces)
            if pass_ != order_pass:
                order, order_pass = np.random.default_rng([seed, pass_]).permutation(pieces), pass_
            shard, part = divmod(int(order[index]), parts)
            rng = random.Random(f'{seed}/{pass_}/{index}')
            records = 0
            for n, item in enumerate(self._shard_items(self.shards[shard], parts, part, rng), 1):
                if n > emitted:
                    records += isinstance(item, Record)
                    yield item, [pass_, index, n]
            empty_in_a_row = 0 if records else empty_in_a_row + 1
            if empty_in_a_row >= pieces:
                raise RuntimeError(f'data source {self.name!r}: {pieces} piece(s) of {len(self.shards)} shard(s) '
                                   f'of {self.spec.path} in a row gave no sample with an image')
            at, emitted = at + num_slots, 0

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

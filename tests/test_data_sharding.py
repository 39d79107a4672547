"""Sharding and determinism: ranks and workers read disjoint data; the order is a function of SEED and epoch."""
from __future__ import annotations

import os

import pytest

from data.builtin import SCALES
from tests.test_data_fixtures import LABELS, SHARDS, data_config, epoch_batches, loader_for, same_batches

TINY = SCALES['tiny']


def origins(batches):
    return [w for b in batches for w in b[3]['where']]


@pytest.mark.parametrize('source,size', [(LABELS, TINY.shapes * TINY.per_class),
                                         (SHARDS, TINY.caption_shards * TINY.per_shard)])
def test_two_ranks_two_workers_read_disjoint_data(tiny_data, tokenizer, source, size):
    # one epoch covers the source exactly once: 2 ranks x 2 workers, each reading its own part
    config = data_config(tiny_data, [source], batch_size=2, num_workers=2, SHUFFLE_BUFFER=3)
    per_rank = [origins(epoch_batches(loader_for(config, tokenizer, rank, 2))) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == size // 2
    everything = per_rank[0] + per_rank[1]
    assert len(set(everything)) == size  # disjoint, and together the whole source


def test_stream_slots_read_disjoint_whole_shards_each_pass(tiny_data):
    """With at least as many shards as slots, a slot reads whole shards, and within a pass the slots'
    shards are disjoint."""
    from data.sources import SourceSpec, build_source
    source = build_source(SourceSpec('webdataset', os.path.join(tiny_data, 'captions', 'shards'), 'w'))
    firsts = []
    for slot in range(2):
        stream = source.iterate(slot, 2, seed=0, position=[0, 0, 0])
        first = {next(stream)[0].where.split('#')[0] for _ in range(TINY.per_shard)}
        assert len(first) == 1
        firsts.append(first.pop())
    assert len(set(firsts)) == 2


@pytest.mark.parametrize('slots', [8, 64, 256])
def test_every_shard_sample_is_read_at_the_same_rate(monkeypatch, slots):
    """332 shards (GCC-3M) over 8, 64 and 256 rank x worker slots reading at the same pace: after 12
    nominal epochs every sample has been read 12 times, give or take one (dealing the shards to the
    slots once would read one slot's shards up to twice as often as another's)."""
    from data.sources import Record, SourceSpec, build_source
    from data.sources.webdataset_shards import WebDatasetSource
    per_shard, shards, epochs = 2, 332, 12

    def shard_items(self, url, modulus, remainder, rng):
        return (Record(b'', f'{url}#{i}', caption='c') for i in range(per_shard) if i % modulus == remainder)

    monkeypatch.setattr(WebDatasetSource, '_shard_items', shard_items)
    source = build_source(SourceSpec('webdataset', f'https://host/gcc3m-{{000..{shards - 1}}}.tar', 'gcc3m'))
    reads = {f'https://host/gcc3m-{s:03d}.tar#{i}': 0 for s in range(shards) for i in range(per_shard)}
    per_slot = epochs * shards * per_shard // slots
    for slot in range(slots):
        stream = source.iterate(slot, slots, seed=0, position=[0, 0, 0])
        for _ in range(per_slot):
            reads[next(stream)[0].where] += 1
    counts = sorted(reads.values())
    assert len(reads) == shards * per_shard  # no sample outside the shards
    assert counts[-1] - counts[0] <= 2 and epochs - 1 <= counts[len(counts) // 2] <= epochs, (counts[0], counts[-1])


def test_order_is_a_function_of_seed_and_epoch(tiny_data, tokenizer):
    config = data_config(tiny_data, [LABELS, SHARDS], batch_size=4)
    a, b = loader_for(config, tokenizer), loader_for(config, tokenizer)
    epoch0, epoch1 = epoch_batches(a, 0), epoch_batches(a, 1)
    assert same_batches(epoch0, epoch_batches(b, 0)) and same_batches(epoch1, epoch_batches(b, 1))
    assert origins(epoch0) != origins(epoch1)
    other_seed = data_config(tiny_data, [LABELS, SHARDS], batch_size=4)
    other_seed.defrost()
    other_seed.SEED = 1
    assert origins(epoch_batches(loader_for(other_seed, tokenizer), 0)) != origins(epoch0)


def test_map_sources_do_not_depend_on_worker_count(tiny_data, tokenizer):
    batches = [epoch_batches(loader_for(data_config(tiny_data, [LABELS], batch_size=4, num_workers=n), tokenizer))
               for n in (0, 2)]
    assert same_batches(*batches)


def test_batch_stream_pickles(tiny_data, tokenizer):
    """Workers started by spawn or forkserver (Python 3.14's default) receive the dataset pickled."""
    import pickle

    from data.loader import BatchStream
    loader = loader_for(data_config(tiny_data, [LABELS, SHARDS, {'TYPE': 'zip', 'PATH': 'labels', 'NAME': 'z'}],
                                    batch_size=4), tokenizer)
    stream = BatchStream(loader.setup, 0, 1, {'shards': [None]})
    copy = pickle.loads(pickle.dumps(stream))
    assert same_batches([next(iter(copy))], [next(iter(stream))])


def test_map_source_alone_is_visited_in_a_new_order_every_epoch(tiny_data, tokenizer):
    """One pass per epoch over a map-style source: the same samples, a different order (no stream or
    augmentation randomness to hide a fixed order)."""
    loader = loader_for(data_config(tiny_data, [LABELS], batch_size=4), tokenizer)
    epochs = [origins(epoch_batches(loader, e)) for e in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2]) and len(set(epochs[0])) == len(epochs[0])
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_each_labelled_sample_draws_its_own_prompt_template(tiny_data, tokenizer):
    loader = loader_for(data_config(tiny_data, [LABELS], batch_size=8), tokenizer)
    loader.setup.templates = [f'{{}} template {i}' for i in range(4)]
    for _, tokens, _, _ in epoch_batches(loader):
        texts = tokenizer.batch_decode(tokens['input_ids'].tolist(), skip_special_tokens=True)
        used = {text.split()[-1] for text in texts}
        assert used <= {'0', '1', '2', '3'} and len(used) > 1, texts

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


def test_stream_slots_split_shards_by_worker(tiny_data):
    """With at least as many shards as slots, every slot reads whole shards of its own."""
    from data.sources import SourceSpec, build_source
    source = build_source(SourceSpec('webdataset', os.path.join(tiny_data, 'captions', 'shards'), 'w'))
    for slot in range(2):
        stream = source.iterate(slot, 2, seed=0, position=[0, 0, 0])
        shards = {next(stream)[0].where.split('#')[0] for _ in range(3 * TINY.per_shard)}
        assert len(shards) == 1
    first = {next(source.iterate(s, 2, seed=0, position=[0, 0, 0]))[0].where.split('#')[0] for s in range(2)}
    assert len(first) == 2


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
        texts = tokenizer.batch_decode(tokens['input_ids'], skip_special_tokens=True)
        used = {text.split()[-1] for text in texts}
        assert used <= {'0', '1', '2', '3'} and len(used) > 1, texts

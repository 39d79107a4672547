"""Mixing: per-batch shares follow the weights, exactly in the long run, with disjoint label ranges."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data.mixing import MixingPlan
from tests.test_data_fixtures import LABELS, SHARDS, TABLE, data_config, epoch_batches, loader_for


@pytest.mark.parametrize('weights,batch', [([0.5, 0.3, 0.2], 10), ([1, 1], 7), ([5, 1, 1, 0.1], 32), ([1], 4)])
def test_plan_counts(weights, batch):
    plan = MixingPlan(weights, batch)
    share = np.asarray(weights) / sum(weights)
    counts = np.array([plan.counts(step) for step in range(2000)])
    assert (counts.sum(axis=1) == batch).all() and (counts >= 0).all()
    assert (np.abs(counts - batch * share) <= 2).all()  # every batch is mixed in proportion
    assert np.abs(np.asarray(plan.cumulative(2000)) - 2000 * batch * share).max() <= 2  # and exact in the long run
    # far into training the closed form still holds
    assert sum(plan.counts(10 ** 9)) == batch and plan.cumulative(10 ** 9 + 1)[-1] >= plan.cumulative(10 ** 9)[-1]


def origin(where: str) -> str:
    return 'shards' if '.tar#' in where else 'table' if '/captions/images/' in where else 'shapes'


def test_loader_batches_mix_sources(tiny_data, tokenizer):
    weights = {'shapes': 0.5, 'shards': 0.25, 'table': 0.25}
    sources = [dict(s, WEIGHT=weights[s['NAME']]) for s in (LABELS, SHARDS, TABLE)]
    loader = loader_for(data_config(tiny_data, sources, batch_size=8, EPOCH_SAMPLES=8 * 25), tokenizer)
    assert len(loader) == 25
    total = Counter()
    for images, tokens, labels, info in epoch_batches(loader):
        assert len(info['where']) == images.shape[0] == 8
        per_batch = Counter(origin(w) for w in info['where'])
        assert all(abs(per_batch[name] - 8 * w) <= 1 for name, w in weights.items()), per_batch
        total.update(per_batch)
        # class ids below the caption ids, and only for the image-label source
        for where, label in zip(info['where'], labels.tolist()):
            assert (label < 4) == (origin(where) == 'shapes')
    assert all(abs(total[name] / 200 - w) < 0.02 for name, w in weights.items()), total

"""Label ids: class ids per source side by side, caption ids unique across ranks or merged by text."""
from __future__ import annotations

import os

from PIL import Image

from tests.test_data_fixtures import LABELS, SHARDS, TABLE, data_config, epoch_batches, loader_for


def test_caption_labels_unique_across_ranks(tiny_data, tokenizer):
    config = data_config(tiny_data, [LABELS, SHARDS, TABLE], batch_size=6)
    ranks = [epoch_batches(loader_for(config, tokenizer, rank, 2)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 48 // 12
    shapes = sorted(os.listdir(os.path.join(tiny_data, 'labels', 'train')))
    seen_captions = set()
    for step_batches in zip(*ranks):
        labels = [l for b in step_batches for l in b[2].tolist()]
        where = [w for b in step_batches for w in b[3]['where']]
        captions = [l for l, w in zip(labels, where) if '/labels/train/' not in w]
        classes = [(l, w) for l, w in zip(labels, where) if '/labels/train/' in w]
        assert captions and classes
        assert all(l >= len(shapes) for l in captions)
        assert all(shapes[l] in w.split('/') for l, w in classes)
        assert not seen_captions & set(captions) and len(set(captions)) == len(captions)
        seen_captions |= set(captions)  # unique for the whole run, not only within a global batch


def test_class_ids_disjoint_between_label_sources(tiny_data, tokenizer):
    zipped = {'TYPE': 'zip', 'PATH': 'labels', 'NAME': 'zipped'}
    loader = loader_for(data_config(tiny_data, [LABELS, zipped, TABLE], batch_size=8), tokenizer)
    assert loader.setup.labels.num_classes == 8
    for _, _, labels, info in epoch_batches(loader):
        for label, where in zip(labels.tolist(), info['where']):
            expected = range(4, 8) if '.zip@/' in where else range(0, 4) if '/train/' in where else None
            assert label in expected if expected else label >= 8


def test_merge_captions(tmp_path, tokenizer):
    Image.new('RGB', (40, 40)).save(tmp_path / 'i.png')
    captions = ['a red ring', 'A  red ring ', 'a blue ring', 'a blue ring'] * 2
    (tmp_path / 'pairs.tsv').write_text(''.join(f'i.png\t{c}\n' for c in captions))
    table = [{'TYPE': 'tsv', 'PATH': 'pairs.tsv'}]
    for merge in (False, True):
        loader = loader_for(data_config(str(tmp_path), table, batch_size=8, MERGE_CAPTIONS=merge), tokenizer)
        ((_, tokens, labels, _),) = epoch_batches(loader)
        texts = [' '.join(t.lower().split()) for t in tokenizer.batch_decode(tokens['input_ids'].tolist(), skip_special_tokens=True)]
        by_text = {}
        for text, label in zip(texts, labels.tolist()):
            by_text.setdefault(text, set()).add(label)
        if merge:
            assert {t: len(ls) for t, ls in by_text.items()} == {'a red ring': 1, 'a blue ring': 1}
            assert by_text['a red ring'] != by_text['a blue ring']
        else:
            assert len(set(labels.tolist())) == 8

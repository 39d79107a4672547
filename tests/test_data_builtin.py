"""The built-in dataset: layout and formats, determinism, and the vocabulary split the demo relies on."""
from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tarfile
import zipfile

from PIL import Image

from data.builtin import COLOURS, SCALES, SHAPES, Attributes, caption, generate
from tests.test_data_fixtures import ROOT

TINY = SCALES['tiny']


def test_layout_and_formats(tiny_data):
    labels = os.path.join(tiny_data, 'labels')
    classes = sorted(os.listdir(os.path.join(labels, 'train')))
    assert classes == sorted(list(SHAPES)[:TINY.shapes])
    image = Image.open(os.path.join(labels, 'train', classes[0], os.listdir(os.path.join(labels, 'train', classes[0]))[0]))
    assert image.format == 'JPEG' and image.size == (TINY.image_size, TINY.image_size)
    with open(os.path.join(labels, 'val', 'classnames.txt')) as f:
        assert f.read().split('\n')[:-1] == classes  # plain names, for evaluation
    with zipfile.ZipFile(os.path.join(labels, 'train.zip')) as archive:
        assert len(archive.namelist()) == TINY.shapes * TINY.per_class
    with tarfile.open(os.path.join(tiny_data, 'captions', 'shards', 'captions-00000.tar')) as tar:
        names = tar.getnames()
    assert len(names) == 3 * TINY.per_shard and names[:3] == ['000000000.jpg', '000000000.txt', '000000000.json']
    zeroshot = os.path.join(tiny_data, 'zeroshot')
    folders = sorted(d for d in os.listdir(zeroshot) if os.path.isdir(os.path.join(zeroshot, d)))
    with open(os.path.join(zeroshot, 'classnames.txt')) as f:
        assert f.read().split('\n')[:-1] == [d.replace('_', ' ') for d in folders]
    assert len(folders) == TINY.zeroshot_grid ** 2


def test_zeroshot_names_need_caption_vocabulary(tiny_data):
    """Label prompts never name a colour; captions do; each zero-shot class needs colour and shape."""
    with open(os.path.join(tiny_data, 'labels', 'classnames.txt')) as f:
        label_words = set(f.read().replace(';', ' ').split())
    with open(os.path.join(tiny_data, 'zeroshot', 'classnames.txt')) as f:
        zeroshot = [line.split() for line in f.read().splitlines()]
    assert all(colour in COLOURS and colour not in label_words and shape in label_words for colour, shape in zeroshot)
    assert len({c for c, _ in zeroshot}) > 1 and len({s for _, s in zeroshot}) > 1


def test_captions_name_colours_always_and_shapes_sometimes():
    import numpy as np
    rng = np.random.default_rng(0)
    texts = [caption(Attributes('star', 'blue', 'dotted', 'small'), rng) for _ in range(400)]
    informative = [t for t in texts if 'blue' in t]
    assert 0.8 < len(informative) / len(texts) < 0.97
    assert 0.07 < sum('star' in t for t in informative) / len(informative) < 0.25


def test_deterministic_and_cli(tmp_path):
    generate(str(tmp_path / 'a'), 'tiny', seed=0)
    subprocess.run([sys.executable, '-m', 'data.builtin', '--out', str(tmp_path / 'b'), '--scale', 'tiny'],
                   cwd=ROOT, check=True, capture_output=True)
    files = {d: sorted(os.path.relpath(os.path.join(r, f), tmp_path / d) for r, _, fs in os.walk(tmp_path / d) for f in fs)
             for d in 'ab'}
    assert files['a'] == files['b'] and len(files['a']) > 50
    assert all(filecmp.cmp(tmp_path / 'a' / f, tmp_path / 'b' / f, shallow=False) for f in files['a'])

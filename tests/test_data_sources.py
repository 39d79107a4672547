"""Each source type on the built-in data and on hand-made layouts; DATA.SOURCES parsing."""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from data.builtin import SCALES, SHAPES
from data.classnames import imagenet_classnames
from data.prompts import class_prompt, split_synonyms
from data.sources import MapSource, Record, SourceSpec, StreamSource, build_source
from data.specs import source_specs
from tests.test_data_fixtures import LABELS, SHARDS, TABLE, data_config, epoch_batches, loader_for

TINY = SCALES['tiny']


def png(color=(200, 30, 30), size=8) -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (size, size), color).save(buffer, format='PNG')
    return buffer.getvalue()


def spec(type_, path, **kw) -> SourceSpec:
    return SourceSpec(type=type_, path=str(path), name=kw.pop('name', type_), **kw)


def read_all(source: MapSource):
    return [source.read(i) for i in range(source.num_samples)]


def test_image_folder_with_synonyms(tiny_data):
    source = build_source(spec('imagefolder', os.path.join(tiny_data, 'labels')))
    assert source.num_samples == TINY.shapes * TINY.per_class
    shapes = sorted(list(SHAPES)[:TINY.shapes])
    # classnames.txt beside train/ lists synonyms, in sorted-folder order
    assert source.class_names == [SHAPES[s] for s in shapes]
    records = read_all(source)
    assert {shapes[r.class_index] for r in records} == set(shapes)
    assert all(f'/train/{shapes[r.class_index]}/' in r.where and r.image for r in records)


def test_image_folder_names(tmp_path):
    def folder(root, classes, names=None):
        for c in classes:
            os.makedirs(root / 'train' / c, exist_ok=True)
            (root / 'train' / c / 'a.png').write_bytes(png())
        if names:
            (root / 'train' / 'classnames.txt').write_text('\n'.join(names) + '\n')
        return build_source(spec('imagefolder', root))

    assert folder(tmp_path / 'plain', ['sea_lion', 'zebra']).class_names == [['sea lion'], ['zebra']]
    assert folder(tmp_path / 'file', ['n01', 'n02'], ['dog; doggy; puppy', 'cat']).class_names == [
        ['dog', 'doggy', 'puppy'], ['cat']]
    with pytest.raises(ValueError, match='no class names'):
        folder(tmp_path / 'wnids', ['n01440764', 'n01443537'])
    imagenet = folder(tmp_path / 'in1k', [f'n{i:08d}' for i in range(1000)])
    assert [names[0] for names in imagenet.class_names] == imagenet_classnames()


def test_prompt_like_official():
    rng = __import__('random').Random(0)
    texts = {class_prompt(split_synonyms('dog, domestic; pup+py'), ['a {}.', 'the {}!'], rng) for _ in range(50)}
    assert texts == {'a dog domestic.', 'the dog domestic!', 'a pup py.', 'the pup py!'}
    with pytest.raises(ValueError):
        split_synonyms(' ; ')


def test_zip_layout_matches_folder(tiny_data):
    folder = build_source(spec('imagefolder', os.path.join(tiny_data, 'labels')))
    archive = build_source(spec('zip', os.path.join(tiny_data, 'labels')))
    assert archive.num_samples == folder.num_samples
    assert archive.class_names == folder.class_names  # labels/classnames.txt beside train.zip
    for a, f in zip(read_all(archive), read_all(folder)):
        assert a.image == f.image and a.class_index == f.class_index and '.zip@/' in a.where
    # also as an explicit X.zip with X_map.txt beside it
    assert build_source(spec('zip', os.path.join(tiny_data, 'labels', 'train.zip'))).num_samples == folder.num_samples


def test_zip_map_errors(tmp_path):
    (tmp_path / 'train.zip').write_bytes(b'')
    (tmp_path / 'train_map.txt').write_text('a/b.jpg 3\n')
    with pytest.raises(ValueError, match='relpath<TAB>label'):
        build_source(spec('zip', tmp_path))


def test_tsv_with_header(tiny_data):
    source = build_source(spec('tsv', os.path.join(tiny_data, 'captions', 'captions.tsv')))
    records = read_all(source)
    assert len(records) == TINY.table_rows
    assert all(r.caption and r.image and r.where.endswith('.png') for r in records)


def test_csv_quoting_and_plain_tsv(tmp_path):
    (tmp_path / 'img.png').write_bytes(png())
    (tmp_path / 'pairs.csv').write_text('caption,image\n"a ""red"", round thing",img.png\n')
    (record,) = read_all(build_source(spec('csv', tmp_path / 'pairs.csv')))
    assert record.caption == 'a "red", round thing' and record.image == png()
    (tmp_path / 'pairs.tsv').write_text(f'{tmp_path / "img.png"}\tsay "hi"\n')  # no header, absolute path
    (record,) = read_all(build_source(spec('tsv', tmp_path / 'pairs.tsv')))
    assert record.caption == 'say "hi"'


def test_webdataset_patterns_and_size(tiny_data):
    shards = os.path.join(tiny_data, 'captions', 'shards')
    by_dir = build_source(spec('webdataset', shards))
    by_braces = build_source(spec('webdataset', os.path.join(shards, 'captions-{00000..00001}.tar')))
    assert isinstance(by_dir, StreamSource) and by_dir.shards == by_braces.shards
    assert by_dir.num_samples == TINY.caption_shards * TINY.per_shard  # from the _stats.json files
    assert build_source(spec('webdataset', shards, num_samples=5)).num_samples == 5
    stream = by_dir.iterate(0, 1, seed=0, position=[0, 0, 0])
    records = [next(stream)[0] for _ in range(TINY.caption_shards * TINY.per_shard)]
    assert all(isinstance(r, Record) and r.caption and r.image for r in records)
    assert len({r.where for r in records}) == len(records)  # one pass: every sample once
    with pytest.raises(ValueError, match='none of the'):
        build_source(spec('webdataset', os.path.join(shards, 'nope-{0..3}.tar')))


def test_webdataset_list_of_folders_patterns_and_urls(tiny_data, tmp_path):
    """'gcc3m::gcc12m' (the GCC-15M configs): each '::' part is a folder, a brace pattern or a url."""
    from data.sources.webdataset_shards import expand_shards
    shards = sorted(glob.glob(os.path.join(tiny_data, 'captions', 'shards', '*.tar')))
    for name, shard in zip(('gcc3m', 'gcc12m'), shards):
        os.makedirs(tmp_path / name)
        for path in (shard, shard[:-len('.tar')] + '_stats.json'):
            os.symlink(path, tmp_path / name / os.path.basename(path))
    both = build_source(spec('webdataset', f'{tmp_path}/gcc3m::{tmp_path}/gcc12m'))
    assert [os.path.basename(s) for s in both.shards] == [os.path.basename(s) for s in shards]
    assert both.num_samples == TINY.caption_shards * TINY.per_shard
    assert expand_shards(f'{tmp_path}/gcc3m::s/{{0..1}}.tar::https://host/x-{{7..8}}.tar') == [
        f'{tmp_path}/gcc3m/{os.path.basename(shards[0])}', 's/0.tar', 's/1.tar',
        'https://host/x-7.tar', 'https://host/x-8.tar']


def test_webdataset_reads_img2dataset_members(tmp_path):
    """png/webp images and the key layout img2dataset writes (json member ignored)."""
    path = tmp_path / 'shard.tar'
    with tarfile.open(path, 'w') as tar:
        for name, data in (('000000000.png', png()), ('000000000.txt', b'a cat'), ('000000000.json', b'{}'),
                           ('000000001.webp', b'RIFF'), ('000000001.txt', b'a dog')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = build_source(spec('webdataset', path, shuffle_buffer=1))
    stream = source.iterate(0, 1, 0, [0, 0, 0])
    first, second = next(stream)[0], next(stream)[0]
    assert (first.caption, first.image) == ('a cat', png()) and second.caption == 'a dog'


def test_source_specs_from_config(tiny_data):
    config = data_config(tiny_data, [LABELS, {**SHARDS, 'WEIGHT': 2}, {**TABLE, 'WEIGHT': 1}])
    with pytest.raises(ValueError, match='every source a WEIGHT or none'):
        source_specs(config)
    specs = source_specs(data_config(tiny_data, [dict(LABELS, NAME=''), dict(LABELS, NAME=''), TABLE]))
    assert [s.name for s in specs] == ['imagefolder', 'imagefolder#1', 'table']
    assert specs[0].path == os.path.join(tiny_data, 'labels')
    (multi,) = source_specs(data_config(tiny_data, [dict(SHARDS, PATH='a/{0..1}.tar::/b.tar::pipe:cat c.tar')]))
    assert multi.path == f'{tiny_data}/a/{{0..1}}.tar::/b.tar::pipe:cat c.tar'
    with pytest.raises(ValueError, match=r'DATA.SOURCES\[0\]: unknown key'):
        source_specs(data_config(tiny_data, [dict(LABELS, WEIHGT=1)]))
    with pytest.raises(ValueError, match='TYPE'):
        source_specs(data_config(tiny_data, [dict(LABELS, TYPE='parquet')]))
    with pytest.raises(ValueError, match='positive'):
        source_specs(data_config(tiny_data, [dict(LABELS, WEIGHT=0)]))


def test_default_is_one_image_folder(tiny_data, tokenizer):
    """DATA.DATASET imagenet + DATA_PATH: the official single ImageFolder; ZIP_MODE: the zip layout."""
    for zip_mode in (False, True):
        config = data_config(os.path.join(tiny_data, 'labels'), ZIP_MODE=zip_mode)
        (spec_,) = source_specs(config)
        assert (spec_.type, spec_.name) == ('zip' if zip_mode else 'imagefolder', 'imagenet')
        loader = loader_for(config, tokenizer)
        assert len(loader) == TINY.shapes * TINY.per_class // 8
        images, tokens, labels, info = epoch_batches(loader)[0]
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
        assert tokens['input_ids'].shape == tokens['attention_mask'].shape == (8, 77)
        assert tokens['input_ids'].dtype == tokens['attention_mask'].dtype == labels.dtype == torch.int64
        assert labels.min() >= 0 and labels.max() < TINY.shapes
    with pytest.raises(ValueError, match='DATA_PATH'):
        source_specs(data_config(''))


def test_prompts_use_class_names(tiny_data, tokenizer):
    loader = loader_for(data_config(tiny_data, [LABELS], batch_size=4), tokenizer)
    images, tokens, labels, _ = epoch_batches(loader)[0]
    names = [SHAPES[s] for s in sorted(list(SHAPES)[:TINY.shapes])]
    texts = tokenizer.batch_decode(tokens['input_ids'].tolist(), skip_special_tokens=True)
    for text, label in zip(texts, labels.tolist()):
        assert any(n in text for n in names[label]), (text, names[label])


def test_stats_files_are_optional(tiny_data, tmp_path):
    shard = os.path.join(tiny_data, 'captions', 'shards', 'captions-00000.tar')
    os.symlink(shard, tmp_path / 'x.tar')
    assert build_source(spec('webdataset', tmp_path / 'x.tar')).num_samples is None
    (tmp_path / 'x_stats.json').write_text(json.dumps({'successes': 7}))
    assert build_source(spec('webdataset', tmp_path / 'x.tar')).num_samples == 7

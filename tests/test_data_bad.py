"""Bad data is skipped and counted, the first few logged with their path; a source with nothing readable
fails naming it; decompression bombs are refused."""
from __future__ import annotations

import io
import logging
import os
import tarfile

import pytest
from PIL import Image

from data.builtin import SCALES
from tests.test_data_fixtures import LABELS, SHARDS, TABLE, copy_of, data_config, epoch_batches, loader_for

TINY = SCALES['tiny']


def image_bytes(side: int, fmt: str = 'PNG') -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (side, side), (10, 200, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def break_things(root: str) -> None:
    """Bad files in every source of the tiny built-in data."""
    circle = os.path.join(root, 'labels', 'train', 'circle')
    files = sorted(os.listdir(circle))
    open(os.path.join(circle, files[0]), 'wb').close()                                  # zero bytes
    with open(os.path.join(circle, files[1]), 'r+b') as f:                                 # truncated
        f.truncate(len(f.read()) // 2)
    with open(os.path.join(circle, files[2]), 'wb') as f:                                  # not an image
        f.write(b'this is not an image at all' * 8)
    with open(os.path.join(root, 'captions', 'captions.tsv'), 'a') as f:
        f.write('images/missing.png\ta missing image\n')                                  # missing file
        f.write('images/00000.png\t   \n')                                                # empty caption
    shards = os.path.join(root, 'captions', 'shards')
    with tarfile.open(os.path.join(shards, 'captions-00002.tar'), 'w') as tar:
        add_member(tar, 'a.jpg', b'\xff\xd8 not really a jpeg')                            # corrupt member
        add_member(tar, 'a.txt', b'a broken jpeg')
        add_member(tar, 'b.txt', b'text without an image')                                 # no image
        add_member(tar, 'c.png', image_bytes(40))
        add_member(tar, 'c.txt', b'a good green square')
    with open(os.path.join(shards, 'captions-00003.tar'), 'wb') as f:                      # truncated shard
        data = open(os.path.join(shards, 'captions-00000.tar'), 'rb').read()
        f.write(data[:len(data) // 3])


def test_bad_samples_are_skipped_counted_and_logged(tiny_data, tmp_path, tokenizer, caplog):
    root = copy_of(tiny_data, tmp_path)
    break_things(root)
    shards = dict(SHARDS, PATH='captions/shards/captions-{00000..00003}.tar', NUM_SAMPLES=20)
    config = data_config(root, [LABELS, shards, TABLE], batch_size=8, EPOCH_SAMPLES=8 * 12, LOG_BAD_SAMPLES=3)
    loader = loader_for(config, tokenizer)
    with caplog.at_level(logging.WARNING, logger='data.loader'):
        batches = epoch_batches(loader)
    assert len(batches) == 12 and all(b[0].shape[0] == 8 for b in batches)  # batches stay full
    skipped = loader.skipped()
    # the epoch reads each source more than once, so each bad file is met at least once
    expected = {'shapes': {'empty': 1, 'corrupt': 2}, 'table': {'missing': 1, 'empty_caption': 1},
                'shards': {'corrupt': 1, 'no_image': 1, 'broken_shard': 1}}
    assert {n: set(r) for n, r in skipped.items()} == {n: set(r) for n, r in expected.items()}, skipped
    assert all(skipped[n][r] >= c for n, reasons in expected.items() for r, c in reasons.items())
    assert sum(len(b[3]['bad']) for b in batches) == sum(c for r in skipped.values() for c in r.values())
    used = {w for b in batches for w in b[3]['where']}
    assert not any(w.endswith(('missing.png', '#a', '#b')) for w in used)
    assert any(w.endswith('captions-00002.tar#c') for w in used)  # the good sample of the broken shard
    logged = [r.getMessage() for r in caplog.records if 'bad sample' in r.getMessage()]
    assert len(logged) == 3 and all(os.sep in m for m in logged) and 'only counted' in logged[-1]
    assert loader.skipped(total=True) == skipped and loader.state_dict()['skipped_total'] == skipped
    loader.set_epoch(1)
    assert loader.skipped() == {} and loader.skipped(total=True) == skipped


def test_decompression_bombs_are_refused(tmp_path, tokenizer, monkeypatch):
    # PIL warns between MAX_IMAGE_PIXELS and twice that, and raises above; both must be bad samples
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 2000)
    for name, side in (('ok', 40), ('warns', 60), ('raises', 100)):
        (tmp_path / f'{name}.png').write_bytes(image_bytes(side))
    (tmp_path / 'pairs.tsv').write_text('ok.png\tfine\nwarns.png\tbig\nraises.png\thuge\n')
    loader = loader_for(data_config(str(tmp_path), [{'TYPE': 'tsv', 'PATH': 'pairs.tsv'}], batch_size=3),
                        tokenizer)
    ((_, _, _, info),) = epoch_batches(loader)
    assert set(info['where']) == {str(tmp_path / 'ok.png')}  # stand-ins for the bombs are drawn until one is ok
    assert {message.split(' (')[0].rsplit(os.sep, 1)[-1] for _, _, message in info['bad']} == {'warns.png', 'raises.png'}
    assert set(loader.skipped()['tsv']) == {'too_large'}


def test_source_without_readable_samples_fails_naming_it(tiny_data, tmp_path, tokenizer):
    root = copy_of(tiny_data, tmp_path)
    for directory, _, files in os.walk(os.path.join(root, 'labels', 'train')):
        for file in files:
            open(os.path.join(directory, file), 'wb').close()
    loader = loader_for(data_config(root, [LABELS, TABLE], batch_size=4), tokenizer)
    with pytest.raises(RuntimeError, match="shapes .*unusable samples in a row"):
        epoch_batches(loader)


def test_stream_without_samples_fails_naming_it(tmp_path, tokenizer):
    with tarfile.open(tmp_path / 'only-text.tar', 'w') as tar:
        add_member(tar, 'a.txt', b'no image here')
    source = {'TYPE': 'webdataset', 'PATH': 'only-text.tar', 'NAME': 'textonly', 'NUM_SAMPLES': 8}
    loader = loader_for(data_config(str(tmp_path), [source], batch_size=4), tokenizer)
    with pytest.raises(RuntimeError, match="textonly.*no sample with an image"):
        epoch_batches(loader)


def test_empty_sources_fail_when_built(tmp_path, tokenizer):
    (tmp_path / 'labels' / 'train' / 'cat').mkdir(parents=True)
    (tmp_path / 'labels' / 'classnames.txt').write_text('cat\n')
    with pytest.raises(ValueError, match="'shapes' has no samples"):
        loader_for(data_config(str(tmp_path), [LABELS]), tokenizer)
    (tmp_path / 'empty.tsv').write_text('filepath\tcaption\n')
    with pytest.raises(ValueError, match="'table' has no samples"):
        loader_for(data_config(str(tmp_path), [dict(TABLE, PATH='empty.tsv')]), tokenizer)


def test_shard_cut_inside_a_header_is_reported(tiny_data, tmp_path):
    """Python's tarfile reads a shard cut inside a member header as a shorter, complete archive; the
    missing end-of-archive blocks give it away."""
    from data.sources.webdataset_shards import _cut_short
    shard = os.path.join(tiny_data, 'captions', 'shards', 'captions-00000.tar')
    data = open(shard, 'rb').read()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cuts = {'in_header': members[3].offset + 100, 'at_member_end': members[3].offset}
    assert not _cut_short(shard)
    for name, cut in cuts.items():
        path = str(tmp_path / f'{name}.tar')
        with open(path, 'wb') as f:
            f.write(data[:cut])
        with tarfile.open(path) as tar:
            assert len(tar.getmembers()) == 3  # no error: the loss would go unnoticed
        assert _cut_short(path), name

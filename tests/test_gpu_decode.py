"""DATA.DECODE_DEVICE cuda (data/gpu_decode.py): the batched decode + crop + flip + normalise the training
process runs, here with decode_jpeg on the CPU (the code CUDA runs, nvJPEG aside), against the CPU path
(Pillow decode, timm's crop on a full decode) on the same boxes, flips and erased patches."""
from __future__ import annotations

import io
import os
import random
import re
from typing import List

import pytest
import torch
from PIL import Image

from configs import ConfigError
from configs.validation import validate_config
from data import build_train_loader
from data.gpu_decode import BatchDecoder, EncodedBatch, build_batched_decode_pipeline
from data.order import seeded_global_rngs
from data.sources.base import CORRUPT, BadSample, Record
from data.transforms import build_train_pipeline
from tests.conftest import tiny_config
from tests.test_crop_decode import _jpeg, _textured
from tests.test_data_fixtures import data_config, epoch_batches

GPU_OPTS = ('AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', '0.0', 'AUG.REPROB', '0.5', 'DATA.REDUCED_DECODE', 'False')
# One level of 255 in units of each channel's std: differences in normalised values -> levels.
LEVEL = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def _png(image: Image.Image) -> Record:
    buffer = io.BytesIO()
    image.save(buffer, 'PNG')
    return Record(buffer.getvalue(), 'png')


@pytest.fixture(scope='module')
def records() -> List[Record]:
    sizes = [(500, 375), (333, 500), (260, 190), (640, 480)]
    jpegs = [_jpeg(_textured(w, h, i), subsampling=(0, 2)[i % 2]) for i, (w, h) in enumerate(sizes)]
    return jpegs + [_png(_textured(300, 220, 9))]


def _run(pipeline, recs: List[Record], seed: int, device=torch.device('cpu')) -> torch.Tensor:
    # As the loader runs it: decode + transform + stack per sample in a worker, finish in the training process.
    with seeded_global_rngs(seed):
        outputs = [pipeline.transform(pipeline.decode(r)) for r in recs]
    return pipeline.finish(*pipeline.stack(outputs), device)


def test_batched_decode_matches_the_pil_path_on_the_same_draws(records):
    config = tiny_config(*GPU_OPTS, 'DATA.DECODE_DEVICE', 'cuda')
    reference = build_train_pipeline(tiny_config(*GPU_OPTS))
    batched = build_batched_decode_pipeline(config)
    assert isinstance(batched.finish, BatchDecoder)
    for seed in range(3):
        expected = _run(reference, records, seed)
        got = _run(batched, records, seed)
        assert got.shape == expected.shape == (len(records), 3, 64, 64) and got.dtype == torch.float32
        # The PNG: cropped and resized by the worker as the CPU path does; flip and normalisation bit-exact.
        assert torch.equal(got[-1], expected[-1])
        levels = ((got - expected) * LEVEL).abs()[:-1]
        # libjpeg-turbo in both; torch's float antialiased bicubic vs Pillow's fixed-point one: measured mean
        # 0.08-0.12, max 1 level of 255 (at 224 px: mean 0.15-0.17, max 2).
        assert levels.mean() < 0.25 and levels.max() < 3, (seed, levels.mean(), levels.max())
        # A flip or box drawn differently would be tens of levels off; erased patches (random normals) more.
    with seeded_global_rngs(0):
        encoded = [batched.decode(r) for r in records]
    assert [e.encoded for e in encoded] == [True] * 4 + [False]


def test_a_batch_the_decoder_refuses_is_decoded_image_by_image(records, monkeypatch):
    import data.gpu_decode as gpu_decode
    pipeline = build_batched_decode_pipeline(tiny_config(*GPU_OPTS, 'DATA.DECODE_DEVICE', 'cuda'))
    expected = _run(pipeline, records, 1)
    decode_jpeg, refused = gpu_decode.decode_jpeg, len(records[1].image)

    def batch_refused(data, **kwargs):  # as nvJPEG failing one image of a batch: the list call raises
        if isinstance(data, list):
            raise RuntimeError('refused')
        return decode_jpeg(data, **kwargs)

    monkeypatch.setattr(gpu_decode, 'decode_jpeg', batch_refused)
    assert torch.equal(_run(pipeline, records, 1), expected)

    def also_alone(data, **kwargs):  # ... and that image alone too, on every device
        if not isinstance(data, list) and data.numel() == refused:
            raise RuntimeError('refused')
        return batch_refused(data, **kwargs)

    monkeypatch.setattr(gpu_decode, 'decode_jpeg', also_alone)
    with pytest.raises(RuntimeError, match=re.escape(records[1].where)):
        _run(pipeline, records, 1)


def test_a_truncated_jpeg_is_decoded_in_the_worker_and_is_a_bad_sample(records):
    pipeline = build_batched_decode_pipeline(tiny_config(*GPU_OPTS, 'DATA.DECODE_DEVICE', 'cuda'))
    truncated = Record(records[0].image[:len(records[0].image) // 2], 'cut.jpg')
    state = random.getstate()
    with pytest.raises(BadSample) as bad:
        pipeline.decode(truncated)
    assert bad.value.reason == CORRUPT and random.getstate() == state  # no draws consumed


def test_loader_with_the_batched_decode_in_a_worker(tmp_path, tokenizer):
    """The whole loader, a worker process sending EncodedBatches (JPEG bytes and a PNG's pixels) to the
    main process, which decodes them: the CPU path's batches, labels and texts, within the decoders' error."""
    for i, (w, h) in enumerate([(300, 220), (220, 300), (256, 256)]):
        os.makedirs(tmp_path / f'class_{i}')
        _textured(w, h, i).save(tmp_path / f'class_{i}' / 'a.jpg', quality=90)
        _textured(w, h, i + 3).save(tmp_path / f'class_{i}' / ('b.png' if i == 0 else 'b.jpg'))
    opts = dict(batch_size=3, num_workers=1, IMG_SIZE=64, EPOCH_SAMPLES=6, REDUCED_DECODE=False)
    config = data_config(str(tmp_path), [{'TYPE': 'imagefolder', 'PATH': '.'}], **opts)
    config.defrost()
    config.AUG.AUTO_AUGMENT, config.AUG.COLOR_JITTER, config.AUG.REPROB = 'none', 0.0, 0.5
    config.freeze()
    reference = epoch_batches(build_train_loader(config, tokenizer, 0, 1), 0)
    loader = build_train_loader(config, tokenizer, 0, 1)
    pipeline = build_batched_decode_pipeline(config)  # DECODE_DEVICE cuda's pipeline, decoding on the CPU
    setup = loader.setup
    setup.decode, setup.transform, setup.finish, setup.stack = (pipeline.decode, pipeline.transform,
                                                                pipeline.finish, pipeline.stack)
    setup.finish_in_workers = False
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(reference) == 2
    assert not all(torch.equal(b[0], r[0]) for b, r in zip(batches, reference))  # the other decoder did run
    for (images, tokens, labels, info), (expected, tokens_ref, labels_ref, info_ref) in zip(batches, reference):
        assert info['where'] == info_ref['where'] and torch.equal(labels, labels_ref)
        assert torch.equal(tokens['input_ids'], tokens_ref['input_ids'])
        assert ((images - expected) * LEVEL).abs().mean() < 0.25


def test_decode_device_rules_name_the_keys(tokenizer):
    for opts, key in [(('DATA.DECODE_DEVICE', 'gpu'), 'DATA.DECODE_DEVICE'),
                      (('DATA.DECODE_DEVICE', 'cuda'), 'AUG.AUTO_AUGMENT'),  # the default RandAugment
                      (('DATA.DECODE_DEVICE', 'cuda', 'AUG.AUTO_AUGMENT', 'none'), 'AUG.COLOR_JITTER')]:
        with pytest.raises(ConfigError, match=key):
            tiny_config(*opts)
    config = tiny_config(*GPU_OPTS, 'DATA.DECODE_DEVICE', 'cuda')
    validate_config(config)
    assert tiny_config().DATA.DECODE_DEVICE == 'cpu'
    # A CPU training device (or none at all) cannot take the GPU decode: refused when the loader is built.
    with pytest.raises(ValueError, match='DATA.DECODE_DEVICE'):
        build_train_loader(config, tokenizer, 0, 1, device=torch.device('cpu'))


@pytest.mark.cuda  # run by bench/device_check.sh on a lent GPU; skipped here (tests/conftest.py)
def test_nvjpeg_batch_matches_the_cpu_fallback(records):
    pipeline = build_batched_decode_pipeline(tiny_config(*GPU_OPTS, 'DATA.DECODE_DEVICE', 'cuda'))
    on_cpu = _run(pipeline, records, 0)
    on_cuda = _run(pipeline, records, 0, torch.device('cuda'))
    assert on_cuda.device.type == 'cuda'
    levels = ((on_cuda.cpu() - on_cpu) * LEVEL).abs()
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or so (not yet measured).
    assert levels.mean() < 1.5, levels.mean()
    assert torch.allclose(on_cuda.cpu()[-1], on_cpu[-1], atol=1e-5)  # the PNG: no decode on the GPU
    assert isinstance(pipeline.stack([pipeline.transform(pipeline.decode(records[0]))])[0], EncodedBatch)

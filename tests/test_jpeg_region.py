"""The optional C helper against Pillow: its libjpeg-turbo crop decoder (data/jpeg_region.c) gives the same
pixels in the box as Pillow's whole decode for every subsampling, progressive and greyscale files, odd sizes
and the DCT scales; its resize (data/resample.c, SIMD and portable builds) gives Pillow's resize bit for bit;
a clean refusal (Pillow then decodes or resizes) for what it does not handle; the training crop unchanged."""
from __future__ import annotations

import io
import logging
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from configs import load_config
from data import jpeg_region
from data.crop_decode import CropDecoder
from data.decode import END_OF_IMAGE
from data.order import seeded_global_rngs
from data.sources.base import CORRUPT, BadSample, Record
from data.transforms import (EVAL_TRANSFORMS, NativeResizeCrop, affine_ops_in_c, build_eval_transform,
                             build_train_transform)
from tests.conftest import ROOT
from tests.test_crop_decode import OUT, _textured
from tests.test_data_fixtures import data_config, epoch_batches, loader_for, same_batches


def _build(tmp_path_factory, *defines: str) -> str:
    try:
        return jpeg_region.build(str(tmp_path_factory.mktemp('jpeg_region') / '_jpeg_region.so'), defines=defines)
    except RuntimeError as exc:
        pytest.skip(f'the helper cannot be built here (then Pillow decodes): {exc}')


@pytest.fixture(scope='module')
def built(tmp_path_factory) -> str:
    """The helper compiled from the current source (not whatever `make` left in data/)."""
    return _build(tmp_path_factory)


@pytest.fixture(scope='module')
def built_portable(tmp_path_factory) -> str:
    """The helper without its AVX2 loops, as on a CPU (or compiler) without them."""
    return _build(tmp_path_factory, 'UNICL_NO_AVX2')


@pytest.fixture
def use_library(monkeypatch):
    """use_library(path): the helper at `path` for this test."""
    def use(path: str) -> None:
        monkeypatch.setattr(jpeg_region, 'LIBRARY', path)
        jpeg_region._library.cache_clear()
    yield use
    jpeg_region._library.cache_clear()


@pytest.fixture
def helper(built, use_library):
    use_library(built)


def _encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', **options)
    return buffer.getvalue()


def _pillow_decode(data: bytes, scale: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    if scale > 1:
        image.draft('RGB', (image.width // scale, image.height // scale))
    return image.convert('RGB')


ENCODINGS = [dict(quality=90, subsampling=2), dict(quality=90, subsampling=1), dict(quality=95, subsampling=0),
             dict(quality=90, subsampling=2, progressive=True), dict(quality=80, subsampling=0, progressive=True)]


@pytest.mark.parametrize('size', [(523, 389), (640, 480), (1203, 811), (33, 517), (17, 9), (1, 1)])
def test_the_box_is_pillows_decode_pixel_for_pixel(helper, size):
    rng = random.Random(size[0])
    files = [(_encode(_textured(*size, seed), **options), options) for seed, options in enumerate(ENCODINGS)]
    files.append((_encode(_textured(*size, 7).convert('L'), quality=90), 'greyscale'))
    checked = 0
    for data, options in files:
        for scale in (1, 2, 4, 8):
            if size[0] < scale or size[1] < scale:
                continue
            whole = _pillow_decode(data, scale)
            width, height = whole.size
            assert (width, height) == (-(-size[0] // scale), -(-size[1] // scale))
            boxes = [(0, 0, width, height), (width - 1, height - 1, 1, 1)]  # all of it; the last pixel
            for _ in range(6):
                w, h = rng.randint(1, width), rng.randint(1, height)
                boxes.append((rng.randint(0, width - w), rng.randint(0, height - h), w, h))
            for left, top, w, h in boxes:
                region = jpeg_region.decode_region(data, scale, left, top, w, h)
                assert region is not None and region.mode == 'RGB' and region.size == (w, h)
                expected = np.asarray(whole.crop((left, top, left + w, top + h)))
                assert np.array_equal(np.asarray(region), expected), (options, scale, (left, top, w, h))
                checked += 1
    assert checked >= 6 * 8


def test_what_it_does_not_handle_is_left_to_pillow(helper):
    photo = _textured(200, 150, 3)
    data = _encode(photo, quality=90)
    assert jpeg_region.decode_region(data, 1, 0, 0, 200, 150) is not None
    # CMYK (Adobe) files, truncated files (no end-of-image marker last), damaged ones (a libjpeg warning).
    assert jpeg_region.decode_region(_encode(photo.convert('CMYK'), quality=90), 1, 0, 0, 10, 10) is None
    assert jpeg_region.decode_region(data[:len(data) // 2], 1, 0, 0, 10, 10) is None
    cut_short = data[:len(data) // 2] + END_OF_IMAGE
    assert jpeg_region.decode_region(cut_short, 1, 0, 140, 200, 10) is None
    png = io.BytesIO()
    photo.save(png, 'PNG')
    assert jpeg_region.decode_region(png.getvalue() + END_OF_IMAGE, 1, 0, 0, 10, 10) is None
    with pytest.raises(ValueError, match='outside the image'):
        jpeg_region.decode_region(data, 1, 150, 0, 51, 10)


def _resize_cases(seed: int):
    """(image, output size, Pillow filter, float box): shrinking up to 5x, enlarging up to 4x, whole-pixel and
    sub-pixel boxes, boxes on the edges, 1-pixel images and outputs, noise (overshooting filters clamp)."""
    rng = random.Random(seed)
    for case in range(120):
        tiny = case % 40 == 0
        width, height = rng.choice([(1, 1), (1, 7), (9, 1)]) if tiny else (rng.randint(2, 520), rng.randint(2, 520))
        image = _textured(width, height, case) if case % 3 else Image.fromarray(
            np.random.default_rng(case).integers(0, 256, (height, width, 3), dtype=np.uint8))
        x0, y0 = rng.uniform(0, width * 0.4), rng.uniform(0, height * 0.4)
        x1, y1 = rng.uniform(x0 + 0.25, width), rng.uniform(y0 + 0.25, height)
        if case % 5 == 0:
            x0, y0, x1, y1 = 0, 0, width, height
        elif case % 5 == 1:
            x0, y0, x1, y1 = int(x0), int(y0), max(int(x1), int(x0) + 1), max(int(y1), int(y0) + 1)
        box_w, box_h = x1 - x0, y1 - y0
        scaled = tuple(max(1, round(side * rng.uniform(0.2, 4))) for side in (box_w, box_h))
        out = (224, 224) if case % 4 == 0 else scaled
        yield image, out, (Image.BICUBIC, Image.BILINEAR)[case % 2], (x0, y0, x1, y1)


@pytest.mark.parametrize('build', ['built', 'built_portable'])
def test_the_resize_is_pillows_pixel_for_pixel(build, request, use_library):
    use_library(request.getfixturevalue(build))
    for image, size, resample, box in _resize_cases(seed=len(build)):
        ours = jpeg_region.resize(jpeg_region.RawRGB.of(image), size, resample, box)
        if image.height > 100 * image.width and size[1] < image.height:  # Pillow's other order: declined
            assert ours is None
            continue
        assert ours is not None and ours.size == size
        expected = np.asarray(image.resize(size, resample, box=box))
        assert np.array_equal(np.asarray(ours), expected), (image.size, size, resample, box)


def test_the_resize_leaves_what_it_does_not_do_to_pillow(helper):
    """Other filters, and the very tall images Pillow resizes in the other order, go back to Pillow: the
    crop's pixels are still Pillow's."""
    image = _textured(300, 200, 1)
    for resample in (Image.NEAREST, Image.LANCZOS, Image.HAMMING, Image.BOX):
        assert jpeg_region.resize(jpeg_region.RawRGB.of(image), (64, 64), resample, (0, 0, 300, 200)) is None
    tall = _textured(3, 400, 2)
    assert jpeg_region.resize(jpeg_region.RawRGB.of(tall), (2, 50), Image.BICUBIC, (0, 0, 3, 400)) is None
    assert jpeg_region.resize(jpeg_region.RawRGB.of(tall), (2, 500), Image.BICUBIC, (0, 0, 3, 400)) is not None


@pytest.mark.parametrize('build', ['built', 'built_portable'])
def test_the_lookup_gives_each_planes_table_entry(build, request, use_library):
    """data/lookup.c, AVX2 gathers and the portable loop: out[b, c, ...] = table[c][in[b, c, ...]] for every
    value, including planes whose length is not a multiple of the vector width."""
    use_library(request.getfixturevalue(build))
    generator = torch.Generator().manual_seed(1)
    for channels, height, width in ((3, 17, 23), (1, 4, 64), (2, 1, 5)):
        planes = torch.randint(0, 256, (3, channels, height, width), dtype=torch.uint8, generator=generator)
        planes[0].view(-1)[:min(256, planes[0].numel())] = torch.arange(min(256, planes[0].numel()), dtype=torch.uint8)
        table = torch.randn(channels, 256, generator=generator)
        out = torch.full(planes.shape, float('nan'))
        assert jpeg_region.lookup_planes(planes.data_ptr(), out.data_ptr(), 3 * channels, height * width, channels,
                                         table.data_ptr())
        expected = torch.stack([table[c][planes[:, c].long()] for c in range(channels)], dim=1)
        assert torch.equal(out, expected), (channels, height, width)


def _affine_cases(seed: int):
    """(image, output size, AFFINE data, Pillow filter, fill colour): rotations (the matrices Pillow's rotate
    makes), shears and translations as RandAugment draws them, and arbitrary matrices that also sample
    outside the image (the fill) and past its edges."""
    rng = np.random.default_rng(seed)
    for case in range(90):
        width, height = (int(v) for v in rng.integers(1, 300, 2))
        image = _textured(width, height, case) if case % 3 else Image.fromarray(
            rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if case % 3 == 0:
            angle = np.radians(rng.uniform(-30, 30))
            c, s = round(np.cos(angle), 15), round(np.sin(angle), 15)
            center_x, center_y = width / 2, height / 2
            data = (c, s, center_x - c * center_x - s * center_y, -s, c, center_y + s * center_x - c * center_y)
        elif case % 3 == 1:
            data = (1, rng.uniform(-0.3, 0.3), rng.uniform(-0.45, 0.45) * width, rng.uniform(-0.3, 0.3), 1, 0)
        else:
            data = tuple(rng.normal(0, 1, 6) * (0.5, 0.5, 40, 0.5, 0.5, 40) + (1, 0, 0, 0, 1, 0))
        size = (width, height) if case % 2 else tuple(int(v) for v in rng.integers(1, 300, 2))
        yield image, size, data, (Image.BICUBIC, Image.BILINEAR)[case % 2], (None, (124, 116, 104))[case % 4 == 0]


@pytest.mark.parametrize('build', ['built', 'built_portable'])
def test_the_affine_transform_is_pillows_pixel_for_pixel(build, request, use_library):
    use_library(request.getfixturevalue(build))
    for image, size, data, resample, fillcolor in _affine_cases(seed=len(build)):
        ours = jpeg_region.affine(image, size, data, resample, fillcolor)
        assert ours is not None and ours.size == size
        expected = np.asarray(image.transform(size, Image.AFFINE, data, resample, fillcolor=fillcolor))
        assert np.array_equal(np.asarray(ours), expected), (image.size, size, data, resample, fillcolor)


def test_the_affine_transform_leaves_what_it_does_not_do_to_pillow(helper):
    image, data = _textured(60, 40, 3), (1, 0.2, 0, 0, 1, 0)
    assert jpeg_region.affine(image, (60, 40), data, Image.NEAREST) is None
    assert jpeg_region.affine(image.convert('L'), (60, 40), data, Image.BICUBIC) is None
    assert jpeg_region.affine(image, (60, 40), data, Image.BICUBIC, fillcolor='red') is None
    for fillcolor in (None, (1, 2, 3), 'red'):  # through the image class, always Pillow's pixels
        fast = image.copy()
        fast.__class__ = jpeg_region.CAffineImage
        for resample in (Image.NEAREST, Image.BICUBIC):
            assert np.array_equal(np.asarray(fast.rotate(17, resample=resample, fillcolor=fillcolor)),
                                  np.asarray(image.rotate(17, resample=resample, fillcolor=fillcolor)))


@pytest.mark.parametrize('interpolation', ['bicubic', 'random'])
def test_randaugment_with_the_c_affine_is_timms(helper, monkeypatch, interpolation):
    """The official RandAugment (rand-m9-mstd0.5-inc1) with its affine ops in C: the same tensors and random
    states as timm's own, with C actually doing the rotations, shears and translations."""
    config = load_config(os.path.join(ROOT, 'configs', 'unicl_swin_tiny.yaml'),
                         ['DATA.IMG_SIZE', '64', 'DATA.INTERPOLATION', interpolation])
    official, ours = build_train_transform(config), build_train_transform(config)
    ours.transforms = [affine_ops_in_c(step) for step in ours.transforms]
    calls = []
    c_affine = jpeg_region.affine
    monkeypatch.setattr(jpeg_region, 'affine', lambda *args: calls.append(args[3]) or c_affine(*args))
    images = [_textured(90 + 7 * i, 70 + 5 * i, i) for i in range(8)]
    for seed in range(60):
        with seeded_global_rngs(seed):
            expected = official(images[seed % len(images)])
            after = (random.getstate(), np.random.get_state()[1].tolist(), torch.random.get_rng_state())
        with seeded_global_rngs(seed):
            assert torch.equal(ours(images[seed % len(images)]), expected)
            assert (random.getstate(), np.random.get_state()[1].tolist()) == after[:2]
            assert torch.equal(torch.random.get_rng_state(), after[2])
    assert len(calls) >= 10 and set(calls) == ({Image.BICUBIC} if interpolation == 'bicubic' else
                                               {Image.BICUBIC, Image.BILINEAR})


@pytest.mark.parametrize('interpolation', ['bicubic', 'random'])
def test_the_training_crop_is_the_same_with_and_without_it(helper, interpolation):
    """CropDecoder with the helper equals it without, draw for draw and pixel for pixel, at full and
    reduced scales and with timm's random filter choice; a truncated JPEG is still a bad sample that draws
    nothing."""
    crop = RandomResizedCropAndInterpolation(OUT, interpolation=interpolation)
    files = [_encode(_textured(w, h, i), quality=90, subsampling=(0, 2)[i % 2])
             for i, (w, h) in enumerate([(700, 560), (600, 800), (520, 390), (1100, 700)])]
    with_helper, pillow_only = CropDecoder(crop), CropDecoder(crop, native=False)
    scales = set()
    for seed in range(40):
        record = Record(files[seed % len(files)], f'file {seed % len(files)}')
        random.seed(seed)
        decoded = with_helper.decode(record)
        region = (decoded.pixels.width, decoded.pixels.height)
        assert decoded.origin != (0, 0) or region != Image.open(io.BytesIO(record.image)).size
        scales.add(decoded.scale)
        random.seed(seed)
        ours, after = np.asarray(with_helper(record)), random.getstate()
        random.seed(seed)
        assert np.array_equal(ours, np.asarray(pillow_only(record))) and random.getstate() == after
    assert scales == {1, 2, 4, 8}
    truncated = Record(files[0][:len(files[0]) // 2], 'truncated.jpg')
    random.seed(5)
    before = random.getstate()
    with pytest.raises(BadSample) as bad:
        with_helper(truncated)
    assert bad.value.reason == CORRUPT and random.getstate() == before


def test_without_the_library_pillow_decodes_and_the_log_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setattr(jpeg_region, 'LIBRARY', str(tmp_path / 'missing.so'))
    jpeg_region._library.cache_clear()
    try:
        assert not jpeg_region.available()
        assert 'decoded whole by Pillow' in jpeg_region.describe()
        assert 'python -m data.jpeg_region' in jpeg_region.describe()
        assert jpeg_region.decode_region(_encode(_textured(64, 48, 0)), 1, 0, 0, 8, 8) is None
    finally:
        jpeg_region._library.cache_clear()


def test_the_evaluation_resize_and_crop_are_torchvisions(helper):
    """NativeResizeCrop (only the kept window computed in C) against torchvision's Resize -> CenterCrop and
    plain Resize on odd, portrait and small images, both filters; what it does not do (max_size, a crop
    larger than the image, greyscale) goes through torchvision and still matches."""
    rng = np.random.default_rng(3)
    bicubic, bilinear = InterpolationMode.BICUBIC, InterpolationMode.BILINEAR
    for case in range(60):
        width, height = (int(v) for v in rng.integers(9, 600, 2))
        image = _textured(width, height, case) if case % 2 else Image.fromarray(
            rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        interpolation = (bicubic, bilinear)[case % 2]
        for steps in ([transforms.Resize(73, interpolation=interpolation), transforms.CenterCrop(64)],
                      [transforms.Resize(64, interpolation=interpolation), transforms.CenterCrop((64, 51))],
                      [transforms.Resize((64, 77), interpolation=interpolation)],
                      [transforms.Resize(64, interpolation=interpolation, max_size=80), transforms.CenterCrop(64)],
                      [transforms.Resize(40, interpolation=interpolation), transforms.CenterCrop(64)]):
            ours = NativeResizeCrop(*steps)(image)
            assert np.array_equal(np.asarray(ours), np.asarray(transforms.Compose(steps)(image))), (case, steps)
    grey = _textured(90, 70, 1).convert('L')
    steps = [transforms.Resize(73), transforms.CenterCrop(64)]
    assert np.array_equal(np.asarray(NativeResizeCrop(*steps)(grey)), np.asarray(transforms.Compose(steps)(grey)))


@pytest.mark.parametrize('mode', sorted(EVAL_TRANSFORMS))
def test_the_evaluation_transform_is_the_same_with_and_without_it(helper, mode, use_library, tmp_path):
    config = load_config(os.path.join(ROOT, 'configs', 'unicl_swin_tiny.yaml'), ['DATA.IMG_SIZE', '64'])
    ours, official = build_eval_transform(config, mode), build_eval_transform(config, mode, native=False)
    assert isinstance(ours.transforms[0], NativeResizeCrop)
    assert isinstance(official.transforms[0], transforms.Resize)
    assert repr(ours) == repr(official)  # the evaluation feature cache's key: the same pixels, the same key
    use_library(str(tmp_path / 'missing.so'))
    assert isinstance(build_eval_transform(config, mode).transforms[0], transforms.Resize)
    for seed, (width, height) in enumerate([(500, 375), (333, 500), (64, 64), (91, 300)]):
        image = _textured(width, height, seed)
        assert torch.equal(ours(image), official(image))


def test_built_without_libjpeg_it_still_resizes_and_says_so(tmp_path_factory, use_library):
    """Without libjpeg-turbo's headers the helper is built from resample.c and affine.c alone: Pillow decodes
    the JPEGs, the crop is still resized in C (the same pixels), and the description says which."""
    try:
        use_library(jpeg_region.build(str(tmp_path_factory.mktemp('no_jpeg') / '_jpeg_region.so'), jpeg=False))
    except RuntimeError as exc:
        pytest.skip(f'the helper cannot be built here: {exc}')
    assert jpeg_region.available() and 'decoded whole by Pillow' in jpeg_region.describe()
    assert "the crop's resize and RandAugment's affine ops in C" in jpeg_region.describe()
    data = _encode(_textured(120, 90, 4), quality=90)
    assert jpeg_region.decode_region(data, 1, 0, 0, 10, 10) is None
    calls = []
    original = jpeg_region.resize
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jpeg_region, 'resize', lambda *args: calls.append(args) or original(*args))
        crop = RandomResizedCropAndInterpolation(OUT, interpolation='bicubic')
        for seed in range(10):
            random.seed(seed)
            ours = np.asarray(CropDecoder(crop)(Record(data, 'a.jpg')))
            random.seed(seed)
            assert np.array_equal(ours, np.asarray(CropDecoder(crop, native=False)(Record(data, 'a.jpg'))))
    assert len(calls) == 10


def test_the_loader_with_it_gives_the_same_batches_and_says_so(helper, tmp_path, tokenizer, caplog):
    """The training loader in a worker process, with the helper and with Pillow's whole decode: the same
    batches (so the exact-resume guarantees, which rest on the draws, carry over), and the log names it."""
    for i, (w, h) in enumerate([(300, 220), (220, 300), (256, 256)]):
        os.makedirs(tmp_path / f'class_{i}')
        for j in range(3):
            _textured(w + 7 * j, h, 10 * i + j).save(tmp_path / f'class_{i}' / f'{j}.jpg', quality=90)
    config = data_config(str(tmp_path), [{'TYPE': 'imagefolder', 'PATH': '.'}], batch_size=3, num_workers=1,
                         EPOCH_SAMPLES=9, IMG_SIZE=64)  # above 32 px: a RandomResizedCrop
    with caplog.at_level(logging.INFO, logger='data.build'):
        with_helper = loader_for(config, tokenizer)
    assert "training JPEGs: only the crop's rectangle decoded, by libjpeg-turbo" in caplog.text
    pillow = loader_for(config, tokenizer)
    pillow.setup.decode.native = False
    for epoch in (0, 1):
        assert same_batches(epoch_batches(with_helper, epoch), epoch_batches(pillow, epoch))

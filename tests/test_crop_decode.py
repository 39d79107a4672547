"""The reduced-scale training decode (data/crop_decode.py) and the device-side normalisation
(data/normalize.py) against the official transform they replace: timm's RandomResizedCrop on a full
decode, and ToTensor -> Normalize -> RandomErasing in the workers."""
from __future__ import annotations

import io
import random
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms

from configs import ConfigError
from configs.validation import validate_config
from data import build_train_loader, jpeg_region
from data.crop_decode import CropDecoder, dct_scale
from data.decode import decode_image
from data.normalize import BatchErasing, ImageFinisher, split_tail, stack_images
from data.order import seeded_global_rngs
from data.sources.base import CORRUPT, BadSample, Record
from data.transforms import build_train_pipeline, build_train_transform
from tests.conftest import tiny_config
from tests.test_data_fixtures import LABELS, TABLE, data_config, epoch_batches, loader_for, same_batches

OUT = 64  # the tiny config's IMG_SIZE: boxes of 128, 256, 512 px allow the 1/2, 1/4, 1/8 decodes


def _textured(width: int, height: int, seed: int) -> Image.Image:
    # Smooth noise at a few scales plus grain: JPEG-coded like a photo, unlike flat colour or white noise.
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 128.0)
    for cells, amplitude in ((4, 60), (24, 30), (96, 15)):
        coarse = np.clip(rng.normal(128, amplitude, (cells, cells, 3)), 0, 255).astype(np.uint8)
        pixels += np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), float) - 128
    pixels += rng.normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, subsampling: int) -> Record:
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90, subsampling=subsampling)  # 2: 4:2:0, 0: 4:4:4
    return Record(buffer.getvalue(), f'{image.size} sub{subsampling}')


@pytest.fixture(scope='module')
def records() -> List[Record]:
    sizes = [(700, 560), (600, 800), (520, 390), (1100, 700)]
    return [_jpeg(_textured(w, h, i), subsampling=(0, 2)[i % 2]) for i, (w, h) in enumerate(sizes)]


def _timm_crop(size: int = OUT) -> RandomResizedCropAndInterpolation:
    return RandomResizedCropAndInterpolation(size, interpolation='bicubic')


def test_boxes_are_timms_draw_for_draw():
    """The box comes from the header size with timm's own draws: for every seed the same box, the same
    interpolation ('random' draws one more number) and the same generator state afterwards, for sizes
    and aspect ratios that take the first try, later tries and the centre-crop fallback."""
    sizes = [(500, 375), (375, 500), (333, 500), (64, 64), (2000, 120), (90, 1400), (1600, 1200), (37, 53)]
    for interpolation in ('bicubic', 'random'):
        crop = RandomResizedCropAndInterpolation(224, interpolation=interpolation)
        decoder = CropDecoder(crop)
        boxes = []
        for seed in range(400):
            size = sizes[seed % len(sizes)]
            header_only = Image.new('RGB', size)  # decoder.sample reads nothing but the size
            random.seed(seed)
            ours = decoder.sample(header_only)
            after = random.getstate()
            random.seed(seed)
            box = crop.get_params(header_only, crop.scale, crop.ratio)
            chosen = random.choice(crop.interpolation) if interpolation == 'random' else crop.interpolation
            assert ours == (box, chosen) and random.getstate() == after
            boxes.append((box, size))
        # The statistics follow: the area share spans timm's range, and a 2000 x 120 image (no 3/4-4/3 box
        # of 8% of it fits in 10 tries) takes the fallback: the centre box of the full height at 4/3.
        shares = [b[2] * b[3] / (s[0] * s[1]) for b, s in boxes if s != (2000, 120)]
        assert 0.07 < min(shares) < 0.15 and max(shares) > 0.9
        assert {b for b, s in boxes if s == (2000, 120)} == {(0, (2000 - 160) // 2, 120, 160)}


def test_dct_scale_keeps_the_box_at_least_the_output_size():
    assert dct_scale(223, 1000, 224, 224) == 1
    assert dct_scale(448, 460, 224, 224) == 2 and dct_scale(447, 460, 224, 224) == 1
    assert dct_scale(900, 1000, 224, 224) == 4 and dct_scale(5000, 1792, 224, 224) == 8


def test_unreduced_decode_is_exactly_timms(records):
    """reduce=False, and every sample whose box allows no reduction, gives timm's pixels bit for bit."""
    crop = _timm_crop()
    exact, reducible = CropDecoder(crop, reduce=False), CropDecoder(crop)
    png = io.BytesIO()
    _textured(300, 200, 9).save(png, 'PNG')
    cases = records + [Record(png.getvalue(), 'png')]
    full_scale_seen = 0
    for seed in range(24):
        record = cases[seed % len(cases)]
        random.seed(seed)
        reference = np.asarray(crop(decode_image(record)))
        random.seed(seed)
        assert np.array_equal(np.asarray(exact(record)), reference)
        random.seed(seed)
        scale = reducible.decode(record).scale
        if scale == 1:
            random.seed(seed)
            assert np.array_equal(np.asarray(reducible(record)), reference)
            full_scale_seen += 1
    assert full_scale_seen >= 4


def test_reduced_scale_decode_error_is_small_and_bounded(records):
    """At 1/2, 1/4 and 1/8 the crop differs from full decode + crop only by the decoders' filters: on
    photo-like content at most 3 levels (of 255) on average per image and 12 at the 99th percentile."""
    crop = _timm_crop()
    decoder = CropDecoder(crop)
    errors = {}
    for seed in range(120):
        record = records[seed % len(records)]
        random.seed(seed)
        scale = decoder.decode(record).scale
        if scale == 1 or len(errors.get(scale, [])) >= 6:
            continue
        random.seed(seed)
        reference = np.asarray(crop(decode_image(record)), dtype=np.float64)
        random.seed(seed)
        reduced = np.asarray(decoder(record), dtype=np.float64)
        assert reduced.shape == reference.shape == (OUT, OUT, 3)
        difference = np.abs(reduced - reference)
        errors.setdefault(scale, []).append((difference.mean(), np.percentile(difference, 99)))
    assert set(errors) == {2, 4, 8}
    for scale, values in errors.items():
        means, p99 = zip(*values)
        assert max(means) <= 3.0 and max(p99) <= 12, (scale, values)


def test_a_bad_jpeg_is_a_bad_sample_and_draws_nothing(records):
    decoder = CropDecoder(_timm_crop())
    truncated = Record(records[0].image[:len(records[0].image) // 2], 'truncated.jpg')
    random.seed(5)
    before = random.getstate()
    with pytest.raises(BadSample) as bad:
        decoder(truncated)
    assert bad.value.reason == CORRUPT and random.getstate() == before


def _official_tail(mode: str, count: int):
    normalize = transforms.Normalize(mean=torch.tensor([0.485, 0.456, 0.406]), std=torch.tensor([0.229, 0.224, 0.225]))
    return [MaybeToTensor(), normalize, RandomErasing(1.0, mode=mode, max_count=count, device='cpu')]


@pytest.mark.parametrize('helper', [True, False], ids=['table-in-C', 'torch-ops'])
@pytest.mark.parametrize('mode,count', [('pixel', 1), ('pixel', 3), ('rand', 2), ('const', 1)])
def test_normalising_after_the_copy_is_bit_identical(mode: str, count: int, helper: bool, monkeypatch):
    """uint8 + recorded erasing, finished in the training process, equals the float path bit for bit,
    and the random generators end where the float path leaves them; on the CPU by data/lookup.c's table
    where the helper is built, else by torch's ops."""
    if helper and not jpeg_region.available():
        pytest.skip('the C helper is not built (python -m data.jpeg_region)')
    if not helper:
        monkeypatch.setattr(jpeg_region, 'lookup_planes', lambda *args: False)
    images = [_textured(48, 40, seed) for seed in range(6)]
    official = transforms.Compose(_official_tail(mode, count))
    head, tail, finish = split_tail(_official_tail(mode, count))
    assert head == []
    with seeded_global_rngs(11):
        reference = torch.stack([official(image) for image in images])
        states = random.getstate(), torch.random.get_rng_state()
    with seeded_global_rngs(11):
        pixels, erasing = stack_images([tail(image) for image in images])
        assert random.getstate() == states[0] and torch.equal(torch.random.get_rng_state(), states[1])
    # probability 1: every image erased
    assert pixels.dtype == torch.uint8 and {index for index, *_ in erasing.places} == set(range(len(images)))
    assert len(erasing.places) >= len(images) and erasing.values.numel() > 0
    assert torch.equal(finish(pixels, erasing, torch.device('cpu')), reference)


@pytest.mark.cuda  # run by bench/device_check.sh on a lent GPU; skipped here (tests/conftest.py)
def test_normalising_on_cuda_matches_the_cpu(tiny_data, tokenizer):
    # CUDA divides by a scalar through its reciprocal: equal to float32 rounding, not always bit for bit.
    images = [_textured(48, 40, seed) for seed in range(4)]
    _, tail, finish = split_tail(_official_tail('pixel', 1))
    with seeded_global_rngs(3):
        pixels, erasing = stack_images([tail(image) for image in images])
    on_cpu = finish(pixels, erasing, torch.device('cpu'))
    on_cuda = finish(pixels.pin_memory(), erasing, torch.device('cuda'))
    assert on_cuda.device.type == 'cuda' and torch.allclose(on_cuda.cpu(), on_cpu, rtol=1e-6, atol=1e-6)
    # The loader for a GPU: uint8 batches pinned by the DataLoader, normalised on the GPU after the copy.
    config = data_config(tiny_data, [LABELS, TABLE], batch_size=4, num_workers=1, EPOCH_SAMPLES=8, PIN_MEMORY=True)
    reference = epoch_batches(loader_for(config, tokenizer), 0)
    for_gpu = build_train_loader(config, tokenizer, 0, 1, device=torch.device('cuda'))
    assert for_gpu.pin_memory and not for_gpu.setup.finish_in_workers
    for (images, *_), (expected, *_) in zip(epoch_batches(for_gpu, 0), reference):
        assert images.device.type == 'cuda' and torch.allclose(images.cpu(), expected, rtol=1e-6, atol=1e-6)


def test_the_table_is_torchs_arithmetic_for_every_value():
    """data/lookup.c's table lookup against torch's float ops on a batch holding every uint8 value in every
    channel at many positions (vectorised and tail elements alike); bit for bit."""
    if not jpeg_region.available():
        pytest.skip('the C helper is not built (python -m data.jpeg_region)')
    finish = ImageFinisher([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 61, 67), dtype=torch.uint8, generator=generator)
    images[0, :, 0, :] = torch.arange(67, dtype=torch.uint8)
    images[1].view(3, -1)[:, :256] = torch.arange(256, dtype=torch.uint8)
    expected = images.to(torch.float32).div_(255).sub_(finish.mean).div_(finish.std)
    by_table = finish(images, BatchErasing.of([]), torch.device('cpu'))
    assert torch.equal(by_table.view(torch.int32), expected.view(torch.int32))
    strided = images.permute(0, 1, 3, 2)  # not contiguous: read in its logical order
    assert torch.equal(finish(strided, BatchErasing.of([]), torch.device('cpu')), expected.permute(0, 1, 3, 2))


class _SharedBatches(torch.utils.data.Dataset):
    """What a loader worker's batches are: (in shared memory, values) for a stacked and a finished batch."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        patch = (slice(1, 3), slice(0, 2), torch.full((3, 2, 2), -7.0))
        outputs = [(torch.full((3, 5, 4), k, dtype=torch.uint8), [patch] if k == 1 else []) for k in range(3)]
        pixels, erasing = stack_images(outputs)
        in_worker = stack_images(outputs, shared=False)[0]
        finished = ImageFinisher([0.5] * 3, [0.25] * 3)(in_worker, erasing, torch.device('cpu'))
        return ([pixels.is_shared(), erasing.values.is_shared(), finished.is_shared(), in_worker.is_shared()],
                pixels, erasing, finished)


def _unchanged(batch):
    return batch  # as the training loader's collate_fn: the worker's objects arrive as they were built


def test_worker_batches_are_built_in_shared_memory():
    """In a loader worker what goes to the training process (the batch, the erased patches' values, a batch
    finished there) is allocated in shared memory, so handing it over copies nothing (as default_collate's
    batches); what stays in the worker, or anything outside a worker, is an ordinary tensor."""
    assert _SharedBatches()[0][0] == [False, False, False, False]
    loader = torch.utils.data.DataLoader(_SharedBatches(), batch_size=None, num_workers=1, collate_fn=_unchanged)
    in_worker, pixels, erasing, finished = next(iter(loader))
    assert in_worker == [True, True, True, False]
    assert pixels[:, 0, 0, 0].tolist() == [0, 1, 2] and erasing.places == [(1, slice(1, 3), slice(0, 2), (3, 2, 2))]
    expected = (pixels.float() / 255 - 0.5) / 0.25
    expected[1, :, 1:3, 0:2] = -7.0
    assert torch.equal(finished, expected)


def _batch(pipeline_decode, transform, finish, recs: List[Record], seed: int) -> torch.Tensor:
    with seeded_global_rngs(seed):
        outputs = [transform(pipeline_decode(r)) for r in recs]
    return finish(*stack_images(outputs), torch.device('cpu'))


def test_the_loaders_pipeline_gives_the_official_transforms_batch(records):
    """build_train_pipeline as the loader runs it (decode, transform in the workers, finish after the
    copy) against decode_image + the whole official transform: bit for bit with REDUCED_DECODE off, and
    with it on the same shapes and normalisation, close to the reference."""
    config = tiny_config('AUG.REPROB', '0.5')
    official = build_train_transform(config)
    with seeded_global_rngs(7):
        reference = torch.stack([official(decode_image(r)) for r in records])
    exact = build_train_pipeline(tiny_config('AUG.REPROB', '0.5', 'DATA.REDUCED_DECODE', 'False'))
    assert isinstance(exact.decode, CropDecoder) and not exact.decode.reduce
    assert torch.equal(_batch(exact.decode, exact.transform, exact.finish, records, 7), reference)
    reduced = build_train_pipeline(config)
    assert isinstance(reduced.decode, CropDecoder)
    batch = _batch(reduced.decode, reduced.transform, reduced.finish, records, 7)
    assert batch.shape == reference.shape and batch.dtype == torch.float32
    # RandAugment may amplify a level or two (contrast, equalize); the erased patches are equal.
    assert (batch - reference).abs().mean() < 0.05  # measured 0.017 (in units of the std)


def test_loader_batches_are_the_same_wherever_they_are_normalised(tiny_data, tokenizer):
    """The training loader's batches, normalised by the workers (a CPU device), by the main process after
    the workers sent uint8 (a GPU's path, here on the CPU) and image by image as before data/normalize.py."""
    config = data_config(tiny_data, [LABELS, TABLE], batch_size=4, EPOCH_SAMPLES=12)
    config.defrost()
    config.AUG.REPROB = 1.0  # every image erased: the patches must survive the trip from the worker
    config.freeze()
    by_workers = loader_for(config, tokenizer)
    assert by_workers.setup.finish_in_workers
    in_main = loader_for(config, tokenizer)
    in_main.setup.finish_in_workers = False
    in_main.setup.num_workers = 1  # a real worker process: uint8 batches and patches pickled to the main one
    finished_in_main = epoch_batches(in_main, 0)
    per_image = loader_for(config, tokenizer)
    steps = list(per_image.setup.transform.transforms)
    tail = steps.pop()
    per_image.setup.transform = transforms.Compose(steps + [MaybeToTensor(), tail.normalize, tail.erasing])
    per_image.setup.finish = None
    reference = epoch_batches(per_image, 0)
    assert len(reference) == 3 and all(batch[0].dtype == torch.float32 for batch in finished_in_main)
    assert same_batches(epoch_batches(by_workers, 0), reference)
    assert same_batches(finished_in_main, reference)


def test_reduced_decode_switch_and_its_rule():
    config = tiny_config()
    assert config.DATA.REDUCED_DECODE is True
    config.defrost()
    config.DATA.REDUCED_DECODE = 'yes'
    with pytest.raises(ConfigError, match='DATA.REDUCED_DECODE'):
        validate_config(config)
    # Small images keep the padded RandomCrop and the plain decode.
    small = build_train_pipeline(tiny_config('DATA.IMG_SIZE', '32', 'MODEL.IMAGE_ENCODER.IMG_SIZE', '32'))
    assert small.decode is decode_image and isinstance(small.transform.transforms[0], transforms.RandomCrop)

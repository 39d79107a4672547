"""Loader throughput on ImageNet-like JPEGs (`python bench/data_loading.py --jpeg`): images per second per
worker core for the official training transform and the evaluation transform, ours against a plain
torchvision `ImageFolder` + `DataLoader` on the same files, 1 and 2 workers.

    python bench/data_loading.py --jpeg [--jpeg-data demo_data/jpeg_bench] [--count 3000] [--samples 1920]
                                        [--repeats 3] [--workers 1 2] [--batch 64] [--decode-device cpu cuda]

The files come from bench/jpeg_data.py (generated once, then reused). The config is unicl_swin_tiny's
(224 px; RandomResizedCrop bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, RandomErasing 0.25 pixel).

Per core, measured two ways, because the machine may be shared: the wall rate divided by the workers,
and the rate per CPU-second: samples over the CPU time the loader's processes spent in the timed window
(the workers' user + system time from /proc, plus the main process's own: ours normalises there). The
first batch (worker start-up) is not timed; every case runs `--repeats` times, the cases interleaved
(a rotating order), and the table gives medians.

Training cases: torchvision (the whole official transform on a full decode, a prompt per sample
tokenised in the workers); ours as shipped for a CPU device (only the crop's rectangle decoded and resized
by data/jpeg_region.py's helper, at a reduced scale where the box allows, RandAugment's affine ops in C;
the workers normalise whole batches); the same with Pillow decoding whole images and resizing; ours as on
a GPU (the workers send uint8, normalised after the copy, here by the main process on the CPU: on a GPU
that part leaves the CPU). The helper must be built (`python -m data.jpeg_region`), else "ours" decodes
with Pillow too; the results say which. Evaluation cases: torchvision `ImageFolder` with the official
validation transform (Resize 256 bicubic, CenterCrop 224) and ours (evaluation/data.py's ImageList in a
sharded loader, the same transform with its resize and crop computed by the C helper: the same pixels).

`--decode-device cpu cuda` times instead the training loader with DATA.DECODE_DEVICE cpu (workers decode,
uint8 normalised on the GPU) and cuda (workers send the files' bytes, the GPU decodes: data/gpu_decode.py),
both without RandAugment and colour jitter (the cuda path cannot run them), onto the GPU; on a machine
without CUDA the cuda case runs its CPU fallback (decode_jpeg on the CPU in the main process).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, default_collate  # noqa: E402
from torch.utils.data._utils import worker as worker_state  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from bench.common import machine, markdown_table, write_results  # noqa: E402
from bench.data_loading import torchvision_baseline, warm_page_cache  # noqa: E402
from bench.jpeg_data import ensure_jpegs  # noqa: E402
from configs import load_config  # noqa: E402
from data import build_train_loader, jpeg_region  # noqa: E402
from data.crop_decode import CropDecoder, dct_scale, resized_box  # noqa: E402
from data.decode import decode_image  # noqa: E402
from data.gpu_decode import build_batched_decode_pipeline  # noqa: E402
from data.normalize import split_tail, stack_images  # noqa: E402
from data.order import seeded_global_rngs  # noqa: E402
from data.sources.base import Record  # noqa: E402
from data.transforms import (affine_ops_in_c, build_eval_transform, build_train_pipeline,  # noqa: E402
                             build_train_transform)
from evaluation.data import ImageList, image_folder, sharded_loader  # noqa: E402
from model import build_tokenizer  # noqa: E402

_TICKS = os.sysconf('SC_CLK_TCK')


def children_cpu_seconds() -> Dict[int, float]:
    """user + system CPU seconds of each live child process (the loader's workers), from /proc."""
    me, seconds = os.getpid(), {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat', encoding='ascii', errors='replace') as f:
                fields = f.read().rsplit(')', 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue
        if int(fields[1]) == me:  # fields: state, ppid, ... utime (12th), stime (13th) from here
            seconds[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return seconds


def timed_run(batches: Iterable, samples: int) -> Dict[str, float]:
    """Wall images/s and CPU ms per image (workers, main process) from the second batch to `samples`."""
    seen, start = 0, None
    iterator = iter(batches)  # held: leaving a for loop would shut the workers down before they are read
    while seen < samples:
        images = next(iterator)[0]
        if start is None:  # the first batch pays for starting the workers: not counted
            start, main_start, workers_start = time.perf_counter(), time.process_time(), children_cpu_seconds()
        else:
            seen += images.shape[0]
    if images.is_cuda:  # the batches are decoded / normalised on the GPU asynchronously: count them done
        torch.cuda.synchronize()
    wall, main = time.perf_counter() - start, time.process_time() - main_start
    workers = sum(t - workers_start.get(pid, 0.0) for pid, t in children_cpu_seconds().items())
    del iterator
    return {'images_per_sec': seen / wall, 'worker_ms': 1000 * workers / seen, 'main_ms': 1000 * main / seen}


@contextmanager
def as_in_a_loader_worker():
    """torch.utils.data.get_worker_info() as a loader worker sees it, so that default_collate and
    data/normalize.py build batches in shared memory as they do there (torch's private global, bench only)."""
    saved = worker_state._worker_info
    worker_state._worker_info = worker_state.WorkerInfo(id=0, num_workers=1, seed=0, dataset=None)
    try:
        yield
    finally:
        worker_state._worker_info = saved


def pillow_decode(loader):
    """Our loader with the crop decoded by Pillow's whole decode and resized by Pillow (data/jpeg_region.py's
    helper not used)."""
    loader.setup.decode.native = False
    return loader


def uint8_to_main(loader):
    """Our loader as it runs for a GPU: uint8 batches to the main process, normalised there."""
    loader.setup.finish_in_workers = False
    return loader


def decoding_on(config, tokenizer, decode_device: str):
    """Our loader as DATA.DECODE_DEVICE `decode_device` trains, onto the GPU when there is one. Without one,
    'cuda' runs its code with decode_jpeg on the CPU in the main process (data/gpu_decode.py's fallback)."""
    if torch.cuda.is_available():
        return build_train_loader(config_with(config, decode_device), tokenizer, 0, 1, device=torch.device('cuda'))
    loader = build_train_loader(config, tokenizer, 0, 1)
    if decode_device == 'cuda':
        pipeline = build_batched_decode_pipeline(config_with(config, 'cuda'))
        setup = loader.setup
        setup.decode, setup.transform, setup.finish, setup.stack = (pipeline.decode, pipeline.transform,
                                                                    pipeline.finish, pipeline.stack)
        setup.finish_in_workers = False
    return loader


def config_with(config, decode_device: str):
    config = config.clone()
    config.defrost()
    config.DATA.DECODE_DEVICE = decode_device
    config.freeze()
    return config


def eval_torchvision(config, folder: str, workers: int, batch: int) -> DataLoader:
    dataset = ImageFolder(folder, transform=build_eval_transform(config, native=False))
    return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)


def eval_ours(config, folder: str, workers: int, batch: int) -> DataLoader:
    items = image_folder(folder).paths
    return sharded_loader(ImageList(items, build_eval_transform(config)), batch, workers, torch.device('cpu'))


def decode_scales(config, folder: str, draws: int = 20000) -> Dict[int, float]:
    """Share of training samples decoded at each DCT scale on these files (boxes drawn from the headers)."""
    decoder = build_train_pipeline(config).decode
    if not isinstance(decoder, CropDecoder):
        return {1: 1.0}
    paths = image_folder(folder).paths
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
    counts: Dict[int, int] = {}
    rng_state = random.getstate()
    random.seed(0)
    out_h, out_w = decoder.crop.size
    for k in range(draws):
        box, _ = decoder.sample(Image.new('L', sizes[k % len(sizes)]))
        scale = dct_scale(box[3], box[2], out_w, out_h)
        counts[scale] = counts.get(scale, 0) + 1
    random.setstate(rng_state)
    return {s: counts[s] / draws for s in sorted(counts)}


def _records(folder: str, count: int) -> List[Record]:
    paths = image_folder(folder).paths
    step = max(1, len(paths) // count)
    records = []
    for path in paths[::step][:count]:
        with open(path, 'rb') as f:
            records.append(Record(f.read(), path))
    return records


def component_costs(config, folder: str, count: int, repeats: int) -> Dict[str, List[float]]:
    """CPU ms per image of each part of a worker's work, in this process on one thread, every variant run
    on the same images with the same seeds and the variants alternated `repeats` times (medians): a
    paired comparison that the machine's load moves less than it moves whole loader runs."""
    torch.set_num_threads(1)  # as in a loader worker
    records = _records(folder, count)
    official = build_train_transform(config)
    assert len(official.transforms) == 6, official  # crop, flip, RandAugment, to tensor, normalise, erase
    crop, middle = official.transforms[0], transforms.Compose(official.transforms[1:-3])
    middle_c_affine = transforms.Compose([affine_ops_in_c(step)
                                          for step in build_train_transform(config).transforms[1:-3]])
    float_tail = transforms.Compose(official.transforms[-3:])
    pillow_reduced, region_full = CropDecoder(crop, native=False), CropDecoder(crop, reduce=False)
    ours = CropDecoder(crop)
    _, deferred, finish = split_tail(official.transforms[1:])
    cropped = [crop(decode_image(r)) for r in records]
    augmented = [middle(image) for image in cropped]
    batch = 64

    def pillow_resize(record):  # ours with Pillow's resize of the decoded region, as before data/resample.c
        decoded = ours.decode(record)
        if isinstance(decoded.pixels, jpeg_region.RawRGB):
            decoded = decoded._replace(pixels=decoded.pixels.image())
        return resized_box(decoded, crop.size, native=False)

    def batches(outputs_of: Callable) -> None:
        # stack + share_memory_, as in a loader worker: what it does to hand a batch to the main process (a
        # batch stacked into shared memory is not copied again)
        with as_in_a_loader_worker():
            for start in range(0, len(augmented), batch):
                outputs_of(augmented[start:start + batch])

    def float_per_image(images):
        default_collate([float_tail(image) for image in images]).share_memory_()  # torchvision's loader

    def uint8_finished_in_worker(images):
        finish(*stack_images([deferred(image) for image in images], shared=False)).share_memory_()

    def uint8_sent(images):
        stack_images([deferred(image) for image in images])[0].share_memory_()

    variants: Dict[str, Callable[[], None]] = {
        'decode + crop: full decode, timm crop': lambda: [crop(decode_image(r)) for r in records],
        'decode + crop: reduced-scale, Pillow decode': lambda: [pillow_reduced(r) for r in records],
        'decode + crop: full scale, crop-region decode + C resize (exact)': lambda: [region_full(r) for r in records],
        'decode + crop: reduced-scale + crop-region decode, Pillow resize': lambda: [pillow_resize(r) for r in records],
        'decode + crop: reduced-scale + crop-region decode + C resize (ours)': lambda: [ours(r) for r in records],
        'flip + RandAugment (official)': lambda: [middle(image) for image in cropped],
        'flip + RandAugment, affine ops in C (ours)': lambda: [middle_c_affine(image) for image in cropped],
        'to tensor, normalise, erase, stack, share: float per image': lambda: batches(float_per_image),
        'the same: uint8, batch normalised in the worker (ours, CPU device)': lambda: batches(
            uint8_finished_in_worker),
        'the same: uint8 sent, normalised on the device (ours, GPU)': lambda: batches(uint8_sent),
    }
    costs: Dict[str, List[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        names = list(variants)
        for name in (names if repeat % 2 == 0 else names[::-1]):
            with seeded_global_rngs(repeat):
                start = time.process_time()
                variants[name]()
                costs[name].append(1000 * (time.process_time() - start) / len(records))
            print(f'repeat {repeat}: {name}: {costs[name][-1]:.2f} ms/image', flush=True)
    pixels, erasing = stack_images([deferred(image) for image in augmented[:batch]])
    costs['(GPU path, on a CPU device: normalising the uint8 batch in the main process)'] = []
    for _ in range(repeats):
        start = time.process_time()
        finish(pixels, erasing)
        costs['(GPU path, on a CPU device: normalising the uint8 batch in the main process)'].append(
            1000 * (time.process_time() - start) / len(pixels))
    return costs


# (variant, the official one it replaces): their cost ratio is taken within each repeat (a paired ratio).
COMPONENT_PAIRS = {
    'decode + crop: reduced-scale, Pillow decode': 'decode + crop: full decode, timm crop',
    'decode + crop: full scale, crop-region decode + C resize (exact)': 'decode + crop: full decode, timm crop',
    'decode + crop: reduced-scale + crop-region decode, Pillow resize': 'decode + crop: full decode, timm crop',
    'decode + crop: reduced-scale + crop-region decode + C resize (ours)': 'decode + crop: full decode, timm crop',
    'flip + RandAugment, affine ops in C (ours)': 'flip + RandAugment (official)',
    'the same: uint8, batch normalised in the worker (ours, CPU device)':
        'to tensor, normalise, erase, stack, share: float per image',
    'the same: uint8 sent, normalised on the device (ours, GPU)':
        'to tensor, normalise, erase, stack, share: float per image',
}


def component_table(costs: Dict[str, List[float]]) -> List[List[str]]:
    rows = []
    for name, values in costs.items():
        reference = COMPONENT_PAIRS.get(name)
        ratio = ''
        if reference:
            ratio = f'{statistics.median(r / v for r, v in zip(costs[reference], values)):.2f}x'
        rows.append([name, f'{statistics.median(values):.2f}', f'{min(values):.2f}-{max(values):.2f}', ratio])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--jpeg', action='store_true', help='(the flag that selects this benchmark)')
    parser.add_argument('--jpeg-data', default=os.path.join(ROOT, 'demo_data', 'jpeg_bench'))
    parser.add_argument('--count', type=int, default=3000, help='JPEGs generated (once)')
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--samples', type=int, default=1920, help='samples timed per case and repeat')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--only', nargs='*', default=None, help='case names to run (default: all)')
    parser.add_argument('--decode-device', nargs='+', choices=['cpu', 'cuda'], default=None,
                        help='instead: training loaders with DATA.DECODE_DEVICE each of these (no RandAugment or '
                             'colour jitter, which the cuda path cannot run; on a machine without CUDA, cuda is '
                             'its CPU fallback)')
    parser.add_argument('--components', type=int, default=0, metavar='N',
                        help='instead: the CPU cost of each part of the training transform on N images')
    args = parser.parse_args(argv)
    manifest = ensure_jpegs(args.jpeg_data, args.count)
    folder = os.path.join(args.jpeg_data, 'train')
    print(f'training JPEGs: {jpeg_region.describe()}', flush=True)
    if args.components:
        config = load_config(os.path.join(ROOT, 'configs', 'unicl_swin_tiny.yaml'), [])
        costs = component_costs(config, folder, args.components, max(args.repeats, 3))
        print(markdown_table(['part of a worker\'s work', 'CPU ms per image (median)', 'range',
                              'speed-up over the official (median of paired ratios)'], component_table(costs)))
        print('results:', write_results('jpeg_components', {
            'machine': machine(), 'data': manifest, 'images': args.components, 'repeats': max(args.repeats, 3),
            'crop_decoder': jpeg_region.describe(),
            'load_average_at_end': os.getloadavg(), 'ms_per_image': costs}))
        return
    if args.samples + 2 * args.batch > args.count:
        raise SystemExit(f'--samples {args.samples} needs more than {args.count} images (--count)')

    def config_for(workers: int, *opts: str):
        return load_config(os.path.join(ROOT, 'configs', 'unicl_swin_tiny.yaml'), [
            'DATA.NUM_WORKERS', str(workers), 'DATA.BATCH_SIZE', str(args.batch),
            'DATA.DATA_PATH', args.jpeg_data, 'DATA.EPOCH_SAMPLES', str(args.samples + 2 * args.batch),
            'DATA.SOURCES', "[{'TYPE': 'imagefolder', 'PATH': '.'}]", *opts])

    base = config_for(1)
    tokenizer = build_tokenizer(base.MODEL.TEXT_ENCODER)
    makers: Dict[Tuple[str, str], Callable[[int], Iterable]] = {
        ('train', 'torchvision'): lambda w: torchvision_baseline(config_for(w), tokenizer, folder, w, args.batch),
        ('train', 'ours'): lambda w: build_train_loader(config_for(w), tokenizer, 0, 1),
        ('train', 'ours, Pillow decode and resize'): lambda w: pillow_decode(
            build_train_loader(config_for(w), tokenizer, 0, 1)),
        ('train', 'ours, uint8 to main (GPU path)'): lambda w: uint8_to_main(
            build_train_loader(config_for(w), tokenizer, 0, 1)),
        ('eval', 'torchvision'): lambda w: eval_torchvision(base, folder, w, args.batch),
        ('eval', 'ours'): lambda w: eval_ours(base, folder, w, args.batch),
    }
    if args.decode_device:
        no_pil_augment = ('AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', '0.0')
        fallback = '' if torch.cuda.is_available() else ' (no CUDA: decode_jpeg on the CPU)'
        makers = {('train', f'ours, DECODE_DEVICE {d}' + (fallback if d == 'cuda' else '')): (
            lambda w, d=d: decoding_on(config_for(w, *no_pil_augment), tokenizer, d)) for d in args.decode_device}
        base = config_for(1, *no_pil_augment)
    cases = [(kind, name, w) for (kind, name) in makers for w in args.workers
             if args.only is None or name in args.only]
    warm_page_cache(args.jpeg_data)
    runs: Dict[str, List[Dict[str, float]]] = {}
    for repeat in range(args.repeats):
        first = (repeat * 3) % len(cases)
        for kind, name, workers in cases[first:] + cases[:first]:
            result = timed_run(makers[(kind, name)](workers), args.samples)
            key = f'{kind} | {name} | {workers}'
            runs.setdefault(key, []).append(result)
            print(f'repeat {repeat}: {key}: {result["images_per_sec"]:.1f} images/s, workers '
                  f'{result["worker_ms"]:.2f} ms/image, main {result["main_ms"]:.2f} ms/image', flush=True)

    medians = {key: {m: statistics.median(r[m] for r in results) for m in results[0]}
               for key, results in runs.items()}
    rows = []
    for key, m in medians.items():
        kind, name, workers = key.split(' | ')
        per_cpu = 1000 / (m['worker_ms'] + m['main_ms'])
        reference = medians.get(f'{kind} | torchvision | {workers}')
        ratio = ''
        if reference:
            ratio = f"{per_cpu * (reference['worker_ms'] + reference['main_ms']) / 1000:.2f}x"
        rows.append([kind, name, workers, f"{m['images_per_sec']:.0f}", f"{m['images_per_sec'] / int(workers):.0f}",
                     f"{m['worker_ms']:.2f}", f"{m['main_ms']:.2f}", f'{per_cpu:.0f}', ratio])
    print(markdown_table(['transform', 'loader', 'workers', 'images/s (wall)', 'per worker (wall)',
                          'worker CPU ms/image', 'main CPU ms/image', 'images per CPU-second',
                          'vs torchvision (per CPU-second)'], rows))
    scales = decode_scales(base, folder)
    print('training samples per DCT scale:', {f'1/{s}': f'{share:.1%}' for s, share in scales.items()})
    print('results:', write_results('jpeg_loading', {
        'machine': machine(), 'data': manifest, 'decode_scales': scales, 'crop_decoder': jpeg_region.describe(),
        'settings': {'batch': args.batch, 'samples': args.samples, 'repeats': args.repeats,
                     'decode_device': args.decode_device, 'cuda': torch.cuda.is_available(),
                     'config': 'unicl_swin_tiny', 'load_average_at_end': os.getloadavg()},
        'medians': medians, 'runs': runs}))


if __name__ == '__main__':
    main()

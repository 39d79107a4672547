"""Data loading throughput: the training loader on each source type against a plain torchvision
`ImageFolder` + `DataLoader` doing the same work (decode, the training transform, a prompt per sample,
batch tokenization in the workers).

    python bench/data_loading.py [--data demo_data] [--workers 2] [--batch 64] [--samples 2560] [--repeats 3]
    python bench/data_loading.py --jpeg [...]   # ImageNet-like JPEGs at 224 px: see bench/jpeg_loading.py

Reads the built-in dataset (generated when missing): `labels/train` as an ImageFolder tree and as the zip
layout, and the captions as webdataset shards. Images/s counts samples delivered to the training loop.
Every file is read once before timing, and each repeat starts with another loader, so that none pays for
a cold page cache or a first position alone; the table gives the median and the range over the repeats.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from bench.common import machine, markdown_table, write_results  # noqa: E402
from configs import load_config  # noqa: E402
from data import build_train_loader  # noqa: E402
from data.builtin import write_zip_layout  # noqa: E402
from data.classnames import training_templates  # noqa: E402
from data.transforms import build_train_transform  # noqa: E402
from model import build_tokenizer, tokenize  # noqa: E402

SOURCES = {
    'imagefolder': "[{'TYPE': 'imagefolder', 'PATH': 'labels'}]",
    'zip': "[{'TYPE': 'zip', 'PATH': 'labels'}]",
    'webdataset': "[{'TYPE': 'webdataset', 'PATH': 'captions/shards'}]",
}


def warm_page_cache(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), 'rb') as f:
                while f.read(1 << 20):
                    pass


def images_per_second(batches: Iterable, samples: int) -> float:
    seen, start = 0, None
    for images, *_ in batches:
        if start is None:  # the first batch pays for starting the workers: not counted
            start = time.perf_counter()
        else:
            seen += images.shape[0]
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def torchvision_baseline(config, tokenizer, folder: str, workers: int, batch: int) -> DataLoader:
    templates = training_templates()
    dataset = ImageFolder(folder, transform=build_train_transform(config))
    names = [c.replace('_', ' ') for c in dataset.classes]

    def collate(samples):
        rng = random.Random()
        images = torch.stack([image for image, _ in samples])
        labels = torch.tensor([label for _, label in samples])
        texts = [rng.choice(templates).format(names[label]) for label in labels.tolist()]
        return images, tokenize(tokenizer, texts), labels

    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                      persistent_workers=False, drop_last=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if '--jpeg' in argv:
        from bench.jpeg_loading import main as jpeg_main  # imports this module: here, not at the top
        return jpeg_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default='demo_data')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--samples', type=int, default=2560, help='samples timed per loader and repeat')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs of every loader')
    args = parser.parse_args(argv)
    data = os.path.abspath(args.data)
    if not os.path.isdir(os.path.join(data, 'labels')):
        subprocess.run([sys.executable, '-m', 'data.builtin', '--out', data], cwd=ROOT, check=True)
    if not os.path.isfile(os.path.join(data, 'labels', 'train.zip')):
        write_zip_layout(os.path.join(data, 'labels', 'train'), os.path.join(data, 'labels', 'train.zip'),
                         os.path.join(data, 'labels', 'train_map.txt'))
    base = ['DATA.NUM_WORKERS', str(args.workers), 'DATA.BATCH_SIZE', str(args.batch), 'DATA.DATA_PATH', data,
            'DATA.EPOCH_SAMPLES', str(args.samples + 2 * args.batch), 'AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1']
    config = load_config(os.path.join(ROOT, 'configs', 'unicl_tiny.yaml'), base)
    tokenizer = build_tokenizer(config.MODEL.TEXT_ENCODER)
    loaders: Dict[str, Callable[[], Iterable]] = {
        'torchvision ImageFolder + DataLoader': lambda: torchvision_baseline(
            config, tokenizer, os.path.join(data, 'labels', 'train'), args.workers, args.batch)}
    for name, sources in SOURCES.items():
        source_config = load_config(os.path.join(ROOT, 'configs', 'unicl_tiny.yaml'), base + ['DATA.SOURCES', sources])
        loaders[f'ours: {name}'] = lambda c=source_config: build_train_loader(c, tokenizer, 0, 1)
    warm_page_cache(data)
    names = list(loaders)
    runs: Dict[str, List[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        first = repeat % len(names)
        for name in names[first:] + names[:first]:
            runs[name].append(images_per_second(loaders[name](), args.samples))
            print(f'repeat {repeat}: {name}: {runs[name][-1]:.1f} images/s', flush=True)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    reference = medians['torchvision ImageFolder + DataLoader']
    print(markdown_table(['loader', 'images/s (median)', 'range', 'vs torchvision (medians)'],
                         [[n, f'{v:.1f}', f'{min(runs[n]):.0f}-{max(runs[n]):.0f}', f'{v / reference:.2f}x']
                          for n, v in medians.items()]))
    print('results:', write_results('data_loading', {
        'machine': machine(), 'settings': {'workers': args.workers, 'batch': args.batch, 'samples': args.samples,
                                           'repeats': args.repeats, 'img_size': config.DATA.IMG_SIZE,
                                           'augment': 'rand-m9-mstd0.5-inc1'},
        'images_per_sec': medians, 'runs': runs}))


if __name__ == '__main__':
    main()

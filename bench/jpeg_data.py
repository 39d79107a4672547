"""ImageNet-like JPEGs for the loader benchmark: the sizes and the encoding of ImageNet's training images,
not their content.

What a JPEG loader spends its time on depends on the pixel count, the entropy-coded size (bits per pixel),
the chroma subsampling and the aspect ratio, so those follow ImageNet: most images are Flickr's 500-pixel
"medium" size (500 x 375, 500 x 333, ...), a quarter are smaller, a tenth larger (up to 1600 px), a
quarter are portrait; quality 90, three quarters 4:2:0 and a quarter 4:4:4. The content is multi-octave
noise (a rough 1/f spectrum), which compresses to 2.5-4.5 bits per pixel at quality 90, the range of
ImageNet's files (about 110 KB for ~190k pixels on average).

    python bench/jpeg_data.py --out demo_data/jpeg_bench --count 3000

writes `OUT/train/class_NN/NNNNN.jpg` (an ImageFolder tree, also the layout of an `imagefolder` training
source) and `OUT/manifest.json`; a tree whose manifest matches the request is reused as it is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

# Bump when the generator changes, so that a cached tree made by an older one is rebuilt.
GENERATOR_VERSION = 1
QUALITY = 90
CLASSES = 10

# (share, aspect ratio long/short) of the 500-px images: 4:3, 3:2, 16:9, 5:4, square.
_MEDIUM_ASPECTS = [(0.45, 4 / 3), (0.30, 3 / 2), (0.10, 16 / 9), (0.05, 5 / 4), (0.10, 1.0)]


def image_size(rng: np.random.Generator) -> Tuple[int, int]:
    """(width, height) of one image: 65% 500-px medium, 25% smaller, 10% larger; a quarter portrait."""
    kind = rng.random()
    if kind < 0.65:
        shares, aspects = zip(*_MEDIUM_ASPECTS)
        long_side, aspect = 500, aspects[rng.choice(len(aspects), p=shares)]
    else:
        aspect = math.exp(rng.uniform(0.0, math.log(1.8)))
        long_side = int(rng.integers(200, 500)) if kind < 0.90 else int(math.exp(rng.uniform(math.log(501),
                                                                                             math.log(1600))))
    short_side = max(1, int(round(long_side / aspect)))
    return (short_side, long_side) if rng.random() < 0.25 else (long_side, short_side)


def noise_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Octaves of smooth random noise, coarse ones strongest: edges and texture at every scale, so the DCT
    coefficients (and the file size) behave like a photograph's rather than like flat or white noise."""
    pixels = np.full((height, width, 3), 128.0, dtype=np.float32)
    for cells, amplitude in ((4, 60.0), (16, 35.0), (64, 22.0), (256, 16.0)):
        grid_w = max(2, round(cells * width / max(width, height)))
        grid_h = max(2, round(cells * height / max(width, height)))
        coarse = np.clip(rng.normal(128.0, amplitude, (grid_h, grid_w, 3)), 0, 255).astype(np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        pixels += np.asarray(smooth, dtype=np.float32) - 128.0
    pixels += rng.normal(0.0, 5.0, pixels.shape).astype(np.float32)  # sensor-like grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _request(count: int, seed: int) -> Dict[str, object]:
    return {'version': GENERATOR_VERSION, 'count': count, 'seed': seed, 'quality': QUALITY, 'classes': CLASSES}


def ensure_jpegs(out: str, count: int = 3000, seed: int = 0) -> Dict[str, object]:
    """The tree at `out` for (count, seed), generated unless a matching one is there; returns the manifest
    (the request plus size statistics)."""
    manifest_path = os.path.join(out, 'manifest.json')
    request = _request(count, seed)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding='utf-8') as f:
            manifest = json.load(f)
        if manifest.get('request') == request:
            return manifest
    sizes: List[Tuple[int, int]] = []
    file_bytes: List[int] = []
    subsampled = 0
    for index in range(count):
        rng = np.random.default_rng([seed, index])  # each image on its own: the tree is the same in any order
        width, height = image_size(rng)
        chroma_420 = rng.random() < 0.75
        folder = os.path.join(out, 'train', f'class_{index % CLASSES:02d}')
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f'{index:05d}.jpg')
        # subsampling 2 is 4:2:0, 0 is 4:4:4 (Pillow's JPEG plugin)
        noise_image(width, height, rng).save(path, 'JPEG', quality=QUALITY, subsampling=2 if chroma_420 else 0)
        sizes.append((width, height))
        file_bytes.append(os.path.getsize(path))
        subsampled += chroma_420
    pixels = [w * h for w, h in sizes]
    manifest = {'request': request,
                'median_long_side': statistics.median(max(s) for s in sizes),
                'median_short_side': statistics.median(min(s) for s in sizes),
                'mean_pixels': round(statistics.mean(pixels)),
                'larger_than_500': sum(max(s) > 500 for s in sizes),
                'smaller_than_500': sum(max(s) < 500 for s in sizes),
                'portrait': sum(h > w for w, h in sizes),
                'chroma_420': subsampled,
                'mean_kb': round(statistics.mean(file_bytes) / 1000, 1),
                'bits_per_pixel': round(8 * sum(file_bytes) / sum(pixels), 2)}
    with open(manifest_path, 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=os.path.join('demo_data', 'jpeg_bench'))
    parser.add_argument('--count', type=int, default=3000)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(ensure_jpegs(args.out, args.count, args.seed), indent=1))


if __name__ == '__main__':
    main()

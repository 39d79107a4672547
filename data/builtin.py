"""The built-in dataset: drawn shapes, generated locally in seconds, written in the real on-disk formats.

    python -m data.builtin --out demo_data [--scale small|tiny] [--seed 0] [--zip]

Every image is one shape with a colour, a fill texture and a size on a noisy dark background.

- `labels/`: image-label data, an ImageFolder (`train/`, `val/`) whose classes are the SHAPES only;
  `labels/classnames.txt` lists synonyms ("circle; disc"), `val/classnames.txt` plain names.
  With --zip also the official zip layout `labels/train.zip` + `labels/train_map.txt`.
- `captions/`: image-text data, webdataset shards `shards/captions-NNNNN.tar` (KEY.jpg, KEY.txt, KEY.json
  and img2dataset's `_stats.json`) and a table `captions.tsv` (filepath, caption) over `images/`.
  Captions always name the colour, often the texture and size, but the shape only now and then (else
  "shape", "object", ...), and some are uninformative, like web alt-texts.
- `zeroshot/`: held-out zero-shot ImageFolder with `classnames.txt`: "COLOUR SHAPE" classes such as
  "red star", a grid of colours x shapes, so that neither attribute alone classifies.

Why UniCL should win on `zeroshot/`: labels-only never sees a colour word, so at best it gets the shape
right and guesses the colour (1 / colours); captions-only grounds colours well but shapes only through
the few captions naming them; labels + captions get shapes from the labels and colours from the captions.
Colour is far easier to learn than shape, so the demo's UniCL run draws 75% of each batch from the labels
(`configs/unicl_tiny_builtin.yaml`). Measured results: README.md, "The built-in dataset"
(`make ablation`, a sweep of `configs/sweeps/builtin_ablation.yaml`, reproduces them).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Shape -> synonyms (the first is the class name everywhere else).
SHAPES: Dict[str, List[str]] = {
    'circle': ['circle', 'disc'],
    'square': ['square', 'box'],
    'triangle': ['triangle'],
    'star': ['star', 'five-pointed star'],
    'cross': ['cross', 'plus sign'],
    'hexagon': ['hexagon'],
    'diamond': ['diamond', 'rhombus'],
    'ring': ['ring', 'annulus'],
}
COLOURS: Dict[str, Tuple[int, int, int]] = {
    'red': (215, 45, 40), 'green': (50, 170, 60), 'blue': (45, 85, 215), 'yellow': (235, 205, 45),
    'purple': (140, 60, 185), 'orange': (240, 135, 35), 'pink': (240, 130, 185), 'cyan': (40, 200, 210),
}
TEXTURES: Dict[str, List[str]] = {
    'plain': ['plain', 'solid'], 'striped': ['striped', 'stripy'],
    'dotted': ['dotted', 'spotted', 'polka-dot'], 'checkered': ['checkered', 'checked'],
}
SIZES: Dict[str, float] = {'small': 0.2, 'medium': 0.3, 'large': 0.42}  # radius / image side
ZEROSHOT_COLOURS = ['red', 'green', 'blue', 'yellow']
ZEROSHOT_SHAPES = ['circle', 'square', 'triangle', 'star']

NOUNS = ['shape', 'object', 'thing', 'figure', 'symbol']
FILLER_CAPTIONS = ['my favourite picture', 'untitled', 'image', 'look at this', 'new wallpaper', 'photo',
                   'a picture i made']
P_SHAPE, P_TEXTURE, P_SIZE, P_FILLER = 0.15, 0.6, 0.4, 0.1


@dataclass(frozen=True)
class Scale:
    image_size: int
    shapes: int              # label classes: the first `shapes` of SHAPES
    per_class: int           # label training images per class
    val_per_class: int
    caption_shards: int
    per_shard: int
    table_rows: int          # captions in captions.tsv, besides the shards
    zeroshot_grid: int       # zero-shot classes: the first n colours x first n shapes
    zeroshot_per_class: int


SCALES = {
    'tiny': Scale(32, 4, 6, 2, 2, 8, 8, 2, 3),
    'small': Scale(64, 8, 160, 20, 6, 200, 400, 4, 25),
}


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    texture: str
    size: str


def _polygon(points: Sequence[Tuple[float, float]], angle: float, cx: float, cy: float, r: float):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _regular(n: int, inner: float = 0.0) -> List[Tuple[float, float]]:
    """Unit regular n-gon, or an n-pointed star when `inner` (the inner radius) is given."""
    if not inner:
        return [(math.sin(2 * math.pi * k / n), -math.cos(2 * math.pi * k / n)) for k in range(n)]
    return [(rad * math.sin(math.pi * k / n), -rad * math.cos(math.pi * k / n))
            for k, rad in zip(range(2 * n), [1.0, inner] * n)]


_OUTLINES = {
    'square': [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    'triangle': _regular(3),
    'star': _regular(5, inner=0.42),
    'cross': [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    'hexagon': _regular(6),
    'diamond': [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
}


def _shape_mask(shape: str, side: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    mask = Image.new('L', (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ('circle', 'ring'):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == 'ring':
            draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    else:
        draw.polygon(_polygon(_OUTLINES[shape], angle, cx, cy, r), fill=255)
    return np.asarray(mask) > 127


def _texture_mask(texture: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """Where the main colour goes; elsewhere inside the shape a darker shade of it."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    period = side / rng.uniform(5, 8)
    if texture == 'striped':
        angle = rng.uniform(0, math.pi)
        return ((x * math.cos(angle) + y * math.sin(angle)) / period) % 2 < 1
    if texture == 'dotted':
        return ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2) < (period / 3.2) ** 2
    if texture == 'checkered':
        return ((x // period + y // period) % 2) == 0
    return np.ones((side, side), dtype=bool)


def render(attributes: Attributes, size: int, rng: np.random.Generator) -> Image.Image:
    """One shape image, drawn at twice the size and downsampled for smooth edges."""
    side = 2 * size
    image = (rng.integers(15, 70) + rng.normal(0, 8, (side, side, 1))).astype(np.float32)
    r = SIZES[attributes.size] * side * rng.uniform(0.9, 1.1)
    cx, cy = rng.uniform(r, side - r, 2)
    angle = rng.uniform(-0.35, 0.35) if attributes.shape in ('square', 'diamond') else rng.uniform(0, 2 * math.pi)
    shape = _shape_mask(attributes.shape, side, cx, cy, r, angle)
    colour = np.clip(np.array(COLOURS[attributes.colour]) + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
    # The darker shade stays brighter than the background, so that textures do not break up the outline.
    fill = np.where(_texture_mask(attributes.texture, side, rng)[..., None], colour, 0.6 * colour)
    image = np.where(shape[..., None], fill, image)
    image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.BOX)


def caption(attributes: Attributes, rng: np.random.Generator) -> str:
    """A web-like caption: colour always, texture and size often, the shape only sometimes."""
    if rng.random() < P_FILLER:
        return str(rng.choice(FILLER_CAPTIONS))
    noun = attributes.shape if rng.random() < P_SHAPE else str(rng.choice(NOUNS))
    texture = str(rng.choice(TEXTURES[attributes.texture])) if rng.random() < P_TEXTURE else ''
    size = attributes.size if rng.random() < P_SIZE else ''
    words = ' '.join(w for w in (size, attributes.colour, texture, noun) if w)
    article = 'an' if words[0] in 'aeiou' else 'a'
    frame = str(rng.choice(['{a} {w}', '{a} {w} on a dark background', 'picture of {a} {w}', '{w}',
                            'a photo of {a} {w}']))
    return frame.format(a=article, w=words)


def _random_attributes(shapes: Sequence[str], rng: np.random.Generator) -> Attributes:
    return Attributes(str(rng.choice(shapes)), str(rng.choice(list(COLOURS))), str(rng.choice(list(TEXTURES))),
                      str(rng.choice(list(SIZES))))


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({'quality': 92} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def _write_lines(path: str, lines: Sequence[str]) -> None:
    _write(path, ('\n'.join(lines) + '\n').encode('utf-8'))


def _write_image_folder(root: str, classes: Dict[str, List[Attributes]], size: int, rng: np.random.Generator,
                        fmt: str) -> None:
    ext = {'JPEG': 'jpg', 'PNG': 'png'}[fmt]
    for folder, items in classes.items():
        for i, attributes in enumerate(items):
            _write(os.path.join(root, folder, f'{folder}_{i:05d}.{ext}'), _encode(render(attributes, size, rng), fmt))


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_labels(out: str, scale: Scale, rng: np.random.Generator) -> None:
    shapes = list(SHAPES)[:scale.shapes]
    for split, count in (('train', scale.per_class), ('val', scale.val_per_class)):
        classes = {s: [_random_attributes([s], rng) for _ in range(count)] for s in shapes}
        _write_image_folder(os.path.join(out, 'labels', split), classes, scale.image_size, rng, 'JPEG')
    # Names files follow the sorted folder order, as ImageFolder indexes classes.
    _write_lines(os.path.join(out, 'labels', 'classnames.txt'), ['; '.join(SHAPES[s]) for s in sorted(shapes)])
    _write_lines(os.path.join(out, 'labels', 'val', 'classnames.txt'), sorted(shapes))


def write_captions(out: str, scale: Scale, rng: np.random.Generator) -> None:
    shapes = list(SHAPES)[:scale.shapes]
    root = os.path.join(out, 'captions')
    for shard in range(scale.caption_shards):
        path = os.path.join(root, 'shards', f'captions-{shard:05d}.tar')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tarfile.open(path, 'w') as tar:
            for i in range(scale.per_shard):
                attributes = _random_attributes(shapes, rng)
                key, text = f'{shard:05d}{i:04d}', caption(attributes, rng)
                image = render(attributes, scale.image_size, rng)
                meta = {'key': key, 'caption': text, 'status': 'success', 'width': image.width,
                        'height': image.height}
                _tar_member(tar, f'{key}.jpg', _encode(image, 'JPEG'))
                _tar_member(tar, f'{key}.txt', text.encode('utf-8'))
                _tar_member(tar, f'{key}.json', json.dumps(meta).encode('utf-8'))
        stats = {'count': scale.per_shard, 'successes': scale.per_shard, 'failed_to_download': 0}
        _write(path[:-len('.tar')] + '_stats.json', json.dumps(stats).encode('utf-8'))
    rows = ['filepath\tcaption']
    for i in range(scale.table_rows):
        attributes = _random_attributes(shapes, rng)
        relpath = f'images/{i:05d}.png'
        _write(os.path.join(root, relpath), _encode(render(attributes, scale.image_size, rng), 'PNG'))
        rows.append(f'{relpath}\t{caption(attributes, rng)}')
    _write_lines(os.path.join(root, 'captions.tsv'), rows)


def write_zeroshot(out: str, scale: Scale, rng: np.random.Generator) -> None:
    grid = [(c, s) for c in ZEROSHOT_COLOURS[:scale.zeroshot_grid] for s in ZEROSHOT_SHAPES[:scale.zeroshot_grid]]
    classes = {f'{c}_{s}': [Attributes(s, c, str(rng.choice(list(TEXTURES))), str(rng.choice(list(SIZES))))
                            for _ in range(scale.zeroshot_per_class)] for c, s in grid}
    root = os.path.join(out, 'zeroshot')
    _write_image_folder(root, classes, scale.image_size, rng, 'PNG')
    _write_lines(os.path.join(root, 'classnames.txt'), [folder.replace('_', ' ') for folder in sorted(classes)])


def write_zip_layout(image_folder: str, zip_path: str, map_path: str) -> int:
    """The official zip layout of an ImageFolder tree: its images in `zip_path`, "relpath<TAB>label" lines
    in `map_path` (labels = sorted class folder indices). Returns the number of images."""
    classes = sorted(e.name for e in os.scandir(image_folder) if e.is_dir())
    lines = []
    with zipfile.ZipFile(zip_path, 'w', zipfile.ZIP_STORED) as archive:
        for label, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(image_folder, name))):
                relpath = f'{name}/{file}'
                archive.write(os.path.join(image_folder, relpath), relpath)
                lines.append(f'{relpath}\t{label}')
    _write_lines(map_path, lines)
    return len(lines)


def generate(out: str, scale: str = 'small', seed: int = 0, with_zip: bool = False) -> Dict[str, str]:
    """Write the dataset under `out`; returns the paths of its parts."""
    config = SCALES[scale]
    # One generator per part, so that a part's images do not depend on the others' sizes.
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    write_labels(out, config, rngs[0])
    write_captions(out, config, rngs[1])
    write_zeroshot(out, config, rngs[2])
    parts = {'labels': os.path.join(out, 'labels'), 'shards': os.path.join(out, 'captions', 'shards'),
             'table': os.path.join(out, 'captions', 'captions.tsv'), 'zeroshot': os.path.join(out, 'zeroshot')}
    if with_zip:
        write_zip_layout(os.path.join(out, 'labels', 'train'), os.path.join(out, 'labels', 'train.zip'),
                         os.path.join(out, 'labels', 'train_map.txt'))
        parts['zip'] = os.path.join(out, 'labels', 'train.zip')
    return parts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='output folder (files in it are overwritten)')
    parser.add_argument('--scale', choices=sorted(SCALES), default='small')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--zip', action='store_true', help='also write labels/train.zip + labels/train_map.txt')
    args = parser.parse_args(argv)
    for part, path in generate(args.out, args.scale, args.seed, args.zip).items():
        print(f'{part:9s} {path}')


if __name__ == '__main__':
    main()

"""Evaluation images: lists of files or in-memory bytes, read in order, split across ranks without padding.

An unreadable image is an error naming it: skipping it would silently change the denominator of every
metric computed over the set.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from utils.dataloader import StopSafeDataLoader
from utils.distributed import get_rank, get_world_size

from .errors import EvaluationInputError

# An image is a file path or, for images read out of tar shards, (bytes, where they came from).
ImageItem = Union[str, Tuple[bytes, str]]


def image_name(item: ImageItem) -> str:
    return item if isinstance(item, str) else item[1]


def load_image(item: ImageItem) -> Image.Image:
    """The image as RGB, fully decoded; any failure names the image (PIL's messages rarely do)."""
    try:
        if isinstance(item, str):
            with Image.open(item) as image:
                return image.convert('RGB')
        with Image.open(io.BytesIO(item[0])) as image:
            return image.convert('RGB')
    except Exception as e:
        raise RuntimeError(f'cannot read image {image_name(item)}: {e}') from e


class ImageList(Dataset):
    """`(transformed image, index)` for each item, so features gathered from all ranks go back in order."""

    def __init__(self, items: Sequence[ImageItem], transform: Callable):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.transform(load_image(self.items[index])), index


@dataclass
class LabeledImages:
    """An ImageFolder tree: sorted class folders, images in torchvision's order."""
    root: str
    classes: List[str]
    paths: List[str]
    labels: List[int]

    def __len__(self) -> int:
        return len(self.paths)

    def relative_paths(self) -> List[str]:
        return [os.path.relpath(p, self.root) for p in self.paths]


def image_folder(root: str) -> LabeledImages:
    """The ImageFolder tree at `root` (one folder per class); a missing tree, one without class folders or
    with a class folder without images is an `EvaluationInputError` naming it."""
    if not os.path.isdir(root):
        raise EvaluationInputError(f'{root} is a file, not an image folder' if os.path.exists(root)
                                   else f'no image folder {root}')
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise EvaluationInputError(f'no class folders in {root}: an image folder holds one folder of images '
                                   f'per class') from None
    # allow_empty, so that the error below can name the folder (torchvision's names only the classes)
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    empty = sorted(set(classes) - {classes[y] for _, y in samples})
    if empty:
        raise EvaluationInputError(f'{root}: {len(empty)} class folder(s) without images ({", ".join(empty[:3])}'
                                   f'{", ..." if len(empty) > 3 else ""}), image extensions: '
                                   f'{" ".join(IMG_EXTENSIONS)}')
    return LabeledImages(root, classes, [p for p, _ in samples], [y for _, y in samples])


class ShardedSampler(Sampler):
    """Indices `rank, rank + world, ...`: disjoint across ranks and, unlike DistributedSampler, never
    padded with repeats, so each image is counted exactly once."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sharded_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """This rank's part of `dataset`, in order."""
    return StopSafeDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                              pin_memory=device.type == 'cuda',
                              sampler=ShardedSampler(len(dataset), get_rank(), get_world_size()))

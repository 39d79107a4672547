"""Class names and prompt templates: the shipped ImageNet-1K names and the 81 official templates, and
the files a user can put beside a dataset."""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import List, Optional

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
CLASSNAMES_FILE = 'classnames.txt'
_WORDNET_ID = re.compile(r'^n\d{8}$')


@lru_cache(maxsize=None)
def _asset(name: str) -> dict:
    with open(os.path.join(ASSETS, name), encoding='utf-8') as f:
        return json.load(f)


def imagenet_classnames() -> List[str]:
    """The 1,000 ImageNet-1K names in class-index order, as the official evaluation uses them."""
    return list(_asset('imagenet1k_classnames.json')['classes'])


def zeroshot_templates() -> List[str]:
    """The 81 templates in the order the official zero-shot evaluation averages them."""
    return list(_asset('prompt_templates.json')['zeroshot_imagenet'])


def training_templates() -> List[str]:
    """The same 81 templates in the order the official prompt sampler draws from."""
    return list(_asset('prompt_templates.json')['training_prompts'])


def read_lines(path: str) -> List[str]:
    """Non-empty, stripped lines of a UTF-8 text file."""
    with open(path, encoding='utf-8') as f:
        return [line.strip() for line in f if line.strip()]


def resolve_classnames(num_classes: int, folder: Optional[str] = None, explicit: Optional[str] = None,
                       folder_names: Optional[List[str]] = None) -> List[str]:
    """Class names for a dataset of `num_classes` classes, first match wins:
    `explicit` file, `folder/classnames.txt`, the ImageNet-1K names when there are 1000 classes,
    else the sorted folder names (`folder_names`) with '_' read as a space.

    A file with the wrong number of lines is an error, not a silent misalignment.
    """
    for path in (explicit, os.path.join(folder, CLASSNAMES_FILE) if folder else None):
        if path and (path == explicit or os.path.isfile(path)):
            names = read_lines(path)
            if len(names) != num_classes:
                raise ValueError(f'{path} lists {len(names)} class names for {num_classes} classes')
            return names
    if num_classes == 1000:
        return imagenet_classnames()
    if folder_names is not None and len(folder_names) == num_classes and not any(
            _WORDNET_ID.match(n) for n in folder_names):  # WordNet ids would make meaningless prompts
        return [n.replace('_', ' ') for n in folder_names]
    raise ValueError(f'no class names for {num_classes} classes: pass a class-names file or add '
                     f'{CLASSNAMES_FILE} (one name per line, in sorted-folder order)')


def resolve_templates(spec: str) -> List[str]:
    """`imagenet` (the 81 official templates), `single` ('a photo of a {}.') or a file, one per line."""
    if spec == 'imagenet':
        return zeroshot_templates()
    if spec == 'single':
        return ['a photo of a {}.']
    if not os.path.isfile(spec):
        raise ValueError(f'--templates {spec!r} is neither "imagenet", "single" nor a file')
    return check_templates(read_lines(spec), spec)


def check_templates(templates: List[str], where: str) -> List[str]:
    """`templates` when there is at least one and each has a "{}" for the class name; else a ValueError."""
    bad = [t for t in templates if not isinstance(t, str) or '{}' not in t]
    if not templates or bad:
        raise ValueError(f'{where}: every template needs a "{{}}" for the class name; bad: {bad[:3]}')
    return templates

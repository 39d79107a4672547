"""Texts for image-label samples: a class name (one of its synonyms) in a random training template."""
from __future__ import annotations

import random
from typing import List, Sequence

# A classnames.txt line may list synonyms, e.g. "dog; doggy; puppy"; each sample draws one.
# ';' because ImageNet-style names already use ',' (and the official sampler deletes commas).
SYNONYM_SEPARATOR = ';'


def split_synonyms(line: str) -> List[str]:
    """The synonyms of one class-name line; evaluation should use the first one."""
    names = [name.strip() for name in line.split(SYNONYM_SEPARATOR)]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f'class-name line {line!r} names no class')
    return names


def class_prompt(synonyms: Sequence[str], templates: Sequence[str], rng: random.Random) -> str:
    """As the official prompt sampler: ',' removed and '+' read as a space, in a uniform template."""
    name = rng.choice(synonyms).replace(',', '').replace('+', ' ')
    return rng.choice(templates).replace('{}', name)

"""Which sources to train on, from the config: `DATA.SOURCES`, or else `DATA.DATASET` + `DATA.DATA_PATH`.

`DATA.SOURCES` is a list of mappings, e.g. in YAML
    SOURCES:
      - {TYPE: imagefolder, PATH: imagenet, WEIGHT: 0.5}
      - {TYPE: webdataset, PATH: 'cc3m/{00000..00331}.tar', NAME: cc3m, WEIGHT: 0.5}
with keys TYPE (a registered source type) and PATH (required), NAME, WEIGHT, CLASSNAMES, NUM_SAMPLES.
Relative local paths are relative to `DATA.DATA_PATH`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping

from .sources import SOURCE_TYPES, SourceSpec

SPEC_KEYS = ('TYPE', 'PATH', 'NAME', 'WEIGHT', 'CLASSNAMES', 'NUM_SAMPLES')

# DATA.DATASET names that are not themselves source types, as the official configs use them.
DATASET_TYPES: Dict[str, Callable[[Any], str]] = {
    'imagenet': lambda data: 'zip' if data.ZIP_MODE else 'imagefolder',
}


def _resolve_path(path: str, data_path: str) -> str:
    """Relative local paths are under DATA_PATH; each part of a '::'-joined shard list on its own."""
    if not path:
        return os.path.expanduser(data_path)
    parts = []
    for part in str(path).split('::'):
        part = os.path.expanduser(part)
        local = '://' not in part and not part.startswith('pipe:')
        parts.append(os.path.join(os.path.expanduser(data_path), part)
                     if local and data_path and not os.path.isabs(part) else part)
    return '::'.join(parts)


def _entries(data) -> List[Mapping[str, Any]]:
    if data.SOURCES:
        return list(data.SOURCES)
    if not data.DATA_PATH:
        raise ValueError('no training data: set DATA.DATA_PATH (--data-path) or DATA.SOURCES')
    dataset = data.DATASET.lower()
    if dataset in DATASET_TYPES:
        source_type = DATASET_TYPES[dataset](data)
    elif dataset in SOURCE_TYPES:
        source_type = dataset
    else:
        raise ValueError(f'DATA.DATASET {data.DATASET!r} is unknown; use one of '
                         f'{sorted(DATASET_TYPES) + sorted(SOURCE_TYPES)} or list DATA.SOURCES')
    return [{'TYPE': source_type, 'PATH': '', 'NAME': dataset}]


def _optional_number(entry: Mapping[str, Any], key: str, kind: type, where: str):
    value = entry.get(key)
    if value is None or value == '':
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f'{where}: {key} must be a number, got {value!r}') from None
    if number < 0 or (key == 'WEIGHT' and number == 0):
        raise ValueError(f'{where}: {key} must be positive, got {value!r}')
    return number


def source_specs(config) -> List[SourceSpec]:
    """The validated, path-resolved list of training sources. Raises ValueError naming the bad entry."""
    data = config.DATA
    specs: List[SourceSpec] = []
    for i, raw in enumerate(_entries(data)):
        where = f'DATA.SOURCES[{i}]'
        if not isinstance(raw, Mapping):
            raise ValueError(f'{where}: expected a mapping with TYPE and PATH, got {raw!r}')
        entry = {str(k).upper(): v for k, v in raw.items()}
        unknown = sorted(set(entry) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f'{where}: unknown key(s) {unknown}; known: {list(SPEC_KEYS)}')
        source_type = str(entry.get('TYPE', '')).lower()
        if source_type not in SOURCE_TYPES:
            raise ValueError(f'{where}: TYPE {entry.get("TYPE")!r} is unknown; known: {sorted(SOURCE_TYPES)}')
        if 'PATH' not in entry:
            raise ValueError(f'{where}: PATH is required')
        name = str(entry.get('NAME') or source_type)
        if any(spec.name == name for spec in specs):
            name = f'{name}#{i}'
        num_samples = _optional_number(entry, 'NUM_SAMPLES', int, where)
        specs.append(SourceSpec(
            type=source_type, path=_resolve_path(entry['PATH'], data.DATA_PATH), name=name,
            weight=_optional_number(entry, 'WEIGHT', float, where),
            classnames=_resolve_path(entry['CLASSNAMES'], data.DATA_PATH) if entry.get('CLASSNAMES') else '',
            num_samples=num_samples, shuffle_buffer=data.SHUFFLE_BUFFER))
    weighted = [spec.weight is not None for spec in specs]
    if any(weighted) and not all(weighted):
        raise ValueError('DATA.SOURCES: give every source a WEIGHT or none (then sizes are the weights)')
    return specs

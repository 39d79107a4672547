"""Suites: several checkpoints evaluated on several datasets, each with its own metric (and prompt templates
for zero-shot), summarized as `suite_results.json` and a Markdown table.

A suite file is YAML:

    root: /data/elevater            # optional; relative to this file; dataset paths are under it
    datasets:
      - {name: colours, path: colours, metric: accuracy}
      - {name: pets, path: pets, metric: mean_per_class, templates: ['a photo of a {}, a type of pet.']}

`path` (relative to `root`, or to the suite file without one) is an ImageFolder tree for zero-shot, or a
folder holding `train/`, `val/` and optionally `test/` trees; zero-shot uses `PATH/test`, else `PATH/val`.
Optional keys: `templates` (a list, or 'imagenet' / 'single' / a file) and `classnames` (a file, relative like
`path`; default: `PATH/classnames.txt`, else as for zero-shot, `classnames.txt` in the split's folder).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import yaml

from data.classnames import CLASSNAMES_FILE, check_templates, resolve_templates

from .encoder import Encoder
from .metrics import get_metric

logger = logging.getLogger(__name__)

DATASET_KEYS = ('name', 'path', 'metric', 'templates', 'classnames')


@dataclass
class SuiteDataset:
    name: str
    path: str
    metric: str = 'accuracy'
    templates: Optional[Union[str, List[str]]] = None  # None: the command's --templates
    classnames: Optional[str] = None

    def split(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def classnames_file(self) -> Optional[str]:
        """`classnames`, else PATH/classnames.txt when it exists (shared by the splits), else None (then each
        split folder's own classnames.txt, or the folder names)."""
        shared = os.path.join(self.path, CLASSNAMES_FILE)
        return self.classnames or (shared if os.path.isfile(shared) else None)

    @property
    def test_folder(self) -> Optional[str]:
        return self.split('test') if os.path.isdir(self.split('test')) else None

    @property
    def zeroshot_folder(self) -> str:
        """The split results are reported on: test/, else val/ (as the linear probe does), else PATH itself
        (a plain class-folder tree)."""
        val = self.split('val')
        return self.test_folder or (val if os.path.isdir(val) else self.path)


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _dataset(entry: object, position: int, base: str, suite: str) -> SuiteDataset:
    where = f'{suite}: datasets[{position}]'
    if not isinstance(entry, dict):
        raise ValueError(f'{where}: expected a mapping with name and path, got {entry!r}')
    unknown = sorted(set(entry) - set(DATASET_KEYS))
    if unknown or 'name' not in entry or 'path' not in entry:
        raise ValueError(f'{where}: needs name and path; unknown keys {unknown}; known: {list(DATASET_KEYS)}')
    metric = str(entry.get('metric', 'accuracy'))
    get_metric(metric)
    templates = entry.get('templates')
    if isinstance(templates, list):
        check_templates(templates, where)
    elif templates is not None:
        templates = str(templates)
        if templates not in ('imagenet', 'single'):
            templates = _resolve(templates, base)
        resolve_templates(templates)
    classnames = entry.get('classnames')
    return SuiteDataset(str(entry['name']), _resolve(entry['path'], base), metric, templates,
                        _resolve(classnames, base) if classnames else None)


def load_suite(path: str) -> List[SuiteDataset]:
    """The datasets of suite file `path`, validated (unknown keys and metrics fail naming the entry)."""
    with open(path, encoding='utf-8') as f:
        content = yaml.safe_load(f) or {}
    if not isinstance(content, dict) or not isinstance(content.get('datasets'), list) or not content['datasets']:
        raise ValueError(f'{path}: a suite file needs a non-empty "datasets" list')
    folder = os.path.dirname(os.path.abspath(path))
    base = _resolve(content['root'], folder) if content.get('root') else folder
    datasets = [_dataset(entry, i, base, path) for i, entry in enumerate(content['datasets'])]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f'{path}: dataset names must be unique, got {names}')
    return datasets


SuiteResults = Dict[str, object]


def run_suite(checkpoints: Sequence[str], datasets: Sequence[SuiteDataset], load: Callable[[str], Encoder],
              evaluate: Callable[[Encoder, SuiteDataset], float]) -> SuiteResults:
    """`evaluate(encoder, dataset)` (the metric in percent) for every checkpoint and dataset, as
    `{"checkpoints", "datasets", "results": {dataset: {checkpoint: {"metric", "value"}}}, "average"}`."""
    results: Dict[str, Dict[str, Dict[str, object]]] = {d.name: {} for d in datasets}
    for checkpoint in checkpoints:
        encoder = load(checkpoint)
        for dataset in datasets:
            value = evaluate(encoder, dataset)
            logger.info(f'{checkpoint} on {dataset.name}: {dataset.metric} {value:.2f}')
            results[dataset.name][checkpoint] = {'metric': dataset.metric, 'value': value}
    average = {c: sum(results[d.name][c]['value'] for d in datasets) / len(datasets) for c in checkpoints}
    return {'checkpoints': list(checkpoints), 'datasets': [d.name for d in datasets], 'results': results,
            'average': average}


def suite_markdown(report: SuiteResults) -> str:
    """Datasets as rows, checkpoints as columns, the average last."""
    checkpoints = report['checkpoints']
    lines = ['| dataset | metric | ' + ' | '.join(f'`{c}`' for c in checkpoints) + ' |',
             '| --- | --- |' + ' ---: |' * len(checkpoints)]
    for name in report['datasets']:
        row = report['results'][name]
        lines.append(f'| {name} | {row[checkpoints[0]]["metric"]} | '
                     + ' | '.join(f'{row[c]["value"]:.2f}' for c in checkpoints) + ' |')
    lines.append('| **average** | | ' + ' | '.join(f'**{report["average"][c]:.2f}**' for c in checkpoints) + ' |')
    return '\n'.join(lines) + '\n'


def write_suite_results(output: str, report: SuiteResults) -> None:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, 'suite_results.json'), 'w') as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output, 'suite_results.md'), 'w') as f:
        f.write(suite_markdown(report))

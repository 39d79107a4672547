"""Suites: several checkpoints evaluated on several datasets, each with its own metric (and prompt templates
for zero-shot), summarized as `suite_results.json` and a Markdown table.

A suite file is YAML:

    root: /data/elevater            # optional; relative to this file; dataset paths are under it
    datasets:
      - {name: colours, path: colours, metric: accuracy}
      - {name: pets, path: pets, metric: mean_per_class, templates: ['a photo of a {}, a type of pet.'],
         classnames: classnames/pets.txt, transform: crop}

`path` (relative to `root`, or to the suite file without one) is an ImageFolder tree for zero-shot, or a
folder holding `train/`, `val/` and optionally `test/` trees; zero-shot uses `PATH/test`, else `PATH/val`.
Optional keys: `templates` (a list, or 'imagenet' / 'single' / a file), `classnames` (a file; default:
`PATH/classnames.txt`, else as for zero-shot, `classnames.txt` in the split's folder) and `transform` (a
name of `data.transforms.EVAL_TRANSFORMS`; default: the command's). Files that describe the suite
(`classnames`, `templates`) resolve relative to the suite file, so they ship with it; only `path` is under
`root`.

A suite run writes `suite_results.json` and `.md` after every result and resumes from them: see `run_suite`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import yaml

from data.classnames import CLASSNAMES_FILE, check_templates, read_lines, resolve_templates
from data.prompts import split_synonyms
from data.transforms import EVAL_TRANSFORMS
from utils.checkpoint import write_atomic
from utils.distributed import get_rank

from .encoder import Encoder
from .errors import EvaluationInputError
from .metrics import get_metric

logger = logging.getLogger(__name__)

DATASET_KEYS = ('name', 'path', 'metric', 'templates', 'classnames', 'transform')
RESULTS_JSON = 'suite_results.json'
RESULTS_MARKDOWN = 'suite_results.md'


@dataclass
class SuiteDataset:
    name: str
    path: str
    metric: str = 'accuracy'
    templates: Optional[Union[str, List[str]]] = None  # None: the command's --templates
    classnames: Optional[str] = None
    transform: Optional[str] = None  # None: the command's --transform

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

    @property
    def zeroshot_split(self) -> str:
        """`zeroshot_folder` relative to `path`: 'test', 'val', or '.' for a plain class-folder tree."""
        return os.path.relpath(self.zeroshot_folder, self.path)

    def check_class_folders(self, folder: str) -> None:
        """Refuses class folders whose sorted order is evidently not the class-names file's order: folders
        named by unpadded indices ('10' sorts before '2'), or named after the classes but listed in another
        order. Either would pair images with the wrong names without any error."""
        names_file = self.classnames_file or os.path.join(folder, CLASSNAMES_FILE)
        if not os.path.isdir(folder) or not os.path.isfile(names_file):
            return  # no file: the names come from the folders themselves
        folders = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())  # torchvision's order
        if folders and all(f.isdigit() for f in folders):
            if [int(f) for f in folders] != sorted(int(f) for f in folders):
                raise EvaluationInputError(
                    f'{folder}: class folders named by index sort as text ({", ".join(folders[:4])}, ...): '
                    f'zero-pad them (000, 001, ...) so they sort in class-index order')
            return
        names = [split_synonyms(line)[0] for line in read_lines(names_file)]
        keys, name_keys = [_folder_key(f) for f in folders], [_folder_key(n) for n in names]
        if sorted(keys) == sorted(name_keys) and keys != name_keys:
            first = next(i for i, (k, n) in enumerate(zip(keys, name_keys)) if k != n)
            raise EvaluationInputError(
                f'{folder}: class folders named after the classes sort in another order than {names_file} lists '
                f'them (folder {first} is {folders[first]!r}, the file says {names[first]!r}): name the folders '
                f'by zero-padded class index (000, 001, ...) in the file\'s order')


def _folder_key(name: str) -> str:
    # How a class name is usually spelled as a folder: '_' for spaces, any case.
    return name.replace('_', ' ').casefold()


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
    folder = os.path.dirname(os.path.abspath(suite))
    templates = entry.get('templates')
    if isinstance(templates, list):
        check_templates(templates, where)
    elif templates is not None:
        templates = str(templates)
        if templates not in ('imagenet', 'single'):
            templates = _resolve(templates, folder)
        resolve_templates(templates)
    classnames = entry.get('classnames')
    transform = entry.get('transform')
    if transform is not None and transform not in EVAL_TRANSFORMS:
        raise ValueError(f'{where}: unknown transform {transform!r}; known: {sorted(EVAL_TRANSFORMS)}')
    return SuiteDataset(str(entry['name']), _resolve(entry['path'], base), metric, templates,
                        _resolve(classnames, folder) if classnames else None, transform)


def load_suite(path: str) -> List[SuiteDataset]:
    """The datasets of suite file `path`, validated (unknown keys, metrics and transforms fail naming the
    entry)."""
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


SuiteResults = Dict[str, Any]
# {dataset: {checkpoint: {"metric", "value", **details}}}
ResultTable = Dict[str, Dict[str, Dict[str, Any]]]


def _as_json(value: Any) -> Any:
    # Settings are compared with what json.load gives back (tuples become lists, keys strings).
    return json.loads(json.dumps(value))


def _previous_results(output: str, settings: Dict[str, Any]) -> ResultTable:
    """The results in OUT/suite_results.json, when its settings are `settings`; none without the file."""
    path = os.path.join(output, RESULTS_JSON)
    if not os.path.isfile(path):
        return {}
    hint = 'pass --fresh to start over (discarding it) or choose another --output'
    try:
        with open(path, encoding='utf-8') as f:
            report = json.load(f)
        results = report['results']
        recorded = report.get('settings')
        if not isinstance(results, dict) or not all(
                isinstance(row, dict) and all(isinstance(r, dict) and 'value' in r for r in row.values())
                for row in results.values()):
            raise ValueError('"results" is not {dataset: {checkpoint: {"value": ...}}}')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvaluationInputError(f'cannot resume from {path} ({e}): {hint}') from e
    if recorded != settings:
        recorded = recorded if isinstance(recorded, dict) else {}
        missing = object()
        differing = sorted(k for k in set(recorded) | set(settings)
                           if recorded.get(k, missing) != settings.get(k, missing))
        raise EvaluationInputError(f'{path} holds results of other settings (differing: '
                                   f'{", ".join(differing) or "settings"}): {hint}')
    return results


def _report(checkpoints: Sequence[str], datasets: Sequence[SuiteDataset], results: ResultTable,
            settings: Dict[str, Any]) -> SuiteResults:
    names = [d.name for d in datasets]
    # Only checkpoints with every dataset done get an average: a partial mean is not comparable.
    complete = [c for c in checkpoints if all(c in results[n] for n in names)]
    average = {c: sum(results[n][c]['value'] for n in names) / len(names) for c in complete}
    return {'checkpoints': list(checkpoints), 'datasets': names, 'results': results, 'average': average,
            'settings': settings}


def run_suite(checkpoints: Sequence[str], datasets: Sequence[SuiteDataset], load: Callable[[str], Encoder],
              evaluate: Callable[[Encoder, SuiteDataset], Dict[str, Any]], output: Optional[str] = None,
              settings: Optional[Dict[str, Any]] = None, fresh: bool = False) -> SuiteResults:
    """`evaluate(encoder, dataset)` for every checkpoint and dataset; it returns a dict with `value` (the
    dataset's metric in percent) and any JSON-able details. The report is
    `{"checkpoints", "datasets", "results": {dataset: {checkpoint: {"metric", "value", **details}}},
    "average": {checkpoint: mean over the datasets}, "settings"}`.

    With `output`, rank 0 rewrites OUT/suite_results.json and .md atomically after every result, so a run
    that stops keeps what it finished (a checkpoint lacking datasets has no average yet). A later run with
    the same `output` reuses those results and evaluates only the missing (checkpoint, dataset) pairs, loading
    a checkpoint only when it has some; it refuses to start when the file's `settings` (the options that
    change the numbers) differ from `settings`. `fresh` discards the file instead. Results of checkpoints or
    datasets not asked for this time stay in the file's `results` but not in `average` or the table. Every
    rank reads the file before rank 0 first rewrites it, so under torchrun (with OUT on a shared filesystem)
    all ranks skip the same pairs.
    """
    settings = _as_json(settings or {})
    results: ResultTable = {} if fresh or not output else _previous_results(output, settings)
    for dataset in datasets:
        results.setdefault(dataset.name, {})

    def save() -> SuiteResults:
        report = _report(checkpoints, datasets, results, settings)
        if output and get_rank() == 0:
            write_suite_results(output, report)
        return report

    if fresh:
        save()  # the old file goes now: a run stopped before its first result must not resume from it
    for checkpoint in checkpoints:
        todo = []
        for dataset in datasets:
            done = results[dataset.name].get(checkpoint)
            if done is None:
                todo.append(dataset)
            else:
                logger.info(f'{checkpoint} on {dataset.name}: skipped: already in {RESULTS_JSON} '
                            f'({done["metric"]} {done["value"]:.2f})')
        if not todo:
            continue
        encoder = load(checkpoint)
        for dataset in todo:
            result = evaluate(encoder, dataset)
            if not isinstance(result, dict) or 'value' not in result:
                raise TypeError(f'a suite evaluation must return a dict with "value", got {result!r}')
            entry = {'metric': dataset.metric, 'value': float(result['value'])}
            entry.update((k, v) for k, v in result.items() if k not in entry)
            results[dataset.name][checkpoint] = entry
            logger.info(f'{checkpoint} on {dataset.name}: {dataset.metric} {entry["value"]:.2f}')
            save()
    return save()


def suite_markdown(report: SuiteResults) -> str:
    """Datasets as rows, checkpoints as columns, the average last; '-' for what is not done yet."""
    checkpoints = report['checkpoints']
    lines = ['| dataset | metric | ' + ' | '.join(f'`{c}`' for c in checkpoints) + ' |',
             '| --- | --- |' + ' ---: |' * len(checkpoints)]
    for name in report['datasets']:
        row = report['results'].get(name, {})
        metric = next((row[c]['metric'] for c in checkpoints if c in row), '')
        lines.append(f'| {name} | {metric} | '
                     + ' | '.join(f'{row[c]["value"]:.2f}' if c in row else '-' for c in checkpoints) + ' |')
    average = report['average']
    lines.append('| **average** | | ' + ' | '.join(f'**{average[c]:.2f}**' if c in average else '-'
                                                   for c in checkpoints) + ' |')
    return '\n'.join(lines) + '\n'


def _write_text_atomic(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode('utf-8')))


def write_suite_results(output: str, report: SuiteResults) -> None:
    """OUT/suite_results.json and OUT/suite_results.md, each replaced whole (never half-written)."""
    _write_text_atomic(os.path.join(output, RESULTS_JSON), json.dumps(report, indent=2) + '\n')
    _write_text_atomic(os.path.join(output, RESULTS_MARKDOWN), suite_markdown(report))

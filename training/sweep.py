"""Sweeps: a base config, variants of it (a name and config overrides), training seeds, and evaluations
after each run; the runs one after the other, then the mean and spread over seeds per variant.

    python -m training.sweep configs/sweeps/builtin_ablation.yaml [--data DIR] [--output DIR] [--opts K V ...]
    python -m training.sweep SWEEP.yaml --print-commands     # one shell line per run, nothing executed
    python -m training.sweep SWEEP.yaml --only VARIANT:SEED  # that run only: what each printed line does

A sweep file (see configs/sweeps/):

    cfg: configs/unicl_tiny_builtin.yaml      # the base config
    data: demo_data                           # every run's --data-path (--data overrides)
    output: output/sweeps/builtin_ablation    # (--output overrides)
    seeds: [0, 1]                             # each variant trains once per seed (SEED)
    opts: [TRAIN.EPOCHS, 10]                  # optional: overrides for every run
    variants:
      - {name: unicl, title: 'labels + captions (UniCL)'}       # the base config as it is
      - {name: clip, opts: [TRAIN.LOSS, clip]}                  # overrides on top of it
      - {name: labels, cfg: configs/unicl_tiny_builtin_labels.yaml}   # or a config of its own
    evaluations:                              # evaluate.py on each run's last checkpoint, in this order
      zeroshot: [zeroshot, --data-path, '${data}/zeroshot']
      linear_probe: [linear-probe, --train-path, '${data}/labels/train', --val-path, '${data}/labels/val']
    plot: {metric: val/acc1, title: zero-shot Acc@1, ylabel: Acc@1 (%), chance: 6.25}   # sweep.png

Config paths and the file's data/output are relative to the repository root; --data/--output to the
current folder. `${data}` in evaluation arguments and overrides is the data path. Every evaluation gets
the run's --cfg and --opts, its newest checkpoint as --resume and its own --output.

Run (VARIANT, S) lives in OUTPUT/VARIANT/seedS: main.py's run folder under train/, each evaluation's
results in eval/NAME/, and run.json, written atomically once the training and every evaluation succeeded.
A run with run.json is finished: started again, the sweep skips it. Any other run starts over and main.py
continues its training from the newest checkpoint (TRAIN.AUTO_RESUME). A run's settings (config,
overrides, data, evaluations) are kept in settings.json at its first start; a run whose sweep file changed
since is refused instead of being mixed with or reported under the new settings.

When every run is finished the sweep writes OUTPUT/sweep.md, sweep.json and sweep.png (reporting/sweep.py);
with --only it runs the chosen runs and writes no report (array jobs would race on it): running the sweep
again without --only afterwards skips the finished runs and writes the report. A stop signal (SIGTERM, or
the terminal's SIGINT) reaches the training, which saves and exits; the sweep exits with its code.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import string
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from configs import ConfigError, load_config
from reporting.scalars import read_scalars
from reporting.sweep import write_report
from utils.checkpoint import CheckpointManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILE = 'run.json'
SETTINGS_FILE = 'settings.json'
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')  # a folder name on every filesystem
_FILE_KEYS = {'cfg', 'data', 'output', 'seeds', 'opts', 'variants', 'evaluations', 'plot'}
_VARIANT_KEYS = {'name', 'title', 'cfg', 'opts'}


class SweepError(Exception):
    """A sweep file or a run folder that cannot be used as it is; the message says what to change."""


class CommandFailed(Exception):
    def __init__(self, argv: Sequence[str], returncode: int):
        super().__init__(f'exit code {returncode}: {shlex.join(argv)}')
        self.returncode = returncode


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    cfg: str
    opts: Tuple[str, ...]


@dataclass(frozen=True)
class Sweep:
    file: str
    data: str
    output: str
    seeds: Tuple[int, ...]
    opts: Tuple[str, ...]  # the file's, then --opts
    variants: Tuple[Variant, ...]
    evaluations: Dict[str, List[str]]
    plot: Dict[str, Any]
    cli_opts: Tuple[str, ...] = ()  # --opts alone, for the printed commands


@dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    folder: str

    @property
    def key(self) -> str:
        return f'{self.variant.name}:{self.seed}'


def _strings(value: Any, where: str) -> Tuple[str, ...]:
    if not isinstance(value, list):
        raise SweepError(f'{where} must be a list, got {value!r}')
    # YAML reads 10 and 0.8 as numbers; the config overrides are strings on a command line.
    return tuple(str(v) for v in value)


def _substitute(text: str, data: str, where: str) -> str:
    try:
        return string.Template(text).substitute(data=data)
    except (KeyError, ValueError) as e:
        raise SweepError(f'{where}: {text!r}: only ${{data}} can be substituted ({e})') from None


def _from_root(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def load_sweep(path: str, data: Optional[str] = None, output: Optional[str] = None,
               opts: Sequence[str] = ()) -> Sweep:
    """The sweep file, with --data / --output / --opts from the command line applied."""
    with open(path, encoding='utf-8') as f:
        content = yaml.safe_load(f) or {}
    if not isinstance(content, dict):
        raise SweepError(f'{path}: expected a mapping of {", ".join(sorted(_FILE_KEYS))}')
    unknown = set(content) - _FILE_KEYS
    missing = {'cfg', 'seeds', 'variants'} - set(content)
    if unknown or missing:
        raise SweepError(f'{path}: ' + '; '.join(
            ([f'unknown keys {sorted(unknown)} (known: {sorted(_FILE_KEYS)})'] if unknown else [])
            + ([f'missing {sorted(missing)}'] if missing else [])))
    data = os.path.abspath(data) if data else _from_root(content.get('data', 'demo_data'))
    output = os.path.abspath(output) if output else _from_root(
        content.get('output', os.path.join('output', 'sweeps', os.path.splitext(os.path.basename(path))[0])))
    seeds = content['seeds']
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise SweepError(f'{path}: seeds must be a list of distinct integers >= 0, got {seeds!r}')
    file_opts = _strings(content.get('opts', []), f'{path}: opts')
    variants = []
    for i, entry in enumerate(content['variants'] or []):
        where = f'{path}: variants[{i}]'
        if not isinstance(entry, dict) or 'name' not in entry or set(entry) - _VARIANT_KEYS:
            raise SweepError(f'{where}: expected a mapping with name and optionally {sorted(_VARIANT_KEYS - {"name"})}'
                             f', got {entry!r}')
        name = str(entry['name'])
        if not _NAME.match(name) or any(v.name == name for v in variants):
            raise SweepError(f'{where}: name {name!r} must be unique and a plain folder name (letters, digits, _.-)')
        variant_opts = _strings(entry.get('opts', []), f'{where}.opts')
        variants.append(Variant(name, str(entry.get('title', name)), str(entry.get('cfg', content['cfg'])),
                                tuple(_substitute(o, data, f'{where}.opts') for o in variant_opts)))
    if not variants:
        raise SweepError(f'{path}: no variants')
    evaluations = {}
    for name, argv in (content.get('evaluations') or {}).items():
        where = f'{path}: evaluations.{name}'
        if not _NAME.match(str(name)):
            raise SweepError(f'{where}: the name must be a plain folder name (letters, digits, _.-)')
        argv = _strings(argv, where)
        if not argv:
            raise SweepError(f'{where}: expected [COMMAND, ARGUMENTS...] of evaluate.py')
        evaluations[str(name)] = [_substitute(a, data, where) for a in argv]
    plot = content.get('plot') or {}
    if not isinstance(plot, dict) or set(plot) - {'metric', 'title', 'ylabel', 'chance'}:
        raise SweepError(f'{path}: plot takes metric, title, ylabel and chance, got {plot!r}')
    return Sweep(file=os.path.abspath(path), data=data, output=output, seeds=tuple(seeds),
                 opts=(*(_substitute(o, data, f'{path}: opts') for o in file_opts), *opts),
                 variants=tuple(variants), evaluations=evaluations, plot=plot, cli_opts=tuple(opts))


def plan(sweep: Sweep) -> List[Run]:
    """Seed by seed, every variant: a sweep stopped halfway has whole seeds to compare."""
    return [Run(v, seed, os.path.join(sweep.output, v.name, f'seed{seed}')) for seed in sweep.seeds
            for v in sweep.variants]


def run_opts(sweep: Sweep, run: Run) -> List[str]:
    return [*sweep.opts, *run.variant.opts, 'SEED', str(run.seed)]


def train_args(sweep: Sweep, run: Run) -> List[str]:
    """main.py's arguments for the run."""
    return ['--cfg', _from_root(run.variant.cfg), '--data-path', sweep.data,
            '--output', os.path.join(run.folder, 'train'), '--opts', *run_opts(sweep, run)]


def run_folder(sweep: Sweep, run: Run) -> str:
    """main.py's run folder, OUTPUT/MODEL.NAME/TAG as main.build_run_config makes it, from the run's config
    (read and checked, so a bad override fails before any run trains)."""
    config = load_config(_from_root(run.variant.cfg), run_opts(sweep, run))
    return os.path.join(run.folder, 'train', config.MODEL.NAME or 'unicl', config.TAG)


def settings(sweep: Sweep, run: Run) -> Dict[str, Any]:
    """What decides a run's numbers, compared when the sweep starts again."""
    return {'cfg': run.variant.cfg, 'opts': run_opts(sweep, run), 'data': sweep.data,
            'evaluations': sweep.evaluations}


def run_command(argv: Sequence[str]) -> None:
    """`argv` in the repository root; raises CommandFailed unless it exits 0. A SIGTERM sent to the sweep is
    passed on, and the terminal's SIGINT (which the child gets too) does not stop the wait: the training
    saves before it exits, and the sweep exits after it."""
    child = subprocess.Popen(list(argv), cwd=ROOT)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        while True:
            try:
                returncode = child.wait()
                break
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    if returncode != 0:
        raise CommandFailed(argv, returncode)


def train(sweep: Sweep, run: Run) -> None:
    run_command([sys.executable, 'main.py', *train_args(sweep, run)])


def evaluate(sweep: Sweep, run: Run, name: str, argv: Sequence[str]) -> None:
    """evaluate.py ARGV[0] on the run's newest checkpoint, results in eval/NAME."""
    checkpoints = CheckpointManager(run_folder(sweep, run)).checkpoints()
    if not checkpoints:
        raise SweepError(f'{run.key}: no checkpoint in {run_folder(sweep, run)} to evaluate')
    run_command([sys.executable, 'evaluate.py', argv[0], '--cfg', _from_root(run.variant.cfg),
                 '--resume', checkpoints[-1], '--output', os.path.join(run.folder, 'eval', name), *argv[1:],
                 '--opts', *run_opts(sweep, run)])


def _headline(name: str, folder: str) -> Dict[str, float]:
    """The numbers of one evaluation's results file, as `NAME what` -> value."""
    def read(file: str) -> Optional[Dict[str, Any]]:
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            return None
        with open(path, encoding='utf-8') as f:
            return json.load(f)

    if (suite := read('suite_results.json')) is not None:
        (checkpoint, average), = suite['average'].items()  # one checkpoint per run
        return {f'{name} average': average,
                **{f'{name} {d}': suite['results'][d][checkpoint]['value'] for d in suite['datasets']}}
    for file, keys in (('zeroshot_results.json', ('top1', 'top5')), ('linear_probe_results.json', ('top1',))):
        if (results := read(file)) is not None:
            extra = {} if results['metric'] == 'accuracy' else {results['metric']: results['value']}
            return {f'{name} {k}': v for k, v in {**{k: results[k] for k in keys}, **extra}.items()}
    if (results := read('retrieval_results.json')) is not None:
        return {f'{name} {k}': v for k, v in results.items() if '@' in k}
    raise SweepError(f'evaluation {name}: no results file in {folder}')


def collect(sweep: Sweep, run: Run) -> Dict[str, Any]:
    """The run's per-epoch curves (validation during training, the epoch loss) from its tensorboard events
    and its flat metrics: each curve's last value, each validation curve's best, each evaluation's numbers."""
    scalars = read_scalars(run_folder(sweep, run))
    curves = {tag: [[step, value] for step, value in points] for tag, points in scalars.items()
              if tag.startswith('val/') or tag == 'train/epoch_loss'}
    metrics: Dict[str, float] = {}
    for tag, points in curves.items():
        if tag.startswith('val/'):
            metrics[f'{tag} final'] = points[-1][1]
            metrics[f'{tag} best'] = max(value for _, value in points)
    for name in sweep.evaluations:
        metrics.update(_headline(name, os.path.join(run.folder, 'eval', name)))
    if 'train/epoch_loss' in curves:  # last: the losses of different TRAIN.LOSS are not comparable
        metrics['train/epoch_loss final'] = curves['train/epoch_loss'][-1][1]
    return {'curves': curves, 'metrics': metrics}


def _commit() -> Optional[str]:
    """The code's git commit, '+dirty' when tracked files differ from it: a report names what it measured."""
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip()[:12] + ('+dirty' if dirty.stdout.strip() else '')


def _write_json_atomic(path: str, content: Any) -> None:
    temporary = f'{path}.tmp'
    with open(temporary, 'w', encoding='utf-8') as f:
        json.dump(content, f, indent=1)
    os.replace(temporary, path)


def _read_json(path: str) -> Any:
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def _check_settings(run: Run, wanted: Dict[str, Any]) -> None:
    """Records the run's settings at its first start; refuses to continue or reuse it under others."""
    path = os.path.join(run.folder, SETTINGS_FILE)
    if not os.path.exists(path):
        os.makedirs(run.folder, exist_ok=True)
        _write_json_atomic(path, wanted)
        return
    found = _read_json(path)
    if found != wanted:
        changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        raise SweepError(f'{run.key}: {run.folder} was started with other settings ({", ".join(changed)} differ: '
                         f'{ {k: found.get(k) for k in changed} } there, { {k: wanted.get(k) for k in changed} } now); '
                         'remove that folder to run it again, or give the changed variant another name')


def execute(sweep: Sweep, run: Run) -> Dict[str, Any]:
    """The run's results: read back when it is finished, else trained (or resumed), evaluated and saved."""
    done = os.path.join(run.folder, RUN_FILE)
    _check_settings(run, settings(sweep, run))
    if os.path.exists(done):
        print(f'[sweep] {run.key}: finished before, skipped ({done})', flush=True)
        return _read_json(done)
    print(f'[sweep] {run.key}: training in {run.folder}', flush=True)
    start = time.time()
    train(sweep, run)
    trained = time.time()
    for name, argv in sweep.evaluations.items():
        print(f'[sweep] {run.key}: evaluation {name}', flush=True)
        evaluate(sweep, run, name, argv)
    result = {'variant': run.variant.name, 'seed': run.seed, 'settings': settings(sweep, run),
              'commit': _commit(), 'seconds': {'train': trained - start, 'evaluate': time.time() - trained},
              **collect(sweep, run)}
    _write_json_atomic(done, result)
    return result


def print_commands(sweep: Sweep, runs: Sequence[Run]) -> None:
    """One line per run, each a whole job for one task of a scheduler array (same folders, same options)."""
    for run in runs:
        command = [sys.executable, '-m', 'training.sweep', sweep.file, '--only', run.key, '--data', sweep.data,
                   '--output', sweep.output] + (['--opts', *sweep.cli_opts] if sweep.cli_opts else [])
        print(f'cd {shlex.quote(ROOT)} && {shlex.join(command)}')


def _select(runs: List[Run], only: Optional[Sequence[str]]) -> List[Run]:
    if not only:
        return runs
    known = {run.key: run for run in runs}
    unknown = [key for key in only if key not in known]
    if unknown:
        raise SweepError(f'--only {" ".join(unknown)}: not a run of this sweep; its runs: {" ".join(known)}')
    return [known[key] for key in dict.fromkeys(only)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m training.sweep', description=__doc__.split('\n\n')[0])
    parser.add_argument('sweep', help='sweep file (configs/sweeps/*.yaml)')
    parser.add_argument('--data', help="every run's --data-path (default: the file's data)")
    parser.add_argument('--output', help="the sweep's folder (default: the file's output)")
    parser.add_argument('--opts', nargs='+', default=[], help='config overrides for every run, after the file\'s')
    parser.add_argument('--only', nargs='+', metavar='VARIANT:SEED', help='run only these runs; no report')
    parser.add_argument('--print-commands', action='store_true',
                        help='print one shell line per run (for a scheduler array job) and run nothing')
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.data, args.output, args.opts)
        runs = _select(plan(sweep), args.only)
        for run in runs:
            run_folder(sweep, run)  # every run's config read and checked before the first one trains
        if args.print_commands:
            print_commands(sweep, runs)
            return 0
        results = [execute(sweep, run) for run in runs]
    except (SweepError, ConfigError, OSError) as e:  # a file to fix, named in the message
        print(f'[sweep] error: {e}', file=sys.stderr)
        return 2
    except CommandFailed as e:
        print(f'[sweep] stopped: {e}', file=sys.stderr)
        return e.returncode if e.returncode > 0 else 128 - e.returncode  # -N: killed by signal N, as a shell says
    if not args.only:
        report = write_report(sweep, results)
        print(f'[sweep] report: {report}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

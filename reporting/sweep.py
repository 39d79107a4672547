"""A sweep's report (training/sweep.py): every metric's mean and spread over seeds per variant (sweep.md),
all of it with every run's numbers (sweep.json), one curve per variant (sweep.png)."""
from __future__ import annotations

import json
import os
from statistics import fmean, stdev
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .plots import plot_runs

if TYPE_CHECKING:  # only for the hints: training/sweep.py imports this module
    from training.sweep import Sweep

Results = Sequence[Dict[str, Any]]  # run.json contents: variant, seed, metrics, curves, seconds, commit


def summarize(results: Results, variants: Sequence[str]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """metric -> variant -> mean, std (sample standard deviation over seeds; None for one seed), min, max and
    each seed's value. Metrics in the order the runs list them; a variant missing a metric has no entry."""
    metrics = list(dict.fromkeys(m for r in results for m in r['metrics']))
    summary: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for metric in metrics:
        summary[metric] = {}
        for variant in variants:
            by_seed = {r['seed']: r['metrics'][metric] for r in results
                       if r['variant'] == variant and metric in r['metrics']}
            if by_seed:
                values = list(by_seed.values())
                summary[metric][variant] = {'mean': fmean(values),
                                            'std': stdev(values) if len(values) > 1 else None,
                                            'min': min(values), 'max': max(values), 'seeds': by_seed}
    return summary


def curves_over_seeds(results: Results, variants: Sequence[str], tag: str) -> Dict[str, Dict[str, List[float]]]:
    """variant -> mean, min and max over seeds of curve `tag` per epoch, over the epochs every seed logged."""
    curves = {}
    for variant in variants:
        runs = [[value for _, value in r['curves'][tag]] for r in results
                if r['variant'] == variant and tag in r['curves']]
        if runs:
            per_epoch = list(zip(*runs))  # zip stops at the shortest run
            curves[variant] = {'mean': [fmean(e) for e in per_epoch], 'min': [min(e) for e in per_epoch],
                               'max': [max(e) for e in per_epoch]}
    return curves


def leaders(curves: Dict[str, Dict[str, List[float]]], titles: Dict[str, str]) -> str:
    """Which variant's mean is highest at each epoch, as runs of epochs: 'epochs 1-4: A; epoch 5: A = B'."""
    epochs = min(len(c['mean']) for c in curves.values())
    spans: List[List[Any]] = []  # [first epoch, last epoch, leader]
    for e in range(epochs):
        best = max(c['mean'][e] for c in curves.values())
        leader = ' = '.join(titles[v] for v, c in curves.items() if c['mean'][e] == best)
        if spans and spans[-1][2] == leader:
            spans[-1][1] = e + 1
        else:
            spans.append([e + 1, e + 1, leader])
    return '; '.join(f'epochs {a}-{b}: {leader}' if a != b else f'epoch {a}: {leader}' for a, b, leader in spans)


def _number(metric: str, value: Optional[float]) -> str:
    if value is None:
        return '-'
    return f'{value:.3f}' if 'loss' in metric else f'{value:.2f}'


def _shown(path: str) -> str:
    """A path under the repository as written in it (relative), any other as it is."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    relative = os.path.relpath(path, root)
    return path if relative.startswith('..') else relative


def _metric_table(metric: str, by_variant: Dict[str, Dict[str, Any]], titles: Dict[str, str],
                  seeds: Sequence[int]) -> List[str]:
    lines = [f'| variant | mean | std | min-max | {" | ".join(f"seed {s}" for s in seeds)} |',
             '| --- ' * (4 + len(seeds)) + '|']
    for variant, stats in by_variant.items():
        lines.append(f'| {titles[variant]} | {_number(metric, stats["mean"])} | {_number(metric, stats["std"])} | '
                     f'{_number(metric, stats["min"])}-{_number(metric, stats["max"])} | '
                     + ' | '.join(_number(metric, stats['seeds'].get(s)) for s in seeds) + ' |')
    return lines


def write_report(sweep: 'Sweep', results: Results) -> str:
    """Writes sweep.md, sweep.json and sweep.png (when some run has the plotted curve) in the sweep's output;
    returns the path of sweep.md."""
    variants = [v.name for v in sweep.variants]
    titles = {v.name: v.title for v in sweep.variants}
    summary = summarize(results, variants)
    tag = sweep.plot.get('metric', 'val/acc1')
    curves = curves_over_seeds(results, variants, tag)
    os.makedirs(sweep.output, exist_ok=True)
    plot = None
    if curves:
        plot = plot_runs({titles[v]: c['mean'] for v, c in curves.items()}, os.path.join(sweep.output, 'sweep.png'),
                         sweep.plot.get('title', f'{tag} per epoch: mean over seeds, min-max shaded'),
                         sweep.plot.get('ylabel', tag), chance=sweep.plot.get('chance'),
                         bands={titles[v]: (c['min'], c['max']) for v, c in curves.items()})
    commits = sorted({str(r.get('commit')) for r in results})
    train_minutes = sum(r['seconds']['train'] for r in results) / 60
    eval_minutes = sum(r['seconds']['evaluate'] for r in results) / 60
    seeds = list(sweep.seeds)
    lines = [f'# Sweep {os.path.splitext(os.path.basename(sweep.file))[0]}', '',
             f'`{_shown(sweep.file)}`: {len(variants)} variants x {len(seeds)} training seeds '
             f'({", ".join(map(str, seeds))}) on `{_shown(sweep.data)}`'
             + (f', every run with `{" ".join(sweep.opts)}`' if sweep.opts else '') + '. '
             f'{len(results)} runs: {train_minutes:.1f} min of training, {eval_minutes:.1f} min of evaluation '
             f'(as measured, including any time lost to a stop). Code: commit{"s" * (len(commits) > 1)} '
             f'{", ".join(commits)}.', '',
             '| variant | name | config | overrides |', '| --- | --- | --- | --- |',
             *[f'| {v.title} | `{v.name}` | `{v.cfg}` | {f"`{chr(32).join(v.opts)}`" if v.opts else "-"} |'
               for v in sweep.variants], '',
             'Each table: the mean over the seeds, their sample standard deviation (n-1), min-max, then each '
             "seed's value. `val/...` and `train/epoch_loss` are the per-epoch values logged during training "
             '(final: the last epoch; best: the best epoch); the other metrics are evaluate.py on the last '
             'checkpoint.', '']
    for metric, by_variant in summary.items():
        lines += [f'## {metric}', '', *_metric_table(metric, by_variant, titles, seeds), '']
    if curves and tag.startswith('val/'):
        lines += [f'Highest mean {tag} (over seeds) per epoch: {leaders(curves, titles)}.', '']
    if plot:
        lines += [f'![{tag} per epoch]({os.path.basename(plot)})', '']
    path = os.path.join(sweep.output, 'sweep.md')
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))
    with open(os.path.join(sweep.output, 'sweep.json'), 'w', encoding='utf-8') as f:
        json.dump({'sweep': _shown(sweep.file), 'data': _shown(sweep.data), 'seeds': seeds, 'opts': list(sweep.opts),
                   'variants': [{'name': v.name, 'title': v.title, 'cfg': v.cfg, 'opts': list(v.opts)}
                                for v in sweep.variants],
                   'evaluations': sweep.evaluations, 'summary': summary, 'curves': {tag: curves},
                   'runs': list(results)}, f, indent=1)
    return path

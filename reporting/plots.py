"""Figures for reports, drawn headless (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from .scalars import Series  # noqa: E402


def _save(figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_training_curves(scalars: Dict[str, Series], path: str) -> str:
    """Three panels: training loss (logged steps and epoch means), learning rate, zero-shot Acc@1 per epoch."""
    figure, (loss_ax, lr_ax, acc_ax) = plt.subplots(1, 3, figsize=(15, 4))
    if 'train/loss' in scalars:
        steps, values = zip(*scalars['train/loss'])
        loss_ax.plot(steps, values, lw=1, alpha=0.6, label='logged steps')
    if 'train/epoch_loss' in scalars and 'train/loss' in scalars:
        # epoch means drawn at each epoch's last logged step, on the same axis as the step losses
        epochs = [e for e, _ in scalars['train/epoch_loss']]
        last_step = max(s for s, _ in scalars['train/loss'])
        per_epoch = last_step / (max(epochs) + 1)
        loss_ax.plot([(e + 1) * per_epoch for e in epochs], [v for _, v in scalars['train/epoch_loss']], 'o-',
                     label='epoch mean')
    loss_ax.set(title='training loss (UniCL)', xlabel='optimizer step', ylabel='loss')
    loss_ax.legend()
    if 'train/lr' in scalars:
        lr_ax.plot(*zip(*scalars['train/lr']))
    lr_ax.set(title='learning rate', xlabel='optimizer step', ylabel='lr')
    if 'val/acc1' in scalars:
        acc_ax.plot(*zip(*scalars['val/acc1']), 'o-')
    acc_ax.set(title='zero-shot Acc@1 (validation)', xlabel='epoch', ylabel='Acc@1 (%)')
    for ax in (loss_ax, lr_ax, acc_ax):
        ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_runs(curves: Dict[str, Sequence[float]], path: str, title: str, ylabel: str,
              chance: Optional[float] = None, group: Callable[[str], str] = lambda label: label,
              bands: Optional[Dict[str, Tuple[Sequence[float], Sequence[float]]]] = None) -> str:
    """One line per run over epochs 1..N (e.g. zero-shot Acc@1 of each ablation run and seed). Runs of the
    same `group(label)` share a colour and differ in line style. `bands[label]` = (low, high) per epoch is
    shaded around that line (e.g. the min-max over seeds around their mean)."""
    figure, ax = plt.subplots(figsize=(9, 5))
    colours, seen = {}, {}
    styles = ['-', '--', ':', '-.']
    for label, values in curves.items():
        key = group(label)
        colour = colours.setdefault(key, f'C{len(colours)}')
        style = styles[seen.setdefault(key, 0) % len(styles)]
        seen[key] += 1
        ax.plot(range(1, len(values) + 1), values, marker='o', ls=style, color=colour, label=label, ms=3)
        if bands and label in bands:
            low, high = bands[label]
            ax.fill_between(range(1, len(low) + 1), low, high, color=colour, alpha=0.15, lw=0)
    if chance is not None:
        ax.axhline(chance, color='grey', ls='--', lw=1, label=f'chance ({chance:g})')
    ax.set(title=title, xlabel='epoch', ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='center left', bbox_to_anchor=(1.01, 0.5))
    return _save(figure, path)

"""The demo's report: what `make demo` trained and measured, as a table with what each number means, and
the training curves.

    python -m reporting.demo --run output/demo/unicl_tiny/builtin_unicl --zeroshot output/demo/zeroshot \
        --linear-probe output/demo/linear_probe --output output/demo
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

from .plots import plot_training_curves
from .scalars import Series, read_scalars


def _read_json(folder: str, name: str) -> Dict:
    with open(os.path.join(folder, name), encoding='utf-8') as f:
        return json.load(f)


def _last(scalars: Dict[str, Series], tag: str) -> Optional[float]:
    return scalars[tag][-1][1] if scalars.get(tag) else None


def _probe_choice(probe: Dict) -> str:
    """The searched values: the default protocol has no learning rate."""
    learning_rate = f"lr {probe['lr']:g}, " if probe.get('lr') is not None else ''
    return f"{learning_rate}weight decay {probe['weight_decay']:g}"


def results_table(zeroshot: Dict, probe: Dict, scalars: Dict[str, Series]) -> List[str]:
    chance = 100 / zeroshot['num_classes']
    rows = [
        ('zero-shot Acc@1', f"{zeroshot['top1']:.2f}",
         f"{zeroshot['num_images']} held-out images of {zeroshot['num_classes']} \"colour shape\" classes "
         f"named only by prompts; chance {chance:.2f}, colour alone 25"),
        ('zero-shot Acc@5', f"{zeroshot['top5']:.2f}", 'the right class among the 5 best prompts'),
        ('linear probe Acc@1', f"{probe['top1']:.2f}",
         f"8 shapes: a linear head on the frozen image features, fit on {probe['num_train']} images "
         f"({_probe_choice(probe)} searched on held-out training images), tested on {probe['num_test']}; chance 12.50"),
    ]
    best = max((v for _, v in scalars.get('val/acc1', [])), default=None)
    if best is not None:
        rows.append(('best zero-shot Acc@1', f'{best:.2f}', 'the best epoch of the validation after each epoch'))
    loss = _last(scalars, 'train/epoch_loss')
    if loss is not None:
        first = scalars['train/epoch_loss'][0][1]
        rows.append(('training loss', f'{loss:.3f}', f'UniCL loss, mean of the last epoch (first epoch {first:.3f}; '
                                                    f'ln(batch 32) = 3.47 is a model that knows nothing)'))
    lines = ['| result | value | what it means |', '| --- | ---: | --- |']
    lines += [f'| {name} | {value} | {meaning} |' for name, value, meaning in rows]
    return lines


def write_report(run: str, zeroshot_dir: str, probe_dir: str, output: str) -> str:
    scalars = read_scalars(run)
    zeroshot = _read_json(zeroshot_dir, 'zeroshot_results.json')
    probe = _read_json(probe_dir, 'linear_probe_results.json')
    curves = plot_training_curves(scalars, os.path.join(output, 'curves.png'))
    table = results_table(zeroshot, probe, scalars)
    report = '\n'.join([
        '# UniCL demo: a tiny model trained on the built-in dataset', '',
        'Training data: 8 shape classes as image-label data (prompts name the shape, never the colour) mixed with '
        'captioned images (captions name the colour, the shape only in 15% of them). The zero-shot classes '
        'combine both: only a model that learned shapes from the labels and colour words from the captions '
        'names them.', '',
        *table, '',
        f'![training curves]({os.path.relpath(curves, output)})', '',
        f'- run folder, checkpoints and logs: `{run}`',
        f"- tensorboard: `tensorboard --logdir {os.path.join(run, 'tensorboard')}`",
        f'- zero-shot results and per-image predictions: `{zeroshot_dir}`',
        f'- linear probe results (with every searched lr / weight decay): `{probe_dir}`', ''])
    path = os.path.join(output, 'report.md')
    with open(path, 'w', encoding='utf-8') as f:
        f.write(report)
    print('\n'.join(table))
    print(f'\nreport: {path}\ncurves: {curves}\ntensorboard: {os.path.join(run, "tensorboard")}')
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--run', required=True, help='the training run folder (with tensorboard/)')
    parser.add_argument('--zeroshot', required=True, help='folder of zeroshot_results.json')
    parser.add_argument('--linear-probe', required=True, help='folder of linear_probe_results.json')
    parser.add_argument('--output', required=True, help='where report.md and curves.png go')
    args = parser.parse_args(argv)
    write_report(args.run, args.zeroshot, args.linear_probe, args.output)


if __name__ == '__main__':
    main()

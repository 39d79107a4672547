"""The paper's comparison at laptop scale: UniCL on labels + captions against labels-only and captions-only.

    python bench/builtin_ablation.py [--data demo_data] [--output output/ablation] [--opts KEY VALUE ...]

Trains the three `configs/unicl_tiny_builtin*.yaml` runs one after the other (same model, schedule and
samples per epoch; only DATA.SOURCES differs), reads each run's per-epoch zero-shot accuracy on the held-out
"colour shape" classes from its log, and prints a table; `results.json` in the output folder keeps it.
About 3 minutes a run on 2 CPU cores. The runs go one at a time on purpose: sharing two cores between
trainings makes each many times slower.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {'labels + captions (UniCL)': 'unicl_tiny_builtin', 'labels only': 'unicl_tiny_builtin_labels',
        'captions only': 'unicl_tiny_builtin_captions'}
ZEROSHOT_LINE = re.compile(r'zero-shot on \d+ images of .*: Acc@1 ([\d.]+) Acc@5 ([\d.]+)')


def epoch_accuracies(log_path: str) -> List[Dict[str, float]]:
    with open(log_path, encoding='utf-8') as f:
        return [{'acc1': float(m.group(1)), 'acc5': float(m.group(2))} for m in ZEROSHOT_LINE.finditer(f.read())]


def train(config_name: str, data: str, output: str, opts: List[str]) -> List[Dict[str, float]]:
    command = [sys.executable, 'main.py', '--cfg', f'configs/{config_name}.yaml', '--data-path', data,
               '--output', output] + (['--opts', *opts] if opts else [])
    subprocess.run(command, cwd=ROOT, check=True)
    logs = [os.path.join(r, 'log_rank0.txt') for r, _, files in os.walk(output) if 'log_rank0.txt' in files]
    if len(logs) != 1:
        raise RuntimeError(f'expected one run log under {output}, found {logs}')
    return epoch_accuracies(logs[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', default='demo_data', help='built-in dataset (python -m data.builtin --out DIR)')
    parser.add_argument('--output', default='output/ablation')
    parser.add_argument('--opts', nargs='+', default=[], help='config overrides for all three runs')
    args = parser.parse_args(argv)
    data, output = os.path.abspath(args.data), os.path.abspath(args.output)
    if not os.path.isdir(os.path.join(data, 'zeroshot')):
        subprocess.run([sys.executable, '-m', 'data.builtin', '--out', data], cwd=ROOT, check=True)
    results = {}
    for title, config_name in RUNS.items():
        run_output = os.path.join(output, config_name)
        if os.path.isdir(run_output):
            raise SystemExit(f'{run_output} exists; remove it or pick another --output')
        results[title] = train(config_name, data, run_output, args.opts)
    with open(os.path.join(output, 'results.json'), 'w', encoding='utf-8') as f:
        json.dump({'opts': args.opts, 'per_epoch': results}, f, indent=1)
    print('\nzero-shot on the held-out built-in classes (final epoch; best Acc@1 over epochs)')
    print('| run | Acc@1 | Acc@5 | best Acc@1 |\n| --- | --- | --- | --- |')
    for title, epochs in results.items():
        print(f"| {title} | {epochs[-1]['acc1']:.2f} | {epochs[-1]['acc5']:.2f} | "
              f"{max(e['acc1'] for e in epochs):.2f} |")


if __name__ == '__main__':
    main()

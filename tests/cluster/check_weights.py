"""Checks a SLURM run of cluster/unicl.sbatch against an uninterrupted run (run by tests/cluster/run_slurm_test.sh).

Reads the job's output file (every restart appended to it), the harness's list of stops and both runs' final
checkpoints; prints a table of the stops and exits non-zero on any failed check:
- each restart is in the file (--open-mode=append kept them all) and the last one says "run finished";
- each stop logged the training's save at the signal ("signal N: saving at step S", "saved at the end of
  epoch", or "signal N during the validation of epoch E: saving" for a signal that arrives after an epoch's
  last step) and the script's "requeued"; the next restart resumed from that step (0 steps redone);
- the final weights equal the uninterrupted run's (allclose, atol 1e-6).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from utils.checkpoint import CheckpointManager, safe_load  # noqa: E402

STAMP = re.compile(r'\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[ \]]')
ANSI = re.compile(r'\x1b\[[0-9;]*m')


def _time(line: str):
    match = STAMP.search(line)
    return datetime.datetime.strptime(match.group(1), '%Y-%m-%d %H:%M:%S').timestamp() if match else None


def _first(lines, pattern):
    return next((line for line in lines if re.search(pattern, line)), None)


def segments(text: str, job: str):
    """The output file cut at the script's start line of each restart: {restart: [lines]}."""
    parts, current = {}, None
    for line in ANSI.sub('', text).splitlines():
        match = re.search(rf'job {job}: restart (\d+):', line)
        if match:
            current = int(match.group(1))
            parts[current] = []
        if current is not None:
            parts[current].append(line)
    return parts


def final_weights(run_dir: str):
    paths = CheckpointManager(run_dir).checkpoints()
    if not paths:
        raise SystemExit(f'FAIL: no checkpoint in {run_dir}')
    state = safe_load(paths[-1])
    return paths[-1], state['progress'], state['model']


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--log', required=True, help='the job output file')
    parser.add_argument('--job', required=True)
    parser.add_argument('--stops', required=True, help='lines "KIND<TAB>unix time the harness acted"')
    parser.add_argument('--run', required=True, help='the SLURM run folder (OUTPUT/MODEL.NAME/TAG)')
    parser.add_argument('--reference', required=True, help='the uninterrupted run folder')
    args = parser.parse_args()
    failures = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            failures.append(message)

    with open(args.stops) as f:
        stops = [line.rstrip('\n').split('\t') for line in f if line.strip()]
    with open(args.log, errors='replace') as f:
        parts = segments(f.read(), args.job)
    check(sorted(parts) == list(range(len(stops) + 1)),
          f'restarts in the output file: {sorted(parts)}, expected 0..{len(stops)} (--open-mode=append)')
    check(bool(parts.get(0)) and any('Train:' in line for line in parts.get(0, [])),
          "the first run's training lines are missing from the output file (truncated by a restart?)")

    rows = []
    for index, (kind, acted) in enumerate(stops):
        lines, after = parts.get(index, []), parts.get(index + 1, [])
        signal_line = _first(lines, r'signal \d+(:| during the validation of epoch \d+:) sav')
        saved = [int(m.group(1)) for m in (re.search(r'saved \S+ \(epoch \d+, step (\d+)\)', line) for line in lines)
                 if m]
        steps = [int(m.group(1)) for m in (re.search(r'Train: .* step (\d+) ', line) for line in lines) if m]
        requeued = _first(lines, r'run stopped by SIGTERM.*: requeued')
        resume = _first(after, r'resuming from .*step (\d+), next step (\d+)')
        trap = _first(lines, r'stopping the run')
        start = _first(after, rf'job {args.job}: restart {index + 1}:')
        check(signal_line is not None,
              f'stop {index + 1} ({kind}): no "signal N: saving" line: the training did not save')
        check(requeued is not None, f'stop {index + 1} ({kind}): no "run stopped by SIGTERM.*: requeued" line')
        check(resume is not None, f'stop {index + 1} ({kind}): restart {index + 1} did not resume from a checkpoint')
        step_saved = saved[-1] if saved and signal_line else None
        resumed = int(re.search(r'step (\d+), next step', resume).group(1)) if resume else None
        redone = (step_saved - resumed) if step_saved is not None and resumed is not None else None
        check(redone == 0, f'stop {index + 1} ({kind}): saved step {step_saved}, resumed from step {resumed}')
        last_logged = max(steps) if steps else None
        check(step_saved is not None and last_logged is not None and step_saved >= last_logged,
              f'stop {index + 1} ({kind}): saved step {step_saved} is before the last step logged {last_logged}')
        signal_at = _time(trap) if kind == 'time limit' and trap else float(acted)
        exit_at = _time(requeued) if requeued else None
        start_at = _time(start) if start else None
        rows.append((kind, step_saved, redone, None if exit_at is None else exit_at - signal_at,
                     None if exit_at is None or start_at is None else start_at - exit_at))

    last = parts.get(len(stops), [])
    check(_first(last, r'run finished') is not None, 'the last restart did not log "run finished"')
    check(_first(last, r'run stopped by SIGTERM|stopping the run') is None, 'the last restart was stopped too')

    path, progress, weights = final_weights(args.run)
    ref_path, ref_progress, ref_weights = final_weights(args.reference)
    check(progress['step'] == ref_progress['step'] and progress['epoch'] == ref_progress['epoch'],
          f'final progress {progress} != the uninterrupted run\'s {ref_progress}')
    check(weights.keys() == ref_weights.keys(), 'the final checkpoints hold different parameters')
    max_dw = max(((weights[k].double() - ref_weights[k].double()).abs().max().item()
                  for k in weights.keys() & ref_weights.keys() if weights[k].numel()), default=float('nan'))
    close = all(torch.allclose(weights[k], ref_weights[k], atol=1e-6) for k in weights.keys() & ref_weights.keys())
    check(close, f'final weights differ from the uninterrupted run: max |dW| {max_dw:.3g}')

    def cell(value, fmt='{}'):
        return '-' if value is None else fmt.format(value)

    print(f'{"stop":<12} {"step saved":>10} {"steps redone":>12} {"signal to exit (s)":>18} '
          f'{"pending before restart (s)":>26}')
    for kind, step, redone, to_exit, pending in rows:
        print(f'{kind:<12} {cell(step):>10} {cell(redone):>12} {cell(to_exit, "{:.0f}"):>18} '
              f'{cell(pending, "{:.0f}"):>26}')
    print(f'final: {os.path.basename(path)} step {progress["step"]}; uninterrupted: {os.path.basename(ref_path)} '
          f'step {ref_progress["step"]}; max |dW| {max_dw:.3g} (allclose atol 1e-6: {close})')
    for message in failures:
        print(f'FAIL: {message}')
    print('all checks passed' if not failures else f'{len(failures)} check(s) failed')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())

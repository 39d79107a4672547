"""Training-step throughput and peak memory: a full UniCL step (forward, loss over the batch, backward, AdamW)
on random images and texts.

    python bench/train_step.py [--quick] [--compile] [--config NAME] [--device cpu|cuda] [--threads N]
                               [--opts KEY VALUE ...] [--name NAME]

Cases: `unicl_swin_tiny` at 224 px and the tiny test config, fp32 and bf16 autocast on the CPU (bf16 on CUDA
when a GPU is present), texts of prompt length ("a photo of a {ImageNet class}.", ~8-12 tokens) and of all 77
tokens (the causal text encoder stops at the batch's last end-of-text token, so the two differ). Each case
runs in its own process: peak memory is the process's peak RSS on the CPU, `max_memory_allocated` on CUDA.

`--compile` measures TRAIN.COMPILE instead: each config eager and with its forward compiled (inductor, as the
trainer compiles it), prompt texts, fp32 on the CPU and bf16 on CUDA; the first step (compilation included)
is timed apart from the steady steps after it, and the graphs compiled are counted. Results go to
`train_step_compile.json`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.common import machine, markdown_table, run_child, write_results  # noqa: E402

CASES = [  # (config, batch on CPU, batch on CUDA)
    ('unicl_swin_tiny', 16, 128),
    ('unicl_tiny', 64, 512),
]


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def measure(config_name: str, batch: int, amp: str, full_text: bool, device_name: str, steps: int,
            compiled: bool, opts: Sequence[str] = ()) -> dict:
    from training.compile import graphs_compiled
    from training.metrics import peak_memory_mb
    from utils.precision import autocast_dtype

    from bench.workload import Workload

    device = torch.device(device_name)
    dtype = autocast_dtype(amp, device)
    workload = Workload(config_name, device, dtype, compiled, opts)
    step = workload.step(batch, full_text)
    with tempfile.TemporaryDirectory(prefix='train_step_inductor_') as cache:
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache  # a cold compilation: nothing from an earlier run's cache
        start = time.perf_counter()
        step()  # the warm-up step: allocations, and for a compiled forward its compilation
        _sync(device)
        first = time.perf_counter() - start
        seconds = step.seconds(warmup=2 if device.type == 'cuda' else 0, steps=steps)
    return {'config': config_name, 'device': device.type, 'amp': str(dtype).replace('torch.', '') if dtype else 'fp32',
            'text': '77 tokens' if full_text else 'prompt', 'batch': batch, 'compiled': compiled,
            'fused_adamw': bool(workload.optimizer.defaults.get('fused')), 'first_step_seconds': first,
            'graphs': graphs_compiled(), 'seconds_per_step': seconds, 'images_per_sec': batch / seconds,
            'peak_memory_mb': peak_memory_mb(device)}


def _cases(args) -> list:
    """(config, batch, amp, full text, device, steps, compiled) of every case the options ask for."""
    devices = args.device or ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    cases = []
    for config, cpu_batch, cuda_batch in CASES:
        if args.config and config not in args.config:
            continue
        for device in devices:
            batch = cuda_batch if device == 'cuda' else cpu_batch
            steps = (2 if args.quick else 4) if config == 'unicl_swin_tiny' and device == 'cpu' else 10
            if args.compile:
                amp = 'bf16' if device == 'cuda' else 'fp32'
                cases += [(config, batch, amp, False, device, steps, compiled) for compiled in (False, True)]
                continue
            for amp in ('bf16',) if device == 'cuda' else ('fp32', 'bf16'):
                cases += [(config, batch, amp, full, device, steps, False) for full in (False, True)]
    return cases


def _table(results: list, compile_rows: bool) -> str:
    if compile_rows:
        header = ['config', 'device', 'autocast', 'forward', 'batch', 'fused AdamW', 'first step (s)',
                  'images/s (vs eager)', 'graphs']
    else:
        header = ['config', 'device', 'autocast', 'texts', 'batch', 'images/s (vs CPU fp32)', 'peak memory (MB)']
    rows = []
    for r in results:
        if 'error' in r:
            rows.append([r['config']] + ['-'] * (len(header) - 3) + [f"failed: {r['error']}", '-'])
            continue
        if compile_rows:  # against the eager run of the same case
            base = next((b for b in results if 'error' not in b and not b['compiled'] and
                         (b['config'], b['device']) == (r['config'], r['device'])), r)
            rows.append([r['config'], r['device'], r['amp'], 'compiled' if r['compiled'] else 'eager', r['batch'],
                         'yes' if r['fused_adamw'] else 'no', f"{r['first_step_seconds']:.1f}",
                         f"{r['images_per_sec']:.1f} ({r['images_per_sec'] / base['images_per_sec']:.2f}x)",
                         r['graphs']])
            continue
        base = next((b for b in results if 'error' not in b and b['config'] == r['config'] and b['device'] == 'cpu'
                     and b['amp'] == 'fp32' and b['text'] == r['text']), r)
        rows.append([r['config'], r['device'], r['amp'], r['text'], r['batch'],
                     f"{r['images_per_sec']:.1f} ({r['images_per_sec'] / base['images_per_sec']:.2f}x)",
                     f"{r['peak_memory_mb']:.0f}"])
    return markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--case', nargs=7,
                        metavar=('CONFIG', 'BATCH', 'AMP', 'FULL_TEXT', 'DEVICE', 'STEPS', 'COMPILED'),
                        help='measure one case in this process (used by the parent run)')
    parser.add_argument('--quick', action='store_true', help='fewer timed steps')
    parser.add_argument('--compile', action='store_true', help='eager against TRAIN.COMPILE, instead of the table')
    parser.add_argument('--config', action='append', choices=[c for c, _, _ in CASES],
                        help='only this config (repeatable; default: all)')
    parser.add_argument('--device', action='append', choices=('cpu', 'cuda'),
                        help='only this device (repeatable; default: the CPU, and CUDA when present)')
    parser.add_argument('--threads', type=int, help='torch threads in each case (default: torch\'s own)')
    parser.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE',
                        help='config overrides for every case, as main.py --opts (e.g. TRAIN.OPTIMIZER.FUSED False)')
    parser.add_argument('--name', help='results file bench/results/NAME.json (default: train_step[_compile])')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        config, batch, amp, full, device, steps, compiled = args.case
        print(__import__('json').dumps(measure(config, int(batch), amp, full == '1', device, int(steps),
                                               compiled == '1', args.opts)))
        return
    results = []
    for config, batch, amp, full, device, steps, compiled in _cases(args):
        threads = ['--threads', str(args.threads)] if args.threads else []
        opts = ['--opts', *args.opts] if args.opts else []
        result = run_child(__file__, ['--case', config, str(batch), amp, str(int(full)), device, str(steps),
                                      str(int(compiled))] + threads + opts)
        result.setdefault('config', config)
        results.append(result)
        print(result, flush=True)
    print(_table(results, args.compile))
    name = args.name or ('train_step_compile' if args.compile else 'train_step')
    print('results:', write_results(name, {'machine': dict(machine(), threads=args.threads or torch.get_num_threads()),
                                           'opts': args.opts, 'results': results}))


if __name__ == '__main__':
    main()

"""Training-step throughput and peak memory: a full UniCL step (forward, loss over the batch, backward, AdamW)
on random images and texts.

    python bench/train_step.py [--quick]

Cases: `unicl_swin_tiny` at 224 px and the tiny test config, fp32 and bf16 autocast on the CPU (bf16 on CUDA
when a GPU is present), texts of prompt length ("a photo of a {ImageNet class}.", ~8-12 tokens) and of all 77
tokens (the causal text encoder stops at the batch's last end-of-text token, so the two differ). Each case
runs in its own process: peak memory is the process's peak RSS on the CPU, `max_memory_allocated` on CUDA.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.common import machine, markdown_table, run_child, write_results  # noqa: E402

CASES = [  # (config, batch on CPU, batch on CUDA)
    ('unicl_swin_tiny', 16, 128),
    ('unicl_tiny', 64, 512),
]


def measure(config_name: str, batch: int, amp: str, full_text: bool, device_name: str, steps: int) -> dict:
    from training.metrics import peak_memory_mb
    from utils.precision import autocast_dtype

    from bench.workload import Workload

    device = torch.device(device_name)
    dtype = autocast_dtype(amp, device)
    seconds = Workload(config_name, device, dtype).step(batch, full_text).seconds(
        warmup=3 if device.type == 'cuda' else 1, steps=steps)
    return {'config': config_name, 'device': device.type, 'amp': str(dtype).replace('torch.', '') if dtype else 'fp32',
            'text': '77 tokens' if full_text else 'prompt', 'batch': batch, 'seconds_per_step': seconds,
            'images_per_sec': batch / seconds, 'peak_memory_mb': peak_memory_mb(device)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--case', nargs=6, metavar=('CONFIG', 'BATCH', 'AMP', 'FULL_TEXT', 'DEVICE', 'STEPS'),
                        help='measure one case in this process (used by the parent run)')
    parser.add_argument('--quick', action='store_true', help='fewer timed steps')
    args = parser.parse_args(argv)
    if args.case:
        config, batch, amp, full, device, steps = args.case
        print(__import__('json').dumps(measure(config, int(batch), amp, full == '1', device, int(steps))))
        return
    devices = [('cpu', 'fp32'), ('cpu', 'bf16')] + ([('cuda', 'bf16')] if torch.cuda.is_available() else [])
    results = []
    for config, cpu_batch, cuda_batch in CASES:
        for device, amp in devices:
            for full in ('0', '1'):
                steps = (2 if args.quick else 4) if config == 'unicl_swin_tiny' and device == 'cpu' else 10
                batch = cuda_batch if device == 'cuda' else cpu_batch
                result = run_child(__file__, ['--case', config, str(batch), amp, full, device, str(steps)])
                result.setdefault('config', config)
                results.append(result)
                print(result, flush=True)
    rows = []
    for r in results:
        if 'error' in r:
            rows.append([r['config'], '-', '-', '-', '-', f"failed: {r['error']}", '-'])
            continue
        base = next((b for b in results if 'error' not in b and b['config'] == r['config'] and b['device'] == 'cpu'
                     and b['amp'] == 'fp32' and b['text'] == r['text']), r)
        rows.append([r['config'], r['device'], r['amp'], r['text'], r['batch'],
                     f"{r['images_per_sec']:.1f} ({r['images_per_sec'] / base['images_per_sec']:.2f}x)",
                     f"{r['peak_memory_mb']:.0f}"])
    print(markdown_table(['config', 'device', 'autocast', 'texts', 'batch', 'images/s (vs CPU fp32)',
                          'peak memory (MB)'], rows))
    print('results:', write_results('train_step', {'machine': machine(), 'results': results}))


if __name__ == '__main__':
    main()

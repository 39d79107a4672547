"""The CUDA benchmark (under 5 minutes on one GPU): UniCL Swin-T training steps in bf16 autocast at the largest
batch that fits, with peak memory and model FLOPs utilization (MFU).

    python bench/gpu.py [--config unicl_swin_tiny] [--peak-tflops 989]

MFU = (FLOPs of one training step, counted by torch's FlopCounterMode: forward + backward of both encoders
and the loss, not the optimizer) / step time / the GPU's dense bf16 peak. The batch search doubles the batch
from 64 until it runs out of memory, then bisects; the timing runs at the largest batch that fit.
`--device cpu --batch 4 --config unicl_tiny` runs the same code on a CPU as a smoke test.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.common import machine, markdown_table, write_results  # noqa: E402
from bench.workload import Workload  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L40S': 362.0, 'A10': 125.0}


def out_of_memory(error: RuntimeError) -> bool:
    """Also the allocation failures that cuBLAS and cuDNN report as plain RuntimeErrors."""
    message = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        sign in message for sign in ('out of memory', 'CUBLAS_STATUS_ALLOC_FAILED', 'CUDNN_STATUS_ALLOC_FAILED'))


def fits(make_step, batch: int) -> bool:
    try:
        make_step(batch)()
        return True
    except RuntimeError as error:
        if not out_of_memory(error):
            raise
        return False
    finally:
        gc.collect()  # the failed step's tensors, before the allocator's cache is released
        torch.cuda.empty_cache()


def largest_batch(make_step, start: int = 64, limit: int = 8192) -> int:
    low, batch = 0, start
    while batch <= limit and fits(make_step, batch):
        low, batch = batch, batch * 2
    if batch > limit:  # everything up to the limit fits: nothing to bisect
        return low
    high = batch
    while high - low > max(8, low // 16):  # bisect to within ~6%
        middle = (low + high) // 2 // 8 * 8
        low, high = (middle, high) if fits(make_step, middle) else (low, middle)
    if low == 0:
        raise RuntimeError(f'not even a batch of {start} fits')
    return low


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='unicl_swin_tiny')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch', type=int, help='skip the search and use this batch')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--peak-tflops', type=float, help='dense bf16 peak of the GPU (default: from its name)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('no CUDA device: this benchmark needs a GPU (or --device cpu for a smoke test)')
    workload = Workload(args.config, device, torch.bfloat16)
    batch = args.batch or largest_batch(workload.step)
    step = workload.step(batch)
    with FlopCounterMode(display=False) as counter:
        step(optimize=False)
    flops = counter.get_total_flops()
    seconds = step.seconds(warmup=3, steps=args.steps)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    result = {'config': args.config, 'device': name, 'batch': batch, 'seconds_per_step': seconds,
              'images_per_sec': batch / seconds, 'tflops_per_step': flops / 1e12,
              'achieved_tflops': flops / seconds / 1e12, 'peak_bf16_tflops': peak,
              'mfu': flops / seconds / 1e12 / peak if peak else None,
              'peak_memory_gb': torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None}
    print(result)
    print(markdown_table(['config', 'device', 'batch', 'images/s', 'TFLOP/s', 'MFU', 'peak memory'],
                         [[args.config, name, batch, f"{result['images_per_sec']:.0f}",
                           f"{result['achieved_tflops']:.1f}", f"{result['mfu']:.1%}" if peak else 'n/a',
                           f"{result['peak_memory_gb']:.1f} GB" if result['peak_memory_gb'] else 'n/a']]))
    print('results:', write_results('gpu', {'machine': machine(), 'result': result}))


if __name__ == '__main__':
    main()

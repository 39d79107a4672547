"""Time and added memory of UniCLLoss against dense references, forward + backward, one process.

    python bench/loss_memory.py [--sizes 4096 16384 32768] [--ours-only 65536]

Three losses on the same inputs (D = 512, L2-normalized, half the labels repeated, logit scale 1/0.07):
  clip         the reference: CLIP's loss as open_clip's ClipLoss computes it in one process: two dense
               B x B logit matrices (image->text and text->image), cross-entropy both ways
  dense_unicl  the previous UniCLLoss: dense logits both ways, logsumexp, group-mean positives
  unicl        loss.UniCLLoss (tiled, exact)
Every (loss, B) runs in a fresh child process, so peak RSS belongs to that case alone: added memory is
the peak RSS (ru_maxrss) minus the RSS once the inputs exist, i.e. everything forward and backward
allocate, gradients included. Time is forward + backward after a small warm-up call, the fastest of
--repeats calls up to B = 16384 (larger cases run once). The machine's 1-minute load average before each
case is recorded: on a shared machine the times are only as good as the quiet they got.

Memory safety: a dense case whose estimated need (quadratic in B, from the smaller sizes measured in the
same run) does not fit in MemAvailable with 3 GB to spare is skipped and reported as not measured, and
each child's data segment is capped below MemAvailable, so an allocation fails instead of waking the
OOM killer on a shared machine. Results go to bench/results/loss_memory.json and a markdown table to
stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.common import machine, run_child, write_results  # noqa: E402
from loss import UniCLLoss  # noqa: E402

LOSS_NAMES = ('clip', 'dense_unicl', 'unicl')
DIM = 512
GIB = 2**30
SPARE_BYTES = 3 * GIB
# Cases up to this batch are timed --repeats times (the fastest counts); larger ones once.
REPEAT_UP_TO = 16384


# ---------------------------------------------------------------------------------------- the losses
def clip_loss(img: Tensor, txt: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """CLIP's loss, computed as open_clip's ClipLoss does in one process (two logit matrices)."""
    targets = torch.arange(img.shape[0])
    logits_per_image = scale * img @ txt.t()
    logits_per_text = scale * txt @ img.t()
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def dense_unicl(img: Tensor, txt: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """The previous UniCLLoss in one process: dense logits both ways, group-mean positives."""
    _, group, counts = torch.unique(labels, return_inverse=True, return_counts=True)

    def group_means(features: Tensor) -> Tensor:
        sums = features.new_zeros(counts.shape[0], features.shape[1]).index_add(0, group, features)
        return (sums / counts.unsqueeze(1).to(features.dtype))[group]

    i2t = torch.logsumexp(scale * img @ txt.t(), dim=1) - scale * (img * group_means(txt)).sum(1)
    t2i = torch.logsumexp(scale * txt @ img.t(), dim=1) - scale * (txt * group_means(img)).sum(1)
    return (i2t.mean() + t2i.mean()) / 2


def build_loss(name: str, tile: int):
    return {'clip': clip_loss, 'dense_unicl': dense_unicl, 'unicl': UniCLLoss(tile_size=tile)}[name]


# ------------------------------------------------------------------------------------- one case (child)
def rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def make_inputs(n: int, scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, DIM, generator=g), dim=1).requires_grad_(True)
    txt = F.normalize(torch.randn(n, DIM, generator=g), dim=1).requires_grad_(True)
    # Half the pairs share a label with a pair of the other half (as image-label data does).
    labels = torch.arange(n)
    labels[n // 2:] = labels[torch.randint(0, n // 2, (n - n // 2,), generator=g)]
    return img, txt, labels, torch.tensor(scale, requires_grad=True)


def run_case(name: str, n: int, scale: float, tile: int, repeats: int) -> Dict[str, float]:
    loss_fn = build_loss(name, tile)
    warm = make_inputs(256, scale)
    loss_fn(*warm).backward()  # thread pool, kernels: not part of the measurement
    del warm
    inputs = make_inputs(n, scale)
    baseline = rss_bytes()
    times = []
    for _ in range(repeats):
        for t in (inputs[0], inputs[1], inputs[3]):
            t.grad = None  # each call allocates its gradients afresh, as the first one did
        start = time.perf_counter()
        loss = loss_fn(*inputs)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {'seconds': min(times), 'all_seconds': times, 'added_bytes': peak - baseline, 'loss': loss.item()}


def child_main(name: str, n: int, args) -> None:
    if args.data_limit > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (args.data_limit, args.data_limit))
    torch.set_num_threads(args.threads)
    repeats = args.repeats if n <= REPEAT_UP_TO else 1
    print(json.dumps(run_case(name, n, args.logit_scale, args.tile, repeats)))


# ------------------------------------------------------------------------------------------ the driver
def mem_available() -> int:
    with open('/proc/meminfo') as f:
        fields = dict(line.split(':', 1) for line in f)
    return int(fields['MemAvailable'].split()[0]) * 1024


def estimated_need(name: str, n: int, done: List[Dict]) -> Optional[int]:
    """Bytes a dense case at ``n`` should need: its largest measured size scaled by (n / size)^2."""
    measured = [r for r in done if r['loss_name'] == name and r.get('added_bytes')]
    if name == 'unicl' or not measured:
        return None
    ref = max(measured, key=lambda r: r['batch'])
    return int(ref['added_bytes'] * (n / ref['batch']) ** 2)


def measure(name: str, n: int, args, done: List[Dict]) -> Dict:
    record: Dict = {'loss_name': name, 'batch': n, 'load_avg_1m_before': os.getloadavg()[0]}
    available = mem_available()
    need = estimated_need(name, n, done)
    if need is not None and need + SPARE_BYTES > available:
        record['skipped'] = f'needs ~{need / GIB:.1f} GiB, {available / GIB:.1f} GiB available'
        return record
    result = run_child(__file__, ['--child', name, str(n), '--threads', str(args.threads), '--tile', str(args.tile),
                                  '--logit-scale', str(args.logit_scale), '--repeats', str(args.repeats),
                                  '--data-limit', str(available - SPARE_BYTES)], timeout=3600)
    if 'error' in result:
        record['failed'] = ' '.join(result['error']) or 'no output'
        return record
    record.update(result)
    return record


def table(records: List[Dict]) -> str:
    by_key = {(r['loss_name'], r['batch']): r for r in records}
    lines = ['| B | loss | time (s) | x clip | added memory (GiB) | x clip | bytes / pair |',
             '| --- | --- | --- | --- | --- | --- | --- |']
    for r in records:
        ref = by_key.get(('clip', r['batch']), {})
        if 'seconds' not in r:
            lines.append(f"| {r['batch']} | {r['loss_name']} | not measured: {r.get('skipped') or r.get('failed')} "
                         f"| | | | |")
            continue
        t_ratio = f"{r['seconds'] / ref['seconds']:.2f}" if 'seconds' in ref else '–'
        m_ratio = f"{r['added_bytes'] / ref['added_bytes']:.3f}" if 'added_bytes' in ref else '–'
        lines.append(f"| {r['batch']} | {r['loss_name']} | {r['seconds']:.2f} | {t_ratio} | "
                     f"{r['added_bytes'] / GIB:.3f} | {m_ratio} | {r['added_bytes'] / r['batch']:,.0f} |")
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[4096, 16384, 32768], help='all three losses')
    parser.add_argument('--ours-only', type=int, nargs='*', default=[65536], help='sizes for UniCLLoss alone')
    parser.add_argument('--losses', nargs='+', choices=LOSS_NAMES, default=list(LOSS_NAMES))
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--tile', type=int, default=0, help='UniCLLoss tile_size (0: automatic)')
    parser.add_argument('--logit-scale', type=float, default=1 / 0.07)
    parser.add_argument('--repeats', type=int, default=2,
                        help=f'timed calls per case up to B = {REPEAT_UP_TO}, the fastest counts (larger: one)')
    parser.add_argument('--child', nargs=2, metavar=('LOSS', 'B'), help=argparse.SUPPRESS)
    parser.add_argument('--data-limit', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child[0], int(args.child[1]), args)
        return

    cases = [(name, n) for n in args.sizes for name in args.losses]
    cases += [('unicl', n) for n in args.ours_only if 'unicl' in args.losses]
    records: List[Dict] = []
    for name, n in cases:
        records.append(measure(name, n, args, records))
        print(json.dumps(records[-1]), flush=True)
    result = {'machine': machine(), 'dim': DIM, 'threads': args.threads, 'tile_size': args.tile,
              'logit_scale': args.logit_scale, 'repeats': args.repeats, 'records': records}
    print(f"\n{result['machine']}, {args.threads} threads, D = {DIM}\n")
    print(table(records))
    print('results:', write_results('loss_memory', result))


if __name__ == '__main__':
    main()

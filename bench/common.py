"""Shared by the benchmarks: the machine they ran on, a child process per case (so each peak memory is its
own), and the table they print."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Dict, List, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> Dict[str, object]:
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    info = {'cpu': cpu, 'cores': os.cpu_count(), 'torch': torch.__version__, 'python': platform.python_version(),
            'threads': torch.get_num_threads(),
            'mem_total_gib': round(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2 ** 30, 1)}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def run_child(script: str, args: Sequence[str], timeout: int = 1800) -> Dict:
    """Run `script` with `args` in a fresh interpreter; it prints one JSON line last."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)  # keep packages found there
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, PYTHONPATH=path))
    if result.returncode != 0:
        return {'error': (result.stderr or result.stdout).strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown_table(header: List[str], rows: List[List[object]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_results(name: str, content: Dict) -> str:
    """Writes `bench/results/NAME.json`, or `$BENCH_RESULTS/NAME.json` where that is set (so that a smoke
    run does not overwrite the measured results)."""
    folder = os.environ.get('BENCH_RESULTS') or os.path.join(ROOT, 'bench', 'results')
    path = os.path.join(folder, f'{name}.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(content, f, indent=1)
    return path

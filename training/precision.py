"""Precision: what AMP_OPT_LEVEL means for autocast.

The one place training takes `autocast_dtype` from (a shared precision module may replace this file)."""
from __future__ import annotations

from typing import Optional

import torch


def autocast_dtype(level: str, device: torch.device) -> Optional[torch.dtype]:
    """AMP_OPT_LEVEL -> autocast dtype. The official O1/O2 (apex) become bf16 on CUDA: bf16 needs no loss
    scaling; '' means the same. CPUs run fp32 unless bf16 is asked for by name."""
    levels = {'O0': None, 'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    if level in levels:
        return levels[level]
    if level in ('', 'O1', 'O2'):
        return torch.bfloat16 if device.type == 'cuda' else None
    raise ValueError(f"AMP_OPT_LEVEL {level!r} is unknown; use O0, O1, O2, bf16, fp16 or ''")


"""Mixed precision: one reading of AMP_OPT_LEVEL shared by training and evaluation, so validation during
training and `evaluate.py` run under the same autocast unless told otherwise."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

# Names that fix the dtype whatever the device. 'none' is evaluate.py's older spelling of fp32.
_NAMED_LEVELS = {'O0': None, 'fp32': None, 'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# The official apex levels (and the empty default) mean "mixed precision where it helps": bf16 on CUDA,
# which needs no loss scaling; CPUs run fp32 unless bf16 is asked for by name.
_DEVICE_LEVELS = ('', 'O1', 'O2')
AMP_LEVELS = tuple(_NAMED_LEVELS) + _DEVICE_LEVELS


def autocast_dtype(level: str, device: torch.device) -> Optional[torch.dtype]:
    """AMP_OPT_LEVEL (or an `--amp` flag) -> autocast dtype, None for fp32."""
    if level in _NAMED_LEVELS:
        return _NAMED_LEVELS[level]
    if level in _DEVICE_LEVELS:
        return torch.bfloat16 if device.type == 'cuda' else None
    raise ValueError(f"AMP_OPT_LEVEL {level!r} is unknown; use one of {', '.join(repr(l) for l in AMP_LEVELS)}")


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """Autocast to `dtype` on `device`; a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)

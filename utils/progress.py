"""Progress bars for long work, drawn only on a terminal: a log redirected to a file (`> run.log 2>&1`)
must stay readable instead of filling with carriage-return bar fragments."""
from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

from tqdm import tqdm

T = TypeVar('T')


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable[T], desc: str, enabled: bool = True, total: Optional[int] = None) -> tqdm:
    """`tqdm` over `iterable` when `enabled` (e.g. rank 0) and stderr is a terminal; else a silent pass-through
    that still supports `set_postfix`."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not (enabled and on_terminal()))

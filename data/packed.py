"""Compact storage for the millions of paths and captions of a large source."""
from __future__ import annotations

from array import array
from typing import Iterable

import numpy as np


class PackedStrings:
    """Strings kept as one UTF-8 blob plus an offset array.

    A Python list of 10M strings costs ~1 GB and, worse, forked loader workers touch every string's
    reference count, copying the pages into each worker; one blob is shared between them untouched.
    """

    def __init__(self, strings: Iterable[str]):
        blob = bytearray()
        ends = array('q')
        for s in strings:
            blob += s.encode('utf-8')
            ends.append(len(blob))
        self._blob = bytes(blob)
        self._ends = np.frombuffer(ends, dtype=np.int64).copy()

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        start = int(self._ends[index - 1]) if index > 0 else 0
        return self._blob[start:int(self._ends[index])].decode('utf-8')

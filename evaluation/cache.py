"""On-disk cache of frozen features, keyed by everything that determines them: the checkpoint's bytes, the
config, the image transform, the amp dtype and the image list (paths, labels, sizes, modification times).
A second evaluation of the same checkpoint on the same data skips extraction; a changed checkpoint, config,
transform or folder gets a new key and is recomputed."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from utils.checkpoint import save_atomic, sha256_file
from utils.distributed import all_reduce_sum, get_rank, get_world_size

logger = logging.getLogger(__name__)


def _file_fingerprint(path: str) -> list:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def feature_key(checkpoint_sha256: str, config_dump: str, transform: Callable, amp_dtype: Optional[torch.dtype],
                paths: Sequence[str], labels: Sequence[int]) -> str:
    """The cache key: a SHA-256 over all the inputs of feature extraction."""
    description = {
        'checkpoint': checkpoint_sha256,
        'config': config_dump,
        'transform': repr(transform),
        'amp': str(amp_dtype),
        'images': [_file_fingerprint(p) + [int(y)] for p, y in zip(paths, labels)],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """`<directory>/<key>.pt` files holding `{'features': [N, D] tensor}`; `directory=None` disables caching.

    Every rank decides together whether to use a cached file (all of them must see it), so under torchrun
    ranks never disagree on whether to run the collective extraction. Rank 0 writes, atomically.
    """

    def __init__(self, directory: Optional[str]):
        self.directory = directory
        self._checkpoint_hashes: Dict[str, str] = {}

    def checkpoint_sha256(self, path: str) -> str:
        if path not in self._checkpoint_hashes:
            self._checkpoint_hashes[path] = sha256_file(path)
        return self._checkpoint_hashes[path]

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f'{key}.pt')

    def _load(self, key: str) -> Optional[Tensor]:
        try:
            return torch.load(self._path(key), map_location='cpu', weights_only=True)['features']
        except FileNotFoundError:
            return None
        except Exception as e:  # a damaged file is recomputed, not trusted
            logger.warning(f'ignoring unreadable feature cache {self._path(key)}: {e}')
            return None

    def get_or_compute(self, key: str, compute: Callable[[], Tensor], device: torch.device,
                       what: str = 'features') -> Tensor:
        if self.directory is None:
            return compute()
        cached = self._load(key)
        everywhere = cached is not None
        if get_world_size() > 1:
            missing = all_reduce_sum(torch.tensor([0.0 if everywhere else 1.0], device=device)).item()
            everywhere = missing == 0
        if everywhere:
            logger.info(f'{what}: cached ({self._path(key)})')
            return cached.to(device)
        features = compute()
        if get_rank() == 0:
            save_atomic({'features': features.cpu()}, self._path(key))
            logger.info(f'{what}: saved to the cache {self._path(key)}')
        return features

"""Helpers shared by the tests/test_data_*.py files (no tests here): tiny built-in data and configs."""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional

import torch

from configs import load_config
from data import build_train_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, 'configs', 'unicl_tiny.yaml')

# The three kinds of source of the built-in data, as DATA.SOURCES entries relative to its folder.
LABELS = {'TYPE': 'imagefolder', 'PATH': 'labels', 'NAME': 'shapes'}
SHARDS = {'TYPE': 'webdataset', 'PATH': 'captions/shards/captions-{00000..00001}.tar', 'NAME': 'shards'}
TABLE = {'TYPE': 'tsv', 'PATH': 'captions/captions.tsv', 'NAME': 'table'}


def copy_of(tiny_data: str, tmp_path) -> str:
    out = str(tmp_path / 'data')
    shutil.copytree(tiny_data, out)
    return out


def data_config(data_path: str, sources: Optional[List[Dict]] = None, batch_size: int = 8, num_workers: int = 0,
                **data_keys):
    """The tiny model config with 32-px images and the given DATA keys."""
    config = load_config(TINY_CONFIG, freeze=False)
    config.DATA.DATA_PATH = data_path
    config.DATA.IMG_SIZE = 32
    config.DATA.BATCH_SIZE = batch_size
    config.DATA.NUM_WORKERS = num_workers
    config.DATA.SOURCES = list(sources or [])
    for key, value in data_keys.items():
        setattr(config.DATA, key, value)
    config.freeze()
    return config


def epoch_batches(loader, epoch: Optional[int] = None) -> List[tuple]:
    """All (images, tokens, labels, info) batches of one epoch."""
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader.iter_with_info())


def loader_for(config, tokenizer, rank: int = 0, world_size: int = 1):
    return build_train_loader(config, tokenizer, rank, world_size)


def same_batches(a: List[tuple], b: List[tuple]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1]['input_ids'], y[1]['input_ids']) and torch.equal(x[2], y[2])
        and x[3]['where'] == y[3]['where'] for x, y in zip(a, b))

"""Checkpoint files: safe loading, downloading, atomic writing, checked loading of a state dict, and the
training checkpoints of a run folder. Nothing here knows the model: layouts are model/checkpoint.py's.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import types
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

StateDict = Dict[str, torch.Tensor]
logger = logging.getLogger(__name__)

DEFAULT_CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'unicl')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked, with the reason."""


# ----------------------------------------------------------------------------------------------------
# Reading files safely
# ----------------------------------------------------------------------------------------------------
def _allowed_global(module: str, name: str) -> bool:
    # What official training checkpoints hold besides plain containers: tensors, storages, dtypes,
    # OrderedDict, set, and the yacs CfgNode of their `config` entry.
    if module in ('collections', 'builtins', '__builtin__'):
        return name in ('OrderedDict', 'set', 'frozenset')
    if module == 'yacs.config':
        return name == 'CfgNode'
    if module == 'torch._utils':
        return name in ('_rebuild_tensor_v2', '_rebuild_parameter')
    if module == 'torch':
        return name.endswith('Storage') or isinstance(getattr(torch, name, None), torch.dtype)
    return False


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _allowed_global(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'{module}.{name} is not on the allow-list')


# torch.load takes a "pickle module"; this one only differs in the Unpickler it hands out.
_allow_list_pickle = types.SimpleNamespace(Unpickler=_AllowListUnpickler, load=pickle.load,
                                           __name__='unicl_allow_list_pickle')


def safe_load(path: str) -> Any:
    """`torch.load` that never runs code from the file.

    `weights_only=True` first. It refuses yacs' `CfgNode` (a dict subclass) that official training
    checkpoints keep under `config`, so those go through an unpickler that admits only tensors,
    storages, dtypes, OrderedDict/set and CfgNode; anything else is refused with its name.
    """
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        return torch.load(path, map_location='cpu', weights_only=False, pickle_module=_allow_list_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'{path}: refused to unpickle ({e}); a checkpoint may hold tensors, plain containers and a '
            f'yacs CfgNode only. Re-save just the weights, torch.save({{"model": state_dict}}, path), '
            f'where you trust the file.') from None


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_source(source: str, cache_dir: str = DEFAULT_CACHE, sha256: Optional[str] = None) -> str:
    """A local path for `source`: the path itself, or an http(s) URL downloaded once into `cache_dir`.

    With `sha256` the file is verified (a cached file that does not match is downloaded again).
    """
    if urllib.parse.urlparse(source).scheme in ('http', 'https'):
        path = os.path.join(cache_dir, os.path.basename(urllib.parse.urlparse(source).path) or 'checkpoint.pth')
        if not os.path.isfile(path) or (sha256 and sha256_file(path) != sha256):
            os.makedirs(cache_dir, exist_ok=True)
            logger.info(f'downloading {source} to {path}')
            with urllib.request.urlopen(source) as response:
                write_atomic(path, lambda f: shutil.copyfileobj(response, f))
    else:
        path = source
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {source}')
    if sha256 and sha256_file(path) != sha256:
        raise CheckpointError(f'{path}: sha256 is {sha256_file(path)}, expected {sha256}')
    return path


# ----------------------------------------------------------------------------------------------------
# Writing files atomically
# ----------------------------------------------------------------------------------------------------
def write_atomic(path: str, write) -> None:
    """Write through `write(file)` into a temp file beside `path`, fsync, then rename over `path`.

    A reader (or a resumed run after SIGKILL) sees the old file or the new one, never half of one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def save_atomic(obj: Any, path: str) -> None:
    """`torch.save(obj, path)`, atomically (see `write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))



# ----------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------
def extract_state_dict(obj: Any, source: str = 'checkpoint') -> StateDict:
    """The model state dict inside a loaded file: `obj['model']`, `obj['state_dict']`, or `obj` itself."""
    for key in ('model', 'state_dict'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f'{source}: no state dict found (expected {{"model": state_dict}} or a state dict)')
    return dict(obj)


@dataclass
class LoadReport:
    source: str
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)


def _shape_mismatches(state_dict: StateDict, model_sd: StateDict) -> List[str]:
    return [f'{k}: {tuple(v.shape)} in the file, {tuple(model_sd[k].shape)} in the model'
            for k, v in state_dict.items() if k in model_sd and v.shape != model_sd[k].shape]


def load_state_dict_checked(model: nn.Module, state_dict: StateDict, source: str, strict: bool) -> LoadReport:
    """Load `state_dict` (already in `model`'s layout) and report missing and unexpected keys.

    A shape mismatch is always an error (a Swin-B file with a Swin-T config, say) and names the first
    mismatched keys; with `strict`, so is a missing key, since it would leave random weights behind.
    """
    model_sd = model.state_dict()
    mismatched = _shape_mismatches(state_dict, model_sd)
    if mismatched:
        raise CheckpointError(f'{source} does not fit this model ({len(mismatched)} shapes differ; '
                              f'check the config): ' + '; '.join(mismatched[:3]))
    report = LoadReport(source,
                        missing=sorted(set(model_sd) - set(state_dict)),
                        unexpected=sorted(set(state_dict) - set(model_sd)))
    if strict and report.missing:
        raise CheckpointError(f'{source} lacks {len(report.missing)} weights of this model: '
                              + ', '.join(report.missing[:5]))
    model.load_state_dict({k: v for k, v in state_dict.items() if k in model_sd}, strict=False)
    for kind, keys in (('missing', report.missing), ('unexpected', report.unexpected)):
        if keys:
            logger.warning(f'{source}: {len(keys)} {kind} keys: {", ".join(keys[:10])}'
                           + (' ...' if len(keys) > 10 else ''))
    return report


class CheckpointManager:
    """Training checkpoints in one folder, `checkpoint_<step>.pth`, the newest `keep` of them kept.

    Files are written atomically, so every listed file is whole; `load_latest` still falls back to an
    older file if the newest cannot be read (a disk that lost data, a file copied in by hand).
    """

    _NAME = re.compile(r'^checkpoint_(\d+)\.pth$')

    def __init__(self, directory: str, keep: int = 3):
        self.directory = directory
        self.keep = keep

    def checkpoints(self) -> List[str]:
        """Paths of the checkpoints present, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = [(int(m.group(1)), name) for name in os.listdir(self.directory) if (m := self._NAME.match(name))]
        return [os.path.join(self.directory, name) for _, name in sorted(found)]

    def save(self, state: Dict[str, Any], step: int) -> str:
        """Write `state` as the checkpoint of `step`; then delete the oldest beyond `keep`, never this one
        (checkpoints of higher steps may be left from an earlier attempt that went further)."""
        path = os.path.join(self.directory, f'checkpoint_{step:09d}.pth')
        save_atomic(state, path)
        self._remove_stale_temp_files()
        others = [p for p in self.checkpoints() if p != path]
        later = [p for p in others if self._step(p) > step]
        if later:
            logger.warning(f'{len(later)} checkpoint(s) in {self.directory} are of later steps than {step}, '
                           f'e.g. {later[-1]}; resuming picks the highest step')
        for old in others[:max(len(others) - (self.keep - 1), 0)] if self.keep > 0 else []:
            os.unlink(old)
        return path

    @classmethod
    def _step(cls, path: str) -> int:
        return int(cls._NAME.match(os.path.basename(path)).group(1))

    def _remove_stale_temp_files(self) -> None:
        # A run killed while writing leaves its temp file; the one writer (rank 0) has just finished its own.
        for name in os.listdir(self.directory):
            if name.startswith('.checkpoint_') and name.endswith('.tmp'):
                os.unlink(os.path.join(self.directory, name))

    def load_latest(self) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """(path, state) of the newest readable checkpoint, or (None, None)."""
        for path in reversed(self.checkpoints()):
            try:
                return path, safe_load(path)
            except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
                logger.warning(f'cannot read {path} ({e}); trying an older checkpoint')
        return None, None


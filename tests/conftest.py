"""Shared fixtures: the tiny config, its model and tokenizer, and small generated image folders."""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from typing import Callable, List, NamedTuple, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from configs import load_config
from data.builtin import generate
from model import build_tokenizer, build_unicl_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, 'configs', 'unicl_tiny.yaml')


def child_env(**variables: str) -> dict:
    """The environment for a child Python process: the project first on PYTHONPATH, what was there kept."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
    return dict(os.environ, PYTHONPATH=path, **variables)


def run_ranks(fn: Callable, args: Sequence = (), nprocs: int = 2, timeout: float = 600) -> None:
    """fn(rank, *args) in `nprocs` forked processes, as mp.spawn runs it; an exception in any is raised here,
    and ranks still running after `timeout` seconds are killed and fail the test (a deadlock must not hang
    the suite).

    Forked, not spawned: a child starts with this process's imports, where a spawned one spends 8-10 s of the
    suite's 2 cores importing torch, torchvision and timm again."""
    ranks = torch.multiprocessing.start_processes(_one_thread, args=(fn, tuple(args)), nprocs=nprocs,
                                                  start_method='fork', join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ranks.processes:
                process.kill()
            raise AssertionError(f'{fn.__name__}: ranks still running after {timeout} s')


def _one_thread(rank: int, fn: Callable, args: tuple) -> None:
    # The ranks share the cores; and a forked child must not use its parent's OpenMP pool (it would wait on it
    # forever).
    torch.set_num_threads(1)
    fn(rank, *args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def run_like_torchrun(entry: Callable[[List[str]], object], argv: Sequence[str], nprocs: int = 2) -> None:
    """A script's `main(argv)` in `nprocs` forked ranks with the environment torchrun gives its workers, so the
    script joins the process group itself; a rank's non-zero exit code (an int `main` returns) fails the call."""
    run_ranks(_torchrun_worker, args=(entry, list(argv), nprocs, free_port()), nprocs=nprocs)


def _torchrun_worker(rank: int, entry: Callable, argv: List[str], world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR='localhost', MASTER_PORT=str(port))
    code = entry(argv)
    if isinstance(code, int) and code:
        raise SystemExit(code)


class CommandRun(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_command(entry: Callable[[List[str]], object], argv: Sequence[str], timeout: float = 300) -> CommandRun:
    """A script's command line, `sys.exit(entry(argv))`, in a forked process whose stdout and stderr are files
    (as when a user redirects the log): its exit code and what it printed. Forked, not started afresh: the
    script's imports cost 8-10 s of the suite's 2 cores in a new interpreter."""
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        process = torch.multiprocessing.get_context('fork').Process(
            target=_command_child, args=(entry, list(argv), out.fileno(), err.fileno()))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise AssertionError(f'{argv} ran for more than {timeout} s')
        out.seek(0)
        err.seek(0)
        return CommandRun(process.exitcode, out.read(), err.read())


def _command_child(entry: Callable, argv: List[str], out: int, err: int) -> None:
    torch.set_num_threads(1)  # a forked child must not use its parent's OpenMP pool (it would wait on it forever)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout, sys.stderr = open(1, 'w', closefd=False), open(2, 'w', closefd=False)
    try:
        code = entry(argv)
        code = code if isinstance(code, int) else 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (stop.code is not None)
    except BaseException:  # as the interpreter reports an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not the parent's exit handlers (pytest's among them)


def tiny_config(*opts: str):
    return load_config(TINY_CONFIG, list(opts))


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> str:
    """The built-in dataset at tiny scale (with the zip layout); read-only: copy it before changing it."""
    out = str(tmp_path_factory.mktemp('builtin'))
    generate(out, 'tiny', seed=0, with_zip=True)
    return out


@pytest.fixture(scope='session')
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope='session')
def tokenizer(tiny_cfg):
    return build_tokenizer(tiny_cfg.MODEL.TEXT_ENCODER)


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return build_unicl_model(tiny_cfg).eval()


@pytest.fixture
def checkpoint(tmp_path, tiny_model) -> str:
    """The tiny model, its weights spread a little (so feature rankings are not ties), saved as a release."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / 'tiny.pth')
    torch.save({'model': tiny_model.state_dict()}, path)
    return path


COLORS = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (30, 40, 220),
          'yellow': (230, 220, 30), 'purple': (140, 30, 160), 'orange': (240, 140, 20)}


def make_image_folder(root: str, per_class: int = 3, extra: int = 1, size: int = 72, seed: int = 0) -> str:
    """Six colour classes of noisy solid images, `extra` more images in the first class; writes
    classnames.txt in sorted-folder order."""
    rng = np.random.default_rng(seed)
    names = sorted(COLORS)
    for c, name in enumerate(names):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class + (extra if c == 0 else 0)):
            pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 20, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, name, f'{i}.png'))
    with open(os.path.join(root, 'classnames.txt'), 'w') as f:
        f.write('\n'.join(names) + '\n')
    return root


@pytest.fixture
def color_folder(tmp_path):
    return make_image_folder(str(tmp_path / 'colors'))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)

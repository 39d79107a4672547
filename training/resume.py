"""Resuming: which checkpoint every rank loads, and where a run continues when its batch layout changed.

A restart may come with fewer processes (a node lost, a smaller allocation), or with BATCH_SIZE or
ACCUMULATION_STEPS changed to keep the global batch. The run continues by samples seen: the epoch stays,
the samples already trained in it convert to steps of the new global batch, and the LR schedule (warmup,
total steps, the LR scaled to the global batch) is the config's for the new layout, as if the run had
started with it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import yaml

from utils.checkpoint import CheckpointError
from utils.distributed import all_gather_object, broadcast_object, get_rank, get_world_size

logger = logging.getLogger('unicl.train')

ROUND_DOWN_KEY = 'TRAIN.RESUME_ROUND_DOWN'

State = Dict[str, Any]


class ResumeError(RuntimeError):
    """A checkpoint that cannot be continued as configured; the message names the option that allows it."""


def load_agreed(choose: Callable[[], Tuple[Optional[str], Optional[State]]],
                load: Callable[[str], State]) -> Tuple[Optional[str], Optional[State]]:
    """Rank 0 runs `choose` (-> (path, state) or (None, None)); every other rank loads that same path.

    Ranks must not pick their own newest checkpoint: on node-local or lagging storage their folders
    differ, and DDP would then train replicas that started from different weights. A rank that cannot
    read the chosen file stops every rank with an error naming it."""
    if get_world_size() == 1:
        return choose()
    path, state = choose() if get_rank() == 0 else (None, None)
    path = broadcast_object(path)
    error = None
    if path is not None and get_rank() != 0:
        try:
            state = load(path)
        except Exception as e:  # noqa: BLE001 - reported below, on every rank
            error = f'{type(e).__name__}: {e}'
    failed = {rank: message for rank, message in enumerate(all_gather_object(error)) if message}
    if failed:
        first = min(failed)
        raise CheckpointError(f'rank(s) {sorted(failed)} cannot read {path}, the checkpoint rank 0 resumes from '
                              f'(rank {first}: {failed[first]}); every rank must see the run folder')
    return path, state


@dataclass(frozen=True)
class BatchLayout:
    """How a run splits its global batch, and the optimizer steps of an epoch that follow from it."""
    world_size: int
    batch_size: int  # per process and micro-batch (DATA.BATCH_SIZE)
    accumulation: int  # micro-batches per optimizer step
    steps_per_epoch: int  # optimizer steps

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulation

    def describe(self) -> str:
        return (f'{self.world_size} process(es) x BATCH_SIZE {self.batch_size} x ACCUMULATION_STEPS '
                f'{self.accumulation} = global batch {self.global_batch}, {self.steps_per_epoch} steps per epoch')

    def as_dict(self) -> Dict[str, int]:
        return {'world_size': self.world_size, 'batch_size': self.batch_size, 'accumulation': self.accumulation,
                'steps_per_epoch': self.steps_per_epoch}


def saved_layout(state: State) -> BatchLayout:
    """The layout a training checkpoint was written with (derived from its config and data position when
    it predates the `layout` entry)."""
    if 'layout' in state:
        return BatchLayout(**state['layout'])
    config = yaml.safe_load(state['config'])
    accumulation = max(int(config['TRAIN']['ACCUMULATION_STEPS']), 1)
    return BatchLayout(int(state['world_size']), int(config['DATA']['BATCH_SIZE']), accumulation,
                       int(state['data']['layout']['steps_per_epoch']) // accumulation)


def convert_step(epoch: int, step: int, saved: BatchLayout, now: BatchLayout, round_down: bool) -> Tuple[int, str]:
    """(the step to continue after, in `now`'s steps, a log line) for a checkpoint at optimizer `step`
    (steps done since the start) in `epoch`, written with `saved`. Raises ResumeError when the samples
    trained in the epoch are not a whole number of `now`'s steps, unless `round_down` (which trains the
    samples of the part step again)."""
    in_epoch = step - epoch * saved.steps_per_epoch
    if not 0 <= in_epoch < saved.steps_per_epoch:
        raise ResumeError(f'checkpoint at step {step} of epoch {epoch} does not fit its own layout '
                          f'({saved.describe()})')
    samples = in_epoch * saved.global_batch
    new_in_epoch = min(samples // now.global_batch, now.steps_per_epoch - 1)
    repeated = samples - new_in_epoch * now.global_batch
    if repeated and not round_down:
        raise ResumeError(
            f'the checkpoint is {samples} samples into epoch {epoch} ({saved.describe()}); with {now.describe()} '
            f'that is not a whole number of steps. Set {ROUND_DOWN_KEY} True to continue at step {new_in_epoch} '
            f'of the epoch, training its last {repeated} samples again, or resume with a layout whose global '
            f'batch divides {samples}')
    new_step = epoch * now.steps_per_epoch + new_in_epoch
    message = (f'the batch layout changed: {saved.describe()} -> {now.describe()}. Epoch {epoch} continues '
               f'{samples} samples in, after step {new_in_epoch}/{now.steps_per_epoch} (global step {new_step}, '
               f'was {step})' + (f', training {repeated} samples again ({ROUND_DOWN_KEY})' if repeated else '')
               + '; the LR schedule is the config\'s for the new global batch')
    return new_step, message

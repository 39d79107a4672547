"""Scalars of a finished run, read back from the tensorboard event files that main.py writes."""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Tuple

Series = List[Tuple[int, float]]  # (step or epoch, value), in order


def read_scalars(run_dir: str) -> Dict[str, Series]:
    """Every scalar tag under `run_dir/tensorboard` (all event files, a resumed run's included); when a
    step was logged twice (a run resumed past it), the later value wins."""
    # Imported here: tensorboard's event reader is slow to import and only reports need it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(os.path.join(run_dir, 'tensorboard', 'events.out.tfevents.*')),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f'no tensorboard event files under {run_dir}/tensorboard')
    merged: Dict[str, Dict[int, float]] = {}
    for path in files:
        events = EventAccumulator(path, size_guidance={'scalars': 0})
        events.Reload()
        for tag in events.Tags()['scalars']:
            merged.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in merged.items()}

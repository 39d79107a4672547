"""Resuming: a loader restored from state_dict() continues with exactly the batches of an uninterrupted run."""
from __future__ import annotations

import io
import json

import torch

from tests.conftest import run_ranks
from tests.test_data_fixtures import (LABELS, SHARDS, TABLE, data_config, epoch_batches, loader_for,
                                      same_batches)
from utils.distributed import destroy_distributed


def roundtrip(state):
    """Through JSON and torch.save / weights_only loading, as a checkpoint would carry it."""
    buffer = io.BytesIO()
    torch.save(json.loads(json.dumps(state)), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_mid_epoch_and_across_epochs(tiny_data, tokenizer):
    config = data_config(tiny_data, [LABELS, SHARDS, TABLE], batch_size=4, num_workers=2, EPOCH_SAMPLES=44,
                         SHUFFLE_BUFFER=4)
    reference = loader_for(config, tokenizer)
    epochs = [epoch_batches(reference, e) for e in range(2)]
    assert len(epochs[0]) == 11

    interrupted = loader_for(config, tokenizer)
    interrupted.set_epoch(0)
    head = []
    for batch in interrupted.iter_with_info():
        head.append(batch)
        if len(head) == 5:
            state = roundtrip(interrupted.state_dict())  # taken while batch 5 trains
            break
    assert state['epoch'] == 0 and state['step'] == 5

    resumed = loader_for(config, tokenizer)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # same epoch: keeps the position
    assert resumed.start_step == 5
    tail = epoch_batches(resumed)
    assert same_batches(head + tail, epochs[0])
    assert same_batches(epoch_batches(resumed, 1), epochs[1])  # streams carried on across the epoch boundary

    at_epoch_end = loader_for(config, tokenizer)
    at_epoch_end.load_state_dict(roundtrip(reference.state_dict()))  # after epoch 1
    reference_epoch2 = epoch_batches(reference, 2)
    assert same_batches(epoch_batches(at_epoch_end, 2), reference_epoch2)


def test_resume_map_sources_with_other_worker_count(tiny_data, tokenizer):
    config = data_config(tiny_data, [LABELS, TABLE], batch_size=4, num_workers=2)
    reference = epoch_batches(loader_for(config, tokenizer), 0)
    partial = loader_for(config, tokenizer)
    batches = partial.iter_with_info()
    head = [next(batches) for _ in range(3)]
    state = partial.state_dict()
    resumed = loader_for(data_config(tiny_data, [LABELS, TABLE], batch_size=4, num_workers=0), tokenizer)
    resumed.load_state_dict(state)  # warns: another layout; map-style sources still continue exactly
    assert same_batches(head + epoch_batches(resumed, 0), reference)


def test_iterating_a_finished_epoch_starts_the_next(tiny_data, tokenizer):
    loader = loader_for(data_config(tiny_data, [LABELS], batch_size=8), tokenizer)
    first = epoch_batches(loader)
    second = epoch_batches(loader)
    assert loader.epoch == 1 and len(first) == len(second) == 3 and not same_batches(first, second)


def _gather_state(rank: int, world_size: int, init_file: str, data: str, result: str) -> None:
    from data import build_train_loader
    from model import build_tokenizer
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        config = data_config(data, [SHARDS], batch_size=2)
        loader = build_train_loader(config, build_tokenizer(config.MODEL.TEXT_ENCODER), rank, world_size)
        batches = loader.iter_with_info()
        next(batches)
        torch.save(loader.state_dict(), result.format(rank))
    finally:
        destroy_distributed()


def test_state_dict_gathers_stream_positions_of_all_ranks(tiny_data, tokenizer, tmp_path):
    """Under torch.distributed any rank's state_dict holds every rank's stream positions."""
    result = str(tmp_path / 'rank{}.pt')
    run_ranks(_gather_state, args=(2, str(tmp_path / 'init'), tiny_data, result))
    states = [torch.load(result.format(rank), weights_only=False) for rank in (0, 1)]
    assert states[0]['stream_positions'] == states[1]['stream_positions']
    assert set(states[0]['stream_positions']) == {'0', '1'}
    # rank 1 restores its own positions from rank 0's saved state
    loader = loader_for(data_config(tiny_data, [SHARDS], batch_size=2), tokenizer, rank=1, world_size=2)
    loader.load_state_dict(states[0])
    assert loader.state_dict()['stream_positions']['1'] == states[0]['stream_positions']['1']


def test_stream_positions_of_another_format_restart_the_stream(tiny_data, tokenizer, caplog):
    """A position saved when shards were dealt to slots once (format 1) means something else now."""
    config = data_config(tiny_data, [SHARDS], batch_size=4)
    loader = loader_for(config, tokenizer)
    next(loader.iter_with_info())
    state = roundtrip(loader.state_dict())
    assert state['layout']['stream_positions'] == {'shards': 2}
    state['layout']['stream_positions'] = {'shards': 1}
    resumed = loader_for(config, tokenizer)
    resumed.load_state_dict(state)
    assert resumed.state_dict()['stream_positions']['0'] == {'shards': [None]}
    assert 'restarts from a fresh shard order' in caplog.text

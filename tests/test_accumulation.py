"""TRAIN.ACCUMULATION_MODE features (GradCache): the contrastive batch spans all accumulated micro-batches,
with the gradients of one big-batch step, in one process and in two; the re-run replays dropout/drop-path."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.conftest import run_ranks
from tests.test_train import _trainer
from utils.distributed import destroy_distributed

MICRO = 2  # samples per micro-batch and rank


def _float64_trainer(data, out, *opts, rank=0, world_size=1):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # before the model (and DDP's buckets) exist
    try:
        trainer = _trainer(data, out, 'TRAIN.CLIP_GRAD', '0.0', 'DATA.BATCH_SIZE', str(MICRO), *opts,
                           rank=rank, world_size=world_size)
    finally:
        torch.set_default_dtype(default)
    trainer.build_optimization(steps_per_epoch=10)
    return trainer


def _gradients(trainer, batches):
    seen = {}
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}))
    trainer.optimizer_step([(images.double(), tokens, labels) for images, tokens, labels in batches])
    return seen


def _split(batch, parts):
    images, tokens, labels = batch
    size = images.shape[0] // parts
    return [(images[i * size:(i + 1) * size], {k: v[i * size:(i + 1) * size] for k, v in tokens.items()},
             labels[i * size:(i + 1) * size]) for i in range(parts)]


@pytest.fixture
def global_batch(tiny_data, tmp_path):
    """8 samples with a positive pair that spans micro-batches (and ranks)."""
    trainer = _trainer(tiny_data, str(tmp_path / 'data'))
    trainer.build_training()
    images, tokens, labels = next(iter(trainer.loader))
    labels = labels.clone()
    labels[5] = labels[1]
    return images, tokens, labels


def _assert_same(got, expected):
    assert set(got) == set(expected) and len(got) > 10
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-9, atol=1e-12), name


def test_features_mode_step_equals_one_big_batch_step(tiny_data, tmp_path, global_batch):
    big = _float64_trainer(tiny_data, str(tmp_path / 'big'), 'DATA.BATCH_SIZE', '8')
    expected = _gradients(big, [global_batch])
    cached = _float64_trainer(tiny_data, str(tmp_path / 'cached'), 'TRAIN.ACCUMULATION_STEPS', '4',
                              'TRAIN.ACCUMULATION_MODE', 'features')
    _assert_same(_gradients(cached, _split(global_batch, 4)), expected)
    # The official mode differs: each micro-batch is its own contrastive batch.
    official = _float64_trainer(tiny_data, str(tmp_path / 'official'), 'TRAIN.ACCUMULATION_STEPS', '4')
    got = _gradients(official, _split(global_batch, 4))
    assert not torch.allclose(got['image_projection'], expected['image_projection'], rtol=1e-3)


def _rank_step(rank, world_size, mode, data, out, init_file, result_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    trainer = _float64_trainer(data, out, 'TRAIN.ACCUMULATION_STEPS', '2', 'TRAIN.ACCUMULATION_MODE', mode,
                               rank=rank, world_size=world_size)
    batch = torch.load(os.path.join(out, 'global_batch.pt'), weights_only=True)
    if mode == 'features':  # rank r: micro-batches 2r and 2r + 1 of 2 samples
        micro = _split(batch, 4)[2 * rank:2 * rank + 2]
    else:  # rank r's 4 samples twice: the DDP no_sync path must average the two, not add them
        micro = _split(batch, 2)[rank:rank + 1] * 2
    torch.save(_gradients(trainer, micro), result_file.format(rank))
    destroy_distributed()


@pytest.mark.parametrize('mode', ['features', 'gradients'])
def test_two_processes_accumulating_equal_one_big_batch_step(tiny_data, tmp_path, global_batch, mode):
    """features: 2 ranks x 2 micro-batches of 2 = one step on the 8 samples. gradients (official): each
    rank's 4 samples twice, accumulated under DDP no_sync = one step on the 8 samples (the same global
    contrastive batch of 2 x 4, since each micro-batch is one)."""
    out = str(tmp_path)
    torch.save(global_batch, os.path.join(out, 'global_batch.pt'))
    expected = _gradients(_float64_trainer(tiny_data, str(tmp_path / 'big'), 'DATA.BATCH_SIZE', '8'), [global_batch])
    result = os.path.join(out, 'rank{}.pt')
    run_ranks(_rank_step, args=(2, mode, tiny_data, out, str(tmp_path / 'init'), result), nprocs=2)
    for rank in range(2):
        _assert_same(torch.load(result.format(rank), weights_only=True), expected)


def test_features_mode_replays_dropout_and_drop_path(tiny_data, tmp_path, global_batch):
    trainer = _trainer(tiny_data, str(tmp_path), 'DATA.BATCH_SIZE', str(MICRO), 'TRAIN.ACCUMULATION_STEPS', '2',
                       'TRAIN.ACCUMULATION_MODE', 'features', 'MODEL.IMAGE_ENCODER.DROP_PATH_RATE', '0.5',
                       'MODEL.IMAGE_ENCODER.DROP_RATE', '0.3')
    trainer.build_optimization(steps_per_epoch=10)
    outputs = []
    trainer.model.image_encoder.norm.register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
    batch = _split(global_batch, 4)[0]
    trainer.model.train()
    trainer.optimizer_step([batch, batch])
    first_a, first_b, again_a, again_b = outputs
    assert not torch.equal(first_a, first_b)  # the same images, other masks: dropout and drop-path are active
    assert torch.equal(first_a, again_a) and torch.equal(first_b, again_b)


def test_unknown_accumulation_mode(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="ACCUMULATION_MODE 'big'.*features.*gradients"):
        _trainer(tiny_data, str(tmp_path), 'TRAIN.ACCUMULATION_MODE', 'big')

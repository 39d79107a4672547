"""Locked towers (MODEL.LOCK_*, model/lock.py): a locked group's weights stay bit-identical through optimizer
steps and are not in the optimizer, its modules stay in evaluation mode under model.train(), the rest trains;
DDP, feature accumulation and resuming work with frozen parameters, and a resume under other locks is refused."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import main
from configs import ConfigError
from model import tokenize
from model.lock import apply_locks, check_same_trainable, image_tower_groups, lock_groups, text_tower_groups
from tests.conftest import TINY_CONFIG, tiny_config
from training import Trainer
from utils.distributed import destroy_distributed

FAST = ['DATA.IMG_SIZE', '32', 'MODEL.IMAGE_ENCODER.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '0',
        'DATA.EPOCH_SAMPLES', '16', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0', 'TRAIN.WARMUP_EPOCHS', '0',
        'TRAIN.BASE_LR', '0.02', 'MODEL.IMAGE_ENCODER.DROP_PATH_RATE', '0.1',
        'DATA.SOURCES', "[{'TYPE': 'imagefolder', 'PATH': 'labels'}, {'TYPE': 'tsv', 'PATH': 'captions/captions.tsv'}]"]


def _trainer(data: str, out: str, *opts: str) -> Trainer:
    args = main.parse_option(['--cfg', TINY_CONFIG, '--data-path', data, '--output', out, '--opts', *FAST, *opts])
    torch.manual_seed(0)
    return Trainer(main.build_run_config(args), 0, 1, torch.device('cpu'))


def _batch(trainer: Trainer, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    texts = [f'a photo of shape {i}' for i in range(8)]
    tokens = tokenize(trainer.tokenizer, texts, trainer.config.MODEL.TEXT_ENCODER.CONTEXT_LENGTH)
    return images, tokens, torch.tensor([0, 1, 2, 3, 0, 1, 9, 10])


def _steps(trainer: Trainer, count: int = 3) -> None:
    trainer.model.train()
    for step in range(count):
        loss, grad_norm, _ = trainer.optimizer_step([_batch(trainer, step)])
        assert torch.isfinite(torch.tensor([loss, grad_norm])).all()


def _groups(model, tower: str):
    return image_tower_groups(model) if tower == 'image' else text_tower_groups(model)


@pytest.mark.parametrize('tower, unlocked', [('image', 0), ('image', 2), ('text', 0), ('text', 2)])
def test_locked_groups_do_not_move_and_the_rest_trains(tmp_path, tower, unlocked):
    lock = f'MODEL.LOCK_{tower.upper()}'
    trainer = _trainer(str(tmp_path), str(tmp_path / 'out'), lock, 'True', f'{lock}_UNLOCKED_GROUPS', str(unlocked))
    trainer.build_optimization(steps_per_epoch=10)
    model = trainer.model
    groups = _groups(model, tower)
    locked = {name for group in groups[:len(groups) - unlocked] for name in group}
    params = dict(model.named_parameters())
    assert locked and {n for n, p in params.items() if not p.requires_grad} == locked
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group['params']}
    assert in_optimizer == {id(p) for n, p in params.items() if n not in locked}
    before = {name: param.detach().clone() for name, param in params.items()}
    _steps(trainer, 2)
    changed = {name for name, param in params.items() if not torch.equal(param, before[name])}
    assert not changed & locked
    assert all(changed & set(group) for group in groups[len(groups) - unlocked:])  # each unlocked group trains
    other = {name for name in params if name.startswith('text_encoder.' if tower == 'image' else 'image_encoder.')}
    assert len(changed & other) > len(other) // 2
    # Locked modules (norms, drop-path and all) stay in evaluation mode while the rest trains.
    model.train()
    for name, module in model.named_modules():
        own = [f'{name}.{n}' if name else n for n, _ in module.named_parameters()]
        if own and all(n in locked for n in own):
            assert not module.training, name
        elif any(n not in locked for n in own):
            assert module.training, name
    if unlocked == 0:  # the whole tower, its parameterless modules (pooling, drop-path) included
        encoder = model.image_encoder if tower == 'image' else model.text_encoder
        assert not any(m.training for m in encoder.modules())
    model.eval()
    model.train()
    assert model.training and sum(not m.training for m in model.modules()) > 0


def test_locked_image_tower_with_feature_accumulation(tmp_path):
    """The GradCache re-run gets image features that need no gradient: the surrogate still backpropagates."""
    trainer = _trainer(str(tmp_path), str(tmp_path / 'out'), 'MODEL.LOCK_IMAGE', 'True',
                       'TRAIN.ACCUMULATION_STEPS', '2', 'TRAIN.ACCUMULATION_MODE', 'features')
    trainer.build_optimization(steps_per_epoch=10)
    image_before = {k: v.clone() for k, v in trainer.model.image_encoder.state_dict().items()}
    text_before = trainer.model.text_projection.detach().clone()
    trainer.model.train()
    trainer.optimizer_step([_batch(trainer, 0), _batch(trainer, 1)])
    assert all(torch.equal(v, image_before[k]) for k, v in trainer.model.image_encoder.state_dict().items())
    assert not torch.equal(trainer.model.text_projection, text_before)


@pytest.mark.filterwarnings('ignore:.*broadcast_buffers')
def test_ddp_steps_with_a_locked_tower(tmp_path):
    """DDP registers only the parameters that need a gradient: with any locked one registered, the second
    step would fail for the reduction the first never finished (find_unused_parameters is off)."""
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "init"}', rank=0, world_size=1)
    try:
        trainer = _trainer(str(tmp_path), str(tmp_path / 'out'), 'MODEL.LOCK_TEXT', 'True',
                           'MODEL.LOCK_TEXT_UNLOCKED_GROUPS', '1')
        trainer.ddp = DistributedDataParallel(trainer.model, broadcast_buffers=False)
        trainer.build_optimization(steps_per_epoch=10)
        before = trainer.model.text_encoder.resblocks[0].mlp.c_fc.weight.detach().clone()
        _steps(trainer, 2)
        assert torch.equal(trainer.model.text_encoder.resblocks[0].mlp.c_fc.weight, before)
    finally:
        destroy_distributed()


def test_a_locked_run_resumes_and_other_locks_are_refused(tiny_data, tmp_path):
    out = str(tmp_path / 'out')
    locked = ('MODEL.LOCK_IMAGE', 'True', 'MODEL.LOCK_IMAGE_UNLOCKED_GROUPS', '1')
    first = _trainer(tiny_data, out, *locked)
    first.build_training()
    _steps(first, 1)
    first.save()
    saved_moments = first.optimizer.state_dict()['state']
    again = _trainer(tiny_data, out, *locked)
    again.build_training()
    again.resume()
    assert again.progress.step == first.progress.step
    moments = again.optimizer.state_dict()['state']
    assert moments.keys() == saved_moments.keys()
    assert all(torch.equal(moments[i]['exp_avg'], saved_moments[i]['exp_avg']) for i in moments)
    unlocked = _trainer(tiny_data, out)
    unlocked.build_training()
    with pytest.raises(ValueError, match=r'cannot resume from .*: 80 trainable now but not in that run '
                                         r'\(image_encoder.*MODEL.LOCK_IMAGE, MODEL.LOCK_TEXT and their '
                                         r'\*_UNLOCKED_GROUPS must be as they were.*MODEL.PRETRAINED'):
        unlocked.resume()


def test_checkpoints_from_before_locks_resume_unlocked_only(tiny_model):
    # Without the saved list a checkpoint trained every parameter.
    check_same_trainable(None, tiny_model, 'old.pth')
    lock_groups(tiny_model, text_tower_groups(tiny_model), 0, 'MODEL.LOCK_TEXT_UNLOCKED_GROUPS')
    with pytest.raises(ValueError, match=r'locked now but trained in that run \(text_encoder'):
        check_same_trainable(None, tiny_model, 'old.pth')


def test_lock_keys_are_checked(tiny_model):
    with pytest.raises(ConfigError, match='MODEL.LOCK_IMAGE_UNLOCKED_GROUPS 2 is invalid: must be 0 while '
                                          'MODEL.LOCK_IMAGE is off'):
        tiny_config('MODEL.LOCK_IMAGE_UNLOCKED_GROUPS', '2')
    with pytest.raises(ConfigError, match='MODEL.LOCK_TEXT_UNLOCKED_GROUPS -1 is invalid'):
        tiny_config('MODEL.LOCK_TEXT', 'True', 'MODEL.LOCK_TEXT_UNLOCKED_GROUPS', '-1')
    # The tiny text tower: embeddings, 3 blocks, projection. Unlocking all 5 groups would lock nothing.
    config = tiny_config('MODEL.LOCK_TEXT', 'True', 'MODEL.LOCK_TEXT_UNLOCKED_GROUPS', '5')
    with pytest.raises(ValueError, match=r'MODEL.LOCK_TEXT_UNLOCKED_GROUPS 5 must be in \[0, 4\]'):
        apply_locks(tiny_model, config.MODEL)


def test_tower_groups_cover_each_tower_once(tiny_model):
    for groups, prefix, projection in ((image_tower_groups(tiny_model), 'image_encoder.', 'image_projection'),
                                       (text_tower_groups(tiny_model), 'text_encoder.', 'text_projection')):
        names = [name for group in groups for name in group]
        expected = [n for n, _ in tiny_model.named_parameters() if n.startswith(prefix)] + [projection]
        assert sorted(names) == sorted(expected) and groups[-1] == [projection]
    text = text_tower_groups(tiny_model)
    assert len(text) == 5 and 'text_encoder.ln_final.weight' in text[-2]
    assert all(n.startswith('text_encoder.resblocks.1.') for n in text[2])

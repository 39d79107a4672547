"""Training (training/, run by main.py): the loss goes down, 2 gloo processes step like one, checkpoints resume the run
exactly, SIGTERM saves, NaN stops or skips. Stops sent as
schedulers send them and resumes on another layout: test_stops.py; torchrun's elastic restarts: test_elastic.py."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import main
from model import build_unicl_model
from tests.conftest import TINY_CONFIG, run_command, run_ranks
from training import Trainer
from utils.checkpoint import CheckpointManager, safe_load
from utils.distributed import destroy_distributed

# A fast, learnable setting: 32-px images, no random augmentation, 8 steps of 8 samples per epoch.
FAST = ['DATA.IMG_SIZE', '32', 'MODEL.IMAGE_ENCODER.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '8',
        'DATA.NUM_WORKERS', '0', 'DATA.EPOCH_SAMPLES', '64', 'AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0',
        'AUG.COLOR_JITTER', '0.0', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.BASE_LR', '0.02', 'PRINT_FREQ', '4']
SOURCES = ("[{'TYPE': 'imagefolder', 'PATH': 'labels', 'NAME': 'shapes'}, "
           "{'TYPE': 'tsv', 'PATH': 'captions/captions.tsv', 'NAME': 'table'}]")


def _args(data, out, *opts, flags=()):
    return ['--cfg', TINY_CONFIG, '--data-path', data, '--output', out, *flags,
            '--opts', *FAST, 'DATA.SOURCES', SOURCES, *opts]


def _trainer(data, out, *opts, rank=0, world_size=1):
    config = main.build_run_config(main.parse_option(_args(data, out, *opts)))
    torch.manual_seed(0)
    return Trainer(config, rank, world_size, torch.device('cpu'))


def _run_dir(out):
    return os.path.join(out, 'unicl_tiny', 'default')


def test_a_few_steps_lower_the_loss(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, str(tmp_path))
    trainer.build_training()
    batch = next(iter(trainer.loader))

    def loss_on(batch):
        trainer.model.eval()
        with torch.no_grad():
            features = trainer.model(batch[0], batch[1])
            return trainer.criterion(*features[:2], batch[2], features[2]).item()

    before = loss_on(batch)
    trainer.model.train()
    for _ in range(12):
        loss, grad_norm, _ = trainer.optimizer_step([batch])
        assert torch.isfinite(torch.tensor([loss, grad_norm])).all()
    assert loss_on(batch) < before - 0.3


def _ddp_step(rank, world_size, data, out, init_file, result_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    trainer = _trainer(data, out, 'TRAIN.OPTIMIZER.NAME', 'sgd', 'DATA.BATCH_SIZE', '4',
                       rank=rank, world_size=world_size)
    trainer.build_optimization(steps_per_epoch=10)
    images, tokens, labels = torch.load(os.path.join(out, 'global_batch.pt'), weights_only=True)
    own = slice(rank * 4, rank * 4 + 4)
    trainer.optimizer_step([(images[own], {k: v[own] for k, v in tokens.items()}, labels[own])])
    torch.save(trainer.model.state_dict(), result_file.format(rank))
    destroy_distributed()


def test_two_gloo_processes_step_like_one_on_the_global_batch(tiny_data, tmp_path):
    out = str(tmp_path)
    single = _trainer(tiny_data, out, 'TRAIN.OPTIMIZER.NAME', 'sgd')  # batch 8 = 2 ranks x 4
    single.build_training()
    images, tokens, labels = next(iter(single.loader))
    labels[5] = labels[1]  # a positive pair that spans the two ranks
    torch.save((images, tokens, labels), os.path.join(out, 'global_batch.pt'))
    single.build_optimization(steps_per_epoch=10)
    single.optimizer_step([(images, tokens, labels)])
    result = os.path.join(out, 'rank{}.pt')
    run_ranks(_ddp_step, args=(2, tiny_data, out, str(tmp_path / 'init'), result), nprocs=2)
    rank0, rank1 = (torch.load(result.format(r), weights_only=True) for r in (0, 1))
    reference = single.model.state_dict()
    torch.manual_seed(0)  # as every trainer here
    initial = build_unicl_model(single.config).state_dict()
    moved = 0
    for key, value in reference.items():
        assert torch.equal(rank0[key], rank1[key]), key  # DDP keeps the replicas bit-identical
        assert torch.allclose(rank0[key], value, atol=2e-6, rtol=1e-5), key
        moved += not torch.equal(value, initial[key])
    assert moved > len(reference) // 2  # the step really changed the weights


def _finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


@pytest.mark.parametrize('keep', [1, 2, 4, 5])
def test_the_newest_keep_checkpoints_are_kept(tmp_path, keep):
    manager = CheckpointManager(str(tmp_path), keep=keep)
    for step in range(1, 8):
        manager.save({'progress': {'step': step}}, step)
        kept = [CheckpointManager._step(p) for p in manager.checkpoints()]
        assert kept == list(range(max(1, step - keep + 1), step + 1)), (step, kept)


def test_latest_unreadable_checkpoint_falls_back(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=5)
    manager.save({'progress': {'step': 1}}, 1)
    manager.save({'progress': {'step': 2}}, 2)
    with open(manager.checkpoints()[-1], 'r+b') as f:
        f.truncate(100)  # a damaged newest file
    path, state = manager.load_latest()
    assert path.endswith('checkpoint_000000001.pth') and state['progress']['step'] == 1


def test_nonfinite_loss_stops_naming_the_step_or_skips(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, str(tmp_path / 'stop'), 'MODEL.LOGIT_SCALE_INIT', '1e999')
    trainer.build_training()
    with pytest.raises(FloatingPointError, match='epoch 0 step 1 .*no checkpoint was saved yet'):
        trainer.fit()
    skipping = _trainer(tiny_data, str(tmp_path / 'skip'), 'MODEL.LOGIT_SCALE_INIT', '1e999',
                        'TRAIN.NAN_POLICY', 'skip', 'TRAIN.EPOCHS', '1')
    skipping.build_training()
    before = {k: v.clone() for k, v in skipping.model.state_dict().items()}
    assert skipping.fit() == 0
    assert skipping.progress.skipped_steps == 8
    assert all(torch.equal(v, skipping.model.state_dict()[k]) for k, v in before.items())


def test_eval_and_throughput_modes(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, str(tmp_path / 'run'))
    trainer.build_training()
    trainer.save()  # a training checkpoint, as a finished run leaves
    checkpoint = CheckpointManager(_run_dir(str(tmp_path / 'run'))).checkpoints()[-1]
    # A relative VAL_PATH is under DATA_PATH, as the SOURCES paths are.
    run = run_command(main.main, _args(tiny_data, str(tmp_path / 'eval'), 'DATA.VAL_PATH', 'zeroshot',
                                       flags=['--eval', '--resume', checkpoint]))
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert f"images of {os.path.join(tiny_data, 'zeroshot')}: Acc@1" in log
    assert '\r' not in log  # a log redirected to a file gets no progress-bar fragments
    run = run_command(main.main, _args(tiny_data, str(tmp_path / 'tp'), flags=['--throughput']))
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'image encoder: batch 8' in run.stdout and 'images/s' in run.stdout


def test_missing_val_path_fails_before_training(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, str(tmp_path), 'DATA.VAL_PATH', 'nowhere')
    with pytest.raises(FileNotFoundError, match="DATA.VAL_PATH 'nowhere': no folder"):
        trainer.build_training()
    # The default DATA_PATH/val may be absent: validation is skipped, training goes on; --eval needs it.
    default = _trainer(tiny_data, str(tmp_path))
    assert default.validation_folder() is None
    with pytest.raises(FileNotFoundError, match="DATA.VAL_PATH '': no folder .*val"):
        default.validation_folder(required=True)


def _children(pid):
    out = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize('sources, extra, origin', [
    ("[{'TYPE': 'imagefolder', 'PATH': 'labels'}]", [], '/labels/train/'),
    ("[{'TYPE': 'zip', 'PATH': 'labels/train.zip'}]", [], 'train.zip@/'),
    ("[{'TYPE': 'webdataset', 'PATH': 'captions/shards'}]", [], '/captions/shards/captions-'),
    ("[{'TYPE': 'tsv', 'PATH': 'captions/captions.tsv'}]", [], '/captions/'),
    ("[]", ['DATA.DATASET', 'imagenet'], '/labels/train/'),  # the official single-folder layout: DATA_PATH/train
    ("[]", ['DATA.DATASET', 'imagenet', 'DATA.ZIP_MODE', 'True'], 'train.zip@/'),
], ids=['imagefolder', 'zip', 'webdataset', 'tsv', 'dataset-imagenet', 'dataset-imagenet-zip'])
def test_trains_on_each_source(tiny_data, tmp_path, sources, extra, origin):
    """Batches come from that source with its kind of label (class ids, or caption ids above them), and
    the steps on them move the weights."""
    data = os.path.join(tiny_data, 'labels') if sources == '[]' else tiny_data
    trainer = _trainer(data, str(tmp_path), 'DATA.SOURCES', sources, *extra)
    trainer.build_training()
    num_classes = trainer.loader.setup.labels.num_classes
    labelled = 'captions' not in origin
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches = trainer.loader.iter_with_info()
    for _ in range(2):
        images, tokens, labels, info = next(batches)
        assert all(origin in where for where in info['where']), info['where']
        assert bool((labels < num_classes).all()) if labelled else bool((labels >= num_classes).all())
        loss, grad_norm, _ = trainer.optimizer_step([(images, tokens, labels)])
        assert torch.isfinite(torch.tensor([loss, grad_norm])).all()
    after = trainer.model.state_dict()
    assert sum(not torch.equal(v, after[k]) for k, v in before.items()) > len(before) // 2


def _sigterm_at(trainer, steps):
    """Make `trainer` receive SIGTERM during each optimizer step whose number (1-based) is in `steps`."""
    step = trainer.optimizer_step

    def step_and_signal(batches):
        result = step(batches)
        if trainer.progress.step + 1 in steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    trainer.optimizer_step = step_and_signal
    return trainer


def _fit(data, out, *opts, sigterm_at=()):
    trainer = _sigterm_at(_trainer(data, out, *opts), sigterm_at)
    trainer.build_training()
    trainer.resume()
    return trainer.fit(), trainer


def test_sigterms_at_any_step_end_like_the_uninterrupted_run(tiny_data, tmp_path, caplog):
    """SIGTERM on an epoch's last step (8), mid-epoch (3, 11) and on the run's last step (16), each followed
    by the same command: the same step count, epoch summaries (their loss over the whole epoch, though
    a stop split it) and weights as an uninterrupted run. The stop after the last step exits too; the
    restart only validates."""
    opts = ('TRAIN.EPOCHS', '2', 'TRAIN.SAVE_STEPS', '4', 'TRAIN.KEEP_CHECKPOINTS', '0')
    caplog.set_level('INFO', logger='unicl.train')

    def summaries():
        return [r.message for r in caplog.records if ' done: ' in r.message]

    code, straight = _fit(tiny_data, str(tmp_path / 'straight'), *opts)
    assert code == 0 and straight.progress.step == 16
    straight_summaries = summaries()
    caplog.clear()
    out, restarts = str(tmp_path / 'interrupted'), 0
    for at in (3, 8, 11, 16, None):
        code, trainer = _fit(tiny_data, out, *opts, sigterm_at={at})
        if code == 0:
            break
        assert code == 128 + signal.SIGTERM and trainer.progress.step == at
        restarts += 1
    assert restarts == 4 and code == 0
    assert (trainer.progress.epoch, trainer.progress.step) == (2, 16)
    assert summaries() == straight_summaries and len(straight_summaries) == 2  # each epoch once, none extra
    saved = [int(os.path.basename(p)[11:20]) for p in CheckpointManager(_run_dir(out), keep=0).checkpoints()]
    assert {4, 12, 16} <= set(saved)  # SAVE_STEPS went on firing after the restarts
    reference = straight.model.state_dict()
    for key, value in trainer.model.state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-6), key


@pytest.mark.parametrize('kind', ['release', 'training-checkpoint'])
def test_restart_of_a_run_started_from_a_file_continues(tiny_data, tmp_path, caplog, kind):
    """--resume FILE (a release: weights only; or another run's training checkpoint) starts the run; the same
    command started again takes the run's own newest checkpoint, says so, and ends like the uninterrupted
    run, instead of going back to FILE."""
    opts = ('TRAIN.EPOCHS', '2', 'TRAIN.SAVE_STEPS', '2', 'TRAIN.KEEP_CHECKPOINTS', '2')
    if kind == 'release':
        source, stop_at = str(tmp_path / 'release.pth'), 5
        torch.manual_seed(7)
        torch.save({'model': build_unicl_model(main.build_run_config(main.parse_option(
            _args(tiny_data, str(tmp_path))))).state_dict()}, source)
    else:  # another run stopped at step 6; this one continues it and is stopped at 9
        code, _ = _fit(tiny_data, str(tmp_path / 'source'), *opts, sigterm_at={6})
        source, stop_at = CheckpointManager(_run_dir(str(tmp_path / 'source'))).checkpoints()[-1], 9
    opts += ('MODEL.RESUME', source)
    code, straight = _fit(tiny_data, str(tmp_path / 'straight'), *opts)
    assert code == 0
    out = str(tmp_path / 'restarted')
    caplog.set_level('INFO', logger='unicl.train')
    code, first = _fit(tiny_data, out, *opts, sigterm_at={stop_at})
    assert code == 128 + signal.SIGTERM and first.progress.step == stop_at
    code, trainer = _fit(tiny_data, out, *opts)
    assert code == 0 and trainer.progress.step == 16
    assert [os.path.basename(p) for p in CheckpointManager(_run_dir(out)).checkpoints()] == [
        'checkpoint_000000014.pth', 'checkpoint_000000016.pth']
    assert any(f'next step {stop_at + 1}' in r.message for r in caplog.records)  # not back to FILE's step
    assert any('checkpoints of its own' in r.message and f'checkpoint_00000000{stop_at}.pth' in r.message
               for r in caplog.records)
    reference = straight.model.state_dict()
    for key, value in trainer.model.state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-6), key


def test_checkpoint_manager_never_deletes_the_checkpoint_it_wrote(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep=2)
    for step in (100, 101, 102):
        manager.save({'step': step}, step)
    for step in (1, 2, 3):
        path = manager.save({'step': step}, step)
        assert os.path.exists(path)
    assert [os.path.basename(p) for p in manager.checkpoints()] == ['checkpoint_000000003.pth',
                                                                     'checkpoint_000000102.pth']


def test_fp16_overflow_skips_are_counted_not_fatal(tiny_data, tmp_path, caplog):
    """An fp16 GradScaler overflow skips the step and lowers the scale; the run goes on (NAN_POLICY stop)."""
    trainer = _trainer(tiny_data, str(tmp_path / 'fp16'), 'AMP_OPT_LEVEL', 'fp16', 'TRAIN.EPOCHS', '1')
    assert trainer.scaler is not None and trainer.scaler.is_enabled()  # on this device too (CPU here)
    trainer.scaler = torch.amp.GradScaler(trainer.device.type, init_scale=2.0 ** 20)  # overflows at first
    trainer.build_training()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    caplog.set_level('INFO', logger='unicl.train')
    assert trainer.fit() == 0
    assert 1 <= trainer.progress.overflow_steps < 8 and trainer.progress.skipped_steps == 0
    assert trainer.scaler.get_scale() < 2.0 ** 20
    assert sum('fp16 gradient overflow' in r.message for r in caplog.records) == trainer.progress.overflow_steps
    assert not torch.equal(before['image_projection'], trainer.model.state_dict()['image_projection'])
    # A real NaN loss still follows NAN_POLICY.
    nan = _trainer(tiny_data, str(tmp_path / 'nan'), 'AMP_OPT_LEVEL', 'fp16', 'MODEL.LOGIT_SCALE_INIT', '1e999')
    nan.build_training()
    with pytest.raises(FloatingPointError, match='epoch 0 step 1'):
        nan.fit()


def _step_gradients(trainer, batches):
    """The gradients `optimizer_step(batches)` hands the optimizer (after unscaling and clipping)."""
    seen = {}

    def record():
        seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    trainer.optimizer.register_step_pre_hook(lambda *_: record())
    trainer.optimizer_step(batches)
    return seen


def test_accumulation_divides_the_loss(tiny_data, tmp_path):
    """ACCUMULATION_STEPS 2 over [b, b] gives the gradient of ACCUMULATION_STEPS 1 over [b]."""
    one = _trainer(tiny_data, str(tmp_path / 'one'), 'TRAIN.CLIP_GRAD', '0.0')
    one.build_training()
    batch = next(iter(one.loader))
    two = _trainer(tiny_data, str(tmp_path / 'two'), 'TRAIN.CLIP_GRAD', '0.0', 'TRAIN.ACCUMULATION_STEPS', '2')
    two.build_training()
    expected, got = _step_gradients(one, [batch]), _step_gradients(two, [batch, batch])
    assert set(expected) == set(got) and len(got) > 10
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-7), name


def test_logit_scale_is_clamped_to_its_maximum(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, str(tmp_path), 'MODEL.LOGIT_SCALE_INIT', '5.0')
    trainer.build_training()
    trainer.optimizer_step([next(iter(trainer.loader))])
    maximum = trainer.config.MODEL.LOGIT_SCALE_MAX
    assert maximum == pytest.approx(math.log(100))
    assert trainer.model.logit_scale.item() <= maximum + 1e-6  # float32 rounding of ln 100


def test_step_log_and_tensorboard_carry_the_sigmoid_bias(tiny_data, tmp_path, caplog):
    """TRAIN.LOSS sigmoid learns a logit bias: the step log and tensorboard show it beside the temperature
    (and a model without one logs none)."""
    from reporting.scalars import read_scalars

    caplog.set_level('INFO', logger='unicl.train')
    out = str(tmp_path / 'sigmoid')
    code, trainer = _fit(tiny_data, out, 'TRAIN.LOSS', 'sigmoid', 'TRAIN.EPOCHS', '1')
    assert code == 0
    steps = [r.message for r in caplog.records if r.message.startswith('Train: ')]
    assert steps and all(' logit_scale ' in m and ' logit_bias ' in m for m in steps)
    bias = read_scalars(_run_dir(out))['train/logit_bias']
    assert [step for step, _ in bias] == [4, 8]
    assert bias[-1][1] == pytest.approx(trainer.model.logit_bias.item(), abs=1e-6) and bias[0][1] != -10.0
    assert not hasattr(_trainer(tiny_data, str(tmp_path / 'unicl')).model, 'logit_bias')


def test_a_refused_config_value_is_one_line_and_exit_code_2(tiny_data, tmp_path):
    """main.py reports a refused config value (at reading, or when the loader finds no GPU for
    DATA.DECODE_DEVICE cuda) as one line naming the key, exit code 2, no traceback."""
    for opts, key in ((['TRAIN.SAVE_FREQ', '0'], 'SAVE_FREQ'), (['DATA.DECODE_DEVICE', 'cuda'], 'DATA.DECODE_DEVICE')):
        if key == 'DATA.DECODE_DEVICE' and torch.cuda.is_available():
            continue  # on a GPU machine this trains
        run = run_command(main.main, _args(tiny_data, str(tmp_path / key), *opts))
        assert run.returncode == 2, run.stdout + run.stderr
        assert run.stderr.startswith('main.py: error: ') and key in run.stderr and 'Traceback' not in run.stderr

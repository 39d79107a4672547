"""Stops as a scheduler sends them, and restarts that differ from the run they continue.

- SIGTERM to every process of a 2-rank torchrun job with loader workers (as slurmstepd and
  `kill -TERM -- -PGID` send it) saves at the end of the step; a SIGTERM to one rank stops both with one code;
  the restarts end on the uninterrupted run's weights (drop-path on, so each rank's RNG state matters).
- A checkpoint of 2 processes continues on 1 by samples seen, with the schedule of the new global batch, or
  is refused naming the option that allows it.
- Every rank loads the checkpoint rank 0 chose; a rank that cannot read it stops the job naming it.
- An epoch's validation is never lost, and validation leaves the training RNG alone.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import main
from tests.conftest import ROOT, run_like_torchrun, run_ranks
from tests.test_train import _args, _children, _finish, _fit, _run_dir, _trainer
from training import Trainer
from training.resume import ResumeError
from utils.checkpoint import CheckpointError, CheckpointManager, safe_load
from utils.distributed import destroy_distributed

# 2 ranks x batch 4 = global batch 8: 8 steps per epoch of 64 samples, 16 in all; loader workers as in every
# real run; drop-path draws from each rank's own RNG.
TWO_RANKS = ('TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS', '2', 'TRAIN.SAVE_STEPS', '2',
             'TRAIN.KEEP_CHECKPOINTS', '0', 'PRINT_FREQ', '1', 'MODEL.IMAGE_ENCODER.DROP_PATH_RATE', '0.1')


def _torchrun(data, out, *opts):
    """2 ranks on CPU in a session of their own, so the whole job can be signalled as one process group."""
    return subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         os.path.join(ROOT, 'main.py'), *_args(data, out, *opts)],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)


def _run_until(process, text):
    """The output up to the first line containing `text` (the job keeps running)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return ''.join(lines)
    raise AssertionError(f'the run ended before printing {text!r}:\n' + ''.join(lines))


def _final(out):
    return safe_load(CheckpointManager(_run_dir(out)).checkpoints()[-1])


def _assert_same_weights(state, reference):
    for key, value in reference['model'].items():
        assert torch.allclose(state['model'][key], value, atol=1e-6), key


@pytest.fixture(scope='module')
def two_rank_run(tiny_data, tmp_path_factory):
    """The uninterrupted 2-rank run, with a checkpoint every 2 steps."""
    out = str(tmp_path_factory.mktemp('two_ranks'))
    run_like_torchrun(main.main, _args(tiny_data, out, *TWO_RANKS))
    return out


def test_stops_sent_to_the_whole_job_or_one_rank_save_and_resume_like_the_uninterrupted_run(
        tiny_data, tmp_path, two_rank_run):
    out = str(tmp_path / 'stopped')
    logs = [os.path.join(_run_dir(out), f'log_rank{rank}.txt') for rank in (0, 1)]
    process = _torchrun(tiny_data, out, *TWO_RANKS)
    try:
        log = _run_until(process, '][3/8]')
        os.killpg(process.pid, signal.SIGTERM)  # torchrun, both ranks and their 4 loader workers
        code, rest = _finish(process, timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log += rest
    assert 'killed by signal' not in log, log
    stopped_at = int(re.search(r'signal 15: saving at step (\d+)', log).group(1))
    assert stopped_at >= 3
    assert all(f'signal 15: saving at step {stopped_at}' in open(path).read() for path in logs)
    assert safe_load(CheckpointManager(_run_dir(out)).checkpoints()[-1])['progress']['step'] == stopped_at

    process = _torchrun(tiny_data, out, *TWO_RANKS)  # the same command; this time only rank 1 is signalled
    try:
        log = _run_until(process, '[1/2][3/8]')
        assert f'next step {stopped_at + 1}' in log
        os.kill(max(_children(process.pid)), signal.SIGTERM)
        code, rest = _finish(process, timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    exit_codes = re.findall(r'exitcode\s*:\s*(-?\d+)', log + rest)
    assert code != 0 and exit_codes and set(exit_codes) == {str(128 + signal.SIGTERM)}, log + rest
    second_stop = int(re.search(r'signal 15: saving at step (\d+)', log + rest).group(1))
    assert all(f'signal 15: saving at step {second_stop}' in open(path).read() for path in logs)

    run_like_torchrun(main.main, _args(tiny_data, out, *TWO_RANKS))  # the rest: no launcher needed
    assert f'next step {second_stop + 1}' in open(logs[0]).read()
    final, reference = _final(out), _final(two_rank_run)
    assert final['progress'] == reference['progress'] and final['progress']['step'] == 16
    _assert_same_weights(final, reference)


def _one_process(data, out, *opts) -> Trainer:
    trainer = _trainer(data, out, *TWO_RANKS, 'DATA.NUM_WORKERS', '0', *opts)
    trainer.build_training()
    return trainer


def test_two_ranks_checkpoint_continues_on_one_by_samples_seen(tiny_data, tmp_path, two_rank_run, caplog):
    """Step 10 of 2 x 4 is 16 samples into epoch 1. On 1 process x 4 that is step 4 of 16 (global step 20); the LR
    of every later step is the one a 1-process run of the config would use, and the run ends at step 32."""
    midway = os.path.join(_run_dir(two_rank_run), 'checkpoint_000000010.pth')
    caplog.set_level('INFO', logger='unicl.train')
    trainer = _one_process(tiny_data, str(tmp_path / 'one'), 'MODEL.RESUME', midway)
    trainer.resume()
    assert (trainer.progress.epoch, trainer.progress.step, trainer.loader.start_step) == (1, 20, 4)
    assert any('batch layout changed' in r.message and '16 samples in' in r.message for r in caplog.records)
    plan = _one_process(tiny_data, str(tmp_path / 'plan'))  # a fresh 1-process run's schedule
    expected = {}
    for step in range(20, 32):
        plan.scheduler.step_update(step)
        expected[step + 1] = plan.optimizer.param_groups[0]['lr']
    caplog.clear()
    assert trainer.fit() == 0
    logged = {int(m.group(2)): float(m.group(3)) for r in caplog.records
              if (m := re.search(r'Train: \[1/2\]\[(\d+)/16\] step (\d+)  lr (\S+)', r.message))}
    assert sorted(logged) == list(range(21, 33))
    assert logged == pytest.approx(expected, rel=1e-3)  # the log prints 4 digits
    assert (trainer.progress.epoch, trainer.progress.step) == (2, 32)


def test_a_position_between_new_steps_is_refused_unless_rounded_down(tiny_data, tmp_path, caplog):
    midway = os.path.join(tmp_path, 'midway.pth')
    first = _one_process(tiny_data, str(tmp_path / 'first'), 'DATA.BATCH_SIZE', '8')  # 8 steps of 8
    first.progress.epoch, first.progress.step = 1, 10  # 2 steps = 16 samples into epoch 1
    torch.save(first.state(), midway)
    # Batch 6: 10 steps per epoch; 16 samples are 2 steps and 4 samples.
    with pytest.raises(ResumeError, match=r'16 samples into epoch 1.*TRAIN.RESUME_ROUND_DOWN True to continue at '
                                          r'step 2 of the epoch, training its last 4 samples again'):
        _one_process(tiny_data, str(tmp_path / 'refused'), 'DATA.BATCH_SIZE', '6', 'MODEL.RESUME', midway).resume()
    rounded = _one_process(tiny_data, str(tmp_path / 'rounded'), 'DATA.BATCH_SIZE', '6', 'MODEL.RESUME', midway,
                           'TRAIN.RESUME_ROUND_DOWN', 'True')
    caplog.set_level('INFO', logger='unicl.train')
    rounded.resume()
    assert (rounded.progress.step, rounded.loader.start_step) == (12, 2)
    assert any('training 4 samples again' in r.message for r in caplog.records)


def _resume_in_rank(rank, data, outs, init_file, result_file, unreadable):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    trainer = _trainer(data, outs[rank], *TWO_RANKS, 'DATA.NUM_WORKERS', '0', rank=rank, world_size=2)
    trainer.build_training()
    if unreadable and rank == 1:
        import training.trainer

        def refuse(path):
            raise OSError(f'{path}: stale file handle')
        training.trainer.safe_load = refuse
    try:
        trainer.resume()
        result = (trainer.progress.step, sum(p.double().sum().item() for p in trainer.model.parameters()))
    except CheckpointError as e:
        result = str(e)
    torch.save(result, result_file.format(rank))
    destroy_distributed()


@pytest.mark.parametrize('unreadable', [False, True], ids=['lagging-folder', 'unreadable'])
def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tiny_data, tmp_path, two_rank_run, unreadable):
    """Rank 1's view of the run folder is empty (node-local or lagging storage): it still loads rank 0's
    newest checkpoint. A rank that cannot read it stops every rank with an error naming the file."""
    shared = str(tmp_path / 'shared')
    shutil.copytree(_run_dir(two_rank_run), _run_dir(shared))
    result = str(tmp_path / 'rank{}.pt')
    run_ranks(_resume_in_rank, args=(tiny_data, [shared, str(tmp_path / 'empty')], str(tmp_path / 'init'), result,
                                     unreadable))
    results = [torch.load(result.format(rank), weights_only=False) for rank in (0, 1)]
    newest = CheckpointManager(_run_dir(shared)).checkpoints()[-1]
    if unreadable:
        assert results[0] == results[1] and f'rank(s) [1] cannot read {newest}' in results[0]
        assert 'stale file handle' in results[0]
    else:
        assert results[0] == results[1] and results[0][0] == 16


def _record_zeroshot(trainer, record):
    validate = trainer.validate

    def recording(writer):
        record.append((trainer.progress.epoch, trainer.progress.step, validate(writer)))
        return record[-1][2]
    trainer.validate = recording


def test_an_epoch_stopped_at_its_end_is_validated_on_restart(tiny_data, tmp_path, caplog):
    """A SIGTERM during epoch 1's last step saves (though SAVE_FREQ would not) and exits before validating;
    the restarted run validates epoch 1 before training on: the validation curve and the weights are the
    uninterrupted run's."""
    opts = ('TRAIN.EPOCHS', '3', 'SAVE_FREQ', '100', 'DATA.VAL_PATH', 'zeroshot',
            'MODEL.IMAGE_ENCODER.DROP_PATH_RATE', '0.1')
    straight = _trainer(tiny_data, str(tmp_path / 'straight'), *opts)
    straight_curve = []
    _record_zeroshot(straight, straight_curve)
    straight.build_training()
    assert straight.fit() == 0 and len(straight_curve) == 3
    out, curve = str(tmp_path / 'stopped'), []
    code, _ = _fit(tiny_data, out, *opts, sigterm_at={16})
    assert code == 128 + signal.SIGTERM
    assert [os.path.basename(p) for p in CheckpointManager(_run_dir(out)).checkpoints()] == [
        'checkpoint_000000008.pth', 'checkpoint_000000016.pth']  # epoch 0 (SAVE_FREQ), then the stop's
    restarted = _trainer(tiny_data, out, *opts)
    _record_zeroshot(restarted, curve)
    restarted.build_training()
    restarted.resume()
    caplog.set_level('INFO', logger='unicl.train')
    caplog.clear()
    assert restarted.fit() == 0
    messages = [r.message for r in caplog.records]
    first_train = next(i for i, m in enumerate(messages) if m.startswith('Train: '))
    assert any(m.startswith('zero-shot on') for m in messages[:first_train])  # epoch 1 first
    assert curve == straight_curve[1:]  # epochs 1 and 2, validated at the same steps with the same results
    assert restarted.progress.max_accuracy == straight.progress.max_accuracy
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(restarted.model.state_dict()[key], value, atol=1e-6), key


def test_validation_leaves_the_training_rng_alone(tiny_data, tmp_path):
    trainer = _trainer(tiny_data, str(tmp_path), 'DATA.VAL_PATH', 'zeroshot', 'DATA.NUM_WORKERS', '1')
    before = torch.get_rng_state()
    assert trainer.validate(None) is not None
    assert torch.equal(torch.get_rng_state(), before)

"""The sweep runner (training/sweep.py) with its training and evaluations faked: a sweep killed between runs
resumes without redoing the finished ones, --print-commands prints one runnable line per run, a changed
sweep file is refused for the runs it already started, the report's means and spreads."""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time

import pytest
from torch.utils.tensorboard import SummaryWriter

from reporting.sweep import leaders
from training import sweep as sweep_module
from tests.conftest import ROOT

SWEEP = """
cfg: configs/unicl_tiny.yaml
seeds: [0, 1]
variants:
  - {name: a, title: variant A}
  - {name: b, opts: [TRAIN.EPOCHS, 3]}
evaluations:
  zeroshot: [zeroshot, --data-path, '${data}/zeroshot']
"""


def _write(tmp_path, text=SWEEP) -> str:
    path = tmp_path / 'sweep.yaml'
    path.write_text(text)
    return str(path)


def _acc1(run) -> list:
    """The fake run's zero-shot Acc@1 per epoch: variant b is 10 above a, seed 1 is 4 above seed 0."""
    offset = 10 * (run.variant.name == 'b') + 4 * run.seed
    return [10.0 + offset, 20.0 + offset]


class FakeCommands:
    """train/evaluate as main.py and evaluate.py leave them (tensorboard events, a results file), counted;
    the training of run number `kill_at` (1-based) fails as a killed process does."""

    def __init__(self, kill_at=None):
        self.trained, self.evaluated, self.kill_at = [], [], kill_at

    def train(self, sweep, run):
        if len(self.trained) + 1 == self.kill_at:
            raise sweep_module.CommandFailed(['main.py'], -signal.SIGKILL)
        self.trained.append(run.key)
        writer = SummaryWriter(os.path.join(sweep_module.run_folder(sweep, run), 'tensorboard'))
        for epoch, value in enumerate(_acc1(run)):
            writer.add_scalar('train/epoch_loss', 3.0 - epoch, epoch)
            writer.add_scalar('val/acc1', value, epoch + 1)
        writer.close()

    def evaluate(self, sweep, run, name, argv):
        self.evaluated.append((run.key, name, argv))
        folder = os.path.join(run.folder, 'eval', name)
        os.makedirs(folder)
        with open(os.path.join(folder, 'zeroshot_results.json'), 'w') as f:
            json.dump({'top1': _acc1(run)[-1] + 1, 'top5': 100.0, 'metric': 'accuracy', 'value': 0.0}, f)


@pytest.fixture
def fake(monkeypatch):
    def install(kill_at=None) -> FakeCommands:
        commands = FakeCommands(kill_at)
        monkeypatch.setattr(sweep_module, 'train', commands.train)
        monkeypatch.setattr(sweep_module, 'evaluate', commands.evaluate)
        return commands
    return install


def test_a_sweep_killed_between_runs_resumes_and_reports(tmp_path, fake, capsys):
    path, out = _write(tmp_path), str(tmp_path / 'out')
    argv = [path, '--data', str(tmp_path / 'data'), '--output', out]
    killed = fake(kill_at=2)
    assert sweep_module.main(argv) == 128 + signal.SIGKILL  # the killed training's code, as a shell gives it
    assert killed.trained == ['a:0'] and os.path.exists(os.path.join(out, 'a', 'seed0', 'run.json'))
    assert not os.path.exists(os.path.join(out, 'b', 'seed0', 'run.json'))
    assert not os.path.exists(os.path.join(out, 'sweep.md'))
    # ${data} substituted, the order of the runs seed by seed
    assert killed.evaluated == [('a:0', 'zeroshot', ['zeroshot', '--data-path', f'{tmp_path}/data/zeroshot'])]

    resumed = fake()
    assert sweep_module.main(argv) == 0
    assert resumed.trained == ['b:0', 'a:1', 'b:1']  # a:0 skipped
    assert 'a:0: finished before, skipped' in capsys.readouterr().out

    report = open(os.path.join(out, 'sweep.md')).read()
    # zero-shot Acc@1 final: a 20 / 24, b 30 / 34 -> means 22 and 32, sample std 2.83
    assert '| variant A | 22.00 | 2.83 | 20.00-24.00 | 20.00 | 24.00 |' in report
    assert '| b | 32.00 | 2.83 | 30.00-34.00 | 30.00 | 34.00 |' in report
    assert '## zeroshot top1' in report and '| b | 33.00 | 2.83 |' in report
    assert '| b | `b` | `configs/unicl_tiny.yaml` | `TRAIN.EPOCHS 3` |' in report
    assert 'Highest mean val/acc1 (over seeds) per epoch: epochs 1-2: b.' in report
    summary = json.load(open(os.path.join(out, 'sweep.json')))
    assert len(summary['runs']) == 4 and summary['summary']['val/acc1 best']['a']['mean'] == 22.0
    assert summary['curves']['val/acc1']['b'] == {'mean': [22.0, 32.0], 'min': [20.0, 30.0], 'max': [24.0, 34.0]}
    with open(os.path.join(out, 'sweep.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'

    again = fake()  # everything finished: nothing runs, the report is written again
    assert sweep_module.main(argv) == 0 and again.trained == again.evaluated == []


def test_print_commands_prints_one_runnable_line_per_run(tmp_path, fake, capsys):
    path, out = _write(tmp_path), str(tmp_path / 'out')
    commands = fake(kill_at=1)  # any training would fail the test
    assert sweep_module.main([path, '--output', out, '--print-commands', '--opts', 'PRINT_FREQ', '7']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and not os.path.exists(out)
    cd, command = lines[2].split(' && ')
    assert cd == f'cd {ROOT}'
    argv = shlex.split(command)
    assert argv[:4] == [sys.executable, '-m', 'training.sweep', path]
    assert argv[argv.index('--only') + 1] == 'a:1' and argv[-3:] == ['--opts', 'PRINT_FREQ', '7']
    assert argv[argv.index('--output') + 1] == out

    commands.kill_at = None
    assert sweep_module.main(argv[3:]) == 0  # what one array task runs: that run only, no report
    assert commands.trained == ['a:1'] and not os.path.exists(os.path.join(out, 'sweep.md'))
    assert json.load(open(os.path.join(out, 'a', 'seed1', 'run.json')))['settings']['opts'][-4:] == [
        'PRINT_FREQ', '7', 'SEED', '1']


def test_a_changed_sweep_file_is_refused_for_the_runs_it_started(tmp_path, fake, capsys):
    out = str(tmp_path / 'out')
    fake()
    assert sweep_module.main([_write(tmp_path), '--output', out, '--only', 'b:0']) == 0
    changed = _write(tmp_path, SWEEP.replace('[TRAIN.EPOCHS, 3]', '[TRAIN.EPOCHS, 4]'))
    assert sweep_module.main([changed, '--output', out]) == 2
    error = capsys.readouterr().err
    assert 'b:0: ' in error and '(opts differ' in error and 'remove that folder' in error


@pytest.mark.parametrize('text, message', [
    (SWEEP + 'seed: 3\n', "unknown keys ['seed']"),
    (SWEEP.replace('name: b,', 'name: a,'), "name 'a' must be unique"),
    (SWEEP.replace('${data}', '${output}'), 'only ${data} can be substituted'),
    (SWEEP.replace('[TRAIN.EPOCHS, 3]', '[TRAIN.EPOCHZ, 3]'), 'TRAIN.EPOCHZ'),  # every run's config is checked
])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, fake, capsys, text, message):
    commands = fake()
    assert sweep_module.main([_write(tmp_path, text), '--output', str(tmp_path / 'out')]) != 0
    assert message in capsys.readouterr().err and commands.trained == []


def test_a_sigterm_to_the_sweep_reaches_the_command(tmp_path):
    ready = tmp_path / 'ready'
    child = [sys.executable, '-c', f'import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(60)']

    def stop_when_ready():
        while not ready.exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    with pytest.raises(sweep_module.CommandFailed) as failed:
        sweep_module.run_command(child)
    assert failed.value.returncode == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the sweep's own handling ends with the command


def test_the_leader_per_epoch_changes_and_ties():
    curves = {'a': {'mean': [1.0, 3.0, 3.0, 3.0]}, 'b': {'mean': [2.0, 2.0, 2.0, 3.0]}}
    assert leaders(curves, {'a': 'A', 'b': 'B'}) == 'epoch 1: B; epochs 2-3: A; epoch 4: A = B'

"""Reports: scalars read back from tensorboard events, the demo report and its curves (sweep reports:
test_sweep.py)."""
import json
import os

import pytest
from torch.utils.tensorboard import SummaryWriter

from reporting.demo import write_report
from reporting.scalars import read_scalars


def fake_run(run_dir, resumed_from=None):
    writer = SummaryWriter(os.path.join(run_dir, 'tensorboard'))
    for step in range(resumed_from or 1, 21):
        writer.add_scalar('train/loss', 3.5 - step / 10, step)
        writer.add_scalar('train/lr', 1e-3 * step / 20, step)
    for epoch in range(1, 5):
        writer.add_scalar('train/epoch_loss', 3.4 - epoch / 5, epoch - 1)
        writer.add_scalar('val/acc1', 10.0 * epoch, epoch)
    writer.close()


def test_scalars_read_back_and_later_files_win(tmp_path):
    run = str(tmp_path / 'run')
    fake_run(run)
    scalars = read_scalars(run)
    assert scalars['val/acc1'] == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    assert len(scalars['train/loss']) == 20 and scalars['train/loss'][0] == (1, pytest.approx(3.4))
    writer = SummaryWriter(os.path.join(run, 'tensorboard'))  # a resumed run logs step 4 again
    writer.add_scalar('val/acc1', 45.0, 4)
    writer.close()
    assert read_scalars(run)['val/acc1'][-1] == (4, 45.0)
    with pytest.raises(FileNotFoundError, match='no tensorboard event files'):
        read_scalars(str(tmp_path / 'empty'))


def test_demo_report(tmp_path, capsys):
    run, out = str(tmp_path / 'run'), str(tmp_path / 'out')
    fake_run(run)
    for name, content in (('zs', {'top1': 39.5, 'top5': 100.0, 'num_images': 400, 'num_classes': 16}),
                          ('lp', {'top1': 71.25, 'num_train': 1280, 'num_test': 320, 'lr': None,
                                  'weight_decay': 1e-4})):
        os.makedirs(os.path.join(tmp_path, name))
        file = 'zeroshot_results.json' if name == 'zs' else 'linear_probe_results.json'
        with open(os.path.join(tmp_path, name, file), 'w') as f:
            json.dump(content, f)
    path = write_report(run, str(tmp_path / 'zs'), str(tmp_path / 'lp'), out)
    report = open(path).read()
    assert '| zero-shot Acc@1 | 39.50 |' in report and 'chance 6.25' in report
    assert '| linear probe Acc@1 | 71.25 |' in report and 'fit on 1280 images' in report
    assert '(weight decay 0.0001 searched' in report  # the default protocol has no learning rate
    assert '| best zero-shot Acc@1 | 40.00 |' in report and '![training curves](curves.png)' in report
    with open(os.path.join(out, 'curves.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert 'report: ' in capsys.readouterr().out

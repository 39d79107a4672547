"""User errors of evaluate.py: one line on stderr naming the file or key, exit code 2, no traceback, and found
before any checkpoint is loaded (input errors) or any feature is extracted (checkpoint errors)."""
import os
import shutil

import pytest
import torch

import evaluate
import evaluation.encoder
from model import build_unicl_model
from tests.conftest import TINY_CONFIG, make_image_folder, run_command, tiny_config


def _options(*checkpoints):
    return ['--cfg', TINY_CONFIG, '--resume', *checkpoints, '--batch-size', '8', '--num-workers', '0',
            '--device', 'cpu']


def error_line(capsys, argv) -> str:
    """The one line `evaluate.main(argv)` writes to stderr as it exits with code 2."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith('\n') and err.count('\n') == 1 and 'Traceback' not in err, err
    return err.strip()


def _forbidden(*args, **kwargs):
    raise AssertionError('got past the checks: an input error must be found first')


@pytest.fixture
def no_extraction(monkeypatch):
    monkeypatch.setattr(evaluation.encoder, 'image_features', _forbidden)
    monkeypatch.setattr(evaluation.encoder, 'text_features', _forbidden)


@pytest.fixture
def no_loading(monkeypatch, no_extraction):
    monkeypatch.setattr(evaluate, 'load_encoder', _forbidden)


@pytest.fixture
def splits(tmp_path):
    return {name: make_image_folder(str(tmp_path / name), per_class=2, seed=seed)
            for name, seed in (('train', 1), ('val', 2))}


@pytest.fixture
def wider_text_checkpoint(tmp_path) -> str:
    """Weights of the tiny model with another MODEL.TEXT_ENCODER.WIDTH than TINY_CONFIG's."""
    path = str(tmp_path / 'wide.pth')
    torch.save({'model': build_unicl_model(tiny_config('MODEL.TEXT_ENCODER.WIDTH', '64')).state_dict()}, path)
    return path


def _zeroshot(folder, checkpoint, *extra):
    return ['zeroshot', '--data-path', folder, '--templates', 'single', *_options(checkpoint), *extra]


def _probe(splits, checkpoint, *extra):
    return ['linear-probe', '--train-path', splits['train'], '--val-path', splits['val'], '--no-cache',
            *_options(checkpoint), *extra]


def test_missing_folder(capsys, tmp_path, checkpoint, no_loading):
    missing = str(tmp_path / 'nowhere')
    assert error_line(capsys, _zeroshot(missing, checkpoint)) == \
        f'evaluate.py zeroshot: error: no image folder {missing}'


def test_folder_without_class_folders(capsys, tmp_path, checkpoint, no_loading):
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert error_line(capsys, _zeroshot(str(empty), checkpoint)) == (
        f'evaluate.py zeroshot: error: no class folders in {empty}: an image folder holds one folder of images '
        'per class')


def test_class_folder_without_images(capsys, tmp_path, checkpoint, no_loading):
    folder = make_image_folder(str(tmp_path / 'colors'))
    os.makedirs(os.path.join(folder, 'zebra'))
    line = error_line(capsys, _zeroshot(folder, checkpoint))
    assert line.startswith(f'evaluate.py zeroshot: error: {folder}: 1 class folder(s) without images (zebra)')


def test_text_file_as_checkpoint(capsys, color_folder, tmp_path, no_loading):
    text = tmp_path / 'notes.pth'
    text.write_text('these are not weights\n')
    assert error_line(capsys, _zeroshot(color_folder, str(text))) == (
        f"evaluate.py zeroshot: error: cannot read checkpoint {text}: not a PyTorch checkpoint (neither "
        "torch.save's zip archive nor a pickle)")


def test_missing_checkpoint(capsys, color_folder, tmp_path, no_loading):
    missing = str(tmp_path / 'missing.pth')
    assert error_line(capsys, _zeroshot(color_folder, missing)) == \
        f'evaluate.py zeroshot: error: checkpoint not found: {missing}'


def test_checkpoint_of_another_config(capsys, color_folder, wider_text_checkpoint, no_loading):
    assert error_line(capsys, _zeroshot(color_folder, wider_text_checkpoint)) == (
        f'evaluate.py zeroshot: error: checkpoint {wider_text_checkpoint} does not fit config {TINY_CONFIG}: 41 '
        'weights differ in shape, first text_projection: (64, 128) in the file, (128, 128) in the model')


def test_checkpoint_of_another_model(capsys, color_folder, tmp_path, no_loading):
    path = str(tmp_path / 'classifier.pth')
    torch.save({'model': {'classifier.weight': torch.zeros(2, 2)}}, path)
    weights = len(build_unicl_model(tiny_config()).state_dict())
    assert error_line(capsys, _zeroshot(color_folder, path)).startswith(
        f"evaluate.py zeroshot: error: checkpoint {path} does not fit config {TINY_CONFIG}: it lacks {weights} of "
        f"the model's {weights} weights, first image_encoder.")


def test_unknown_config_key(capsys, color_folder, checkpoint, no_loading):
    line = error_line(capsys, _zeroshot(color_folder, checkpoint, '--opts', 'MODEL.NO_SUCH_KEY', '1'))
    assert line.startswith('evaluate.py zeroshot: error: ') and 'MODEL.NO_SUCH_KEY' in line


def test_class_names_count(capsys, color_folder, tmp_path, checkpoint, no_loading):
    names = tmp_path / 'names.txt'
    names.write_text('red\ngreen\nblue\nyellow\npurple\n')
    assert error_line(capsys, _zeroshot(color_folder, checkpoint, '--classnames', str(names))) == (
        f'evaluate.py zeroshot: error: class names for {color_folder}: {names} lists 5 class names for 6 classes')


def test_roc_auc_on_four_classes(capsys, color_folder, checkpoint, no_loading):
    for name in ('purple', 'yellow'):
        shutil.rmtree(os.path.join(color_folder, name))
    with open(os.path.join(color_folder, 'classnames.txt'), 'w') as f:
        f.write('blue\ngreen\norange\nred\n')
    assert error_line(capsys, _zeroshot(color_folder, checkpoint, '--metric', 'roc_auc')) == \
        f'evaluate.py zeroshot: error: metric roc_auc needs exactly 2 classes, {color_folder} has 4'


def test_class_folders_differ_between_splits(capsys, splits, checkpoint, no_loading):
    shutil.rmtree(os.path.join(splits['val'], 'red'))
    assert error_line(capsys, _probe(splits, checkpoint)) == (
        f"evaluate.py linear-probe: error: the val split {splits['val']} has other class folders than the train "
        f"split {splits['train']}: 'red' is only in train")


def test_missing_probe_split(capsys, splits, tmp_path, checkpoint, no_loading):
    missing = str(tmp_path / 'test')
    assert error_line(capsys, _probe(splits, checkpoint, '--test-path', missing)) == \
        f'evaluate.py linear-probe: error: no image folder {missing}'


def test_missing_caption_file(capsys, tmp_path, checkpoint, no_loading):
    missing = str(tmp_path / 'captions.tsv')
    assert error_line(capsys, ['retrieval', '--data-path', missing, *_options(checkpoint)]) == \
        f'evaluate.py retrieval: error: no caption file {missing}'


@pytest.mark.parametrize('option, message', [
    (['--epochs', '0'], 'argument --epochs: must be >= 1, got 0'),
    (['--probe-batch-size', '0'], 'argument --probe-batch-size: must be >= 1, got 0'),
    (['--num-workers', '-1'], 'argument --num-workers: must be >= 0, got -1'),
    (['--batch-size', 'many'], "argument --batch-size: expected an integer >= 1, got 'many'"),
    (['--lrs', '0.1', '0'], 'argument --lrs: must be > 0, got 0'),
    (['--lrs', 'nan'], 'argument --lrs: must be > 0, got nan'),
])
def test_option_values_refused_by_argparse(capsys, splits, checkpoint, no_loading, option, message):
    assert error_line(capsys, _probe(splits, checkpoint, *option)) == f'evaluate.py linear-probe: error: {message}'


def _suite(tmp_path, *entries) -> str:
    path = tmp_path / 'data' / 'suite.yaml'
    path.write_text('datasets:\n' + ''.join(f'  - {entry}\n' for entry in entries))
    return str(path)


def test_suite_checks_every_dataset_before_the_first(capsys, tmp_path, checkpoint, no_loading):
    make_image_folder(str(tmp_path / 'data' / 'colours'))
    suite = _suite(tmp_path, '{name: colours, path: colours}', '{name: gone, path: gone}')
    out = tmp_path / 'out'
    assert error_line(capsys, ['zeroshot', '--suite', suite, '--output', str(out), *_options(checkpoint)]) == \
        f"evaluate.py zeroshot: error: dataset gone: no image folder {tmp_path / 'data' / 'gone'}"
    assert not (out / 'suite_results.json').exists()


def test_suite_reports_every_problem_and_every_checkpoint(capsys, tmp_path, checkpoint, wider_text_checkpoint,
                                                          no_loading):
    for split in ('train', 'val'):
        make_image_folder(str(tmp_path / 'data' / 'colours' / split), per_class=2)
    shutil.rmtree(tmp_path / 'data' / 'colours' / 'val' / 'blue')
    make_image_folder(str(tmp_path / 'data' / 'memes' / 'train'), per_class=2)
    make_image_folder(str(tmp_path / 'data' / 'memes' / 'val'), per_class=2)
    suite = _suite(tmp_path, '{name: colours, path: colours}', '{name: memes, path: memes, metric: roc_auc}')
    line = error_line(capsys, ['linear-probe', '--suite', suite, '--no-cache',
                               *_options(checkpoint, wider_text_checkpoint)])
    problems = line[len('evaluate.py linear-probe: error: '):].split('; ')
    assert problems[0].startswith('dataset colours: the val split') and "'blue' is only in train" in problems[0]
    memes_val = tmp_path / 'data' / 'memes' / 'val'
    assert problems[1] == f'dataset memes: metric roc_auc needs exactly 2 classes, {memes_val} has 6'
    assert problems[2] == (f'checkpoint {wider_text_checkpoint} does not fit config {TINY_CONFIG}: 41 weights differ '
                           'in shape, first text_projection: (64, 128) in the file, (128, 128) in the model')
    assert len(problems) == 3


def test_several_checkpoints_without_a_suite(capsys, color_folder, checkpoint, no_loading):
    assert error_line(capsys, _zeroshot(color_folder, checkpoint) + ['--resume', checkpoint, checkpoint]) == \
        'evaluate.py zeroshot: error: several --resume checkpoints need --suite (zeroshot and linear-probe only)'


def test_a_real_run_prints_one_line_and_no_traceback(color_folder, wider_text_checkpoint, tmp_path):
    run = run_command(evaluate.main, _zeroshot(color_folder, wider_text_checkpoint))
    assert run.returncode == 2
    assert run.stderr.count('\n') == 1 and 'Traceback' not in run.stderr, run.stderr
    assert run.stderr.startswith(f'evaluate.py zeroshot: error: checkpoint {wider_text_checkpoint} does not fit')


def test_suite_checks_class_folder_order_before_loading(capsys, tmp_path, checkpoint, no_loading):
    root = make_image_folder(str(tmp_path / 'data' / 'numbered'), per_class=1)
    folders = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
    for name, index in zip(folders, ('1', '2', '3', '4', '5', '10')):  # '10' sorts before '2' as text
        os.rename(os.path.join(root, name), os.path.join(root, index))
    suite = _suite(tmp_path, '{name: numbered, path: numbered}')
    line = error_line(capsys, ['zeroshot', '--suite', suite, *_options(checkpoint)])
    assert line.startswith(f'evaluate.py zeroshot: error: dataset numbered: {root}: class folders named by index')

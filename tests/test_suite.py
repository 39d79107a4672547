"""Suites: the YAML file, zero-shot and linear-probe suites over several checkpoints, the result files."""
import json
import os

import pytest
import torch

import evaluate
from evaluation import load_suite, suite_markdown
from tests.conftest import ROOT, TINY_CONFIG, make_image_folder


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    return path


def test_paths_metrics_and_templates(tmp_path):
    suite = write(str(tmp_path / 'suites' / 's.yaml'), """
datasets:
  - {name: colours, path: colours}
  - {name: pets, path: /abs/pets/test, metric: mean_per_class, templates: ['a photo of a {}, a type of pet.']}
  - {name: rooted, path: ../data/x, templates: single, classnames: names.txt}
""")
    colours, pets, rooted = load_suite(suite)
    assert colours.path == str(tmp_path / 'suites' / 'colours') and colours.metric == 'accuracy'
    assert colours.templates is None and pets.path == '/abs/pets/test' and pets.metric == 'mean_per_class'
    assert pets.templates == ['a photo of a {}, a type of pet.']
    assert rooted.path == str(tmp_path / 'data' / 'x') and rooted.templates == 'single'
    assert rooted.classnames_file == str(tmp_path / 'suites' / 'names.txt')
    assert colours.classnames_file is None
    write(os.path.join(colours.path, 'classnames.txt'), 'red\n')  # shared by the splits
    assert colours.classnames_file == os.path.join(colours.path, 'classnames.txt')
    with_root = write(str(tmp_path / 'r.yaml'), 'root: /data/elevater\ndatasets:\n  - {name: a, path: cifar-10}\n')
    assert load_suite(with_root)[0].path == '/data/elevater/cifar-10'


@pytest.mark.parametrize('entry, message', [
    ('{name: a, path: b, metric: f1}', 'unknown metric'),
    ('{name: a, path: b, split: test}', 'unknown keys'),
    ('{path: b}', 'needs name and path'),
    ("{name: a, path: b, templates: ['no placeholder']}", 'placeholder|"\\{\\}"'),
])
def test_bad_entries_are_named(tmp_path, entry, message):
    suite = write(str(tmp_path / 's.yaml'), f'datasets:\n  - {entry}\n')
    with pytest.raises(ValueError, match=message):
        load_suite(suite)


def test_zeroshot_reads_test_else_val_else_the_folder_itself(tmp_path):
    """A dataset without test/ reports on val/ (as the linear probe does), never on PATH's split folders."""
    for split in ('plain/a', 'plain/b', 'noval/train/a', 'noval/val/a', 'full/val/a', 'full/test/a'):
        os.makedirs(tmp_path / split)
    suite = write(str(tmp_path / 'suite.yaml'), "datasets: [{name: p, path: plain}, {name: n, path: noval}, "
                                                "{name: f, path: full}]\n")
    plain, noval, full = load_suite(suite)
    assert plain.zeroshot_folder == str(tmp_path / 'plain') and plain.test_folder is None
    assert noval.zeroshot_folder == str(tmp_path / 'noval' / 'val') and noval.test_folder is None
    assert full.zeroshot_folder == full.test_folder == str(tmp_path / 'full' / 'test')


def test_the_shipped_elevater_suite_lists_20_datasets():
    datasets = load_suite(os.path.join(ROOT, 'configs', 'eval', 'elevater.yaml'))
    assert len(datasets) == 20 and len({d.name for d in datasets}) == 20
    metrics = {d.name: d.metric for d in datasets}
    assert metrics['voc-2007-classification'] == 'map_11point' and metrics['hateful-memes'] == 'roc_auc'
    assert metrics['oxford-iiit-pets'] == 'mean_per_class' and metrics['cifar-10'] == 'accuracy'
    assert all(isinstance(d.templates, list) and d.templates for d in datasets)


@pytest.fixture
def checkpoints(tmp_path, tiny_model):
    paths = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in tiny_model.state_dict().items()}
        paths.append(str(tmp_path / f'ckpt{seed}.pth'))
        torch.save({'model': state}, paths[-1])
    return paths


def _common(checkpoints, out):
    return ['--cfg', TINY_CONFIG, '--resume', *checkpoints, '--output', out, '--batch-size', '8',
            '--num-workers', '0', '--device', 'cpu']


def test_zeroshot_suite_over_two_checkpoints(tmp_path, checkpoints):
    make_image_folder(str(tmp_path / 'data' / 'colours'))
    make_image_folder(str(tmp_path / 'data' / 'split' / 'test'), per_class=2, seed=5)
    suite = write(str(tmp_path / 'data' / 'suite.yaml'), """
datasets:
  - {name: colours, path: colours, metric: accuracy, templates: ['a photo of a {}.']}
  - {name: split, path: split, metric: mean_per_class, templates: single}
""")
    out = str(tmp_path / 'out')
    report = evaluate.main(['zeroshot', '--suite', suite, *_common(checkpoints, out)])
    with open(os.path.join(out, 'suite_results.json')) as f:
        assert json.load(f) == report
    assert report['checkpoints'] == checkpoints and report['datasets'] == ['colours', 'split']
    for checkpoint in checkpoints:
        single = evaluate.main(['zeroshot', '--data-path', str(tmp_path / 'data' / 'split' / 'test'),
                                '--templates', 'single', '--metric', 'mean_per_class',
                                *_common([checkpoint], str(tmp_path / 'single'))])
        assert report['results']['split'][checkpoint] == {'metric': 'mean_per_class', 'value': single['value']}
        values = [report['results'][d][checkpoint]['value'] for d in report['datasets']]
        assert report['average'][checkpoint] == pytest.approx(sum(values) / 2)
    with open(os.path.join(out, 'suite_results.md')) as f:
        table = f.read()
    assert table == suite_markdown(report)
    lines = table.splitlines()
    assert lines[0].count('|') == 5 and lines[2].startswith('| colours | accuracy |')
    assert lines[-1].startswith('| **average** |') and len(lines) == 5


def test_linear_probe_suite(tmp_path, checkpoints):
    for split, per_class, seed in (('train', 3, 1), ('val', 2, 2), ('test', 2, 3)):
        make_image_folder(str(tmp_path / 'data' / 'colours' / split), per_class=per_class, seed=seed)
    suite = write(str(tmp_path / 'data' / 'suite.yaml'), 'datasets:\n  - {name: colours, path: colours}\n')
    report = evaluate.main(['linear-probe', '--suite', suite, '--no-cache', '--epochs', '2',
                            *_common(checkpoints[:1], str(tmp_path / 'out'))])
    value = report['results']['colours'][checkpoints[0]]['value']
    assert 0 <= value <= 100 and report['average'][checkpoints[0]] == value


def test_several_checkpoints_need_a_suite(tmp_path, checkpoints):
    folder = make_image_folder(str(tmp_path / 'colours'))
    with pytest.raises(SystemExit, match='need --suite'):
        evaluate.main(['zeroshot', '--data-path', folder, *_common(checkpoints, str(tmp_path / 'out'))])

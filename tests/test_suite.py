"""Suites: the YAML file, the shipped ELEVATER suite, eval transforms, zero-shot and linear-probe suites over
several checkpoints, the result files written as results come and resumed from."""
import json
import os

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode

import evaluate
from data.classnames import read_lines
from data.transforms import build_eval_transform
from evaluation import Encoder, SuiteDataset, load_suite, run_suite, suite_markdown
from evaluation.cache import feature_key
from evaluation.errors import EvaluationInputError
from tests.conftest import ROOT, TINY_CONFIG, make_image_folder, tiny_config

ELEVATER = os.path.join(ROOT, 'configs', 'eval', 'elevater.yaml')


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


def test_files_describing_the_suite_resolve_next_to_it_and_data_under_root(tmp_path):
    templates = write(str(tmp_path / 'suites' / 'prompts' / 't.txt'), 'a {}.\n')
    suite = write(str(tmp_path / 'suites' / 's.yaml'), """root: /data/elevater
datasets:
  - {name: a, path: cifar-10, classnames: classnames/cifar-10.txt, templates: prompts/t.txt, transform: squash}
  - {name: b, path: mnist, transform: crop}
  - {name: c, path: dtd}
""")
    a, b, c = load_suite(suite)
    assert a.path == '/data/elevater/cifar-10' and a.classnames == str(tmp_path / 'suites/classnames/cifar-10.txt')
    assert a.templates == templates
    assert (a.transform, b.transform, c.transform) == ('squash', 'crop', None)


@pytest.mark.parametrize('entry, message', [
    ('{name: a, path: b, metric: f1}', 'unknown metric'),
    ('{name: a, path: b, split: test}', 'unknown keys'),
    ('{path: b}', 'needs name and path'),
    ("{name: a, path: b, templates: ['no placeholder']}", 'placeholder|"\\{\\}"'),
    ('{name: a, path: b, transform: stretch}', "unknown transform 'stretch'.*crop.*resize.*squash"),
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


# NUM_CLASSES and TEST.METRIC of the ELEVATER toolkit's vision_benchmark/resources/datasets/*.yaml, and the
# length of each dataset's list in template_map of vision_benchmark/datasets/prompts.py.
ELEVATER_DATASETS = {
    'caltech-101': (102, 'mean_per_class', 34), 'cifar-10': (10, 'accuracy', 18),
    'cifar-100': (100, 'accuracy', 18), 'country211': (211, 'accuracy', 5), 'dtd': (47, 'accuracy', 8),
    'eurosat_clip': (10, 'accuracy', 3), 'fer-2013': (7, 'accuracy', 6),
    'fgvc-aircraft-2013b-variants102': (100, 'mean_per_class', 2), 'food-101': (101, 'accuracy', 1),
    'gtsrb': (43, 'accuracy', 3), 'hateful-memes': (2, 'roc_auc', 1), 'kitti-distance': (4, 'accuracy', 1),
    'mnist': (10, 'accuracy', 1), 'oxford-flower-102': (102, 'mean_per_class', 1),
    'oxford-iiit-pets': (37, 'mean_per_class', 1), 'patch-camelyon': (2, 'accuracy', 1),
    'rendered-sst2': (2, 'accuracy', 1), 'resisc45_clip': (45, 'accuracy', 18),
    'stanford-cars': (196, 'accuracy', 8), 'voc-2007-classification': (20, 'map_11point', 1),
}


def test_the_shipped_elevater_suite_is_the_benchmark():
    datasets = load_suite(ELEVATER)
    assert [d.name for d in datasets] == sorted(ELEVATER_DATASETS)
    for d in datasets:
        num_classes, metric, num_templates = ELEVATER_DATASETS[d.name]
        assert d.classnames == os.path.join(ROOT, 'configs', 'eval', 'classnames', f'{d.name}.txt')
        names = read_lines(d.classnames)
        assert len(names) == num_classes and len(set(names)) == num_classes, d.name
        assert (d.metric, len(d.templates)) == (metric, num_templates), d.name
        assert d.transform == ('squash' if d.name == 'kitti-distance' else 'crop'), d.name
        assert d.path == os.path.join('/data/elevater', d.name)
    by_name = {d.name: d for d in datasets}
    assert by_name['voc-2007-classification'].templates == ['a photo of a {}.']
    assert by_name['caltech-101'].templates[-1] == 'a doodle of the {}.'
    assert by_name['kitti-distance'].templates == ['{}']
    assert read_lines(by_name['fer-2013'].classnames)[3] == 'happy; smiling'  # ELEVATER's synonyms, first used
    assert read_lines(by_name['cifar-10'].classnames)[:2] == ['airplane', 'automobile']


# ----------------------------------------------------------------------------------------------------
# Eval transforms
# ----------------------------------------------------------------------------------------------------
def _gradient(width=120, height=80):
    """A non-square image whose pixels tell where they came from."""
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    pixels = torch.stack([x, y, 255 - x], dim=-1).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _by_hand(image, size, crop):
    bicubic = InterpolationMode.BICUBIC
    image = TF.resize(image, size, interpolation=bicubic)
    if crop is not None:
        image = TF.center_crop(image, crop)
    return TF.normalize(TF.to_tensor(image), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


@pytest.mark.parametrize('mode, size, crop', [
    (None, int(256 / 224 * 64), 64),   # the official validation transform, as training validates
    ('resize', int(256 / 224 * 64), 64),
    ('crop', 64, 64),                  # ELEVATER: shorter side to 64 (96 x 64), centre 64 x 64
    ('squash', [64, 64], None),        # ELEVATER without a crop: the whole 120 x 80 frame in 64 x 64
])
def test_eval_transform_modes_against_torchvision_by_hand(mode, size, crop):
    image = _gradient()
    out = build_eval_transform(tiny_config(), mode)(image)
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out, _by_hand(image, size, crop), atol=1e-6)


def test_eval_transform_modes_differ_and_unknown_is_refused():
    image, config = _gradient(), tiny_config()
    outputs = {mode: build_eval_transform(config, mode)(image) for mode in ('resize', 'crop', 'squash')}
    assert repr(build_eval_transform(config)) == repr(build_eval_transform(config, 'resize'))
    # The squashed image spans the whole width: its left column is the image's left edge.
    assert outputs['squash'][0, :, 0].mean() < outputs['crop'][0, :, 0].mean() < outputs['resize'][0, :, 0].mean()
    with pytest.raises(ValueError, match=r"unknown eval transform 'stretch'; known: \['crop', 'resize', 'squash'\]"):
        build_eval_transform(config, 'stretch')


def test_encoder_with_transform_shares_the_model_and_changes_the_cache_key(tiny_model, tokenizer, tiny_cfg):
    encoder = Encoder(tiny_model, tokenizer, tiny_cfg, torch.device('cpu'))
    crop = encoder.with_transform('crop')
    assert crop.model is encoder.model and crop.tokenizer is encoder.tokenizer and crop.transform_mode == 'crop'
    assert repr(encoder.transform) == repr(build_eval_transform(tiny_cfg))
    keys = {mode: feature_key('sha', 'config', encoder.with_transform(mode).transform, None, [], [])
            for mode in (None, 'resize', 'crop', 'squash')}
    assert keys[None] == keys['resize'] and len({keys['resize'], keys['crop'], keys['squash']}) == 3


# ----------------------------------------------------------------------------------------------------
# Class folders against the class-names file
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('folders, names, refused', [
    (['000', '001', '010'], ['a', 'b', 'c'], None),
    (['0', '1', '10', '2'], ['a', 'b', 'c', 'd'], 'zero-pad'),
    (['cat', 'dog'], ['cat', 'dog'], None),
    (['Great_Dane', 'cat'], ['cat; kitty', 'great dane'], 'another order'),
    (['x', 'y'], ['dog', 'cat'], None),  # nothing to compare: the count is checked when names are read
])
def test_class_folders_that_misalign_with_the_names_are_refused(tmp_path, folders, names, refused):
    for folder in folders:
        os.makedirs(tmp_path / 'd' / 'test' / folder)
    write(str(tmp_path / 'names.txt'), '\n'.join(names) + '\n')
    dataset = SuiteDataset('d', str(tmp_path / 'd'), classnames=str(tmp_path / 'names.txt'))
    if refused:
        with pytest.raises(EvaluationInputError, match=refused):
            dataset.check_class_folders(dataset.zeroshot_folder)
    else:
        dataset.check_class_folders(dataset.zeroshot_folder)


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
        assert report['results']['split'][checkpoint] == {
            'metric': 'mean_per_class', 'value': single['value'], 'mode': 'zeroshot', 'top1': single['top1'],
            'top5': single['top5'], 'num_images': 13, 'num_classes': 6, 'split': 'test', 'transform': 'resize'}
        colours = report['results']['colours'][checkpoint]
        assert (colours['split'], colours['num_images'], colours['mode']) == ('.', 19, 'zeroshot')
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
    report = evaluate.main(['linear-probe', '--suite', suite, '--no-cache', '--protocol', 'elevater',
                            '--epochs', '2', '--final-epochs', '2', *_common(checkpoints[:1], str(tmp_path / 'out'))])
    result = report['results']['colours'][checkpoints[0]]
    assert 0 <= result['value'] <= 100 and report['average'][checkpoints[0]] == result['value']
    assert (result['mode'], result['split'], result['transform']) == ('linear-probe', 'test', 'resize')
    assert (result['protocol'], result['report_rule']) == ('elevater', 'best_epoch_on_test')
    assert (result['num_train'], result['num_test']) == (19, 13) and {'lr', 'weight_decay'} <= set(result)


def test_several_checkpoints_need_a_suite(tmp_path, checkpoints, capsys):
    folder = make_image_folder(str(tmp_path / 'colours'))
    with pytest.raises(SystemExit) as exit_info:  # the message in the exit or as a one-line error on stderr
        evaluate.main(['zeroshot', '--data-path', folder, *_common(checkpoints, str(tmp_path / 'out'))])
    assert 'need --suite' in str(exit_info.value) + capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Averages, result files written as results come, resuming
# ----------------------------------------------------------------------------------------------------
def _fake_suite(values):
    """Datasets and callbacks for `run_suite` without a model: `values[checkpoint][dataset]`."""
    names = list(next(iter(values.values())))
    calls = []

    def evaluate_one(encoder, dataset):
        calls.append((encoder, dataset.name))
        return {'value': values[encoder][dataset.name], 'mode': 'fake'}

    return [SuiteDataset(n, f'/data/{n}') for n in names], (lambda checkpoint: checkpoint), evaluate_one, calls


@pytest.mark.parametrize('values, average', [
    ({'a': {'d1': 10.0, 'd2': 20.0, 'd3': 60.0}}, {'a': 30.0}),
    ({'a': {'d1': 10.0, 'd2': 20.0, 'd3': 60.0}, 'b': {'d1': 1.0, 'd2': 2.0, 'd3': 6.0}}, {'a': 30.0, 'b': 3.0}),
])
def test_the_average_is_over_datasets_per_checkpoint(tmp_path, values, average):
    datasets, load, evaluate_one, calls = _fake_suite(values)
    report = run_suite(list(values), datasets, load, evaluate_one, str(tmp_path))
    assert report['average'] == pytest.approx(average)
    assert report['results']['d3']['a'] == {'metric': 'accuracy', 'value': 60.0, 'mode': 'fake'}
    assert len(calls) == 3 * len(values)
    with open(tmp_path / 'suite_results.json') as f:
        assert json.load(f) == report


def test_settings_that_differ_are_refused_before_any_work(tmp_path):
    values = {'a': {'d1': 10.0, 'd2': 20.0}}
    datasets, load, evaluate_one, calls = _fake_suite(values)
    run_suite(['a'], datasets, load, evaluate_one, str(tmp_path), {'templates': 'imagenet', 'amp': None})
    with open(tmp_path / 'suite_results.json') as f:
        before = f.read()
    with pytest.raises(EvaluationInputError, match=r'differing: amp, templates\): pass --fresh .* --output'):
        run_suite(['a', 'b'], datasets, load, evaluate_one, str(tmp_path), {'templates': 'single', 'amp': 'bf16'})
    assert len(calls) == 2
    with open(tmp_path / 'suite_results.json') as f:
        assert f.read() == before
    report = run_suite(['a'], datasets, load, evaluate_one, str(tmp_path), {'templates': 'single'}, fresh=True)
    assert len(calls) == 4 and report['settings'] == {'templates': 'single'}


@pytest.fixture
def three_datasets(tmp_path):
    for i, name in enumerate(('first', 'second', 'third')):
        make_image_folder(str(tmp_path / 'data' / name / 'test'), per_class=1, extra=0, size=32, seed=i)
    return write(str(tmp_path / 'data' / 'suite.yaml'), """
datasets:
  - {name: first, path: first, templates: single}
  - {name: second, path: second, metric: mean_per_class, templates: single, transform: crop}
  - {name: third, path: third, templates: single, transform: squash}
""")


def _counting_zeroshot(monkeypatch, fail_on=None):
    """evaluate.run_zeroshot, counting the datasets it evaluates and failing on `fail_on`."""
    real, calls = evaluate.run_zeroshot, []

    def counted(encoder, folder, *args, **kwargs):
        name = os.path.basename(os.path.dirname(folder))
        calls.append(name)
        if name == fail_on:
            raise RuntimeError(f'killed while evaluating {name}')
        return real(encoder, folder, *args, **kwargs)

    monkeypatch.setattr(evaluate, 'run_zeroshot', counted)
    return calls


def _read(out, name='suite_results.json'):
    with open(os.path.join(out, name)) as f:
        return json.load(f) if name.endswith('.json') else f.read()


def test_a_suite_interrupted_after_dataset_2_resumes_at_dataset_3(tmp_path, checkpoint, three_datasets,
                                                                  monkeypatch):
    uninterrupted = evaluate.main(['zeroshot', '--suite', three_datasets,
                                   *_common([checkpoint], str(tmp_path / 'whole'))])
    out = str(tmp_path / 'out')
    calls = _counting_zeroshot(monkeypatch, fail_on='third')
    with pytest.raises(RuntimeError, match='killed while evaluating third'):
        evaluate.main(['zeroshot', '--suite', three_datasets, *_common([checkpoint], out)])
    partial = _read(out)
    assert calls == ['first', 'second', 'third']
    assert {name: list(row) for name, row in partial['results'].items()} == {
        'first': [checkpoint], 'second': [checkpoint], 'third': []}
    assert partial['results']['second'] == uninterrupted['results']['second'] and partial['average'] == {}
    assert '| third |  | - |' in _read(out, 'suite_results.md')

    monkeypatch.undo()
    calls = _counting_zeroshot(monkeypatch)
    report = evaluate.main(['zeroshot', '--suite', three_datasets, *_common([checkpoint], out)])
    assert calls == ['third']
    assert report == uninterrupted == _read(out)
    assert _read(out, 'suite_results.md') == _read(str(tmp_path / 'whole'), 'suite_results.md')
    log = _read(out, 'log_rank0.txt')
    assert log.count('skipped: already in suite_results.json') == 2 and 'on first: skipped' in log
    result = report['results']['third'][checkpoint]
    assert (result['mode'], result['split'], result['num_images'], result['transform']) == (
        'zeroshot', 'test', 6, 'squash')
    assert report['results']['second'][checkpoint]['transform'] == 'crop'


def test_a_resumed_suite_needs_the_same_settings_or_fresh(tmp_path, checkpoint, three_datasets, monkeypatch):
    out = str(tmp_path / 'out')
    first = evaluate.main(['zeroshot', '--suite', three_datasets, *_common([checkpoint], out)])
    assert first['settings']['transform'] == 'resize' and 'output' not in first['settings']
    calls = _counting_zeroshot(monkeypatch)
    with pytest.raises((EvaluationInputError, SystemExit)):
        evaluate.main(['zeroshot', '--suite', three_datasets, '--transform', 'crop',
                       *_common([checkpoint], out)])
    assert calls == [] and _read(out) == first
    # Options that cannot change a number (batch size, device, workers) do not block a resume.
    again = evaluate.main(['zeroshot', '--suite', three_datasets, *_common([checkpoint], out), '--batch-size', '3'])
    assert calls == [] and again == first
    fresh = evaluate.main(['zeroshot', '--suite', three_datasets, '--transform', 'crop', '--fresh',
                           *_common([checkpoint], out)])
    assert calls == ['first', 'second', 'third'] and _read(out) == fresh
    assert fresh['settings']['transform'] == 'crop' and fresh['results']['first'][checkpoint]['transform'] == 'crop'
    assert fresh['results']['third'][checkpoint]['transform'] == 'squash'  # the dataset's own wins

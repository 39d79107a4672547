"""Linear probe: the protocol on generated features, the command line, the feature cache, torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import evaluation.encoder
from evaluation import Encoder, ProbeSettings, linear_probe, run_linear_probe, run_zeroshot
from evaluation.linear_probe import balanced_split, search_hyperparameters
from tests.conftest import ROOT, TINY_CONFIG, child_env, make_image_folder


def gaussian_classes(num_classes: int, per_class: int, dim: int, seed: int, spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)),
                                            dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centers[labels] + spread / dim ** 0.5 * torch.randn(len(labels), dim, generator=g), labels


def test_separable_set_far_above_chance():
    train, val, test = (gaussian_classes(5, n, 32, seed) for n, seed in ((40, 0), (10, 1), (30, 2)))
    result = linear_probe(train, val, test, num_classes=5, settings=ProbeSettings(epochs=20, batch_size=64))
    assert result.top1 > 95 and result.value == result.top1  # chance: 20
    assert (result.num_train, result.num_test) == (250, 150)
    assert len(result.search) == len(ProbeSettings().learning_rates) * len(ProbeSettings().weight_decays)


def few_samples_many_noise_dims(n: int, seed: int):
    """One informative dimension among 300 noise dimensions: with 20 training images an unregularized head
    fits the noise; a strong L2 penalty keeps it near the class-mean direction, which generalizes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, 300, generator=g)
    features[:, 0] += (2 * labels - 1) * 2.0
    return features, labels


def test_search_picks_the_weight_decay_that_generalizes():
    train, val = few_samples_many_noise_dims(20, 0), few_samples_many_noise_dims(400, 1)
    settings = ProbeSettings(learning_rates=(0.01,), weight_decays=(0.0, 1e-2, 1.0), epochs=100, batch_size=20)
    (lr, wd), search = search_hyperparameters(train, val, 2, 'accuracy', settings)
    values = {r['weight_decay']: r['value'] for r in search}
    assert wd == 1.0 and values[1.0] > values[0.0] + 15, values
    # the order of the grid does not decide
    reordered = ProbeSettings(learning_rates=(0.01,), weight_decays=(1.0, 0.0, 1e-2), epochs=100, batch_size=20)
    assert search_hyperparameters(train, val, 2, 'accuracy', reordered)[0] == (0.01, 1.0)


def test_balanced_split_holds_out_a_fifth_of_every_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    kept, held = balanced_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(17))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 1, 1]
    assert torch.equal(balanced_split(labels, 0.2, seed=0)[1], held)


@pytest.fixture
def splits(tmp_path):
    return {name: make_image_folder(str(tmp_path / name), per_class=per_class, seed=seed)
            for name, per_class, seed in (('train', 4, 1), ('val', 2, 2), ('test', 2, 3))}


def test_text_head_without_training_is_the_zeroshot_classifier(splits, tiny_model, tiny_cfg, tokenizer):
    encoder = Encoder(tiny_model, tokenizer, tiny_cfg, torch.device('cpu'), batch_size=8, num_workers=0)
    probe = run_linear_probe(encoder, splits['train'], splits['val'], splits['test'], init_head='text',
                             templates='single', settings=ProbeSettings(epochs=0))
    zeroshot = run_zeroshot(encoder, splits['test'], templates='single')
    assert probe.top1 == pytest.approx(zeroshot.top1) and probe.num_test == zeroshot.num_images == 13


def _probe(splits, checkpoint, out, cache, *extra):
    return evaluate.main(['linear-probe', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--train-path',
                          splits['train'], '--val-path', splits['val'], '--test-path', splits['test'], '--output', out,
                          '--batch-size', '8', '--num-workers', '0', '--device', 'cpu', '--cache-dir', cache,
                          '--epochs', '5', *extra])


class CountingExtraction:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = evaluation.encoder.image_features

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(evaluation.encoder, 'image_features', counted)


def test_cli_results_and_feature_cache(splits, checkpoint, tmp_path, monkeypatch):
    extraction = CountingExtraction(monkeypatch)
    cache, out = str(tmp_path / 'cache'), str(tmp_path / 'out')
    first = _probe(splits, checkpoint, out, cache)
    with open(os.path.join(out, 'linear_probe_results.json')) as f:
        assert json.load(f) == first
    for key in ('top1', 'metric', 'value', 'lr', 'weight_decay', 'num_train', 'num_test'):
        assert key in first
    assert (first['num_train'], first['num_test'], first['metric']) == (25 + 13, 13, 'accuracy')
    assert extraction.calls == 3 and len(os.listdir(cache)) == 3  # train, val, test

    assert _probe(splits, checkpoint, out, cache) == first
    assert extraction.calls == 3  # all three from the cache

    make_image_folder(splits['test'], per_class=3, seed=4)  # the test folder changes: only it is recomputed
    _probe(splits, checkpoint, out, cache)
    assert extraction.calls == 4

    state = torch.load(checkpoint, weights_only=True)
    state['model']['logit_scale'] += 0.5
    changed = str(tmp_path / 'changed.pth')
    torch.save(state, changed)
    _probe(splits, changed, out, cache)
    assert extraction.calls == 7  # another checkpoint: every split again


def test_without_test_split_the_search_holds_out_part_of_train(splits, checkpoint, tmp_path):
    result = evaluate.main(['linear-probe', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--train-path',
                            splits['train'], '--val-path', splits['val'], '--output', str(tmp_path / 'o'),
                            '--batch-size', '8', '--num-workers', '0', '--device', 'cpu', '--no-cache',
                            '--epochs', '3', '--metric', 'mean_per_class'])
    assert (result['num_train'], result['num_test'], result['metric']) == (25, 13, 'mean_per_class')


def test_unreadable_training_image_is_named(splits, checkpoint, tmp_path):
    with open(os.path.join(splits['train'], 'red', 'broken.png'), 'wb') as f:
        f.write(b'not a png')
    with pytest.raises(RuntimeError, match='cannot read image .*broken.png'):
        _probe(splits, checkpoint, str(tmp_path / 'out'), str(tmp_path / 'cache'))


def test_torchrun_two_processes_match_one(splits, checkpoint, tmp_path):
    single = _probe(splits, checkpoint, str(tmp_path / 'single'), str(tmp_path / 'cache1'))
    double = str(tmp_path / 'double')
    env = child_env(OMP_NUM_THREADS='1')
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    os.path.join(ROOT, 'evaluate.py'), 'linear-probe', '--cfg', TINY_CONFIG, '--resume', checkpoint,
                    '--train-path', splits['train'], '--val-path', splits['val'], '--test-path', splits['test'],
                    '--output', double, '--batch-size', '8', '--num-workers', '0', '--device', 'cpu',
                    '--cache-dir', str(tmp_path / 'cache2'), '--epochs', '5'],
                   check=True, env=env, cwd=ROOT, timeout=300)
    with open(os.path.join(double, 'linear_probe_results.json')) as f:
        two = json.load(f)
    for key in ('num_train', 'num_test', 'lr', 'weight_decay'):
        assert two[key] == single[key]
    assert two['top1'] == pytest.approx(single['top1']) and two['value'] == pytest.approx(single['value'])
    cached = [torch.load(os.path.join(d, name), weights_only=True)['features']
              for d in (str(tmp_path / 'cache1'), str(tmp_path / 'cache2')) for name in sorted(os.listdir(d))]
    for a, b in zip(cached[:3], cached[3:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

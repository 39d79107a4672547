"""Linear probe: both protocols on generated features against outside references (scikit-learn's
LogisticRegressionCV, torch's own SGD and BatchNorm1d), the ELEVATER search grid, few-shot sampling, hold-out
splits, the command line, the feature cache, torchrun."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

import evaluate
import evaluation.encoder
import evaluation.logistic
from evaluation import Encoder, ProbeSettings, probe_features, run_linear_probe, run_zeroshot
from evaluation.cache import feature_key
from evaluation.elevater_probe import ElevaterSettings, first_part_of_each_class, train_heads
from evaluation.linear_probe import balanced_split, class_folds, few_shot_indices
from evaluation.search import WeightDecaySearch, search_together
from tests.conftest import TINY_CONFIG, make_image_folder, run_like_torchrun


def gaussian_classes(num_classes: int, per_class: int, dim: int, seed: int, spread: float):
    """Unit-norm features around fixed class centres (as image embeddings are), classes in blocks."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)),
                                            dim=1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centers[labels] + spread / dim ** 0.5 * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(features, dim=1), labels


# ----------------------------------------------------------------------------------------------------
# The default protocol against scikit-learn
# ----------------------------------------------------------------------------------------------------
def test_default_protocol_within_half_a_point_of_logistic_regression_cv():
    """A hard generated case (overlapping classes, well below 100 %): the probe cross-validated on train and
    refit, against LogisticRegressionCV (5-fold CV over its C grid) on the same train, both scored on the same
    10,000 test images, so the paired difference's standard error (printed) is far below the 0.5 points."""
    from sklearn.linear_model import LogisticRegressionCV

    train, test = gaussian_classes(10, 60, 64, 0, spread=3.0), gaussian_classes(10, 1000, 64, 1, spread=3.0)
    report = probe_features({'train': train, 'val': test}, 10, 'accuracy', ProbeSettings())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        reference = LogisticRegressionCV(max_iter=1000).fit(train[0].numpy(), train[1].numpy())
    sklearn_right = reference.predict(test[0].numpy()) == test[1].numpy()
    ours_right = (report.runs[0].test_scores.argmax(dim=1) == test[1]).numpy()
    difference = 100 * (ours_right.astype(float) - sklearn_right).mean()
    se = 100 * (ours_right.astype(float) - sklearn_right).std(ddof=1) / len(sklearn_right) ** 0.5
    assert 30 < 100 * sklearn_right.mean() < 95  # a case where the regularization matters
    assert se < 0.25
    assert difference >= -0.5, (difference, se)
    assert report.report_rule == 'final_head' and report.runs[0].lr is None


def _sklearn_minimizer(x, y, weight_decay):
    """scikit-learn's multinomial logistic regression solved to 1e-10 by Newton steps: its objective,
    sum loss + ||W||^2 / (2 C), is ours times n for C = 1 / (weight_decay * n)."""
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(C=1 / (weight_decay * len(y)), solver='newton-cholesky', tol=1e-10, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.fit(x.double().numpy(), y.numpy())
    return torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_)


def _objective(head, x, y, weight_decay):
    logits = x.double() @ head.weight.T + head.bias
    return torch.nn.functional.cross_entropy(logits, y).item() + weight_decay / 2 * head.weight.pow(2).sum().item()


@pytest.mark.parametrize('weight_decay', [1e-2, 1e-6])
def test_fit_logistic_reaches_the_minimizer(weight_decay):
    """Features as embeddings are (unit norm, a large common component, a few directions of large variance,
    many of almost none): the fit reaches scikit-learn's Newton solution, also weakly regularized. Measured
    at weight decay 1e-6: objective 1.7e-6 above Newton's (relative), weights within 0.17 % of its largest;
    plain L-BFGS on the raw features (the solver before the preconditioner) stopped at 1.5e-5 and 0.5 %.
    Softmax logits are defined up to a constant per image, so the heads are compared with their class means
    removed."""
    from evaluation.logistic import fit_logistic

    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, -3, 32, dtype=torch.float64)
    labels = torch.arange(6).repeat_interleave(40)
    centers = torch.randn(6, 32, generator=g, dtype=torch.float64) * scales
    features = centers[labels] + torch.randn(240, 32, generator=g, dtype=torch.float64) * scales * 0.8
    features[:, 0] += 3.0  # the common component
    features = torch.nn.functional.normalize(features, dim=1)
    head = fit_logistic(features, labels, 6, weight_decay)
    weight, bias = _sklearn_minimizer(features, labels, weight_decay)
    reference = evaluation.logistic.LinearHead(weight, bias)
    optimum = _objective(reference, features, labels, weight_decay)
    assert _objective(head, features, labels, weight_decay) <= optimum * (1 + 3e-6)
    torch.testing.assert_close(head.weight - head.weight.mean(0), weight - weight.mean(0),
                               atol=3e-3 * weight.abs().max(), rtol=0)


def test_warm_start_reaches_the_same_head():
    """A fit that starts at another weight decay's solution (the search's warm start) ends at the same head."""
    from evaluation.logistic import fit_logistic

    features, labels = gaussian_classes(5, 30, 16, 0, spread=2.0)
    cold = fit_logistic(features, labels, 5, 1e-3)
    warm = fit_logistic(features, labels, 5, 1e-3, init=fit_logistic(features, labels, 5, 1e-1))
    x = features.double()
    assert _objective(warm, x, labels, 1e-3) == pytest.approx(_objective(cold, x, labels, 1e-3), rel=1e-9)
    scale = cold.weight.abs().max()
    torch.testing.assert_close(warm.weight, cold.weight, atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(warm.bias - warm.bias.mean(), cold.bias - cold.bias.mean(), atol=1e-4 * scale, rtol=0)


# ----------------------------------------------------------------------------------------------------
# The ELEVATER protocol
# ----------------------------------------------------------------------------------------------------
def test_weight_decay_search_visits_elevater_grid():
    """Coarse 7 points of logspace(-6, 6, 97), then spans 8, 4, 2, 1 around the peak, strict improvements."""
    search = WeightDecaySearch()
    assert len(search.grid) == 97 and search.coarse == [0, 16, 32, 48, 64, 80, 96]
    peak = 30  # a unimodal score with its top at grid index 30
    rounds = []

    def score(pairs):
        rounds.append([i for _, i in pairs])
        return [100 - abs(i - peak) for _, i in pairs]

    search_together([search], score)
    assert rounds == [[0, 16, 32, 48, 64, 80, 96], [24, 40], [28, 36], [30, 34], [29, 31]]
    assert search.best == (search.grid[30], 100)
    assert search.grid[30] == pytest.approx(10 ** (-6 + 30 * 12 / 96))


def test_weight_decay_search_without_any_positive_score_ends_at_the_last_point():
    """ELEVATER's peak starts at index -1 with score 0: nothing above 0 leaves it there (weight decay 1e6)."""
    search = WeightDecaySearch()
    search_together([search], lambda pairs: [0.0] * len(pairs))
    assert search.best == (1e6, 0.0)


def test_elevater_search_records_every_point_it_trains():
    train = gaussian_classes(3, 10, 8, 0, spread=0.5)
    test = gaussian_classes(3, 5, 8, 1, spread=0.5)
    settings = ProbeSettings(protocol='elevater', elevater=ElevaterSettings(epochs=2, final_epochs=3))
    run = probe_features({'train': train, 'val': test}, 3, 'accuracy', settings).runs[0]
    grid = set(WeightDecaySearch().grid)
    for lr in np.logspace(-6, -1, 6).tolist():
        tried = [p['weight_decay'] for p in run.search if p['lr'] == lr]
        assert set(tried) <= grid and {WeightDecaySearch().grid[i] for i in WeightDecaySearch().coarse} <= set(tried)
        assert len(tried) == len(set(tried)) <= 7 + 8  # each point trained once
    assert run.lr in np.logspace(-6, -1, 6).tolist() and run.weight_decay in grid
    assert (run.num_search_train, run.num_search_val, run.num_train) == (24, 6, 30)  # first 2 of each 10
    assert run.value == max(run.extra['curve']) and len(run.extra['curve']) == 3
    assert run.extra['curve'][run.extra['best_epoch'] - 1] == run.value


def test_elevater_heads_train_exactly_as_torch_modules_do():
    """One head of the batched trainer against BatchNorm1d(affine=False) + Linear + torch.optim.SGD (momentum
    0.9, weight decay) on the same batches: the same logits after every epoch."""
    train, val = gaussian_classes(4, 13, 16, 0, spread=1.0), gaussian_classes(4, 3, 16, 1, spread=1.0)
    text = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    settings = ElevaterSettings(batch_size=8, seed=5)
    lr, wd, epochs = 0.05, 1e-3, 3
    _, logits = train_heads(train, val, 4, [(lr, wd)], epochs, settings, 'accuracy', text)

    norm, linear = torch.nn.BatchNorm1d(16, affine=False), torch.nn.Linear(16, 4)
    with torch.no_grad():
        linear.weight.copy_(text)
        linear.bias.zero_()
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    generator = torch.Generator().manual_seed(5)
    for epoch in range(epochs):
        norm.train()
        order = torch.randperm(len(train[1]), generator=generator)
        for start in range(0, len(order), 8):
            batch = order[start:start + 8]
            if len(batch) == 1:
                continue
            loss = torch.nn.functional.cross_entropy(linear(norm(train[0][batch])), train[1][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        norm.eval()
        with torch.no_grad():
            torch.testing.assert_close(logits[epoch], linear(norm(val[0])), atol=1e-5, rtol=1e-5)


def test_elevater_one_shot_draws_two_and_trains_on_one():
    train, test = gaussian_classes(3, 6, 8, 0, spread=0.5), gaussian_classes(3, 2, 8, 1, spread=0.5)
    settings = ProbeSettings(protocol='elevater', shots=1, elevater=ElevaterSettings(epochs=1, final_epochs=1))
    report = probe_features({'train': train, 'val': test}, 3, 'accuracy', settings)
    run = report.runs[0]
    assert report.shots == 2 and (run.num_search_train, run.num_search_val, run.num_train) == (3, 3, 3)
    assert 'without its validation part' in report.splits['final']


# ----------------------------------------------------------------------------------------------------
# Splits and few-shot sampling
# ----------------------------------------------------------------------------------------------------
def test_few_shot_picks_k_per_class_with_the_seed():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    picks = {seed: few_shot_indices(labels, 5, seed) for seed in (0, 1)}
    for chosen in picks.values():
        assert [int((labels[chosen] == c).sum()) for c in range(3)] == [5, 5, 3]  # a class with fewer: all
        assert torch.equal(chosen, chosen.sort().values)
    assert torch.equal(few_shot_indices(labels, 5, 0), picks[0]) and not torch.equal(picks[0], picks[1])


def test_hold_out_splits_never_take_a_class_only_image():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    kept, held = balanced_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(16))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 1, 0]
    assert set(labels[kept].tolist()) == {0, 1, 2}
    train, val = first_part_of_each_class(labels, 0.2)
    assert val.tolist() == [0, 1, 10]  # ceil(20 %) of each class, the first in order
    assert set(labels[train].tolist()) == {0, 1, 2}
    folds = class_folds(labels, 5, seed=0)
    held = torch.cat([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(15))  # every image held out once, except class 2's only one
    for kept, _ in folds:
        assert set(labels[kept].tolist()) == {0, 1, 2}


# ----------------------------------------------------------------------------------------------------
# From image folders
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def splits(tmp_path):
    return {name: make_image_folder(str(tmp_path / name), per_class=per_class, seed=seed)
            for name, per_class, seed in (('train', 4, 1), ('val', 2, 2), ('test', 2, 3))}


def test_text_head_before_training_is_the_zeroshot_classifier_with_its_logit_scale(splits, tiny_model, tiny_cfg,
                                                                                  tokenizer):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(2.5)  # exp(2.5) = 12.2: a head without the scale gives other logits
    encoder = Encoder(tiny_model, tokenizer, tiny_cfg, torch.device('cpu'), batch_size=8, num_workers=0)
    probe = run_linear_probe(encoder, splits['train'], splits['val'], splits['test'], init_head='text',
                             templates='single', settings=ProbeSettings(max_iterations=0))
    zeroshot = run_zeroshot(encoder, splits['test'], templates='single', keep_predictions=True)
    top = torch.tensor([p['scores'] for p in zeroshot.predictions])
    head_top = probe.runs[0].test_scores.topk(top.shape[1], dim=1).values
    torch.testing.assert_close(head_top, top, atol=1e-4, rtol=1e-4)
    assert probe.top1 == pytest.approx(zeroshot.top1) and probe.runs[0].num_test == zeroshot.num_images == 13


def _probe(splits, checkpoint, out, cache, *extra):
    return evaluate.main(['linear-probe', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--train-path',
                          splits['train'], '--val-path', splits['val'], '--test-path', splits['test'], '--output', out,
                          '--batch-size', '8', '--num-workers', '0', '--device', 'cpu', '--cache-dir', cache, *extra])


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
    assert (first['protocol'], first['report_rule'], first['lr']) == ('default', 'final_head', None)
    assert (first['num_train'], first['num_test'], first['metric']) == (25 + 13, 13, 'accuracy')
    assert first['splits'] == {'search': 'train, scored on val', 'final': 'train + val', 'report': 'test'}
    assert extraction.calls == 3 and len(os.listdir(cache)) == 3  # train, val, test

    assert _probe(splits, checkpoint, out, cache) == first
    assert extraction.calls == 3  # all three from the cache

    make_image_folder(splits['test'], per_class=3, seed=4)  # the test folder changes: only it is recomputed
    _probe(splits, checkpoint, out, cache)
    assert extraction.calls == 4

    _probe(splits, checkpoint, out, cache, '--amp', 'bf16')  # other autocast: other features
    assert extraction.calls == 7

    state = torch.load(checkpoint, weights_only=True)
    state['model']['logit_scale'] += 0.5
    changed = str(tmp_path / 'changed.pth')
    torch.save(state, changed)
    _probe(splits, changed, out, cache)
    assert extraction.calls == 10  # another checkpoint: every split again


def test_feature_cache_key_covers_the_autocast_dtype(splits):
    paths = [os.path.join(splits['test'], 'red', '0.png')]
    keys = {feature_key('sha', 'cfg', 'transform', dtype, paths, [0])
            for dtype in (None, torch.bfloat16, torch.float16)}
    assert len(keys) == 3


def test_save_features_writes_what_the_head_is_trained_on(splits, checkpoint, tmp_path):
    out = str(tmp_path / 'out')
    _probe(splits, checkpoint, out, str(tmp_path / 'cache'), '--save-features')
    for name in ('train', 'val', 'test'):
        saved = torch.load(os.path.join(out, f'features_{name}.pt'), weights_only=True)
        folder = evaluation.data.image_folder(splits[name])
        assert saved['features'].dtype == torch.float32 and saved['labels'].dtype == torch.int64
        assert saved['labels'].tolist() == folder.labels and saved['paths'] == folder.paths
        assert saved['features'].shape[0] == len(folder) and saved['features'].norm(dim=1).allclose(
            torch.ones(len(folder)), atol=1e-5)


def test_cli_elevater_few_shot_over_seeds(splits, checkpoint, tmp_path):
    out = str(tmp_path / 'out')
    result = _probe(splits, checkpoint, out, str(tmp_path / 'cache'), '--protocol', 'elevater', '--shots', '2',
                    '--seeds', '0', '1', '2', '--save-features', '--epochs', '2', '--final-epochs', '3')
    assert (result['protocol'], result['report_rule'], result['shots']) == ('elevater', 'best_epoch_on_test', 2)
    values = [run['value'] for run in result['runs']]
    assert result['seeds'] == [0, 1, 2] and result['value'] == pytest.approx(np.mean(values))
    assert result['std'] == pytest.approx(np.std(values, ddof=1))
    saved = torch.load(os.path.join(out, 'features_train.pt'), weights_only=True)
    for run in result['runs']:  # each seed trained on 2 images of each of the 6 classes, all in the saved rows
        assert run['num_train'] == 12 and len(run['train_rows']) == 12
        assert torch.bincount(saved['labels'][run['train_rows']]).tolist() == [2] * 6


def test_without_test_split_the_search_holds_out_part_of_train(splits, checkpoint, tmp_path):
    result = evaluate.main(['linear-probe', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--train-path',
                            splits['train'], '--val-path', splits['val'], '--output', str(tmp_path / 'o'),
                            '--batch-size', '8', '--num-workers', '0', '--device', 'cpu', '--no-cache',
                            '--metric', 'mean_per_class'])
    assert (result['num_train'], result['num_test'], result['metric']) == (25, 13, 'mean_per_class')
    assert (result['num_search_train'], result['num_search_val']) == (19, 6)  # the first of 5 folds
    assert result['runs'][0]['search_folds'] == 5 and result['splits']['search'].startswith('train, 5-fold')


def test_one_image_per_class_is_refused_before_extraction(tmp_path, checkpoint, monkeypatch):
    folders = {name: make_image_folder(str(tmp_path / name), per_class=1, extra=0, seed=i)
               for i, name in enumerate(('train', 'val'))}
    monkeypatch.setattr(evaluation.encoder, 'image_features', lambda *a, **k: pytest.fail('extracted features'))
    with pytest.raises(SystemExit) as stop:
        evaluate.main(['linear-probe', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--train-path',
                       folders['train'], '--val-path', folders['val'], '--device', 'cpu', '--no-cache'])
    assert stop.value.code == 2


def test_unreadable_training_image_is_named(splits, checkpoint, tmp_path):
    with open(os.path.join(splits['train'], 'red', 'broken.png'), 'wb') as f:
        f.write(b'not a png')
    with pytest.raises(RuntimeError, match='cannot read image .*broken.png'):
        _probe(splits, checkpoint, str(tmp_path / 'out'), str(tmp_path / 'cache'))


def test_two_processes_match_one(splits, checkpoint, tmp_path):
    single = _probe(splits, checkpoint, str(tmp_path / 'single'), str(tmp_path / 'cache1'))
    double = str(tmp_path / 'double')
    run_like_torchrun(evaluate.main, ['linear-probe', '--cfg', TINY_CONFIG, '--resume', checkpoint,
                                      '--train-path', splits['train'], '--val-path', splits['val'],
                                      '--test-path', splits['test'], '--output', double, '--batch-size', '8',
                                      '--num-workers', '0', '--device', 'cpu', '--cache-dir', str(tmp_path / 'cache2')])
    with open(os.path.join(double, 'linear_probe_results.json')) as f:
        two = json.load(f)
    for key in ('num_train', 'num_test', 'weight_decay'):
        assert two[key] == single[key]
    assert two['top1'] == pytest.approx(single['top1']) and two['value'] == pytest.approx(single['value'])
    cached = [torch.load(os.path.join(d, name), weights_only=True)['features']
              for d in (str(tmp_path / 'cache1'), str(tmp_path / 'cache2')) for name in sorted(os.listdir(d))]
    for a, b in zip(cached[:3], cached[3:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

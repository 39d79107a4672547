"""Evaluation metrics against scikit-learn on the same inputs, and ELEVATER's 11-point mAP worked by hand."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, precision_recall_curve, roc_auc_score,
                             top_k_accuracy_score)

from evaluation.metrics import METRICS, get_metric


def random_case(n, num_classes, seed, ties=False, absent=()):
    """Logits `[n, C]` and targets. With `ties`, small integer logits, so that rows repeat and scores tie
    exactly (also after the softmax, which subtracts the row maximum first); `absent` classes never occur
    among the targets."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        scores = torch.randint(-2, 3, (n, num_classes), generator=g).double()
    else:
        scores = 3 * torch.randn(n, num_classes, generator=g, dtype=torch.float64)
    present = torch.tensor([c for c in range(num_classes) if c not in absent])
    targets = present[torch.randint(0, len(present), (n,), generator=g)]
    return scores, targets


def elevater_map_11point(logits, targets):
    """ELEVATER's rule, written from its description: softmax probabilities; per class with a positive,
    precision_recall_curve's points (the closing recall 0 / precision 1 included); at each recall level
    1, 0.9, ..., 0 (np.linspace, as ELEVATER makes them) the best precision at that recall or more."""
    probabilities = logits.double().softmax(dim=1).numpy()
    y = targets.numpy()
    aps = []
    for c in range(probabilities.shape[1]):
        if not (y == c).any():
            continue
        precision, recall, _ = precision_recall_curve(y == c, probabilities[:, c])
        aps.append(np.mean([precision[recall >= level].max() for level in np.linspace(1, 0, 11)]))
    return 100 * float(np.mean(aps))


CASES = [(2, 2, 0, False, ()), (7, 3, 1, True, ()), (50, 5, 2, False, (3,)), (60, 4, 3, True, (0,)),
         (200, 20, 4, False, (5, 17)), (300, 10, 5, True, ()), (1000, 3, 6, True, (1,))]


@pytest.mark.parametrize('n, num_classes, seed, ties, absent', CASES)
def test_map_11point_matches_elevater_on_scikit_learn_curves(n, num_classes, seed, ties, absent):
    scores, targets = random_case(n, num_classes, seed, ties, absent)
    assert get_metric('map_11point')(scores, targets) == pytest.approx(elevater_map_11point(scores, targets),
                                                                       abs=1e-9)
    # the metric takes float32 logits as the evaluations produce them
    assert get_metric('map_11point')(scores.float(), targets) == pytest.approx(
        elevater_map_11point(scores.float(), targets), abs=1e-9)


def test_map_11point_at_recall_levels_reached_exactly():
    # 10 positives per class: recalls k/10 land exactly on the levels, where a float threshold a hair above
    # t/10 would drop a point
    g = torch.Generator().manual_seed(7)
    targets = torch.arange(4).repeat_interleave(10)
    for _ in range(5):
        scores = torch.randn(40, 4, generator=g, dtype=torch.float64) + 1.5 * torch.nn.functional.one_hot(targets, 4)
        assert get_metric('map_11point')(scores, targets) == pytest.approx(elevater_map_11point(scores, targets),
                                                                           abs=1e-9)


def test_map_11point_elevater_reference_two_images():
    # ELEVATER scores 54.55 here (the metric without the recall-0 point gave 50). Class 0's one positive
    # (image 1) ranks below image 0 by P(class 0): points (recall 0, precision 0), (1, 1/2), and the closing
    # (0, 1): levels 0.1..1 take 1/2, level 0 takes 1, AP = (1 + 10/2) / 11 = 6/11; class 1 is the mirror.
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    targets = torch.tensor([1, 0])
    assert get_metric('map_11point')(scores, targets) == pytest.approx(100 * 6 / 11)  # 54.5454...
    assert elevater_map_11point(scores, targets) == pytest.approx(100 * 6 / 11)


def test_map_11point_by_hand_ranks_softmax_probabilities_not_logits():
    # logits          P(class 0)      target
    # r0 [2, 0]       0.881           1
    # r1 [1, -5]      0.9975          0
    # r2 [0, 0]       0.5             0
    # r3 [3, 3]       0.5 (tie)       1
    # By logit, class 0 would rank r3, r0, r1, r2 (both positives last); by probability r1, r0, {r2, r3}.
    # Class 0 (positives r1, r2): after r1 P=1 R=.5; after r0 P=1/2 R=.5; after the tie block {r2, r3}
    # P=1/2 R=1. Levels 0..0.5 (six) take 1, levels 0.6..1 (five) take 1/2: AP0 = (6 + 5/2) / 11.
    # Class 1 (positives r0, r3), P(class 1) = 1 - P(class 0): block {r2, r3} P=1/2 R=1/2; r0 P=2/3 R=1;
    # r1 P=1/2 R=1. Level 0 takes the closing point's 1, levels 0.1..1 (ten) take 2/3: AP1 = (1 + 20/3) / 11.
    scores = torch.tensor([[2.0, 0.0], [1.0, -5.0], [0.0, 0.0], [3.0, 3.0]])
    targets = torch.tensor([1, 0, 0, 1])
    ap0, ap1 = (6 + 5 / 2) / 11, (1 + 20 / 3) / 11
    expected = 100 * (ap0 + ap1) / 2  # 73.4848...
    assert get_metric('map_11point')(scores, targets) == pytest.approx(expected)
    assert elevater_map_11point(scores, targets) == pytest.approx(expected)


def test_map_11point_skips_classes_absent_from_the_targets():
    # class 2 never occurs: its column still takes part in the softmax but has no AP of its own
    scores = torch.tensor([[2.0, 0.0, 5.0], [0.0, 2.0, 5.0], [1.0, 0.0, -1.0]])
    targets = torch.tensor([0, 1, 0])
    assert get_metric('map_11point')(scores, targets) == pytest.approx(elevater_map_11point(scores, targets))


@pytest.mark.parametrize('n, num_classes, seed, ties, absent', CASES)
def test_accuracy_and_mean_per_class_match_scikit_learn(n, num_classes, seed, ties, absent):
    scores, targets = random_case(n, num_classes, seed, ties, absent)
    # tied top scores: the lowest class index is the prediction, as np.argmax (and ELEVATER's top-1) picks
    predictions = scores.numpy().argmax(axis=1)
    assert get_metric('accuracy')(scores, targets) == pytest.approx(100 * accuracy_score(targets, predictions))
    with warnings.catch_warnings():
        # scikit-learn warns when a prediction names a class absent from the targets, then averages over
        # the classes present, as mean_per_class does
        warnings.simplefilter('ignore', UserWarning)
        expected = balanced_accuracy_score(targets, predictions)
    assert get_metric('mean_per_class')(scores, targets) == pytest.approx(100 * expected)


@pytest.mark.filterwarnings('ignore:.k. \\(5\\) greater than or equal:UserWarning')  # C <= 5 cases: all hits
@pytest.mark.parametrize('n, num_classes, seed', [(30, 3, 0), (200, 7, 1), (500, 20, 2), (100, 5, 3)])
def test_top5_matches_scikit_learn(n, num_classes, seed):
    # continuous scores: with ties, scikit-learn keeps the higher class indices in the top k, while
    # torch.topk leaves the choice open
    scores, targets = random_case(n, num_classes, seed)
    expected = top_k_accuracy_score(targets, scores.numpy(), k=5, labels=range(num_classes))
    assert get_metric('accuracy_top5')(scores, targets) == pytest.approx(100 * expected)


def test_accuracy_tie_goes_to_the_lowest_class_index():
    scores = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert get_metric('accuracy')(scores, torch.tensor([0, 1])) == pytest.approx(50.0)


def test_mean_per_class_weights_classes_equally_on_imbalanced_data():
    # class 0: 8 images, 6 right; class 1: 2 images, 0 right; class 2 never occurs in the targets
    predictions = [0] * 6 + [1] * 2 + [0, 2]
    targets = torch.tensor([0] * 8 + [1] * 2)
    scores = torch.nn.functional.one_hot(torch.tensor(predictions), 3).float()
    assert get_metric('accuracy')(scores, targets) == pytest.approx(60.0)
    assert get_metric('mean_per_class')(scores, targets) == pytest.approx((75.0 + 0.0) / 2)


@pytest.mark.parametrize('n, seed', [(2, 0), (9, 1), (100, 2), (1000, 3)])
def test_roc_auc_matches_scikit_learn_on_softmax_probabilities_with_ties(n, seed):
    scores, targets = random_case(n, 2, seed, ties=True)
    targets[0], targets[1] = 0, 1  # both classes present
    expected = roc_auc_score(targets.numpy(), scores.softmax(dim=1)[:, 1].numpy())
    assert get_metric('roc_auc')(scores, targets) == pytest.approx(100 * expected)


def test_roc_auc_binary_with_ties_by_hand():
    # log-odds s1 - s0: positives (target 1) at 0.8, 0.4, 0.4; negatives at 0.4, 0.1.
    # pairs (pos, neg): (.8,.4)=1 (.8,.1)=1 (.4,.4)=.5 (.4,.1)=1 (.4,.4)=.5 (.4,.1)=1 -> 5 / 6
    log_odds = torch.tensor([0.8, 0.4, 0.4, 0.4, 0.1])
    targets = torch.tensor([1, 1, 1, 0, 0])
    scores = torch.stack([torch.zeros(5), log_odds], dim=1)
    assert get_metric('roc_auc')(scores, targets) == pytest.approx(100 * 5 / 6)
    # the same ranking from probabilities gives the same AUC
    assert get_metric('roc_auc')(scores.softmax(dim=1), targets) == pytest.approx(100 * 5 / 6)


def test_roc_auc_refuses_non_binary_and_single_class_sets():
    with pytest.raises(ValueError, match='two classes'):
        get_metric('roc_auc')(torch.zeros(3, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match='both classes'):
        get_metric('roc_auc')(torch.zeros(2, 2), torch.tensor([1, 1]))


@pytest.mark.parametrize('name', sorted(METRICS))
@pytest.mark.parametrize('bad', [-1, 2])
def test_targets_outside_the_classes_are_errors(name, bad):
    # C = 2 columns: -1 would wrap to the last class and 2 would count as a silent miss
    with pytest.raises(ValueError, match=rf'target {bad} is outside the 2 classes'):
        get_metric(name)(torch.zeros(3, 2), torch.tensor([0, 1, bad]))


@pytest.mark.parametrize('name', sorted(METRICS))
def test_targets_must_be_integers(name):
    with pytest.raises(ValueError, match='integer'):
        get_metric(name)(torch.zeros(2, 2), torch.tensor([0.0, 1.0]))


def test_unknown_metric_and_bad_shapes_are_errors():
    assert set(METRICS) == {'accuracy', 'accuracy_top5', 'mean_per_class', 'map_11point', 'roc_auc'}
    with pytest.raises(ValueError, match='unknown metric'):
        get_metric('f1')
    with pytest.raises(ValueError, match=r'\[N, C\]'):
        get_metric('accuracy')(torch.zeros(3, 2), torch.tensor([0, 1]))

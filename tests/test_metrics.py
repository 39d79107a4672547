"""Evaluation metrics against values computed by hand."""
import pytest
import torch

from evaluation.metrics import METRICS, get_metric


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_accuracy_and_top5():
    scores = t([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    targets = torch.tensor([0, 1, 1, 0])
    assert get_metric('accuracy')(scores, targets) == pytest.approx(50.0)  # rows 0 and 1
    # top-5 over 3 classes is every class: always a hit
    assert get_metric('accuracy_top5')(scores, targets) == pytest.approx(100.0)
    many = torch.arange(7, dtype=torch.float32).repeat(2, 1)  # class 6 best, class 0 worst
    assert get_metric('accuracy_top5')(many, torch.tensor([2, 1])) == pytest.approx(50.0)  # top5 = 6..2


def test_accuracy_tie_goes_to_the_lowest_class_index():
    scores = t([[0.5, 0.5], [0.5, 0.5]])
    assert get_metric('accuracy')(scores, torch.tensor([0, 1])) == pytest.approx(50.0)


def test_mean_per_class_weights_classes_equally_on_imbalanced_data():
    # class 0: 8 images, 6 right; class 1: 2 images, 0 right; class 2 never occurs in the targets
    predictions = [0] * 6 + [1] * 2 + [0, 2]
    targets = torch.tensor([0] * 8 + [1] * 2)
    scores = torch.nn.functional.one_hot(torch.tensor(predictions), 3).float()
    assert get_metric('accuracy')(scores, targets) == pytest.approx(60.0)
    assert get_metric('mean_per_class')(scores, targets) == pytest.approx((75.0 + 0.0) / 2)


def test_map_11point_by_hand():
    # Class 0 ranking by score: +, -, +, -, - (2 positives). Precision/recall after each item:
    # (1, .5), (.5, .5), (.667, 1), (.5, 1), (.4, 1). Best precision at recall >= r:
    # r in 0..0.5 (6 levels): 1; r in 0.6..1 (5 levels): 2/3. AP = (6 + 5 * 2/3) / 11.
    # Class 1 (the rest, 3 positives): scores make its ranking -, +, -, +, + by construction below.
    s0 = [0.9, 0.8, 0.7, 0.6, 0.5]
    targets = torch.tensor([0, 1, 0, 1, 1])
    s1 = [0.5, 0.4, 0.9, 0.3, 0.2]  # ranking: item2 (-), item0 (-), item1 (+), item3 (+), item4 (+)
    scores = torch.tensor([s0, s1]).T
    ap0 = (6 + 5 * 2 / 3) / 11
    # class 1: precision/recall: (0,0), (0,0), (1/3,1/3), (1/2,2/3), (3/5,1): every level's best is 3/5,
    # except levels <= 2/3 also see 1/2 and 1/3 (smaller), so AP = 3/5.
    ap1 = 3 / 5
    assert get_metric('map_11point')(scores, targets) == pytest.approx(100 * (ap0 + ap1) / 2)


def test_map_11point_ties_form_one_block():
    # Both images score the same for each class, so a class's positive and negative tie: the block is ranked
    # as one, precision 1/2 at recall 1, AP 1/2 for both classes whatever the order of the images.
    scores = torch.tensor([[0.5, -0.5], [0.5, -0.5]])
    assert get_metric('map_11point')(scores, torch.tensor([0, 1])) == pytest.approx(50.0)
    assert get_metric('map_11point')(scores, torch.tensor([1, 0])) == pytest.approx(50.0)


def test_roc_auc_binary_with_ties():
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


def test_unknown_metric_and_bad_shapes_are_errors():
    assert set(METRICS) == {'accuracy', 'accuracy_top5', 'mean_per_class', 'map_11point', 'roc_auc'}
    with pytest.raises(ValueError, match='unknown metric'):
        get_metric('f1')
    with pytest.raises(ValueError, match=r'\[N, C\]'):
        get_metric('accuracy')(torch.zeros(3, 2), torch.tensor([0, 1]))

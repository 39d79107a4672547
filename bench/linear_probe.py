"""The linear probe against scikit-learn's LogisticRegressionCV on the same features and the same split.

Feature sets (all L2-normalized, as image embeddings are):
- `digits pixels`: scikit-learn's 8x8 digits, the pixel vector of each image; 50/50 stratified split;
- `digits UniCL`: the same digits drawn as 64-px RGB images through a trained UniCL image encoder (with
  --checkpoint; `make demo` leaves one in output/demo); 50/50;
- `generated hard (old)`: `make_classification`, 20 overlapping classes in 128 dimensions, 3,000 images split
  50/50. Too small to decide a 0.5-point question: at 21 % accuracy one test accuracy on 1,500 images has a
  standard error of 1.05 points (see FRESH_HARD for the case that replaced it);
- `generated hard (fresh)`: the case fixed in advance to decide the 0.5-point goal (FRESH_HARD below).

LogisticRegressionCV (lbfgs, max_iter 1000, its default 10 Cs and 5-fold CV, refit) fits on train; our probes
get the same train as their `train` and report on the test part as `val` (no test split: the default protocol
searches by 5-fold cross-validation on train, or with one random 20 % of each class held out; the ELEVATER
protocol scores its search on the first 20 % of each class). ELEVATER's number is its best test epoch, so it
is an optimistic reading by construction. Each method's difference to LogisticRegressionCV is paired (the
same test images): its standard error is the sample standard deviation of the per-image differences
(+1, 0, -1) over sqrt(test images).

Everything runs on one thread (torch and scikit-learn's OpenMP/BLAS pools): a fair time column, and no
oversubscription of a shared machine (scikit-learn's default thread pool made it 15x slower under load).

    python bench/linear_probe.py [--checkpoint output/demo/.../checkpoint_*.pth --cfg configs/unicl_tiny_builtin.yaml]
    python bench/linear_probe.py --sets fresh              # the decision run: the 3 evaluation seeds, once
    python bench/linear_probe.py --sets fresh --dev        # the same generator on the development seeds
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, markdown_table, write_results  # noqa: E402
from evaluation import ProbeSettings, probe_features  # noqa: E402

FeatureSet = Tuple[np.ndarray, np.ndarray]
Split = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, x_test, y_train, y_test

# ----------------------------------------------------------------------------------------------------
# The fresh hard case: fixed (and committed) before it was first run. Its seeds were never used before;
# any change to the probe is chosen on other data (DEV_SEEDS of this generator, the other sets, the unit
# test's Gaussian classes), then EVAL_SEEDS run once on the committed code and their result is reported.
# ----------------------------------------------------------------------------------------------------
FRESH_HARD = dict(
    generator=dict(n_features=128, n_informative=48, n_redundant=32, n_repeated=0, n_classes=32,
                   n_clusters_per_class=2,  # each class two clusters on a hypercube: a linear head can not fit both
                   class_sep=2.0,  # LogisticRegressionCV about 50 % on a development draw (chance 3.1 %)
                   flip_y=0.02,  # 2 % labels replaced at random
                   shift=None),  # a random offset per feature: not centred, as embeddings are not
    train=4_000,  # 125 images per class: the regularization matters
    test=48_000,  # 1,500 per class: the paired difference's standard error well below 0.5 points (below)
    EVAL_SEEDS=(1101, 1102, 1103),  # the decision; each seed draws the classes, the images and the split
    DEV_SEEDS=(2201, 2202, 2203),  # for development only
)
# Why 48,000 test images: two probes of similar accuracy on the same images disagree on a fraction q of them;
# the standard error of their accuracy difference is about sqrt(q / n). For q = 10 % (q <= 30 %), n = 48,000
# gives 0.14 (0.25) points, against 1.05 points for one accuracy on the old case's 1,500 images (q = 20 %
# there gives 1.2 points for the difference). The table reports the measured value per seed.
#
# The decision rule (fixed with the design): the goal "within 0.5 points of LogisticRegressionCV, or above" is
# met when the mean over EVAL_SEEDS of (default - LogisticRegressionCV) is >= -0.5 points. Reported beside it:
# each seed's difference with its standard error, and whether every seed is >= -0.5 (the strict reading).
GOAL = -0.5


def _unit(features: np.ndarray) -> np.ndarray:
    return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)


def halves(data: FeatureSet, seed: int) -> Split:
    from sklearn.model_selection import train_test_split
    return tuple(train_test_split(*data, test_size=0.5, stratify=data[1], random_state=seed))


def digits_pixels(seed: int) -> Split:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return halves((_unit(x), y), seed)


def generated_hard_old(seed: int) -> Split:
    from sklearn.datasets import make_classification
    x, y = make_classification(n_samples=3000, n_features=128, n_informative=40, n_redundant=20, n_classes=20,
                               n_clusters_per_class=2, class_sep=1.0, flip_y=0.05, random_state=0)
    return halves((_unit(x), y), seed)


def generated_hard_fresh(seed: int) -> Split:
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split
    x, y = make_classification(n_samples=FRESH_HARD['train'] + FRESH_HARD['test'], random_state=seed,
                               **FRESH_HARD['generator'])
    return tuple(train_test_split(_unit(x), y, train_size=FRESH_HARD['train'], stratify=y, random_state=seed))


def digits_through(cfg: str, checkpoint: str) -> FeatureSet:
    """The digits as 64-px RGB images (ink white on black, scaled up), encoded by the checkpoint's model."""
    import tempfile

    from PIL import Image
    from sklearn.datasets import load_digits

    from evaluation import load_encoder

    images, y = load_digits(return_X_y=True)
    encoder = load_encoder(cfg, checkpoint, torch.device('cpu'), num_workers=0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, pixels in enumerate(images.reshape(-1, 8, 8)):
            paths.append(os.path.join(folder, f'{i}.png'))
            gray = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((64, 64), Image.BICUBIC)
            gray.convert('RGB').save(paths[-1])
        features = encoder.images(paths, desc='digits').numpy()
    return _unit(features), y


# ----------------------------------------------------------------------------------------------------
# The methods: each returns its predicted class of every test image
# ----------------------------------------------------------------------------------------------------
def sklearn_cv(x_train, y_train, x_test, y_test) -> np.ndarray:
    from sklearn.linear_model import LogisticRegressionCV
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # scikit-learn's notices about future defaults
        model = LogisticRegressionCV(max_iter=1000).fit(x_train, y_train)
    return model.predict(x_test)


def ours(**settings) -> Callable[..., np.ndarray]:
    def run(x_train, y_train, x_test, y_test) -> np.ndarray:
        # The test labels reach only the scoring, and ELEVATER's choice of its best test epoch.
        splits = {'train': (torch.from_numpy(x_train), torch.from_numpy(y_train)),
                  'val': (torch.from_numpy(x_test), torch.from_numpy(y_test))}
        report = probe_features(splits, int(y_train.max()) + 1, 'accuracy', ProbeSettings(**settings))
        return report.runs[0].test_scores.argmax(dim=1).numpy()
    return run


METHODS: Dict[str, Callable[..., np.ndarray]] = {
    'LogisticRegressionCV': sklearn_cv,
    'default': ours(protocol='default'),  # 5-fold cross-validated weight decay
    'default, 1 hold-out': ours(protocol='default', search_folds=1),
    'elevater': ours(protocol='elevater')}
REFERENCE = 'LogisticRegressionCV'


def paired(correct: np.ndarray, reference: np.ndarray) -> Tuple[float, float]:
    """(difference of accuracies, its standard error), percent, from per-image correctness on the same images."""
    d = correct.astype(np.float64) - reference.astype(np.float64)
    return 100 * d.mean(), 100 * d.std(ddof=1) / math.sqrt(len(d))


def _cell(result: Dict[str, float]) -> str:
    difference = f" ({result['difference']:+.2f} ± {result['se']:.2f})" if 'difference' in result else ''
    return f"{result['value']:.2f}{difference}"


def one_thread() -> None:
    """torch and scikit-learn's OpenMP / BLAS pools on one thread each."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        os.environ.setdefault('OMP_NUM_THREADS', '1')


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sets_known = ('digits', 'old', 'unicl', 'fresh')
    parser.add_argument('--sets', nargs='+', default=list(sets_known), choices=sets_known,
                        help='digits pixels, generated hard (old), digits UniCL (needs --checkpoint), '
                             'generated hard (fresh)')
    parser.add_argument('--seeds', type=int, nargs='+', help='override every set\'s seeds')
    parser.add_argument('--dev', action='store_true', help='the fresh generator on its development seeds')
    parser.add_argument('--checkpoint', help='a trained UniCL checkpoint for the "digits UniCL" features')
    parser.add_argument('--cfg', default='configs/unicl_tiny_builtin.yaml', help='its config')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    parser.add_argument('--name', default='linear_probe', help='results file bench/results/NAME.json')
    args = parser.parse_args(argv)
    one_thread()
    methods = [REFERENCE] + [m for m in args.methods if m != REFERENCE]
    sets: Dict[str, Tuple[Callable[[int], Split], Sequence[int]]] = {}
    if 'digits' in args.sets:
        sets['digits pixels'] = (digits_pixels, (0, 1, 2))
    if 'old' in args.sets:
        sets['generated hard (old): 20 classes, 128-d'] = (generated_hard_old, (0, 1, 2))
    if 'unicl' in args.sets and args.checkpoint:
        features = digits_through(args.cfg, args.checkpoint)
        sets['digits through UniCL'] = (lambda seed: halves(features, seed), (0, 1, 2))
    if 'fresh' in args.sets:
        seeds = FRESH_HARD['DEV_SEEDS' if args.dev else 'EVAL_SEEDS']
        sets[f"generated hard (fresh{', dev seeds' if args.dev else ''}): 32 classes, 128-d"] = (
            generated_hard_fresh, seeds)
    results: Dict[str, Dict] = {}
    rows = []
    header = ['features', 'seed', 'train / test'] + methods
    for name, (make, seeds) in sets.items():
        seeds = args.seeds or seeds
        for seed in seeds:
            x_train, x_test, y_train, y_test = make(seed)
            cell = results.setdefault(name, {}).setdefault(str(seed), {})
            correct = {}
            for method in methods:
                start = time.perf_counter()
                predicted = METHODS[method](x_train, y_train, x_test, y_test)
                correct[method] = predicted == y_test
                cell[method] = {'value': 100 * correct[method].mean(), 'seconds': time.perf_counter() - start}
                if method != REFERENCE:
                    difference, se = paired(correct[method], correct[REFERENCE])
                    cell[method].update(difference=difference, se=se,  # and how often one is right, one wrong:
                                        disagreement=100 * float((correct[method] != correct[REFERENCE]).mean()))
            rows.append([name, seed, f'{len(y_train)} / {len(y_test)}'] + [_cell(cell[m]) for m in methods])
            print(markdown_table(header, rows[-1:]).splitlines()[-1],
                  ' seconds: ' + ', '.join(f"{cell[m]['seconds']:.0f}" for m in methods), flush=True)
        mean_row = [name, 'mean', '']
        for method in methods:
            runs = [results[name][str(s)][method] for s in seeds]
            summary = {'value': statistics.fmean(r['value'] for r in runs)}
            if method != REFERENCE:
                summary.update(difference=statistics.fmean(r['difference'] for r in runs),
                               se=math.sqrt(sum(r['se'] ** 2 for r in runs)) / len(runs),
                               every_seed_within_goal=all(r['difference'] >= GOAL for r in runs))
            results[name][f'mean {method}'] = summary
            mean_row.append(_cell(summary))
        rows.append(mean_row)
        if 'default' in methods and 'fresh' in name:
            summary = results[name]['mean default']
            verdict = 'met' if summary['difference'] >= GOAL else 'NOT met'
            results[name]['decision'] = (
                f"goal {verdict}: mean difference {summary['difference']:+.2f} (>= {GOAL} needed); every seed "
                f"within {GOAL}: {summary['every_seed_within_goal']}")
            print(results[name]['decision'], flush=True)
    table = markdown_table(header, rows)
    print(table)
    print(write_results(args.name, {'machine': machine(), 'results': results, 'table': table,
                                    'fresh_hard': FRESH_HARD}))


if __name__ == '__main__':
    main()

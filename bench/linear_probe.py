"""The linear probe against scikit-learn's LogisticRegressionCV on the same features and the same split.

Feature sets (all L2-normalized, as image embeddings are):
- `digits pixels`: scikit-learn's 8x8 digits, the pixel vector of each image;
- `digits UniCL`: the same digits drawn as 64-px RGB images through a trained UniCL image encoder (with
  --checkpoint; `make demo` leaves one in output/demo);
- `generated hard`: `make_classification`, 20 overlapping classes in 128 dimensions (a case where the
  regularization matters and accuracy is low).

Each seed splits the set 50/50 stratified. LogisticRegressionCV (lbfgs, max_iter 1000, its default 10 Cs and
5-fold CV, refit) fits on train; our probes get the same train as their `train` and report on the test half
as `val` (no test split: the default protocol searches by 5-fold cross-validation on train, or with one
random 20 % of each class held out; the ELEVATER protocol scores its search on the first 20 % of each
class). ELEVATER's number is its best test epoch, so it is an optimistic reading by construction.

    python bench/linear_probe.py [--checkpoint output/demo/.../checkpoint_*.pth --cfg configs/unicl_tiny_builtin.yaml]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine, markdown_table, write_results  # noqa: E402
from evaluation import ProbeSettings, probe_features  # noqa: E402

FeatureSet = Tuple[np.ndarray, np.ndarray]


def _unit(features: np.ndarray) -> np.ndarray:
    return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)


def digits_pixels() -> FeatureSet:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    return _unit(x), y


def generated_hard() -> FeatureSet:
    from sklearn.datasets import make_classification
    x, y = make_classification(n_samples=3000, n_features=128, n_informative=40, n_redundant=20, n_classes=20,
                               n_clusters_per_class=2, class_sep=1.0, flip_y=0.05, random_state=0)
    return _unit(x), y


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


def split(data: FeatureSet, seed: int):
    from sklearn.model_selection import train_test_split
    return train_test_split(*data, test_size=0.5, stratify=data[1], random_state=seed)


def sklearn_cv(x_train, y_train, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegressionCV
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # scikit-learn's notices about future defaults
        model = LogisticRegressionCV(max_iter=1000).fit(x_train, y_train)
    return 100 * model.score(x_test, y_test)


def ours(**settings) -> Callable[..., float]:
    def run(x_train, y_train, x_test, y_test) -> float:
        splits = {'train': (torch.from_numpy(x_train), torch.from_numpy(y_train)),
                  'val': (torch.from_numpy(x_test), torch.from_numpy(y_test))}
        return probe_features(splits, int(y_train.max()) + 1, 'accuracy', ProbeSettings(**settings)).value
    return run


METHODS: Dict[str, Callable[..., float]] = {
    'LogisticRegressionCV': sklearn_cv,
    'default': ours(protocol='default'),  # 5-fold cross-validated weight decay
    'default, 1 hold-out': ours(protocol='default', search_folds=1),
    'elevater': ours(protocol='elevater')}


def _cell(result: Dict[str, float], reference: Optional[float]) -> str:
    difference = f" ({result['value'] - reference:+.2f})" if reference is not None else ''
    return f"{result['value']:.2f}{difference} [{result['seconds']:.0f} s]"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--checkpoint', help='a trained UniCL checkpoint for the "digits UniCL" features')
    parser.add_argument('--cfg', default='configs/unicl_tiny_builtin.yaml', help='its config')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as scikit-learn's lbfgs runs: one core each, a fair time column
    sets = {'digits pixels': digits_pixels, 'generated hard': generated_hard}
    if args.checkpoint:
        sets['digits UniCL'] = lambda: digits_through(args.cfg, args.checkpoint)
    results, rows = {}, []
    for name, make in sets.items():
        data = make()
        for seed in args.seeds:
            x_train, x_test, y_train, y_test = split(data, seed)
            cell = results.setdefault(name, {}).setdefault(str(seed), {})
            for method in args.methods:
                start = time.perf_counter()
                value = METHODS[method](x_train, y_train, x_test, y_test)
                cell[method] = {'value': value, 'seconds': time.perf_counter() - start}
            reference = cell['LogisticRegressionCV']['value'] if 'LogisticRegressionCV' in cell else None
            rows.append([name, seed, f'{len(y_train)} / {len(y_test)}'] + [
                _cell(cell[m], reference if m != 'LogisticRegressionCV' else None) for m in args.methods])
            print(markdown_table(['features', 'seed', 'train / test'] + args.methods, rows[-1:]).splitlines()[-1],
                  flush=True)
        for method in args.methods:
            values = [results[name][str(s)][method]['value'] for s in args.seeds]
            results[name][f'mean {method}'] = statistics.fmean(values)
    table = markdown_table(['features', 'seed', 'train / test'] + args.methods, rows)
    print(table)
    print(write_results('linear_probe', {'machine': machine(), 'results': results, 'table': table}))


if __name__ == '__main__':
    main()

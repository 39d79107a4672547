"""Evaluation of UniCL checkpoints: zero-shot classification, linear probe, image-text retrieval, and suites
of datasets. A thin command line over the `evaluation` package.

    python evaluate.py zeroshot --cfg configs/unicl_swin_tiny.yaml --resume in21k_yfcc14m.pth \
        --data-path /data/imagenet/val --output out/zs
    python evaluate.py linear-probe --cfg CFG --resume CKPT --train-path DIR --val-path DIR [--test-path DIR] \
        --output OUT [--protocol elevater] [--shots 5 --seeds 0 1 2] [--save-features]
    python evaluate.py zeroshot --suite configs/eval/elevater.yaml --resume A.pth B.pth --cfg CFG --output OUT
    python evaluate.py retrieval --cfg CFG --resume CKPT --data-path captions.tsv --output OUT

Under torchrun every image and text is encoded exactly once, by one rank; results are written by rank 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import urllib.error
from typing import Callable, Dict, List, NoReturn, Optional

import torch

from data.transforms import DEFAULT_EVAL_TRANSFORM, EVAL_TRANSFORMS
from evaluation import (FeatureCache, ProbeSettings, load_encoder, run_linear_probe, run_retrieval,
                        run_suite, run_zeroshot)
from evaluation.checks import (check_checkpoints, check_linear_probe, check_retrieval, check_suite, check_zeroshot,
                               read_suite)
from evaluation.errors import EvaluationInputError
from evaluation.elevater_probe import ElevaterSettings
from evaluation.linear_probe import INIT_HEADS, PROTOCOLS, LinearProbeReport
from evaluation.logistic import MAX_ITERATIONS
from evaluation.metrics import METRICS
from utils.checkpoint import DEFAULT_CACHE, CheckpointError
from utils.distributed import destroy_distributed, get_rank, init_distributed
from utils.logger import setup_logger
from utils.precision import AMP_LEVELS

logger = logging.getLogger('unicl.evaluate')


def _device(local_rank: int, requested: Optional[str]) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')


def _write_json(output: Optional[str], name: str, content: Dict) -> None:
    if output and get_rank() == 0:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, name), 'w') as f:
            json.dump(content, f, indent=2)


# Options that cannot change a suite's numbers: where results go, which checkpoints, speed. Every other
# option belongs to the settings a resumed suite must share with the results it reuses.
NOT_SUITE_SETTINGS = frozenset({'output', 'resume', 'device', 'batch_size', 'num_workers', 'cache_dir', 'no_cache',
                                'fresh', 'save_predictions', 'run'})


def suite_settings(args: argparse.Namespace) -> Dict:
    """The command line minus NOT_SUITE_SETTINGS: compared path for path, value for value, not by content."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SUITE_SETTINGS}


class Session:
    """What every command shares: the process group, logging, the device, and how to load a checkpoint."""

    def __init__(self, args: argparse.Namespace):
        _, _, local_rank = init_distributed()
        setup_logger(args.output, get_rank())
        self.args = args
        self.device = _device(local_rank, args.device)

    def load(self, checkpoint: str):
        a = self.args
        try:
            return load_encoder(a.cfg, checkpoint, self.device, a.opts, a.amp, a.batch_size, a.num_workers,
                                getattr(a, 'transform', None))
        except (CheckpointError, EOFError, urllib.error.URLError) as e:
            # The commands check local files first; this is what is left: a URL's download or its file.
            raise EvaluationInputError(f'cannot load checkpoint {checkpoint} with config {a.cfg}: '
                                       f'{str(e).strip().splitlines()[0]}') from None

    def single_checkpoint(self) -> str:
        if len(self.args.resume) != 1:
            raise EvaluationInputError('several --resume checkpoints need --suite (zeroshot and linear-probe only)')
        return self.args.resume[0]

    def suite(self, evaluate) -> Dict:
        """`run_suite` over --resume: results written to --output as they come, resumed from it unless
        --fresh."""
        a = self.args
        # Every dataset and checkpoint before the first is loaded: a problem in the last must not cost the rest.
        datasets = read_suite(a.suite)
        check_suite(datasets, a.command, a.templates, getattr(a, 'init_head', 'zero'), a.resume, a.cfg, a.opts)
        report = run_suite(self.args.resume, datasets, self.load, evaluate, self.args.output,
                           suite_settings(self.args), self.args.fresh)
        if get_rank() == 0:
            for name in report['datasets']:
                logger.info(f'{name}: ' + ', '.join(f'{c} {report["results"][name][c]["value"]:.2f}'
                                                     for c in report['checkpoints']))
            logger.info('average: ' + ', '.join(f'{c} {v:.2f}' for c, v in report['average'].items()))
        return report


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------
def zeroshot_command(session: Session) -> Dict:
    args = session.args
    if args.suite:
        def suite_zeroshot(encoder, d) -> Dict:
            transform = d.transform or args.transform
            result = run_zeroshot(encoder.with_transform(transform), d.zeroshot_folder, d.classnames_file,
                                  d.templates or args.templates, d.metric, logit_scale=args.logit_scale)
            return {'value': result.value, 'mode': 'zeroshot', 'top1': result.top1, 'top5': result.top5,
                    'num_images': result.num_images, 'num_classes': result.num_classes,
                    'split': d.zeroshot_split, 'transform': transform}

        return session.suite(suite_zeroshot)
    checkpoint = session.single_checkpoint()
    check_zeroshot(args.data_path, args.classnames, args.templates, args.metric)
    check_checkpoints(args.cfg, args.opts, [checkpoint])
    result = run_zeroshot(session.load(checkpoint), args.data_path, args.classnames, args.templates, args.metric,
                          keep_predictions=args.save_predictions, logit_scale=args.logit_scale)
    summary = {'top1': result.top1, 'top5': result.top5, 'num_images': result.num_images,
               'num_classes': result.num_classes, 'metric': result.metric, 'value': result.value,
               'checkpoint': checkpoint, 'config': args.cfg, 'templates': args.templates, 'transform': args.transform,
               'logit_scale': args.logit_scale}
    logger.info(f' * Acc@1 {result.top1:.3f} Acc@5 {result.top5:.3f} {result.metric} {result.value:.3f} '
                f'({result.num_images} images, {result.num_classes} classes)')
    _write_json(args.output, 'zeroshot_results.json', summary)
    if args.save_predictions and get_rank() == 0:
        with open(os.path.join(args.output, 'predictions.jsonl'), 'w') as f:
            f.writelines(json.dumps(p) + '\n' for p in result.predictions)
    return summary


def _probe_settings(args: argparse.Namespace) -> ProbeSettings:
    """The protocol's settings from the options; an option of the other protocol is refused, not ignored."""
    elevater_options = {'lrs': '--lrs', 'epochs': '--epochs', 'final_epochs': '--final-epochs',
                        'probe_batch_size': '--probe-batch-size'}
    if args.protocol == 'default':
        given = [flag for key, flag in elevater_options.items() if getattr(args, key) is not None]
        if given:
            raise EvaluationInputError(f'{", ".join(given)}: only for --protocol elevater (the default protocol '
                                       'solves a logistic regression to convergence; see --max-iterations)')
    else:
        given = [flag for key, flag in (('max_iterations', '--max-iterations'), ('search_folds', '--search-folds'))
                 if getattr(args, key) is not None]
        if given:
            raise EvaluationInputError(f'{", ".join(given)}: only for --protocol default')
    defaults = ElevaterSettings()
    elevater = ElevaterSettings(
        learning_rates=tuple(args.lrs) if args.lrs else defaults.learning_rates,
        epochs=args.epochs or defaults.epochs, final_epochs=args.final_epochs or defaults.final_epochs,
        batch_size=args.probe_batch_size or defaults.batch_size)
    return ProbeSettings(protocol=args.protocol, shots=args.shots, seeds=tuple(dict.fromkeys(args.seeds)),
                         max_iterations=args.max_iterations or MAX_ITERATIONS,
                         search_folds=args.search_folds or ProbeSettings.search_folds, elevater=elevater)


def linear_probe_command(session: Session) -> Dict:
    args = session.args
    settings = _probe_settings(args)
    cache = FeatureCache(None if args.no_cache else args.cache_dir)
    if args.save_features and (args.suite or not args.output):
        raise EvaluationInputError('--save-features needs --output and a single dataset (no --suite)')

    def probe(encoder, train, val, test, metric, classnames, templates, save_to=None) -> LinearProbeReport:
        return run_linear_probe(encoder, train, val, test, metric, settings, args.init_head, classnames,
                                templates, cache, save_to)

    if args.suite:
        def suite_probe(encoder, d) -> Dict:
            transform = d.transform or args.transform
            report = probe(encoder.with_transform(transform), d.split('train'), d.split('val'), d.test_folder,
                           d.metric, d.classnames_file, d.templates or args.templates)
            summary = report.summary()
            del summary['metric']  # the suite keeps its own
            return {**summary, 'mode': 'linear-probe', 'split': summary['splits']['report'],
                    'transform': transform}

        return session.suite(suite_probe)
    if not (args.train_path and args.val_path):
        raise EvaluationInputError('linear-probe needs --train-path and --val-path (or --suite)')
    checkpoint = session.single_checkpoint()
    check_linear_probe(args.train_path, args.val_path, args.test_path, args.metric, args.init_head, args.classnames,
                       args.templates)
    check_checkpoints(args.cfg, args.opts, [checkpoint])
    report = probe(session.load(checkpoint), args.train_path, args.val_path, args.test_path, args.metric,
                   args.classnames, args.templates, args.output if args.save_features else None)
    summary = {**report.summary(), 'init_head': args.init_head, 'transform': args.transform,
               'checkpoint': checkpoint, 'config': args.cfg}
    spread = f' +- {report.std:.3f} over seeds {summary["seeds"]}' if len(report.runs) > 1 else ''
    chosen = ', '.join(f'seed {r.seed}: ' * (len(report.runs) > 1) + (f'lr {r.lr:g}, ' if r.lr is not None else '')
                       + f'weight decay {r.weight_decay:g}' for r in report.runs)
    logger.info(f' * linear probe ({report.protocol} protocol, {report.report_rule}) {report.metric} '
                f'{report.value:.3f}{spread} (top-1 {report.top1:.3f}); {chosen}; reported on '
                f'{report.splits["report"]} ({summary["num_test"]} images)')
    _write_json(args.output, 'linear_probe_results.json', summary)
    return summary


def retrieval_command(session: Session) -> Dict:
    args = session.args
    checkpoint = session.single_checkpoint()
    check_retrieval(args.data_path, args.image_root)
    check_checkpoints(args.cfg, args.opts, [checkpoint])
    cache = FeatureCache(None if args.no_cache else args.cache_dir)
    results = run_retrieval(session.load(checkpoint), args.data_path, args.image_root, args.split, cache)
    summary = {**results, 'checkpoint': checkpoint, 'config': args.cfg, 'data_path': args.data_path}
    logger.info(f' * {results["num_images"]} images, {results["num_texts"]} texts: ' + ', '.join(
        f'{k} {v:.2f}' for k, v in results.items() if '@' in k))
    _write_json(args.output, 'retrieval_results.json', summary)
    return summary


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------
class _OneLineErrors(argparse.ArgumentParser):
    """argparse, with an error as the single line `PROG: error: MESSAGE` (exit code 2), the form every user
    error of this command takes: the usage argparse prints first would push the message off the screen."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f'{self.prog}: error: {message}\n')


def _number(convert: Callable[[str], float], minimum: float, strict: bool) -> Callable[[str], float]:
    kind = 'an integer' if convert is int else 'a number'
    bound = f'{">" if strict else ">="} {minimum:g}'

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {kind} {bound}, got {text!r}') from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f'must be {bound}, got {text}')
        return value
    return parse


positive_int = _number(int, 1, strict=False)
non_negative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0, strict=True)
non_negative_float = _number(float, 0, strict=False)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--cfg', required=True, help='model config (e.g. configs/unicl_swin_tiny.yaml)')
    parser.add_argument('--resume', required=True, nargs='+', help='checkpoint path(s) or URL(s); several need --suite')
    parser.add_argument('--output', help='folder for the results files')
    parser.add_argument('--batch-size', type=positive_int,
                        help='images per batch and process (default DATA.BATCH_SIZE)')
    parser.add_argument('--num-workers', type=non_negative_int, help='data loading workers (default DATA.NUM_WORKERS)')
    parser.add_argument('--amp', choices=[level for level in AMP_LEVELS if level],
                        help="autocast: O0/fp32/none, bf16, fp16, or O1/O2 (bf16 on CUDA); default: the config's "
                        "AMP_OPT_LEVEL, as training validates")
    parser.add_argument('--device', help='e.g. cpu or cuda:0 (default: cuda when available)')
    parser.add_argument('--opts', nargs='+', help='config overrides: KEY VALUE pairs')


def _classification(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--suite', help='YAML suite file: evaluate every dataset it lists')
    parser.add_argument('--metric', default='accuracy', choices=sorted(METRICS), help='reported metric')
    parser.add_argument('--classnames', help='class names, one per line in sorted-folder order '
                        '(default: DIR/classnames.txt, else the ImageNet-1K names for 1000 classes)')
    parser.add_argument('--templates', default='imagenet', help='imagenet (81 official), single, or a file')
    parser.add_argument('--transform', choices=sorted(EVAL_TRANSFORMS), default=DEFAULT_EVAL_TRANSFORM,
                        help='eval transform: resize (Resize 256/224 x size + CenterCrop, as training validates), '
                        'crop (ELEVATER: Resize size + CenterCrop), squash (Resize to size x size); a suite '
                        "dataset's own `transform` wins (default: %(default)s)")
    parser.add_argument('--fresh', action='store_true', help='with --suite: discard OUT/suite_results.json and '
                        'start over (default: resume from it, if its settings are the same)')


def _cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--cache-dir', default=os.path.join(DEFAULT_CACHE, 'features'),
                        help='feature cache folder (default: %(default)s)')
    parser.add_argument('--no-cache', action='store_true', help='always extract features, cache nothing')


def build_parser() -> argparse.ArgumentParser:
    # prog fixed: under pytest or `python -m` argv[0] is not evaluate.py, and errors name the command by it
    parser = _OneLineErrors(prog='evaluate.py', description='UniCL evaluation')
    commands = parser.add_subparsers(dest='command', required=True)

    zeroshot = commands.add_parser('zeroshot', help='zero-shot classification on an ImageFolder tree or a suite')
    _common(zeroshot)
    _classification(zeroshot)
    zeroshot.add_argument('--data-path', help='ImageFolder tree: one folder per class')
    zeroshot.add_argument('--save-predictions', action='store_true', help='write OUT/predictions.jsonl')
    zeroshot.add_argument('--logit-scale', type=positive_float,
                          help="multiplier of the cosine similarities (default: the model's exp(logit_scale)); "
                          'ELEVATER scores every model at 100, which matters for map_11point only')
    zeroshot.set_defaults(run=zeroshot_command)

    probe = commands.add_parser('linear-probe', help='linear probe on frozen features (default or ELEVATER protocol)')
    _common(probe)
    _classification(probe)
    _cache(probe)
    probe.add_argument('--train-path', help='ImageFolder tree of training images')
    probe.add_argument('--val-path', help='ImageFolder tree: the search split with --test-path, else the result split')
    probe.add_argument('--test-path', help='ImageFolder tree the result is reported on')
    probe.add_argument('--init-head', choices=INIT_HEADS, default='zero',
                       help='start the head at zero or at the zero-shot classifier (text)')
    probe.add_argument('--protocol', choices=sorted(PROTOCOLS), default='default',
                       help='default: a logistic regression solved to convergence, weight decay searched on '
                       'held-out data, reported as fit; elevater: the ELEVATER benchmark procedure exactly (SGD, '
                       'lr x weight-decay search, best test epoch reported)')
    probe.add_argument('--shots', type=positive_int, help='training images per class, drawn with each seed '
                       '(ELEVATER: 5, 20, 50); default: all')
    probe.add_argument('--seeds', type=non_negative_int, nargs='+', default=[0],
                       help='one run per seed (few-shot sample, hold-out split); the mean and std are reported')
    probe.add_argument('--save-features', action='store_true',
                       help='write OUT/features_<split>.pt: the features the head is trained on')
    probe.add_argument('--max-iterations', type=positive_int,
                       help=f'default protocol: L-BFGS iterations per fit (default {MAX_ITERATIONS})')
    probe.add_argument('--search-folds', type=positive_int,
                       help='default protocol without --test-path: cross-validation folds of the weight-decay '
                       'search (default 5; 1: one random 20%% of each class held out)')
    probe.add_argument('--lrs', type=positive_float, nargs='+',
                       help='elevater protocol: searched learning rates (default: logspace(-6, -1, 6))')
    probe.add_argument('--epochs', type=positive_int, help='elevater protocol: epochs per search run (default 10)')
    probe.add_argument('--final-epochs', type=positive_int,
                       help='elevater protocol: epochs of the final head (default 50)')
    probe.add_argument('--probe-batch-size', type=positive_int,
                       help='elevater protocol: features per SGD step (default 64)')
    probe.set_defaults(run=linear_probe_command)

    retrieval = commands.add_parser('retrieval', help='image-text retrieval Recall@1/5/10')
    _common(retrieval)
    _cache(retrieval)
    retrieval.add_argument('--data-path', required=True,
                           help='captions: a TSV/CSV table, webdataset shards, or a COCO-style JSON')
    retrieval.add_argument('--image-root', help='image folder of a COCO JSON (default: the JSON\'s folder)')
    retrieval.add_argument('--split', default='test', help="Karpathy split to use ('all': every image)")
    retrieval.set_defaults(run=retrieval_command)
    return parser


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == 'zeroshot':
            if bool(args.suite) == bool(args.data_path):
                raise EvaluationInputError('zeroshot needs exactly one of --data-path and --suite')
            if args.save_predictions and (not args.output or args.suite):
                raise EvaluationInputError('--save-predictions needs --output and a single --data-path')
        return args.run(Session(args))
    except EvaluationInputError as e:
        # Only the user's errors: any other exception is a bug and keeps its traceback.
        parser.exit(2, f'{parser.prog} {args.command}: error: {" ".join(str(e).split())}\n')
    finally:
        destroy_distributed()


if __name__ == '__main__':
    main()

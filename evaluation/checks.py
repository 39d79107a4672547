"""Checks of evaluation inputs that run before anything expensive: folder listings, file headers, the config
built on the meta device (shapes, no memory), a checkpoint's tensors compared with it. A bad input then fails
in seconds with one `EvaluationInputError` naming the file or key, instead of after minutes of feature
extraction, or, in a suite, after the datasets before it.

Each check goes through the same code evaluation does (`image_folder`, `dataset_classnames`,
`resolve_templates`, `load_suite`, the checkpoint layout conversion), so the two never disagree about what
is valid.
"""
from __future__ import annotations

import os
import urllib.parse
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn

from configs import load_config
from data.classnames import resolve_templates
from data.sources.webdataset_shards import expand_shards
from model import build_unicl_model
from model.checkpoint import to_model_layout
from utils.checkpoint import CheckpointError, extract_state_dict, safe_load

from .data import LabeledImages, image_folder
from .errors import EvaluationInputError
from .metrics import get_metric
from .suite import SuiteDataset, load_suite
from .zeroshot import Templates, dataset_classnames

# Metrics defined for one number of classes only; every metric needs at least MIN_CLASSES.
METRIC_CLASSES = {'roc_auc': 2}
MIN_CLASSES = 2


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ('http', 'https')


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def check_image_folder(root: str) -> LabeledImages:
    """The tree `root` as evaluation will list it; a missing or empty one fails naming it."""
    return image_folder(root)


def check_same_classes(splits: Dict[str, LabeledImages]) -> None:
    """Every split has the class folders of the first (the split the head is trained on)."""
    (first_name, first), *others = splits.items()
    for name, images in others:
        if images.classes == first.classes:
            continue
        only_first = sorted(set(first.classes) - set(images.classes))
        detail = (f'{only_first[0]!r} is only in {first_name}' if only_first else
                  f'{sorted(set(images.classes) - set(first.classes))[0]!r} is only in {name}')
        raise EvaluationInputError(f'the {name} split {images.root} has other class folders than the '
                                   f'{first_name} split {first.root}: {detail}')


def check_classnames(images: LabeledImages, classnames_file: Optional[str]) -> None:
    """The class names evaluation would use for `images` exist and are one per class folder."""
    try:
        dataset_classnames(images, classnames_file)
    except OSError as e:
        raise EvaluationInputError(f'cannot read the class names file {e.filename}: {e.strerror}') from None
    except ValueError as e:
        raise EvaluationInputError(f'class names for {images.root}: {e}') from None


def check_templates(templates: Templates) -> None:
    """A template spec ('imagenet', 'single' or a file) that resolves; lists were checked where they were read."""
    if isinstance(templates, str):
        try:
            resolve_templates(templates)
        except (OSError, ValueError) as e:
            raise EvaluationInputError(_first_line(e)) from None


def check_metric(metric: str, num_classes: int, where: str) -> None:
    """`metric` is known and defined for `num_classes` classes (the class folders of `where`)."""
    try:
        get_metric(metric)
    except ValueError as e:
        raise EvaluationInputError(str(e)) from None
    if num_classes < MIN_CLASSES:
        raise EvaluationInputError(f'{where} has {num_classes} class folder(s); classification needs at least '
                                   f'{MIN_CLASSES}')
    needed = METRIC_CLASSES.get(metric)
    if needed is not None and num_classes != needed:
        raise EvaluationInputError(f'metric {metric} needs exactly {needed} classes, {where} has {num_classes}')


def check_zeroshot(data_path: str, classnames_file: Optional[str] = None, templates: Templates = 'imagenet',
                   metric: str = 'accuracy') -> None:
    """What `run_zeroshot(encoder, data_path, classnames_file, templates, metric)` needs of its inputs."""
    images = check_image_folder(data_path)
    check_metric(metric, len(images.classes), data_path)
    check_classnames(images, classnames_file)
    check_templates(templates)


def check_linear_probe(train_path: str, val_path: str, test_path: Optional[str] = None,
                       metric: str = 'accuracy', init_head: str = 'zero', classnames_file: Optional[str] = None,
                       templates: Templates = 'imagenet') -> None:
    """What `run_linear_probe` needs of its inputs: the splits list the same classes, the metric fits the
    split it is reported on; class names and templates only with `init_head='text'`, the one use of them."""
    splits = {name: check_image_folder(path) for name, path in
              (('train', train_path), ('val', val_path), ('test', test_path)) if path}
    check_same_classes(splits)
    result_split = 'test' if test_path else 'val'
    check_metric(metric, len(splits[result_split].classes), splits[result_split].root)
    if init_head == 'text':
        check_classnames(splits['train'], classnames_file)
        check_templates(templates)


def check_retrieval(data_path: str, image_root: Optional[str] = None) -> None:
    """The caption source exists: a table or JSON file, or every local shard of a shard spec."""
    extension = os.path.splitext(data_path)[1].lower()
    if extension in ('.tsv', '.csv', '.json'):
        if not os.path.isfile(data_path):
            raise EvaluationInputError(f'no caption file {data_path}')
        if extension == '.json' and image_root and not os.path.isdir(image_root):
            raise EvaluationInputError(f'no image folder {image_root} (--image-root)')
        return
    shards = expand_shards(data_path)
    if not shards:
        raise EvaluationInputError(f'no shards in {data_path}')
    local = [s for s in shards if '://' not in s and not s.startswith('pipe:')]
    missing = [s for s in local if not os.path.isfile(s)]
    if missing == [data_path]:
        raise EvaluationInputError(f'no caption source {data_path}: neither a .tsv/.csv/.json file nor shards')
    if missing:
        raise EvaluationInputError(f'{len(missing)} of the {len(shards)} shards of {data_path} do not exist, '
                                   f'e.g. {missing[0]}')


# ----------------------------------------------------------------------------------------------------
# Config and checkpoints
# ----------------------------------------------------------------------------------------------------
def check_config(cfg: str, opts: Optional[Sequence[str]] = None) -> Tuple[object, nn.Module]:
    """(config, the model built on the meta device): a config that loads and builds, at no memory cost."""
    try:
        config = load_config(cfg, list(opts) if opts else None)
        # The real model is built later; this one must not move the random stream that build draws from.
        with torch.random.fork_rng(devices=[]), torch.device('meta'):
            model = build_unicl_model(config)
    except ValueError as e:  # ConfigError, and the builders' refusals of config values
        message = _first_line(e)
        raise EvaluationInputError(message if cfg in message else f'config {cfg}: {message}') from None
    return config, model


def check_checkpoint_file(checkpoint: str) -> None:
    """A local `checkpoint` exists and starts as a file of `torch.save` does (a zip archive with data.pkl,
    or the legacy pickle); a URL is not checked (resolving it downloads it). Reads the header and, for an
    archive, its directory, which a truncated download lacks."""
    if is_url(checkpoint):
        return
    if not os.path.exists(checkpoint):
        raise EvaluationInputError(f'checkpoint not found: {checkpoint}')
    if os.path.isdir(checkpoint):
        raise EvaluationInputError(f'checkpoint {checkpoint} is a folder, not a file')
    try:
        with open(checkpoint, 'rb') as f:
            head = f.read(4)
    except OSError as e:
        raise EvaluationInputError(f'cannot read checkpoint {checkpoint}: {e.strerror}') from None
    if head.startswith(b'PK\x03\x04'):
        try:
            with zipfile.ZipFile(checkpoint) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise EvaluationInputError(f'cannot read checkpoint {checkpoint}: a damaged or truncated archive '
                                       f'({_first_line(e)})') from None
        if not any(name.endswith('data.pkl') for name in names):
            raise EvaluationInputError(f'cannot read checkpoint {checkpoint}: a zip archive, but not a PyTorch '
                                       f'checkpoint (no data.pkl)')
    elif not head.startswith(b'\x80'):  # the legacy format is a pickle, protocol 2 or later
        what = 'an empty file' if not head else "neither torch.save's zip archive nor a pickle"
        raise EvaluationInputError(f'cannot read checkpoint {checkpoint}: not a PyTorch checkpoint ({what})')


def check_checkpoint(checkpoint: str, cfg: str, config, model: nn.Module) -> None:
    """`checkpoint` reads and its weights fit `model` (`check_config(cfg)`'s) as loading would require: every
    weight of the model present, none of another shape. Reads the whole file; a URL is not checked."""
    check_checkpoint_file(checkpoint)
    if is_url(checkpoint):
        return
    try:
        loaded = safe_load(checkpoint)
    except Exception as e:  # noqa: BLE001 - whatever the file's bytes make torch.load raise
        raise EvaluationInputError(f'cannot read checkpoint {checkpoint}: {_first_line(e)}') from None
    try:
        state_dict = to_model_layout(extract_state_dict(loaded, checkpoint), model, config.MODEL.IMAGE_ENCODER.TYPE)
    except CheckpointError as e:
        raise EvaluationInputError(f'checkpoint {checkpoint} does not fit config {cfg}: {_first_line(e)}') from None
    model_state = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in model_state and v.shape != model_state[k].shape]
    if mismatched:
        key = mismatched[0]
        raise EvaluationInputError(
            f'checkpoint {checkpoint} does not fit config {cfg}: {len(mismatched)} weights differ in shape, first '
            f'{key}: {tuple(state_dict[key].shape)} in the file, {tuple(model_state[key].shape)} in the model')
    missing = sorted(set(model_state) - set(state_dict))
    if missing:
        raise EvaluationInputError(f'checkpoint {checkpoint} does not fit config {cfg}: it lacks {len(missing)} of '
                                   f'the model\'s {len(model_state)} weights, first {missing[0]}')


def _checkpoint_problems(cfg: str, opts: Optional[Sequence[str]], checkpoints: Sequence[str]) -> List[str]:
    try:
        config, model = check_config(cfg, opts)
    except EvaluationInputError as e:
        return [str(e)]
    problems = []
    for checkpoint in dict.fromkeys(checkpoints):
        try:
            check_checkpoint(checkpoint, cfg, config, model)
        except EvaluationInputError as e:
            problems.append(str(e))
    return problems


def check_checkpoints(cfg: str, opts: Optional[Sequence[str]], checkpoints: Sequence[str]) -> None:
    """The config builds and every checkpoint fits it (see `check_checkpoint`); all problems in one error."""
    problems = _checkpoint_problems(cfg, opts, checkpoints)
    if problems:
        raise EvaluationInputError('; '.join(problems))


# ----------------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------------
def read_suite(path: str) -> List[SuiteDataset]:
    """`load_suite(path)`, its refusals as `EvaluationInputError`."""
    try:
        return load_suite(path)
    except EvaluationInputError:
        raise
    except OSError as e:
        raise EvaluationInputError(f'cannot read suite {path}: {e.strerror}') from None
    except ValueError as e:
        message = _first_line(e)
        raise EvaluationInputError(message if path in message else f'{path}: {message}') from None
    except yaml.YAMLError as e:
        raise EvaluationInputError(f'{path}: not valid YAML: {" ".join(str(e).split())}') from None


def check_suite(datasets: Sequence[SuiteDataset], command: str, templates: Templates = 'imagenet',
                init_head: str = 'zero', checkpoints: Sequence[str] = (), cfg: Optional[str] = None,
                opts: Optional[Sequence[str]] = None) -> None:
    """Every dataset's inputs for `command` ('zeroshot' or 'linear-probe', with the command's `templates`
    and `init_head` where a dataset has none of its own) and, with `cfg`, the config and every checkpoint.
    All problems are reported together, as one line joined by '; ', so one run shows everything to fix."""
    problems = []
    for d in datasets:
        try:
            if command == 'zeroshot':
                check_zeroshot(d.zeroshot_folder, d.classnames_file, d.templates or templates, d.metric)
                d.check_class_folders(d.zeroshot_folder)
            else:
                check_linear_probe(d.split('train'), d.split('val'), d.test_folder, d.metric, init_head,
                                   d.classnames_file, d.templates or templates)
                if init_head == 'text':
                    d.check_class_folders(d.split('train'))
        except EvaluationInputError as e:
            problems.append(f'dataset {d.name}: {e}')
    if cfg is not None:
        problems += _checkpoint_problems(cfg, opts, checkpoints)
    if problems:
        raise EvaluationInputError('; '.join(problems))

"""Range and choice checks for config values, run on the final merged config.

The merge checks types; these catch well-typed values that would crash late (SAVE_FREQ 0 divides by zero
after a whole epoch) or quietly mean something else (NAN_POLICY Skip would stop, SAVE_STEPS -4 would act
as 4). Keys without a rule (paths, names, TAG, OUTPUT, MODEL.SPEC, and DATA.SOURCES, which data/specs.py
checks) take any value of their type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from yacs.config import CfgNode as CN

__all__ = ['Rule', 'RULES', 'RELATIONS', 'validate_config']


@dataclass(frozen=True)
class Rule:
    allowed: str  # completes "must be ..." in the error message
    ok: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # Finite only: a NaN or infinite rate, ratio or scale is never meant.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_range(low: int, high: Optional[int] = None) -> Rule:
    if high is None:
        return Rule(f'an integer >= {low}', lambda v: _is_int(v) and v >= low)
    return Rule(f'an integer in [{low}, {high}]', lambda v: _is_int(v) and low <= v <= high)


positive_int = int_range(1)
non_negative_int = int_range(0)


def float_range(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number between `low` and `high`, each end included unless marked open."""
    def ok(v: Any) -> bool:
        return (_is_number(v) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))
    if high == math.inf:
        return Rule(f"a number {'>' if low_open else '>='} {low:g}", ok)
    return Rule(f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}", ok)


positive_float = float_range(0, low_open=True)
non_negative_float = float_range(0)
probability = float_range(0, 1)


def one_of(*choices: str) -> Rule:
    names = ', '.join(repr(c) for c in sorted(choices))
    return Rule(f'one of the known values {names}', lambda v: v in choices)


def optional(rule: Rule) -> Rule:
    return Rule(f'null or {rule.allowed}', lambda v: v is None or rule.ok(v))


def list_of(item: Rule, length: Optional[int] = None) -> Rule:
    """`length` values (any number but none when not given), each allowed by `item`."""
    def ok(v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and (len(v) == length if length else len(v) > 0)
                and all(item.ok(x) for x in v))
    return Rule(f"{length or 'a non-empty list of'} values, each {item.allowed}", ok)


# An image-area fraction range (crop, cutmix box): timm samples within it, so it must be non-empty.
unit_interval_pair = Rule('two numbers low, high with 0 < low <= high <= 1',
                          lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                          and all(_is_number(x) for x in v) and 0 < v[0] <= v[1] <= 1)


# A word prefix (DATA.TEXT_PREFIX_*): a blank one would tokenize to nothing, i.e. silently be no prefix.
prefix_text = Rule("'' or a text with a non-blank character",
                   lambda v: isinstance(v, str) and (v == '' or bool(v.strip())))


RULES: Dict[str, Rule] = {
    'DATA.BATCH_SIZE': positive_int,
    'DATA.IMG_SIZE': positive_int,
    # data/transforms.py (timm for training; 'random' evaluates as bicubic)
    'DATA.INTERPOLATION': one_of('bicubic', 'bilinear', 'nearest', 'random'),
    'DATA.CACHE_MODE': one_of('no', 'full', 'part'),  # main.py's --cache-mode choices
    'DATA.NUM_WORKERS': non_negative_int,
    'DATA.EPOCH_SAMPLES': non_negative_int,  # 0: the sources' sizes summed
    'DATA.SHUFFLE_BUFFER': non_negative_int,  # 0 and 1 both mean no shuffling
    'DATA.LOG_BAD_SAMPLES': non_negative_int,
    'DATA.REDUCED_DECODE': Rule('True or False', lambda v: isinstance(v, bool)),  # data/crop_decode.py
    'DATA.DECODE_DEVICE': one_of('cpu', 'cuda'),  # data/gpu_decode.py; a CUDA device is checked by data/build.py
    'DATA.TEXT_PREFIX_LABEL': prefix_text,
    'DATA.TEXT_PREFIX_CAPTION': prefix_text,

    'MODEL.NUM_CLASSES': non_negative_int,
    'MODEL.LABEL_SMOOTHING': probability,
    'MODEL.DIM_PROJECTION': positive_int,
    # Any number, even 1e999 (infinite): that is how the tests force a non-finite loss. null: the loss's own.
    'MODEL.LOGIT_SCALE_INIT': Rule('null or a number', lambda v: v is None or (
        isinstance(v, (int, float)) and not isinstance(v, bool))),
    'MODEL.LOGIT_SCALE_MAX': non_negative_float,  # the clamp's upper end; its lower end is 0
    # Their upper end is the tower's group count, which model/lock.py checks on the built model.
    'MODEL.LOCK_IMAGE_UNLOCKED_GROUPS': non_negative_int,
    'MODEL.LOCK_TEXT_UNLOCKED_GROUPS': non_negative_int,
    'MODEL.IMAGE_ENCODER.IMG_SIZE': positive_int,
    'MODEL.IMAGE_ENCODER.DROP_RATE': probability,
    'MODEL.IMAGE_ENCODER.DROP_PATH_RATE': probability,
    'MODEL.IMAGE_ENCODER.SWIN.PATCH_SIZE': positive_int,
    'MODEL.IMAGE_ENCODER.SWIN.IN_CHANS': positive_int,
    'MODEL.IMAGE_ENCODER.SWIN.EMBED_DIM': positive_int,
    'MODEL.IMAGE_ENCODER.SWIN.DEPTHS': list_of(positive_int),
    'MODEL.IMAGE_ENCODER.SWIN.NUM_HEADS': list_of(positive_int),
    'MODEL.IMAGE_ENCODER.SWIN.WINDOW_SIZE': positive_int,
    'MODEL.IMAGE_ENCODER.SWIN.MLP_RATIO': positive_float,
    'MODEL.IMAGE_ENCODER.SWIN.QK_SCALE': optional(positive_float),
    'MODEL.IMAGE_ENCODER.FOCAL.PATCH_SIZE': positive_int,
    'MODEL.IMAGE_ENCODER.FOCAL.IN_CHANS': positive_int,
    'MODEL.IMAGE_ENCODER.FOCAL.EMBED_DIM': positive_int,
    'MODEL.IMAGE_ENCODER.FOCAL.DEPTHS': list_of(positive_int),
    'MODEL.IMAGE_ENCODER.FOCAL.MLP_RATIO': positive_float,
    # Level 0 leaves only FocalNet's global context, which its modulation still computes.
    'MODEL.IMAGE_ENCODER.FOCAL.FOCAL_LEVELS': list_of(non_negative_int),
    'MODEL.IMAGE_ENCODER.FOCAL.FOCAL_WINDOWS': list_of(positive_int),
    'MODEL.IMAGE_ENCODER.FOCAL.FOCAL_FACTORS': list_of(positive_int),
    'MODEL.TEXT_ENCODER.NAME': one_of('transformer'),  # model/text_encoder.py builds only this one
    'MODEL.TEXT_ENCODER.TOKENIZER': one_of('clip'),  # model/tokenizer.py
    'MODEL.TEXT_ENCODER.CONTEXT_LENGTH': int_range(2),  # start- and end-of-text tokens at least
    'MODEL.TEXT_ENCODER.WIDTH': positive_int,
    'MODEL.TEXT_ENCODER.HEADS': positive_int,
    'MODEL.TEXT_ENCODER.LAYERS': positive_int,

    'TRAIN.START_EPOCH': non_negative_int,
    'TRAIN.EPOCHS': positive_int,
    'TRAIN.WARMUP_EPOCHS': non_negative_float,  # utils/optim.py counts it in steps, so a fraction would do
    'TRAIN.WEIGHT_DECAY': non_negative_float,
    'TRAIN.BASE_LR': non_negative_float,
    'TRAIN.WARMUP_LR': non_negative_float,
    'TRAIN.MIN_LR': non_negative_float,
    'TRAIN.CLIP_GRAD': non_negative_float,  # 0: no clipping
    'TRAIN.ACCUMULATION_STEPS': non_negative_int,  # 0 and 1 both mean none
    'TRAIN.SAVE_STEPS': non_negative_int,  # 0: only at epoch ends
    'TRAIN.KEEP_CHECKPOINTS': non_negative_int,  # 0 keeps all
    'TRAIN.NAN_POLICY': one_of('stop', 'skip'),
    'TRAIN.LOSS_TILE_SIZE': non_negative_int,  # 0: picked from the device
    'TRAIN.COMPILE': Rule('True or False', lambda v: isinstance(v, bool)),
    'TRAIN.LR_SCHEDULER.NAME': one_of('cosine', 'step'),  # utils/optim.py build_scheduler
    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': positive_float,  # the step scheduler divides by it
    'TRAIN.LR_SCHEDULER.DECAY_RATE': non_negative_float,
    'TRAIN.OPTIMIZER.NAME': one_of('adamw', 'sgd'),  # utils/optim.py build_optimizer
    'TRAIN.OPTIMIZER.EPS': positive_float,
    'TRAIN.OPTIMIZER.BETAS': list_of(float_range(0, 1, high_open=True), length=2),  # torch's AdamW range
    'TRAIN.OPTIMIZER.MOMENTUM': positive_float,  # SGD is built with Nesterov momentum, which needs one

    'AUG.COLOR_JITTER': non_negative_float,  # 0: off
    'AUG.REPROB': probability,
    'AUG.REMODE': one_of('const', 'rand', 'pixel'),  # timm's RandomErasing
    'AUG.RECOUNT': positive_int,  # timm draws the count from [1, RECOUNT]
    'AUG.CROP_SCALE': unit_interval_pair,
    'AUG.MIXUP': non_negative_float,  # Beta(alpha, alpha); 0: off
    'AUG.CUTMIX': non_negative_float,
    'AUG.CUTMIX_MINMAX': optional(unit_interval_pair),
    'AUG.MIXUP_PROB': probability,
    'AUG.MIXUP_SWITCH_PROB': probability,
    'AUG.MIXUP_MODE': one_of('batch', 'pair', 'elem'),  # timm's Mixup

    'SAVE_FREQ': positive_int,
    'PRINT_FREQ': positive_int,
    'SEED': int_range(0, 2 ** 32 - 1),  # numpy's seed range
    'LOCAL_RANK': non_negative_int,
}


def _same_length(other_key: str, other: Any) -> Rule:
    return Rule(f'a list as long as {other_key} ({len(other)} values)', lambda v: len(v) == len(other))


def _divisible_by(other_key: str, other: Any) -> Rule:
    return Rule(f'divisible by {other_key} ({other})', lambda v: v % other == 0)


def _zero_with_mixup(other_key: str, aug: Any) -> Rule:
    from data.mixup import mixup_enabled  # imports torch; see _registry_rules
    return Rule(f'0 while {other_key}.MIXUP, {other_key}.CUTMIX or {other_key}.CUTMIX_MINMAX turn mixup/cutmix on '
                f'(the mixup in image-text-label space has no label smoothing)',
                lambda v: v == 0 or not mixup_enabled(aug))


def _zero_unless(other_key: str, other: Any) -> Rule:
    return Rule(f'0 while {other_key} is off', lambda v: bool(other) or v == 0)


def _default_unless_inductor(other_key: str, backend: Any) -> Rule:
    return Rule(f"'default' while {other_key} is {backend!r} (modes are inductor's)",
                lambda v: backend == 'inductor' or v == 'default')


def _off_when_decoding_on_cuda(*off: Any) -> Callable[[str, Any], Rule]:
    # RandAugment and colour jitter are PIL operations per image: the GPU decode path has no pixels in the workers.
    def relation(other_key: str, decode_device: Any) -> Rule:
        return Rule(f"{' or '.join(map(repr, off))} while {other_key} is 'cuda' (data/gpu_decode.py runs no "
                    f"PIL augmentation)", lambda v: decode_device != 'cuda' or v in off)
    return relation


# (key, other key, rule on the key given the other's value), checked after RULES so both values are in range.
RELATIONS: List[Tuple[str, str, Callable[[str, Any], Rule]]] = [
    ('MODEL.IMAGE_ENCODER.SWIN.NUM_HEADS', 'MODEL.IMAGE_ENCODER.SWIN.DEPTHS', _same_length),
    ('MODEL.IMAGE_ENCODER.FOCAL.FOCAL_LEVELS', 'MODEL.IMAGE_ENCODER.FOCAL.DEPTHS', _same_length),
    ('MODEL.IMAGE_ENCODER.FOCAL.FOCAL_WINDOWS', 'MODEL.IMAGE_ENCODER.FOCAL.DEPTHS', _same_length),
    ('MODEL.IMAGE_ENCODER.FOCAL.FOCAL_FACTORS', 'MODEL.IMAGE_ENCODER.FOCAL.DEPTHS', _same_length),
    ('MODEL.TEXT_ENCODER.WIDTH', 'MODEL.TEXT_ENCODER.HEADS', _divisible_by),  # attention splits WIDTH
    # timm's Mixup smooths the mixed targets by MODEL.LABEL_SMOOTHING; ours cannot, so it refuses to ignore it.
    ('MODEL.LABEL_SMOOTHING', 'AUG', _zero_with_mixup),
    # Unlocked groups of a tower that is not locked would quietly mean nothing.
    ('MODEL.LOCK_IMAGE_UNLOCKED_GROUPS', 'MODEL.LOCK_IMAGE', _zero_unless),
    ('MODEL.LOCK_TEXT_UNLOCKED_GROUPS', 'MODEL.LOCK_TEXT', _zero_unless),
    # torch.compile hands a mode to inductor only; the other backends would fail on the first step.
    ('TRAIN.COMPILE_MODE', 'TRAIN.COMPILE_BACKEND', _default_unless_inductor),
    ('AUG.AUTO_AUGMENT', 'DATA.DECODE_DEVICE', _off_when_decoding_on_cuda('none', '')),
    ('AUG.COLOR_JITTER', 'DATA.DECODE_DEVICE', _off_when_decoding_on_cuda(0)),
]


def _registry_rules() -> Dict[str, Rule]:
    # The registries' own names, imported here rather than at the top: these modules import torch and
    # timm, and model/ and training/ import configs themselves.
    from data.text_prefix import TEXT_KINDS, TEXT_PREFIX_MODES
    from loss import LOSSES
    from model.image_encoder import IMAGE_ENCODERS
    from training.accumulation import ACCUMULATION_MODES
    from training.compile import COMPILE_BACKENDS, COMPILE_MODES
    from utils.precision import AMP_LEVELS
    return {'MODEL.IMAGE_ENCODER.TYPE': one_of(*IMAGE_ENCODERS),
            'TRAIN.ACCUMULATION_MODE': one_of(*ACCUMULATION_MODES),
            'TRAIN.LOSS': one_of(*LOSSES),
            'TRAIN.COMPILE_MODE': one_of(*COMPILE_MODES),
            'TRAIN.COMPILE_BACKEND': one_of(*COMPILE_BACKENDS),
            'DATA.TEXT_PREFIX': one_of(*TEXT_PREFIX_MODES),
            'DATA.TEXT_PREFIX_ZEROSHOT': one_of(*TEXT_KINDS),
            'AMP_OPT_LEVEL': one_of(*AMP_LEVELS)}


def _get(config: CN, key: str) -> Any:
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


def _check(key: str, value: Any, rule: Rule) -> None:
    if not rule.ok(value):
        from . import ConfigError  # configs/__init__.py imports this module
        raise ConfigError(f'config key {key} {value!r} is invalid: must be {rule.allowed}')


def validate_config(config: CN) -> None:
    """Raise ConfigError naming the first key whose value is out of range or not a known choice."""
    for key, rule in {**RULES, **_registry_rules()}.items():
        _check(key, _get(config, key), rule)
    for key, other_key, relation in RELATIONS:
        _check(key, _get(config, key), relation(other_key, _get(config, other_key)))

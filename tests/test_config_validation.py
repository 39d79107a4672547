"""Config values are checked for range and choice when the config is read, by load_config and by main.py
after its flags, so a bad value fails at once naming the key, the value and what is allowed."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from configs import CONFIG_DIR, ConfigError, load_config, validate_config
from configs.defaults import get_defaults
from tests.conftest import ROOT, TINY_CONFIG, child_env

# (key, value as on the command line, the message after "config key ")
BAD_VALUES = [
    ('SAVE_FREQ', '0', 'SAVE_FREQ 0 is invalid: must be an integer >= 1'),
    ('PRINT_FREQ', '0', 'PRINT_FREQ 0 is invalid: must be an integer >= 1'),
    ('DATA.BATCH_SIZE', '0', 'DATA.BATCH_SIZE 0 is invalid: must be an integer >= 1'),
    ('SEED', '-1', 'SEED -1 is invalid: must be an integer in [0, 4294967295]'),
    ('TRAIN.NAN_POLICY', 'Skip', "TRAIN.NAN_POLICY 'Skip' is invalid: must be one of the known values 'skip', 'stop'"),
    ('TRAIN.SAVE_STEPS', '-4', 'TRAIN.SAVE_STEPS -4 is invalid: must be an integer >= 0'),
    ('TRAIN.OPTIMIZER.NAME', 'lamb', "TRAIN.OPTIMIZER.NAME 'lamb' is invalid: must be one of the known values "
                                     "'adamw', 'sgd'"),
    ('TRAIN.LR_SCHEDULER.NAME', 'linear', "TRAIN.LR_SCHEDULER.NAME 'linear' is invalid: must be one of the known "
                                          "values 'cosine', 'step'"),
    ('TRAIN.ACCUMULATION_MODE', 'big', "TRAIN.ACCUMULATION_MODE 'big' is invalid: must be one of the known values "
                                       "'features', 'gradients'"),
    ('MODEL.IMAGE_ENCODER.TYPE', 'vit', "MODEL.IMAGE_ENCODER.TYPE 'vit' is invalid: must be one of the known values "
                                        "'focalnet', 'swin'"),
    ('AMP_OPT_LEVEL', 'O3', "AMP_OPT_LEVEL 'O3' is invalid: must be one of the known values '', 'O0', 'O1', 'O2', "
                            "'bf16', 'fp16', 'fp32', 'none'"),
    ('DATA.CACHE_MODE', 'some', "DATA.CACHE_MODE 'some' is invalid: must be one of the known values 'full', 'no', "
                                "'part'"),
    ('DATA.INTERPOLATION', 'cubic', "DATA.INTERPOLATION 'cubic' is invalid"),
    ('MODEL.TEXT_ENCODER.TOKENIZER', 'bert', "MODEL.TEXT_ENCODER.TOKENIZER 'bert' is invalid"),
    ('TRAIN.EPOCHS', '0', 'TRAIN.EPOCHS 0 is invalid: must be an integer >= 1'),
    ('TRAIN.WARMUP_EPOCHS', '-1', 'TRAIN.WARMUP_EPOCHS -1 is invalid: must be a number >= 0'),
    ('TRAIN.BASE_LR', '-0.1', 'TRAIN.BASE_LR -0.1 is invalid: must be a number >= 0'),
    ('TRAIN.CLIP_GRAD', '-1.0', 'TRAIN.CLIP_GRAD -1.0 is invalid: must be a number >= 0'),
    ('TRAIN.KEEP_CHECKPOINTS', '-1', 'TRAIN.KEEP_CHECKPOINTS -1 is invalid: must be an integer >= 0'),
    ('TRAIN.LOSS_TILE_SIZE', '-1', 'TRAIN.LOSS_TILE_SIZE -1 is invalid: must be an integer >= 0'),
    ('TRAIN.OPTIMIZER.BETAS', '[0.9, 1.0]', 'TRAIN.OPTIMIZER.BETAS (0.9, 1.0) is invalid: must be 2 values, each a '
                                            'number in [0, 1)'),
    ('DATA.NUM_WORKERS', '-1', 'DATA.NUM_WORKERS -1 is invalid: must be an integer >= 0'),
    ('AUG.REPROB', '1.5', 'AUG.REPROB 1.5 is invalid: must be a number in [0, 1]'),
    ('AUG.CROP_SCALE', '[0.9, 0.5]', 'AUG.CROP_SCALE [0.9, 0.5] is invalid: must be two numbers low, high with '
                                     '0 < low <= high <= 1'),
    ('AUG.CROP_SCALE', '[0.0, 1.0]', 'AUG.CROP_SCALE [0.0, 1.0] is invalid'),
    ('MODEL.LOGIT_SCALE_MAX', '1e999', 'MODEL.LOGIT_SCALE_MAX inf is invalid: must be a number >= 0'),
    ('MODEL.DIM_PROJECTION', '0', 'MODEL.DIM_PROJECTION 0 is invalid: must be an integer >= 1'),
    ('MODEL.TEXT_ENCODER.CONTEXT_LENGTH', '1', 'MODEL.TEXT_ENCODER.CONTEXT_LENGTH 1 is invalid: must be an '
                                               'integer >= 2'),
    ('MODEL.IMAGE_ENCODER.SWIN.DEPTHS', '[2, 0, 6, 2]', 'MODEL.IMAGE_ENCODER.SWIN.DEPTHS [2, 0, 6, 2] is invalid: '
                                                        'must be a non-empty list of values, each an integer >= 1'),
    ('MODEL.IMAGE_ENCODER.SWIN.NUM_HEADS', '[3, 6, 12]', 'MODEL.IMAGE_ENCODER.SWIN.NUM_HEADS [3, 6, 12] is invalid: '
                                                         'must be a list as long as MODEL.IMAGE_ENCODER.SWIN.DEPTHS '
                                                         '(4 values)'),
    ('MODEL.TEXT_ENCODER.HEADS', '7', 'MODEL.TEXT_ENCODER.WIDTH 1024 is invalid: must be divisible by '
                                      'MODEL.TEXT_ENCODER.HEADS (7)'),
]


def _message(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message.startswith('config key ')
    return message[len('config key '):]


@pytest.mark.parametrize('key, value, expected', BAD_VALUES)
def test_bad_value_fails_when_the_config_is_read(key, value, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [key, value])
    assert _message(error).startswith(expected)


@pytest.mark.parametrize('flags, expected', [
    (['--batch-size', '0'], 'DATA.BATCH_SIZE 0 is invalid'),
    (['--accumulation-steps', '-1'], 'TRAIN.ACCUMULATION_STEPS -1 is invalid'),
    (['--amp-opt-level', 'O3'], "AMP_OPT_LEVEL 'O3' is invalid"),
    (['--opts', 'SAVE_FREQ', '0'], 'SAVE_FREQ 0 is invalid'),
])
def test_bad_value_fails_on_the_command_line(flags, expected):
    import main
    with pytest.raises(ConfigError) as error:
        main.build_run_config(main.parse_option(['--cfg', TINY_CONFIG, *flags]))
    assert _message(error).startswith(expected)


def test_the_merged_config_is_validated_not_each_step():
    # A file's DEPTHS may get a matching NUM_HEADS only from a later override.
    config = load_config(TINY_CONFIG, ['MODEL.IMAGE_ENCODER.SWIN.DEPTHS', '[1, 1, 2]',
                                       'MODEL.IMAGE_ENCODER.SWIN.NUM_HEADS', '[1, 2, 4]'])
    assert len(config.MODEL.IMAGE_ENCODER.SWIN.NUM_HEADS) == 3


def test_defaults_and_every_shipped_training_config_pass():
    validate_config(get_defaults())
    # configs/eval/ holds evaluation suites, not config trees.
    names = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.yaml')))
    assert len(names) >= 15
    for name in names:
        validate_config(load_config(name))


def test_importing_configs_stays_light():
    # The registries validate_config reads import torch and timm; configs/ must not at import time.
    check = "import sys, configs; assert 'torch' not in sys.modules and 'training' not in sys.modules"
    subprocess.run([sys.executable, '-c', check], cwd=ROOT, env=child_env(), check=True)

"""One reading of AMP_OPT_LEVEL for training and evaluation: evaluate.py defaults to the config's level."""
import pytest
import torch

from evaluation import load_encoder
from tests.conftest import TINY_CONFIG
from utils.precision import autocast, autocast_dtype

CPU, CUDA = torch.device('cpu'), torch.device('cuda')


@pytest.mark.parametrize('level, cpu, cuda', [
    ('', None, torch.bfloat16), ('O1', None, torch.bfloat16), ('O2', None, torch.bfloat16),
    ('O0', None, None), ('fp32', None, None), ('none', None, None),
    ('bf16', torch.bfloat16, torch.bfloat16), ('fp16', torch.float16, torch.float16)])
def test_levels(level, cpu, cuda):
    assert autocast_dtype(level, CPU) == cpu and autocast_dtype(level, CUDA) == cuda


def test_unknown_level_is_an_error():
    with pytest.raises(ValueError, match="'O3' is unknown"):
        autocast_dtype('O3', CPU)


def test_autocast_context_runs_in_the_dtype():
    a = torch.randn(4, 4)
    with autocast(CPU, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert (a @ a).dtype == torch.float32


def test_evaluation_follows_the_config_unless_told(tmp_path, tiny_model):
    checkpoint = str(tmp_path / 'tiny.pth')
    torch.save({'model': tiny_model.state_dict()}, checkpoint)
    assert load_encoder(TINY_CONFIG, checkpoint, CPU).amp_dtype is None  # '' on a CPU: fp32, as training
    bf16 = load_encoder(TINY_CONFIG, checkpoint, CPU, opts=['AMP_OPT_LEVEL', 'bf16'])
    assert bf16.amp_dtype == torch.bfloat16
    assert load_encoder(TINY_CONFIG, checkpoint, CPU, opts=['AMP_OPT_LEVEL', 'bf16'], amp='O0').amp_dtype is None

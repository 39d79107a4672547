import math

import pytest
import torch

from tests.conftest import tiny_config
from utils.optim import build_optimizer, build_scheduler, parameter_groups, scaled_learning_rates


def test_no_decay_on_norms_biases_embeddings_and_scale(tiny_model):
    decay, no_decay = parameter_groups(tiny_model, 0.05)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    decay_names = {names[id(p)] for p in decay['params']}
    assert {'logit_scale', 'text_encoder.token_embedding.weight', 'text_encoder.positional_embedding',
            'text_encoder.ln_final.weight', 'text_encoder.resblocks.0.attn.in_proj_bias',
            'image_encoder.norm.weight', 'image_encoder.layers.0.blocks.0.attn.relative_position_bias_table'
            } <= no_decay_names
    assert {'text_encoder.resblocks.0.attn.in_proj_weight', 'image_projection', 'text_projection',
            'image_encoder.patch_embed.proj.weight'} <= decay_names
    assert (decay['weight_decay'], no_decay['weight_decay']) == (0.05, 0.0)
    assert len(decay_names) + len(no_decay_names) == len(list(tiny_model.parameters()))


def test_lr_scaled_by_global_batch():
    config = tiny_config('DATA.BATCH_SIZE', '64', 'TRAIN.ACCUMULATION_STEPS', '2', 'TRAIN.BASE_LR', '5e-4')
    lrs = scaled_learning_rates(config, world_size=4)
    assert lrs.base == pytest.approx(5e-4 * 64 * 4 * 2 / 512)
    assert lrs.minimum == pytest.approx(config.TRAIN.MIN_LR * 1.0)


def test_warmup_then_cosine_per_step(tiny_model):
    config = tiny_config('TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '2', 'TRAIN.BASE_LR', '1e-3',
                         'TRAIN.WARMUP_LR', '1e-6', 'TRAIN.MIN_LR', '1e-5', 'DATA.BATCH_SIZE', '512')
    lrs = scaled_learning_rates(config, 1)
    optimizer = build_optimizer(config, tiny_model, lrs.base)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults['betas'] == (0.9, 0.999)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=10, lrs=lrs)
    seen = []
    for step in range(100):
        scheduler.step_update(step)
        seen.append(optimizer.param_groups[0]['lr'])
    assert seen[0] == pytest.approx(1e-6)
    assert all(a < b for a, b in zip(seen[:19], seen[1:20]))  # linear warmup rises every step
    assert seen[19] == pytest.approx(1e-6 + 19 / 20 * (1e-3 - 1e-6))
    # the cosine counts from step 0, as the official schedule (timm without warmup_prefix)
    assert seen[20] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 20 / 100)))
    assert all(a >= b for a, b in zip(seen[20:], seen[21:]))  # then cosine decays every step
    assert seen[-1] == pytest.approx(1e-5, rel=0.05)


@pytest.mark.parametrize('name', ['adamw', 'sgd'])
def test_fused_kernel_where_torch_has_one_with_the_loop_s_update(name):
    """TRAIN.OPTIMIZER.FUSED: torch's fused kernel (on this CPU from torch 2.4), the same steps as the
    per-parameter loop up to float rounding; False keeps the loop."""
    def steps(fused: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(1000, 16), torch.nn.Linear(16, 4))
        config = tiny_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.OPTIMIZER.FUSED', str(fused))
        optimizer = build_optimizer(config, model, lr=1e-2)
        for _ in range(5):
            model(torch.randint(0, 1000, (32,))).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return optimizer, [p.detach() for p in model.parameters()]

    fused, fused_weights = steps(True)
    loop, loop_weights = steps(False)
    assert fused.defaults.get('fused') is True and not loop.defaults.get('fused')
    for a, b in zip(fused_weights, loop_weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_refused_by_torch_falls_back_to_the_loop_and_says_so(caplog):
    """Where torch has no fused kernel (it raises when the optimizer is built) the loop is used, with a log line."""
    from utils.optim import _fused_if_possible

    class NoFusedKernel(torch.optim.SGD):
        def __init__(self, params, fused=None, **options):
            if fused:
                raise RuntimeError('`fused=True` requires all the params to be floating point Tensors of '
                                   'supported devices')
            super().__init__(params, **options)

    caplog.set_level('INFO', logger='utils.optim')
    optimizer = _fused_if_possible(NoFusedKernel, [{'params': [torch.nn.Parameter(torch.zeros(2))]}], True, lr=0.1)
    assert isinstance(optimizer, NoFusedKernel) and not optimizer.defaults.get('fused')
    assert any('no fused NoFusedKernel' in r.message for r in caplog.records)

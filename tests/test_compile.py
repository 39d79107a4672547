"""TRAIN.COMPILE (training/compile.py): bucketed text lengths give the features of the exact trim; a compiled
step equals the eager one; the graphs compiled stay within the buckets' bound; checkpoints keep their keys;
the config refuses bad values.

The compiled runs use the 'aot_eager' backend: the same dynamo capture, graph breaks, guards and
AOTAutograd forward/backward graphs as inductor, run by torch's own operators, in seconds rather than the
minutes inductor's C++ compilation takes on 2 CPU cores (bench/train_step.py --compile measures inductor).
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
from torch import Tensor

from configs import ConfigError
from model import build_unicl_model
from model.unicl import bucketed_length
from tests.conftest import tiny_config
from training.compile import graph_bound
from training.trainer import Trainer

# A smaller tiny model: the compile time is what these tests pay.
SMALL = ['DATA.IMG_SIZE', '32', 'MODEL.IMAGE_ENCODER.IMG_SIZE', '32', 'MODEL.TEXT_ENCODER.LAYERS', '1',
         'MODEL.IMAGE_ENCODER.SWIN.DEPTHS', '[1]', 'MODEL.IMAGE_ENCODER.SWIN.NUM_HEADS', '[1]', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.BATCH_SIZE', '4']
EOT = 49407  # the end-of-text id, which the padding repeats


def _tokens(lengths, context: int = 77) -> Dict[str, Tensor]:
    """Texts of the given lengths (start and end tokens included), padded to `context` as the tokenizer pads."""
    g = torch.Generator().manual_seed(sum(lengths))
    ids = torch.full((len(lengths), context), EOT)
    for row, length in enumerate(lengths):
        ids[row, :length - 1] = torch.randint(1, 40000, (length - 1,), generator=g)
        ids[row, 0] = 49406
    return {'input_ids': ids, 'attention_mask': (torch.arange(context) < torch.tensor(lengths)[:, None]).long()}


def _batch(lengths) -> Tuple[Tensor, Dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(len(lengths) + max(lengths))
    return torch.randn(len(lengths), 3, 32, 32, generator=g), _tokens(lengths), torch.tensor([0, 1, 0, 2])


def test_bucketed_length():
    assert [bucketed_length(n, 16, 77) for n in (1, 15, 16, 17, 64, 65, 77)] == [16, 16, 16, 32, 64, 77, 77]
    assert bucketed_length(9, 16, 12) == 12 and bucketed_length(9, 1, 77) == 9


def test_bucketed_text_length_gives_the_same_features():
    """Causal attention and end-of-text pooling: the padding a bucket adds after the longest text (and the
    whole 77-token context) changes no feature beyond float rounding."""
    torch.manual_seed(0)
    model = build_unicl_model(tiny_config(*SMALL)).eval()
    tokens = _tokens([5, 9, 12, 20])  # trimmed to 20; buckets of 16 give 32, of 77 the whole context
    with torch.no_grad():
        exact = model.encode_text(tokens, normalize=False)
        for multiple in (16, 77):
            model.text_length_multiple = multiple
            assert torch.allclose(model.encode_text(tokens, normalize=False), exact, rtol=1e-5, atol=1e-6)


def _trainer(*opts: str) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(*SMALL, *opts), 0, 1, torch.device('cpu'))
    trainer.build_optimization(steps_per_epoch=100)
    return trainer


def _step(trainer: Trainer, lengths) -> Tuple[float, Dict[str, Tensor]]:
    """One optimizer step on a batch of texts of these lengths: the loss and the gradients it applied."""
    grads: Dict[str, Tensor] = {}
    hook = trainer.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}))
    loss = trainer.optimizer_step([_batch(lengths)]).loss
    hook.remove()
    return loss, grads


@pytest.fixture(scope='module')
def compiled_and_eager():
    """An eager and a compiled trainer from the same weights after the same 3 steps (longest texts 12, 11 and
    20 tokens: buckets of 16, 16 and 32), with both runs' losses and gradients and the graph count per step."""
    torch._dynamo.reset()
    eager, compiled = _trainer(), _trainer('TRAIN.COMPILE', 'True', 'TRAIN.COMPILE_BACKEND', 'aot_eager')
    runs = []
    for step, lengths in enumerate([[5, 7, 9, 12], [4, 6, 8, 11], [20, 3, 3, 3]], start=1):
        eager_run, compiled_run = _step(eager, lengths), _step(compiled, lengths)
        compiled.compile_watch.check(step)
        runs.append((eager_run, compiled_run, compiled.compile_watch.count))
    yield eager, compiled, runs
    torch._dynamo.reset()


def test_compiled_steps_equal_eager_steps(compiled_and_eager):
    _, _, runs = compiled_and_eager
    for (eager_loss, eager_grads), (compiled_loss, compiled_grads), _ in runs:
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
        assert set(compiled_grads) == set(eager_grads) and len(eager_grads) > 10
        for name, grad in eager_grads.items():
            # Relative to the gradient's own scale: the attention keys' biases get float noise, ~0 either way.
            tolerance = 1e-4 * grad.abs().max() + 1e-8
            assert (compiled_grads[name] - grad).abs().max() <= tolerance, name


def test_graphs_compiled_per_bucket_not_per_length(compiled_and_eager):
    _, compiled, runs = compiled_and_eager
    counts = [count for _, _, count in runs]
    # Lengths 12 and 11 share the bucket of 16: no new graph in the second step; 20 adds the bucket of 32.
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == counts[0] + 1
    assert counts[2] <= compiled.compile_watch.bound == graph_bound(77, passes=1)
    assert compiled.model.text_length_multiple == 16


def test_checkpoint_keys_unchanged_by_compile(compiled_and_eager):
    """A compiled run's checkpoint loads strictly into an eager model, and an eager one into a compiled model."""
    eager, compiled, _ = compiled_and_eager
    # What Trainer.state() saves as 'model'.
    saved = {name: value.clone() for name, value in compiled.model.state_dict().items()}
    assert list(saved) == list(eager.model.state_dict())
    fresh = build_unicl_model(tiny_config(*SMALL))
    fresh.load_state_dict(saved, strict=True)
    assert all(torch.equal(value, saved[name]) for name, value in fresh.state_dict().items())
    compiled.model.load_state_dict(eager.model.state_dict(), strict=True)
    assert all(torch.equal(value, eager.model.state_dict()[name])
               for name, value in compiled.model.state_dict().items())


@pytest.mark.parametrize('opts, key', [
    (['TRAIN.COMPILE_MODE', 'fast'], 'TRAIN.COMPILE_MODE'),
    (['TRAIN.COMPILE_BACKEND', 'tensorrt'], 'TRAIN.COMPILE_BACKEND'),
    (['TRAIN.COMPILE_BACKEND', 'aot_eager', 'TRAIN.COMPILE_MODE', 'max-autotune'], 'TRAIN.COMPILE_MODE'),
])
def test_config_refuses_bad_compile_values(opts, key):
    with pytest.raises(ConfigError, match=f'config key {key} '):
        tiny_config(*opts)
    tiny_config('TRAIN.COMPILE', 'True', 'TRAIN.COMPILE_MODE', 'max-autotune')  # inductor takes any mode

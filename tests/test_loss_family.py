"""The loss family (TRAIN.LOSS unicl, clip, sigmoid), plain and with mixed targets, against dense float64
references written from the definitions, in one process and in two (gloo); the model's logit parameters
per loss; the config keys and their refusals; a training step with each new path."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from configs import ConfigError, load_config
from loss import LOSSES, MixedTargets, SigmoidLoss, UniCLLoss, cat_targets
from loss.targets import Targets
from model import build_unicl_model
from tests.conftest import tiny_config
from tests.gloo import ddp_average, run_in_gloo_group
from training import Trainer
from training.accumulation import StepParts, accumulate_features

# ---------------------------------------------------------------- dense references (float64, explicit N x N)


def weight_matrix(targets: Targets, unique_pairs: bool = False) -> Tensor:
    """W = Y~ Y^T from one-hot rows, the formula of the official repository's issue #12 with clean texts:
    Y one-hot rows of the labels, Y~ = lam Y + (1 - lam) Y[partner] for the (mixed) images."""
    mixed = isinstance(targets, MixedTargets)
    labels = targets.labels if mixed else targets
    if unique_pairs:
        labels = torch.arange(len(labels))
    _, classes = torch.unique(labels, return_inverse=True)
    y = F.one_hot(classes).double()
    if not mixed:
        return y @ y.t()
    lam = targets.lam.double()[:, None]
    return (lam * y + (1 - lam) * y[targets.partner]) @ y.t()


def dense_contrastive(img: Tensor, txt: Tensor, weights: Tensor, scale: Tensor) -> Tensor:
    """UniCL with soft targets: rows (image -> text) and columns (text -> image) of W normalized to sum 1."""
    logits = scale * img @ txt.t()
    i2t = -(weights / weights.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1)
    t2i = -(weights.t() / weights.t().sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1)
    return (i2t.mean() + t2i.mean()) / 2


def dense_sigmoid(img: Tensor, txt: Tensor, weights: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """SigLIP: binary cross-entropy of every pair, summed over texts, averaged over images."""
    logits = scale * img @ txt.t() + bias
    return -(weights * F.logsigmoid(logits) + (1 - weights) * F.logsigmoid(-logits)).sum() / img.shape[0]


def dense(name: str, targets: Targets):
    """The reference of loss `name` as a function of (img, txt, *logit params)."""
    weights = weight_matrix(targets, unique_pairs=name == 'clip')
    if name == 'sigmoid':
        return lambda img, txt, scale, bias: dense_sigmoid(img, txt, weights, scale, bias)
    return lambda img, txt, scale: dense_contrastive(img, txt, weights, scale)


# ---------------------------------------------------------------- cases

TIES = torch.tensor([3, 7, 3, 100, 7, 3, 101, 102, 7, 5])
N = len(TIES)


def flip_partners(sizes: Sequence[int]) -> Tensor:
    """Each rank's batch flipped (data/mixup.py's partners), as global positions."""
    starts = np.cumsum([0, *sizes[:-1]])
    return torch.cat([start + torch.arange(n - 1, -1, -1) for start, n in zip(starts, sizes)])


def mixed(sizes: Sequence[int] = (N,)) -> MixedTargets:
    g = torch.Generator().manual_seed(7)
    lam = torch.rand(N, generator=g, dtype=torch.float64)
    lam[2] = 1.0  # one image left unmixed
    return MixedTargets(TIES, flip_partners(sizes), lam)


TARGETS = {'plain': TIES, 'mixed': mixed()}


def features(n: int, d: int, dtype: torch.dtype, seed: int) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype) for _ in range(2))


def logit_params(name: str, dtype: torch.dtype) -> List[Tensor]:
    # Scale and bias away from their inits so that positives and negatives both carry gradient.
    return [torch.tensor(7.0, dtype=dtype), torch.tensor(-3.0, dtype=dtype)] if name == 'sigmoid' else \
        [torch.tensor(14.3, dtype=dtype)]


def value_and_grads(fn, img: Tensor, txt: Tensor, params: Sequence[Tensor], *targets: Targets) -> List[Tensor]:
    """The loss and its gradients w.r.t. image features, text features and each logit parameter."""
    leaves = [t.clone().requires_grad_(True) for t in (img, txt, *params)]
    value = fn(leaves[0], leaves[1], *targets, *leaves[2:])
    return [value.detach(), *torch.autograd.grad(value, leaves)]


def ours(name: str, tile: int):
    return LOSSES[name].build(tile)


def assert_close(got: Sequence[Tensor], want: Sequence[Tensor], atol: float, where: str = '') -> None:
    for name, a, b in zip(('loss', 'd_img', 'd_txt', 'd_scale', 'd_bias'), got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=atol, msg=lambda m, n=name: f'{where} {n}: {m}')


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize('tile', [3, 0], ids=['tile3-ragged', 'tile-auto'])
@pytest.mark.parametrize('kind', TARGETS)
@pytest.mark.parametrize('name', sorted(LOSSES))
def test_loss_matches_dense_reference_in_float64(name: str, kind: str, tile: int) -> None:
    targets = TARGETS[kind]
    img, txt = features(N, 8, torch.float64, seed=1)
    params = logit_params(name, torch.float64)
    got = value_and_grads(ours(name, tile), img, txt, params, targets)
    reference = dense(name, targets)
    want = value_and_grads(reference, img, txt, params)
    assert_close(got, want, atol=1e-12)


@pytest.mark.parametrize('kind', TARGETS)
@pytest.mark.parametrize('name', sorted(LOSSES))
def test_float32_loss_is_close_to_the_float64_definition(name: str, kind: str) -> None:
    targets = TARGETS[kind]
    img, txt = features(N, 8, torch.float64, seed=2)
    got = value_and_grads(ours(name, 4), img.float(), txt.float(), logit_params(name, torch.float32), targets)
    reference = dense(name, targets)
    want = value_and_grads(reference, img, txt, logit_params(name, torch.float64))
    assert_close(got, want, atol=2e-5)


def test_sigmoid_loss_at_large_logits_keeps_its_small_terms() -> None:
    # Logits of +-100: torch's softplus turns linear above 20 (off by exp(-20) = 2e-9 per term); ours is
    # exact, and the float64 reference sees every term.
    img, _ = features(N, 8, torch.float64, seed=3)
    params = [torch.tensor(100.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)]
    got = value_and_grads(SigmoidLoss(tile_size=3), img, img, params, TIES)
    reference = dense('sigmoid', TIES)
    assert_close(got, value_and_grads(reference, img, img, params), atol=1e-12)


@pytest.mark.parametrize('kind', TARGETS)
def test_clip_is_unicl_with_distinct_labels_bit_for_bit(kind: str) -> None:
    img, txt = features(N, 8, torch.float32, seed=4)
    scale = [torch.tensor(14.3)]
    distinct = torch.arange(100, 100 + N)
    targets = distinct if kind == 'plain' else MixedTargets(distinct, TARGETS['mixed'].partner, TARGETS['mixed'].lam)
    clip = value_and_grads(ours('clip', 3), img, txt, scale, TARGETS[kind])  # TIES: labels ignored
    unicl = value_and_grads(ours('unicl', 3), img, txt, scale, targets)
    for a, b in zip(clip, unicl):
        assert torch.equal(a, b)


@pytest.mark.parametrize('name', sorted(LOSSES))
def test_unmixed_mixed_targets_give_the_plain_loss(name: str) -> None:
    img, txt = features(N, 8, torch.float64, seed=5)
    params = logit_params(name, torch.float64)
    unmixed = MixedTargets(TIES, flip_partners([N]), torch.ones(N, dtype=torch.float64))
    assert_close(value_and_grads(ours(name, 3), img, txt, params, unmixed),
                 value_and_grads(ours(name, 3), img, txt, params, TIES), atol=1e-12)


def test_hand_built_mixup_weights() -> None:
    # Two classes; image 0 (class 0) is mixed with image 2 (class 1) at lam 0.6, image 2 with image 0 at
    # 0.8, image 1 is the middle of the flipped batch: its own partner.
    targets = MixedTargets(torch.tensor([0, 0, 1]), torch.tensor([2, 1, 0]),
                           torch.tensor([0.6, 0.9, 0.8], dtype=torch.float64))
    by_hand = torch.tensor([[0.6, 0.6, 0.4],   # 0.6 * class 0 + 0.4 * class 1, against texts of class 0, 0, 1
                            [1.0, 1.0, 0.0],   # mixed with itself: all class 0
                            [0.2, 0.2, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(weight_matrix(targets), by_hand, rtol=0, atol=1e-15)

    img, txt = features(3, 4, torch.float64, seed=6)
    scale = torch.tensor(5.0, dtype=torch.float64)
    logits = scale * img @ txt.t()
    # Row sums 1.6, 2, 1.2 and column sums 1.8, 1.8, 1.2 normalize the soft targets.
    rows = by_hand / torch.tensor([[1.6], [2.0], [1.2]], dtype=torch.float64)
    columns = by_hand.t() / torch.tensor([[1.8], [1.8], [1.2]], dtype=torch.float64)
    want = (-(rows * logits.log_softmax(1)).sum(1).mean() - (columns * logits.t().log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(UniCLLoss(tile_size=2)(img, txt, targets, scale), want, rtol=0, atol=1e-12)

    bias = torch.tensor(-1.0, dtype=torch.float64)
    x = logits + bias
    want = -(by_hand * F.logsigmoid(x) + (1 - by_hand) * F.logsigmoid(-x)).sum() / 3
    torch.testing.assert_close(SigmoidLoss(tile_size=2)(img, txt, targets, scale, bias), want, rtol=0, atol=1e-12)


def test_concatenated_micro_batches_keep_their_partners() -> None:
    # ACCUMULATION_MODE features joins micro-batches: partners move with their batch.
    whole = mixed(sizes=(4, 6))
    parts = [MixedTargets(TIES[s], whole.partner[s] - s.start, whole.lam[s]) for s in (slice(0, 4), slice(4, N))]
    joined = cat_targets(parts)
    for a, b in zip((joined.labels, joined.partner, joined.lam), (whole.labels, whole.partner, whole.lam)):
        assert torch.equal(a, b)
    assert torch.equal(cat_targets([TIES[:4], TIES[4:]]), TIES)
    with pytest.raises(TypeError):
        cat_targets([TIES[:4], parts[1]])


def test_sigmoid_loss_saves_no_batch_by_batch_tensor() -> None:
    n, d = 256, 4
    img, txt = features(n, d, torch.float32, seed=8)
    targets = MixedTargets(torch.arange(n) % 50, torch.arange(n - 1, -1, -1),
                           torch.full((n,), 0.7, dtype=torch.float64))
    for loss in (SigmoidLoss(tile_size=16), UniCLLoss(tile_size=16)):
        sizes: List[int] = []
        leaves = [t.clone().requires_grad_(True) for t in (img, txt)]
        params = [torch.tensor(value, requires_grad=True) for value in (10.0, -10.0)][:len(loss.logit_params)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            value = loss(*leaves, targets, *params)
        value.backward()
        assert max(sizes) <= 2 * n * d, type(loss).__name__


def test_wrong_number_of_logit_parameters_is_refused() -> None:
    img, txt = features(4, 4, torch.float32, seed=9)
    with pytest.raises(ValueError, match='logit_bias'):
        SigmoidLoss()(img, txt, torch.arange(4), torch.tensor(10.0))
    with pytest.raises(ValueError, match='lam'):
        UniCLLoss()(img, txt, MixedTargets(torch.arange(4), torch.arange(4), torch.ones(3)), torch.tensor(10.0))


# ---------------------------------------------------------------- two processes (one spawned group)

WORLD = 2
SIZES = [4, 6]  # uneven; TIES has label 3, 7 on both ranks


def _dist_cases() -> List[Tuple[str, str]]:
    return [(name, kind) for name in sorted(LOSSES) for kind in ('plain', 'mixed')]


def _dist_results(rank: int) -> Dict:
    rows = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    global_targets = mixed(SIZES)
    # What data/mixup.py hands this rank: positions within its own batch.
    local = {'plain': TIES[rows], 'mixed': MixedTargets(TIES[rows], global_targets.partner[rows] - rows.start,
                                                        global_targets.lam[rows])}
    img, txt = features(N, 6, torch.float64, seed=10)
    results = {}
    for name, kind in _dist_cases():
        results[name, kind] = value_and_grads(ours(name, 3), img[rows], txt[rows], logit_params(name, torch.float64),
                                              local[kind])
        ddp_average(results[name, kind][3:])  # the logit parameters' gradients
    return results


def test_two_gloo_processes_compute_the_global_loss_and_its_gradient(tmp_path: Path) -> None:
    per_rank = run_in_gloo_group(_dist_results, tmp_path, WORLD)
    img, txt = features(N, 6, torch.float64, seed=10)
    targets = {'plain': TIES, 'mixed': mixed(SIZES)}
    for name, kind in _dist_cases():
        reference = dense(name, targets[kind])
        want = value_and_grads(reference, img, txt, logit_params(name, torch.float64))
        for rank in range(WORLD):
            rows = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
            got = per_rank[rank][name, kind]
            # Feature gradients are world_size x the global loss's by design (DDP's average removes it).
            got = [got[0], got[1] / WORLD, got[2] / WORLD, *got[3:]]
            assert_close(got, [want[0], want[1][rows], want[2][rows], *want[3:]], atol=1e-12,
                         where=f'{name} {kind} rank {rank}')


# ---------------------------------------------------------------- model, config, training


def _model(*opts: str):
    return build_unicl_model(tiny_config(*opts))


def test_sigmoid_model_starts_at_siglip_scale_and_bias_and_other_losses_keep_released_keys() -> None:
    sigmoid = _model('TRAIN.LOSS', 'sigmoid')
    assert sigmoid.logit_scale.exp().item() == pytest.approx(10.0)
    assert sigmoid.logit_bias.item() == -10.0
    assert len(sigmoid(torch.zeros(2, 3, 64, 64), {'input_ids': torch.full((2, 5), 49407)})) == 4
    released = set(_model().state_dict())
    assert {k for k in released if '.' not in k} == {'image_projection', 'text_projection', 'logit_scale'}
    assert set(sigmoid.state_dict()) == released | {'logit_bias'}
    # Only a loss with a bias adds a parameter (a model build per loss would cost a second each).
    assert [name for name, spec in LOSSES.items() if spec.logit_bias_init is not None] == ['sigmoid']


@pytest.mark.parametrize('opts, message', [
    (['TRAIN.LOSS', 'triplet'], "TRAIN.LOSS 'triplet' is invalid: must be one of the known values 'clip', 'sigmoid', "
                                "'unicl'"),
    (['AUG.MIXUP', '0.8'], 'MODEL.LABEL_SMOOTHING 0.1 is invalid: must be 0 while AUG.MIXUP, AUG.CUTMIX or '
                           'AUG.CUTMIX_MINMAX turn mixup/cutmix on'),
    (['AUG.CUTMIX_MINMAX', '[0.2, 0.8]'], 'MODEL.LABEL_SMOOTHING 0.1 is invalid'),
    (['AUG.MIXUP', '0.8', 'MODEL.LABEL_SMOOTHING', '0.0', 'AUG.MIXUP_MODE', 'row'], "AUG.MIXUP_MODE 'row' is invalid"),
    (['MODEL.LOGIT_SCALE_INIT', "'large'"], "MODEL.LOGIT_SCALE_INIT 'large' is invalid: must be null or a number"),
])
def test_bad_combinations_are_refused_naming_the_key(opts: List[str], message: str) -> None:
    with pytest.raises(ConfigError, match='^config key ' + message.replace('[', r'\[').replace('(', r'\(')):
        load_config(None, opts)


def test_mixup_with_smoothing_off_is_accepted_and_label_smoothing_alone_stays_ignored() -> None:
    config = load_config(None, ['AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0', 'MODEL.LABEL_SMOOTHING', '0.0',
                                'TRAIN.LOSS', 'sigmoid'])
    assert config.AUG.MIXUP == 0.8
    load_config(None, ['AUG.MIXUP', '0.8', 'AUG.MIXUP_PROB', '0.0'])  # mixes nothing: smoothing is no conflict


FAST = ['DATA.IMG_SIZE', '32', 'MODEL.IMAGE_ENCODER.IMG_SIZE', '32', 'TRAIN.WARMUP_EPOCHS', '0',
        'TRAIN.BASE_LR', '0.02', 'DATA.BATCH_SIZE', '8']


def _trainer(*opts: str):
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(*FAST, *opts), 0, 1, torch.device('cpu'))
    trainer.build_optimization(steps_per_epoch=100)
    return trainer


def _batch(n: int = 8) -> Tuple[Tensor, Dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 4, 0])[:n]
    images = torch.randn(n, 3, 32, 32, generator=g) + labels[:, None, None, None].float()
    tokens = {'input_ids': torch.randint(1, 400, (n, 6), generator=g)}
    tokens['input_ids'][:, -1] = 49407  # end of text
    tokens['input_ids'][:, 1] = 500 + labels  # the texts tell the classes apart
    return images, tokens, labels


def _clean_loss(trainer, batch) -> float:
    trainer.model.eval()
    with torch.no_grad():
        image_features, text_features, *logit = trainer.model(batch[0], batch[1])
        value = trainer.criterion(image_features, text_features, batch[2], *logit).item()
    trainer.model.train()
    return value


def test_training_steps_with_the_sigmoid_loss_and_mixup_lower_the_loss() -> None:
    np.random.seed(0)
    trainer = _trainer('TRAIN.LOSS', 'sigmoid', 'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0', 'AUG.MIXUP_MODE', 'elem',
                       'MODEL.LABEL_SMOOTHING', '0.0')
    batch = _batch()
    before = _clean_loss(trainer, batch)
    seen = _spy_on_targets(trainer)
    for _ in range(3):
        loss, grad_norm, _ = trainer.optimizer_step([batch])
        assert math.isfinite(loss) and math.isfinite(grad_norm)
    assert len(seen) == 3 and all(isinstance(t, MixedTargets) for t in seen) and bool((seen[0].lam < 1).any())
    # SigLIP's start (t = 10, b = -10) is far from the optimum: a few steps bring the loss well down.
    assert _clean_loss(trainer, batch) < before / 2


def _spy_on_targets(trainer) -> list:
    """The targets each call of the trainer's loss receives, in order."""
    seen, criterion = [], trainer.criterion
    trainer.criterion = lambda img, txt, targets, *logit: seen.append(targets) or criterion(img, txt, targets, *logit)
    return seen


class _Towers(torch.nn.Module):
    """Two linear towers with the model's output convention: features, scale, then the bias if any."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = torch.nn.Linear(6, 5).double(), torch.nn.Linear(6, 5).double()
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64)) if bias else None

    def forward(self, images: Tensor, tokens: Dict[str, Tensor]) -> Tuple[Tensor, ...]:
        out = (F.normalize(self.image(images), dim=1), F.normalize(self.text(tokens['x']), dim=1), self.log_scale.exp())
        return out + ((self.bias,) if self.bias is not None else ())


@pytest.mark.parametrize('name', ['unicl', 'sigmoid'])
def test_features_accumulation_of_mixed_micro_batches_equals_one_batch(name: str) -> None:

    model, criterion = _Towers(bias=name == 'sigmoid'), ours(name, 3)
    g = torch.Generator().manual_seed(11)
    images, texts = (torch.randn(N, 6, generator=g, dtype=torch.float64) for _ in range(2))
    whole = mixed(sizes=(4, 6))
    micro = [(images[s], {'x': texts[s]}, MixedTargets(TIES[s], whole.partner[s] - s.start, whole.lam[s]))
             for s in (slice(0, 4), slice(4, N))]
    parts = StepParts(model=model, module=model, ddp=None, criterion=criterion, autocast=contextlib.nullcontext,
                      scaler=None, device=torch.device('cpu'))
    loss = accumulate_features(parts, micro)
    accumulated = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    image_features, text_features, *logit = model(images, {'x': texts})
    want = criterion(image_features, text_features, whole, *logit)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=0, atol=1e-12)
    for k, p in model.named_parameters():
        torch.testing.assert_close(accumulated[k], p.grad, rtol=0, atol=1e-12, msg=k)


def test_mixup_off_hands_the_loader_batch_to_the_loss_untouched() -> None:
    # Off: the plain labels reach UniCLLoss's unmixed path, which computes what it computed before mixup.
    trainer = _trainer()
    assert trainer.mixup is None
    seen = _spy_on_targets(trainer)
    images, tokens, labels = _batch()
    trainer.optimizer_step([(images, tokens, labels)])
    assert isinstance(seen[0], Tensor) and torch.equal(seen[0], labels)

"""The same code on a GPU: bf16 autocast training steps, and CUDA features matching CPU features.
Skipped (and counted) where no CUDA device is present."""
import pytest
import torch

from tests.conftest import tiny_config
from model import build_unicl_model, tokenize
from loss import UniCLLoss

pytestmark = pytest.mark.cuda


def _batch(tokenizer, n=8):
    torch.manual_seed(0)
    texts = [f'a photo of a {c} shape' for c in ['red', 'blue', 'green', 'odd'] * (n // 4)]
    tokens = tokenize(tokenizer, texts)
    return torch.randn(n, 3, 64, 64), tokens, torch.arange(n) % 4


def test_features_match_cpu(tokenizer):
    model = build_unicl_model(tiny_config()).eval()
    images, tokens, _ = _batch(tokenizer)
    with torch.no_grad():
        cpu = model(images, tokens)
        gpu = model.cuda()(images.cuda(), {k: v.cuda() for k, v in tokens.items()})
    for a, b in zip(cpu[:2], gpu[:2]):
        assert torch.allclose(a, b.cpu(), atol=2e-3)


def test_bf16_autocast_steps_lower_the_loss(tokenizer):
    model = build_unicl_model(tiny_config()).cuda().train()
    images, tokens, labels = _batch(tokenizer)
    images, labels = images.cuda(), labels.cuda()
    tokens = {k: v.cuda() for k, v in tokens.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = UniCLLoss()
    losses = []
    for _ in range(20):
        with torch.autocast('cuda', dtype=torch.bfloat16):
            image_features, text_features, scale = model(images, tokens)
        loss = criterion(image_features, text_features, labels, scale)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize('tile', [0, 768], ids=['tile-auto', 'tile768-ragged'])
def test_tiled_loss_matches_dense_definition(tile):
    """The tiled loss on the GPU (auto tile size from the real free memory, and a ragged tiling) against the
    dense definition in float64."""
    from tests.test_loss import dense_unicl, random_batch, value_and_grads

    img, txt = (t.cuda() for t in random_batch(3000, 64, torch.float32, seed=7))
    labels = (torch.arange(3000) % 1100).cuda()  # repeated labels: 1, 2 or 3 positives per row
    scale = torch.tensor(50.0, device='cuda')
    ref = value_and_grads(dense_unicl, img.double(), txt.double(), labels, scale.double())
    ours = value_and_grads(UniCLLoss(tile_size=tile), img, txt, labels, scale)
    for name, a, b in zip(('loss', 'd_img', 'd_txt', 'd_scale'), ours, ref):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5, msg=lambda m, name=name: f'{name}: {m}')

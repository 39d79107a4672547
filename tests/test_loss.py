"""Tests for UniCLLoss against independent dense references, single- and multi-process."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loss import UniCLLoss
from loss.unicl_loss import resolve_tile_size
from tests.gloo import ddp_average, run_in_gloo_group
from utils.distributed import all_gather_with_grad, get_world_size, init_distributed, is_dist


def dense_unicl(img: Tensor, txt: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """The definition written out with an explicit B x B positive mask."""
    logits = scale * img @ txt.t()
    pos = (labels[:, None] == labels[None, :]).to(logits.dtype)
    i2t = -(pos * logits.log_softmax(dim=1)).sum(dim=1) / pos.sum(dim=1)
    t2i = -(pos.t() * logits.t().log_softmax(dim=1)).sum(dim=1) / pos.t().sum(dim=1)
    return (i2t.mean() + t2i.mean()) / 2


def random_batch(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return img, txt


REPEATED = torch.tensor([3, 7, 3, 100, 7, 3, 101, 102, 7, 5])


def value_and_grads(fn, img: Tensor, txt: Tensor, labels: Tensor, scale: Tensor) -> Tuple[Tensor, ...]:
    """Loss and its gradients w.r.t. image features, text features and logit scale."""
    leaves = [t.clone().requires_grad_(True) for t in (img, txt, scale)]
    value = fn(leaves[0], leaves[1], labels, leaves[2])
    return (value.detach(), *torch.autograd.grad(value, leaves))


def assert_all_close(ours: Tuple[Tensor, ...], ref: Tuple[Tensor, ...], atol: float) -> None:
    for name, a, b in zip(("loss", "d_img", "d_txt", "d_scale"), ours, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_distinct_labels_equal_clip_loss() -> None:
    img, txt = random_batch(12, 16, torch.float64)
    scale = torch.tensor(14.3, dtype=torch.float64)
    logits = scale * img @ txt.t()
    target = torch.arange(12)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

    loss = UniCLLoss()(img, txt, torch.arange(100, 112), scale)

    torch.testing.assert_close(loss, clip, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_repeated_labels_match_dense_reference_value_and_grads(dtype: torch.dtype, atol: float) -> None:
    img, txt = random_batch(len(REPEATED), 8, dtype, seed=1)
    scale = torch.tensor(10.0, dtype=dtype)

    ours = value_and_grads(UniCLLoss(), img, txt, REPEATED, scale)
    ref = value_and_grads(dense_unicl, img, txt, REPEATED, scale)

    assert_all_close(ours, ref, atol)


def test_autocast_bf16_computes_logits_in_float32() -> None:
    img, txt = random_batch(len(REPEATED), 32, torch.float32, seed=2)
    img, txt = img.bfloat16(), txt.bfloat16()
    scale = torch.tensor(50.0)
    # Reference on the same bf16-rounded inputs, evaluated in float32: only a
    # float32 computation inside the loss can agree to this tolerance.
    ref = dense_unicl(img.float(), txt.float(), REPEATED, scale)

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = UniCLLoss()(img, txt, REPEATED, scale)

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)


def test_backward_inside_autocast_stays_float32() -> None:
    img, txt = random_batch(len(REPEATED), 32, torch.float32, seed=2)
    scale = torch.tensor(50.0)
    ref = value_and_grads(dense_unicl, img.double(), txt.double(), REPEATED, scale.double())

    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        ours = value_and_grads(UniCLLoss(tile_size=4), img, txt, REPEATED, scale)

    assert_all_close(ours, ref, atol=1e-5)


@pytest.mark.parametrize(
    ("img_shape", "txt_shape", "labels"),
    [
        ((4, 8), (4, 6), torch.arange(4)),
        ((4, 8), (4, 8), torch.arange(3)),
        ((4, 8), (4, 8), torch.arange(4).float()),
    ],
    ids=["feature-dims", "label-count", "float-labels"],
)
def test_rejects_malformed_inputs(img_shape, txt_shape, labels) -> None:
    with pytest.raises(ValueError):
        UniCLLoss()(torch.randn(img_shape), torch.randn(txt_shape), labels, torch.tensor(1.0))


def test_single_process_helpers_are_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == (0, 1, 0)
    assert not is_dist() and get_world_size() == 1
    t = torch.randn(3, 2)
    assert all_gather_with_grad(t) is t


# ---------------------------------------------------------------- tiled computation

LABEL_CASES = {
    "unique": torch.arange(10),
    "repeated": REPEATED,
    "all-same": torch.full((10,), 4),
}


@pytest.mark.parametrize("tile", [1, 3, 10, 0], ids=["tile1", "tile3-ragged", "tile10-whole", "tile-auto"])
@pytest.mark.parametrize("labels", LABEL_CASES.values(), ids=LABEL_CASES.keys())
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_tiled_loss_equals_dense_definition(dtype: torch.dtype, atol: float, labels: Tensor, tile: int) -> None:
    img, txt = random_batch(10, 8, dtype, seed=3)
    scale = torch.tensor(14.3, dtype=dtype)
    # The reference runs in float64 on the same inputs: it is the exact value the float32 result
    # must approach, not a second float32 computation with rounding errors of its own.
    ref = value_and_grads(dense_unicl, img.double(), txt.double(), labels, scale.double())

    assert_all_close(value_and_grads(UniCLLoss(tile_size=tile), img, txt, labels, scale), ref, atol)


@pytest.mark.parametrize("labels", LABEL_CASES.values(), ids=LABEL_CASES.keys())
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_tiled_loss_at_logit_scale_100(dtype: torch.dtype, atol: float, labels: Tensor) -> None:
    # Pairs aligned as after training, when the scale reaches 100: the loss is then O(1). (With
    # unrelated features it is ~60, whose float32 spacing alone is 4e-6.) Logits reach 100, so
    # exp(S - lse) spans far below float32's normal range and the clamping of tiny terms is exercised.
    img, noise = random_batch(10, 8, torch.float64, seed=4)
    txt = F.normalize(img + 0.3 * noise, dim=1)
    img, txt, scale = img.to(dtype), txt.to(dtype), torch.tensor(100.0, dtype=dtype)
    ref = value_and_grads(dense_unicl, img.double(), txt.double(), labels, scale.double())

    assert_all_close(value_and_grads(UniCLLoss(tile_size=3), img, txt, labels, scale), ref, atol)


def test_no_batch_by_batch_tensor_is_saved_for_backward() -> None:
    n, d = 256, 4  # n * n = 65536 logits, n * d = 1024 features per modality
    img, txt = random_batch(n, d, torch.float32, seed=5)
    labels = torch.arange(n) % 100

    def largest_saved(fn) -> int:
        sizes: List[int] = []

        def pack(t: Tensor) -> Tensor:
            sizes.append(t.numel())
            return t

        leaves = [t.clone().requires_grad_(True) for t in (img, txt, torch.tensor(10.0))]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(leaves[0], leaves[1], labels, leaves[2])
        loss.backward()
        return max(sizes)

    # The check can see a logit matrix: the dense definition saves several.
    assert largest_saved(dense_unicl) >= n * n
    # Ours saves features (at most the [n, 2d] concatenation of both) and per-row/column statistics.
    assert largest_saved(UniCLLoss(tile_size=16)) <= 2 * n * d


def test_tile_size_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_tile_size(3, torch.float32, cpu) == 3
    # A 64 MiB tile on CPU: 4096^2 float32, and the largest multiple of 128 below 2896^2 float64.
    assert resolve_tile_size(0, torch.float32, cpu) == 4096
    assert resolve_tile_size(0, torch.float64, cpu) == 2816

    def cuda_tile(free: int, reserved: int, allocated: int) -> int:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 2**30))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated)
        return resolve_tile_size(0, torch.float32, cuda)

    # 1/16 of the free memory (the allocator's unused cache counts as free), within [64 MiB, 1 GiB].
    assert cuda_tile(free=3 * 2**30, reserved=2 * 2**30, allocated=2**30) == 8192  # 256 MiB
    assert cuda_tile(free=70 * 2**30, reserved=0, allocated=0) == 16384  # capped at 1 GiB
    assert cuda_tile(free=2**28, reserved=0, allocated=0) == 4096  # floor of 64 MiB


def test_rejects_negative_tile_size() -> None:
    with pytest.raises(ValueError):
        UniCLLoss(tile_size=-1)


# ---------------------------------------------------------------- multi-process

WORLD = 2
DIN, DOUT = 6, 5
# (labels of the global batch, per-rank batch sizes); repeated labels cross ranks.
DIST_CASES: List[Tuple[List[int], List[int]]] = [
    ([0, 1, 2, 0, 3, 1, 0, 4], [4, 4]),
    ([5, 6, 5, 6, 7, 8, 5, 9], [3, 5]),
    (list(range(10, 16)), [3, 3]),
    ([2] * 7, [4, 3]),
]
# Automatic tiles (one tile per rank here), and 3 x 3 tiles with ragged edges on both axes.
DIST_TILES = [0, 3]


class TwoTower(nn.Module):
    """Shared parameters producing both modalities, so DDP-style averaging can be checked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(DIN, DOUT).double()
        self.text_proj = nn.Linear(DIN, DOUT).double()
        self.log_scale = nn.Parameter(torch.tensor(2.5, dtype=torch.float64))

    def forward(self, x_img: Tensor, x_txt: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        img = F.normalize(self.image_proj(x_img), dim=1)
        txt = F.normalize(self.text_proj(x_txt), dim=1)
        return img, txt, self.log_scale.exp()


def case_inputs(n: int, seed: int) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIN, generator=g, dtype=torch.float64), torch.randn(n, DIN, generator=g, dtype=torch.float64)


def run_case(labels: List[int], seed: int, rows: slice, loss_fn) -> Dict[str, Tensor]:
    """Forward/backward on ``rows`` of the case's global batch; returns loss and grads."""
    model = TwoTower()
    x_img, x_txt = case_inputs(len(labels), seed)
    img, txt, scale = model(x_img[rows], x_txt[rows])
    img.retain_grad()
    txt.retain_grad()
    loss = loss_fn(img, txt, torch.tensor(labels)[rows], scale)
    loss.backward()
    out = {f"param.{k}": p.grad for k, p in model.named_parameters()}
    out.update(loss=loss.detach(), d_img=img.grad, d_txt=txt.grad)
    return out


def _dist_results(rank: int) -> Dict:
    results = {}
    for tile in DIST_TILES:
        for seed, (labels, sizes) in enumerate(DIST_CASES):
            start = sum(sizes[:rank])
            res = run_case(labels, seed, slice(start, start + sizes[rank]), UniCLLoss(tile_size=tile))
            ddp_average(res[key] for key in res if key.startswith("param."))
            results[tile, seed] = res
    return results


def test_two_process_gloo_matches_single_process(tmp_path: Path) -> None:
    per_rank = run_in_gloo_group(_dist_results, tmp_path, WORLD)

    for (tile, seed), (labels, sizes) in [((t, i), c) for t in DIST_TILES for i, c in enumerate(DIST_CASES)]:
        ref = run_case(labels, seed, slice(None), dense_unicl)
        single = run_case(labels, seed, slice(None), UniCLLoss(tile_size=tile))
        start = 0
        for rank in range(WORLD):
            got = per_rank[rank][tile, seed]
            rows = slice(start, start + sizes[rank])
            start += sizes[rank]
            where = f"tile {tile} case {seed} rank {rank}"
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=1e-12, msg=where)
            torch.testing.assert_close(got["loss"], single["loss"], rtol=0, atol=1e-12, msg=where)
            for key in [k for k in ref if k.startswith("param.")]:
                torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-10, msg=f"{where} {key}")
            # Feature grads are world_size x the global-loss grads by design;
            # DDP's averaging removes that factor (checked via params above).
            for key in ("d_img", "d_txt"):
                torch.testing.assert_close(
                    got[key] / WORLD, ref[key][rows], rtol=0, atol=1e-10, msg=f"{where} {key}"
                )

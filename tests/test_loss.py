"""Tests for UniCLLoss against independent dense references, single- and multi-process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from loss import UniCLLoss
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

    def value_and_grads(fn) -> Tuple[Tensor, ...]:
        leaves = [t.clone().requires_grad_(True) for t in (img, txt, scale)]
        value = fn(leaves[0], leaves[1], REPEATED, leaves[2])
        return (value.detach(), *torch.autograd.grad(value, leaves))

    ours = value_and_grads(UniCLLoss())
    ref = value_and_grads(dense_unicl)

    for name, a, b in zip(("loss", "d_img", "d_txt", "d_scale"), ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


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


# ---------------------------------------------------------------- multi-process

WORLD = 2
DIN, DOUT = 6, 5
# (labels of the global batch, per-rank batch sizes); repeated labels cross ranks.
DIST_CASES: List[Tuple[List[int], List[int]]] = [
    ([0, 1, 2, 0, 3, 1, 0, 4], [4, 4]),
    ([5, 6, 5, 6, 7, 8, 5, 9], [3, 5]),
    (list(range(10, 16)), [3, 3]),
]


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


def _dist_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = []
        for seed, (labels, sizes) in enumerate(DIST_CASES):
            start = sum(sizes[:rank])
            res = run_case(labels, seed, slice(start, start + sizes[rank]), UniCLLoss())
            for key in [k for k in res if k.startswith("param.")]:
                # What DDP does to parameter gradients.
                dist.all_reduce(res[key])
                res[key] /= WORLD
            results.append(res)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path: Path) -> None:
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for seed, (labels, sizes) in enumerate(DIST_CASES):
        ref = run_case(labels, seed, slice(None), dense_unicl)
        start = 0
        for rank in range(WORLD):
            got = per_rank[rank][seed]
            rows = slice(start, start + sizes[rank])
            start += sizes[rank]
            where = f"case {seed} rank {rank}"
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=1e-12, msg=where)
            for key in [k for k in ref if k.startswith("param.")]:
                torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-10, msg=f"{where} {key}")
            # Feature grads are world_size x the global-loss grads by design;
            # DDP's averaging removes that factor (checked via params above).
            for key in ("d_img", "d_txt"):
                torch.testing.assert_close(
                    got[key] / WORLD, ref[key][rows], rtol=0, atol=1e-10, msg=f"{where} {key}"
                )

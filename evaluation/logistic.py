"""Multinomial logistic regression on frozen features, solved to convergence: the default linear probe.

A linear probe is a convex problem, so the honest way to get a tuned probe is to solve it rather than to run
a fixed budget of stochastic steps: full-batch L-BFGS with a strong-Wolfe line search (what scikit-learn's
`LogisticRegression` and CLIP's linear-probe protocol use) on

    mean cross-entropy(W z + b) + weight_decay / 2 * ||W - W0||^2

where z are the features standardized per channel with the fitting set's statistics (so one weight-decay
grid suits features of any scale, such as unit-norm embeddings), the bias is not penalized, and W0 is the
prior: zero, or the zero-shot classifier (logit scale x class embeddings, expressed for standardized
features), so a large weight decay gives the zero-shot classifier with fitted class biases. The result is
returned as a plain head on the raw features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_ITERATIONS = 1000
GRADIENT_TOLERANCE = 1e-6


@dataclass
class LinearHead:
    """Logits `features @ weight.T + bias`; `weight` `[C, D]`, `bias` `[C]`."""
    weight: Tensor
    bias: Tensor

    def scores(self, features: Tensor) -> Tensor:
        """`[N, C]` logits as fp32, on the CPU where the metrics run."""
        weight = self.weight.to(features.device)
        return (features.to(weight.dtype) @ weight.T + self.bias.to(features.device)).float().cpu()


@dataclass
class Standardizer:
    """Per-channel mean and standard deviation of a fitting set; a channel that does not vary keeps scale 1."""
    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, features: Tensor) -> 'Standardizer':
        std = features.std(dim=0, unbiased=False)
        return cls(features.mean(dim=0), torch.where(std > 1e-12, std, torch.ones_like(std)))

    def __call__(self, features: Tensor) -> Tensor:
        return (features - self.mean) / self.std

    def to_standardized(self, head: LinearHead) -> LinearHead:
        """The head on standardized features that gives the same logits as `head` on raw features."""
        return LinearHead(head.weight * self.std, head.bias + head.weight @ self.mean)

    def to_raw(self, head: LinearHead) -> LinearHead:
        weight = head.weight / self.std
        return LinearHead(weight, head.bias - weight @ self.mean)


def _solver_dtype(device: torch.device) -> torch.dtype:
    # fp64 where it is cheap (the CPU): L-BFGS then converges to the tolerance instead of stalling on rounding.
    return torch.float64 if device.type == 'cpu' else torch.float32


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float,
                 prior: Optional[LinearHead] = None, standardize: bool = True,
                 max_iterations: int = MAX_ITERATIONS) -> LinearHead:
    """The minimizer of the objective in the module docstring, as a head on raw `features` `[N, D]`.
    `prior` is on raw features too (None: zero). `max_iterations=0` returns the prior itself."""
    dtype = _solver_dtype(features.device)
    x, y = features.to(dtype), labels.to(features.device).long()
    scaler = Standardizer.fit(x) if standardize else Standardizer(torch.zeros_like(x[0]), torch.ones_like(x[0]))
    z = scaler(x)
    if prior is None:
        prior = LinearHead(torch.zeros(num_classes, x.shape[1], dtype=dtype, device=x.device),
                           torch.zeros(num_classes, dtype=dtype, device=x.device))
    prior = scaler.to_standardized(LinearHead(prior.weight.to(x.device, dtype), prior.bias.to(x.device, dtype)))
    weight = prior.weight.clone().requires_grad_(True)
    bias = prior.bias.clone().requires_grad_(True)
    if max_iterations > 0:
        optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iterations, history_size=20,
                                      tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-12,
                                      line_search_fn='strong_wolfe')

        def objective() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z @ weight.T + bias, y)
            loss = loss + weight_decay / 2 * (weight - prior.weight).pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
    return scaler.to_raw(LinearHead(weight.detach(), bias.detach()))

"""Multinomial logistic regression on frozen features, solved to convergence: the default linear probe.

A linear probe is a convex problem, so the honest way to get a tuned probe is to solve it rather than to run
a fixed budget of stochastic steps: full-batch L-BFGS with a strong-Wolfe line search (what scikit-learn's
`LogisticRegression` and CLIP's linear-probe protocol use) on

    mean cross-entropy(W x + b) + weight_decay / 2 * ||W - W0||^2

over the features x as the model gives them (L2-normalized); the bias is not penalized, and W0 is the prior:
zero, or the zero-shot classifier (logit scale x class embeddings), so a large weight decay gives the
zero-shot classifier with fitted class biases. Standardizing the features per channel first (what
ELEVATER's BatchNorm does) was measured and lost 0.5-4 points against scikit-learn on the same features
(bench/README.md), so it is not done.
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


def _solver_dtype(device: torch.device) -> torch.dtype:
    # fp64 where it is cheap (the CPU): L-BFGS then converges to the tolerance instead of stalling on rounding.
    return torch.float64 if device.type == 'cpu' else torch.float32


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float,
                 prior: Optional[LinearHead] = None, max_iterations: int = MAX_ITERATIONS) -> LinearHead:
    """The minimizer of the objective in the module docstring for `features` `[N, D]`, `labels` `[N]`.
    `prior` None is zero; `max_iterations=0` returns the prior itself."""
    dtype = _solver_dtype(features.device)
    x, y = features.to(dtype), labels.to(features.device).long()
    if prior is None:
        prior = LinearHead(torch.zeros(num_classes, x.shape[1]), torch.zeros(num_classes))
    prior_weight = prior.weight.to(x.device, dtype)
    weight = prior_weight.clone().requires_grad_(True)
    bias = prior.bias.to(x.device, dtype).clone().requires_grad_(True)
    if max_iterations > 0:
        optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iterations, history_size=20,
                                      tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-12,
                                      line_search_fn='strong_wolfe')

        def objective() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, y) + weight_decay / 2 * (weight - prior_weight).pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
    return LinearHead(weight.detach(), bias.detach())

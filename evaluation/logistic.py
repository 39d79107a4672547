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
from typing import Optional, Tuple

import torch
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


def _objective_and_gradient(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, prior_weight: Tensor,
                            weight_decay: float, preconditioner: Tensor) -> Tensor:
    """The objective at the preconditioned variables (logits `x @ weight.T + bias`, the head's weight
    `weight @ preconditioner`), its gradient written to `weight.grad` / `bias.grad` (by hand: autograd's
    bookkeeping cost 2-3x the arithmetic on probe-sized problems)."""
    logits = torch.addmm(bias, x, weight.T)
    log_norm = logits.logsumexp(dim=1, keepdim=True)
    rows = torch.arange(len(y), device=x.device)
    difference = weight @ preconditioner - prior_weight
    loss = (log_norm.squeeze(1) - logits[rows, y]).mean() + weight_decay / 2 * difference.pow(2).sum()
    residual = logits.sub_(log_norm).exp_()  # softmax, in place of the logits
    residual[rows, y] -= 1
    residual /= len(y)
    weight.grad = torch.addmm(difference @ preconditioner, residual.T, x, beta=weight_decay)
    bias.grad = residual.sum(dim=0)
    return loss


def _preconditioner(x: Tensor, weight_decay: float, curvature: float) -> Tuple[Tensor, Tensor]:
    """(P, P^-1) with P = (covariance of the centred `x` + weight_decay / curvature)^(-1/2): in the variables
    V = W P^-1 every direction of the objective has about the same curvature (the data's, `curvature` x the
    feature variance, plus the weight decay's), which L-BFGS needs to converge in tens of steps where weakly
    regularized fits of embeddings (a few directions of large variance, many of almost none) did not converge
    in 1000."""
    variances, directions = torch.linalg.eigh(x.T @ x / len(x))
    floor = variances.max().clamp_min(1e-30) * (1e-10 if x.dtype == torch.float64 else 1e-5)
    scale = (variances.clamp_min(0) + weight_decay / curvature).clamp_min(floor).rsqrt()
    return (directions * scale) @ directions.T, (directions / scale) @ directions.T


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float,
                 prior: Optional[LinearHead] = None, max_iterations: int = MAX_ITERATIONS,
                 init: Optional[LinearHead] = None) -> LinearHead:
    """The minimizer of the objective in the module docstring for `features` `[N, D]`, `labels` `[N]`.
    `prior` None is zero; `max_iterations=0` returns the prior itself. `init` (default: the prior) is where
    L-BFGS starts: a solution for a nearby weight decay (a warm start) reaches the same minimum in fewer
    steps.

    The minimizer is that of the objective as written; two changes of variables only make L-BFGS reach it
    sooner: the features are centred (W (x - mean) + b' is the same model with b' = b + W mean, and the bias
    is not penalized) and the weight is preconditioned (`_preconditioner`)."""
    dtype = _solver_dtype(features.device)
    x, y = features.to(dtype), labels.to(features.device).long()
    if prior is None:
        prior = LinearHead(torch.zeros(num_classes, x.shape[1]), torch.zeros(num_classes))
    start = init if init is not None and max_iterations > 0 else prior
    start_weight, start_bias = start.weight.to(x.device, dtype), start.bias.to(x.device, dtype)
    if max_iterations <= 0:
        return LinearHead(start_weight.clone(), start_bias.clone())
    prior_weight = prior.weight.to(x.device, dtype)
    if start is prior:  # from the prior: its class biases plus the log class frequencies (the best biases at W = 0)
        counts = torch.bincount(y, minlength=num_classes).to(dtype).clamp_min(0.5)
        start_bias = start_bias + counts.log() - counts.log().mean()
    # The data's curvature per unit of feature variance: 1/C at uniform predictions, near 0 where the start
    # already predicts confidently (weak weight decays on separable data).
    probabilities = torch.softmax(torch.addmm(start_bias, x, start_weight.T), dim=1)
    curvature = max(((1 - probabilities.pow(2).sum(dim=1)).mean() / max(num_classes - 1, 1)).item(), 1e-6)
    mean = x.mean(dim=0)
    x = x - mean
    preconditioner, inverse = _preconditioner(x, weight_decay, curvature)
    x = x @ preconditioner
    weight = start_weight @ inverse
    bias = start_bias + start_weight @ mean
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iterations, history_size=20,
                                  tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-12,
                                  line_search_fn='strong_wolfe')
    optimizer.step(lambda: _objective_and_gradient(x, y, weight, bias, prior_weight, weight_decay, preconditioner))
    weight = weight @ preconditioner
    return LinearHead(weight, bias - weight @ mean)

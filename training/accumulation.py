"""How the ACCUMULATION_STEPS micro-batches of one optimizer step make its gradients (TRAIN.ACCUMULATION_MODE).

- 'gradients' (the official behaviour): each micro-batch is its own contrastive batch of BATCH_SIZE x
  processes pairs; the micro-batch losses are averaged. Accumulation saves memory, the negatives stay few.
- 'features' (as GradCache and open_clip's --accum-freq): one contrastive batch of BATCH_SIZE x processes x
  ACCUMULATION_STEPS pairs. The features of every micro-batch are computed first without a graph, the loss
  over all of them gives each feature its gradient, then every micro-batch runs again with its graph and
  backpropagates those cached gradients. Same gradients as one big batch, for the activation memory of one
  micro-batch and one extra forward. Each re-run replays the RNG of its first run, so dropout and
  drop-path draw the same masks in both.

Each mode runs the forward and backward passes (DDP all-reduces on the last micro-batch only) and returns
the step's loss, detached: the global loss, the same on all ranks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from loss.targets import Targets, cat_targets

# (images, tokens, labels); after mixup the labels are MixedTargets.
Batch = Tuple[torch.Tensor, Dict[str, torch.Tensor], Targets]


@dataclass
class StepParts:
    """What a mode needs of the trainer."""
    model: nn.Module  # the UniCL model itself
    module: nn.Module  # what the forward runs through: the DDP wrapper, or the model
    ddp: Optional[nn.Module]  # the DDP wrapper when distributed (for no_sync)
    criterion: nn.Module
    autocast: Callable[[], ContextManager]
    scaler: Optional[Any]  # a GradScaler for fp16
    device: torch.device


def to_device(batch: Batch, device: torch.device) -> Batch:
    images, tokens, labels = batch
    return (images.to(device, non_blocking=True), {k: v.to(device, non_blocking=True) for k, v in tokens.items()},
            labels.to(device, non_blocking=True))


def _sync_unless(parts: StepParts, last: bool) -> ContextManager:
    # Only the last micro-batch of a step all-reduces gradients.
    return parts.ddp.no_sync() if parts.ddp is not None and not last else contextlib.nullcontext()


def _backward(parts: StepParts, objective: torch.Tensor) -> None:
    (parts.scaler.scale(objective) if parts.scaler else objective).backward()


def accumulate_gradients(parts: StepParts, batches: Sequence[Batch]) -> torch.Tensor:
    losses = []
    for i, batch in enumerate(batches):
        images, tokens, labels = to_device(batch, parts.device)
        with _sync_unless(parts, last=i == len(batches) - 1):
            with parts.autocast():
                # The logit parameters: the scale, and the bias of a loss that has one (model/unicl.py).
                image_features, text_features, *logit = parts.module(images, tokens)
            loss = parts.criterion(image_features, text_features, labels, *logit)
            _backward(parts, loss / len(batches))
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def _rng_state(device: torch.device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == 'cuda' else None


def _set_rng_state(state: Tuple[torch.Tensor, Optional[torch.Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _gradient_leaf(features: List[torch.Tensor]) -> torch.Tensor:
    # At least fp32: the cached gradients of thousands of features would lose their small values in the
    # fp16/bf16 of autocast features (the loss itself runs in fp32 anyway).
    joined = torch.cat(features)
    return joined.to(torch.promote_types(joined.dtype, torch.float32)).requires_grad_()


def accumulate_features(parts: StepParts, batches: Sequence[Batch]) -> torch.Tensor:
    batches = [to_device(batch, parts.device) for batch in batches]
    rng_states: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []
    image_parts, text_parts = [], []
    with torch.no_grad():  # the plain model: no DDP bookkeeping for a pass without backward
        for images, tokens, _ in batches:
            rng_states.append(_rng_state(parts.device))
            with parts.autocast():
                image_features, text_features, *logit = parts.model(images, tokens)
            image_parts.append(image_features)
            text_parts.append(text_features)
    image_features, text_features = _gradient_leaf(image_parts), _gradient_leaf(text_parts)
    logit = [p.detach().requires_grad_() for p in logit]
    loss = parts.criterion(image_features, text_features, cat_targets([labels for _, _, labels in batches]), *logit)
    if not torch.isfinite(loss):
        return loss.detach()  # no gradients made: the trainer judges the step
    image_grads, text_grads, *logit_grads = torch.autograd.grad(loss, (image_features, text_features, *logit))
    sizes = [images.shape[0] for images, _, _ in batches]
    for i, ((images, tokens, _), rng, image_grad, text_grad) in enumerate(
            zip(batches, rng_states, image_grads.split(sizes), text_grads.split(sizes))):
        _set_rng_state(rng, parts.device)
        with _sync_unless(parts, last=i == len(batches) - 1):
            with parts.autocast():
                image_features, text_features, *logit = parts.module(images, tokens)
            # d(surrogate)/d(weights) = the cached feature gradients backpropagated through this micro-batch;
            # the logit parameters' gradients are shared out so every micro-batch uses every parameter.
            surrogate = ((image_features * image_grad).sum() + (text_features * text_grad).sum()
                         + sum(p * (g / len(batches)) for p, g in zip(logit, logit_grads)))
            _backward(parts, surrogate)
    return loss.detach()


ACCUMULATION_MODES: Dict[str, Callable[[StepParts, Sequence[Batch]], torch.Tensor]] = {
    'gradients': accumulate_gradients,
    'features': accumulate_features,
}


def get_accumulation_mode(name: str) -> Callable[[StepParts, Sequence[Batch]], torch.Tensor]:
    if name not in ACCUMULATION_MODES:
        raise ValueError(f'TRAIN.ACCUMULATION_MODE {name!r} is unknown; known: {sorted(ACCUMULATION_MODES)}')
    return ACCUMULATION_MODES[name]

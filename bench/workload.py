"""The training workload the throughput benchmarks time: a UniCL model with its optimizer, and one full
step (forward of both encoders, the loss, backward, AdamW) on a fixed batch of random images and texts."""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence

import torch

from bench.common import ROOT
from configs import load_config
from data.classnames import imagenet_classnames
from loss import UniCLLoss
from model import build_tokenizer, build_unicl_model, tokenize
from training.compile import compile_for_training
from utils.optim import build_optimizer
from utils.precision import autocast


def text_batch(tokenizer, batch: int, full_length: bool, context: int) -> Dict[str, torch.Tensor]:
    """Prompts "a photo of a {ImageNet class}." or, with `full_length`, texts of all `context` tokens."""
    if full_length:  # start, ordinary tokens, end: the longest a caption can be
        ids = torch.randint(1000, 40000, (batch, context))
        ids[:, 0], ids[:, -1] = tokenizer.bos_token_id, tokenizer.eos_token_id
        return {'input_ids': ids, 'attention_mask': torch.ones_like(ids)}
    names = imagenet_classnames()
    texts = [f'a photo of a {names[i % len(names)]}.' for i in range(batch)]
    return tokenize(tokenizer, texts, context)


class Workload:
    """`configs/<config_name>.yaml`'s model (seeded) in training mode on `device`, with its optimizer; with
    `compiled`, its forward compiled as TRAIN.COMPILE compiles it (inductor, default mode); `opts` override the
    config as main.py's --opts do."""

    def __init__(self, config_name: str, device: torch.device, dtype: Optional[torch.dtype], compiled: bool = False,
                 opts: Sequence[str] = ()):
        torch.manual_seed(0)
        self.config = load_config(os.path.join(ROOT, 'configs', f'{config_name}.yaml'), list(opts))
        self.device, self.dtype = device, dtype
        self.model = build_unicl_model(self.config).to(device).train()
        if compiled:
            compile_for_training(self.model, self.config)
        self.optimizer = build_optimizer(self.config, self.model, 1e-4)
        self.tokenizer = build_tokenizer(self.config.MODEL.TEXT_ENCODER)
        self.criterion = UniCLLoss(tile_size=self.config.TRAIN.LOSS_TILE_SIZE)

    def step(self, batch: int, full_text: bool = False) -> 'Step':
        return Step(self, batch, full_text)


class Step:
    """One training step of a workload on a fixed batch; call it to run it."""

    def __init__(self, workload: Workload, batch: int, full_text: bool):
        size, device = workload.config.DATA.IMG_SIZE, workload.device
        self.workload = workload
        self.images = torch.randn(batch, 3, size, size, device=device)
        tokens = text_batch(workload.tokenizer, batch, full_text, workload.config.MODEL.TEXT_ENCODER.CONTEXT_LENGTH)
        self.tokens = {k: v.to(device) for k, v in tokens.items()}
        self.labels = torch.arange(batch, device=device)

    def __call__(self, optimize: bool = True) -> None:
        w = self.workload
        with autocast(w.device, w.dtype):
            image_features, text_features, scale = w.model(self.images, self.tokens)
        loss = w.criterion(image_features, text_features, self.labels, scale)
        w.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimize:
            w.optimizer.step()

    def seconds(self, warmup: int, steps: int) -> float:
        """Seconds per step after `warmup` untimed steps; CUDA peak-memory stats restart after the warm-up."""
        device = self.workload.device
        for _ in range(warmup):
            self()
        if device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            self()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

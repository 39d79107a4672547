"""The UniCL model: image encoder + text encoder, linear projections into one space, a learnable scale."""
from __future__ import annotations

from typing import Dict, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_

from loss import get_loss_spec

from .image_encoder import build_image_encoder, pooled_features
from .lock import apply_locks
from .text_encoder import build_text_encoder, eot_features, eot_positions

TokenBatch = Dict[str, torch.Tensor]


class UniCLModel(nn.Module):
    """Attribute names are the official ones, so a released `{'model': state_dict}` maps key for key
    (after the image encoder's own layout conversion, see `model.checkpoint`)."""

    def __init__(self, config):
        super().__init__()
        self.text_encoder = build_text_encoder(config.MODEL.TEXT_ENCODER)
        self.image_encoder = build_image_encoder(config.MODEL.IMAGE_ENCODER)
        dim = config.MODEL.DIM_PROJECTION
        self.text_projection = nn.Parameter(torch.empty(self.text_encoder.dim_out, dim))
        self.image_projection = nn.Parameter(torch.empty(self.image_encoder.num_features, dim))
        spec = get_loss_spec(config.TRAIN.LOSS)
        scale_init = spec.logit_scale_init if config.MODEL.LOGIT_SCALE_INIT is None else config.MODEL.LOGIT_SCALE_INIT
        self.logit_scale = nn.Parameter(torch.tensor(float(scale_init)))
        # Only a loss with a learned bias (sigmoid) adds the parameter: the other losses' checkpoints keep
        # exactly the released keys.
        if spec.logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(spec.logit_bias_init)))
        trunc_normal_(self.text_projection, std=.02)
        trunc_normal_(self.image_projection, std=.02)
        # Submodules frozen by MODEL.LOCK_* (model/lock.py), kept in evaluation mode by `train`.
        self.locked_modules: Tuple[str, ...] = ()
        # The trimmed text length is rounded up to a multiple of this (training/compile.py sets 16): a compiled
        # text encoder then meets a few lengths, each compiled once, instead of a new one almost every batch.
        self.text_length_multiple = 1

    def train(self, mode: bool = True) -> 'UniCLModel':
        """As nn.Module's, except that locked submodules stay in evaluation mode: a frozen tower computes
        the function it was pretrained to, without dropout, drop-path or batch statistics."""
        super().train(mode)
        for name in self.locked_modules:
            self.get_submodule(name).eval()
        return self

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """`[B, 3, H, W]` -> `[B, DIM_PROJECTION]`, L2-normalized unless `normalize=False`."""
        x = pooled_features(self.image_encoder, images) @ self.image_projection
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: TokenBatch, normalize: bool = True) -> torch.Tensor:
        """Tokenizer output (`input_ids` `[B, L]`, optionally `attention_mask`) -> `[B, DIM_PROJECTION]`."""
        input_ids, attention_mask = tokens['input_ids'], tokens.get('attention_mask')
        eot = eot_positions(input_ids)
        if self.text_encoder.causal:
            # Under causal attention no state up to a sequence's end-of-text token sees the tokens after
            # it, so the padding after the batch's longest text is dropped: the same features for a
            # fraction of the compute (captions and prompts are far shorter than the 77-token context).
            length = trimmed_length(eot, self.text_length_multiple, input_ids.shape[1])
            input_ids = input_ids[:, :length]
            attention_mask = attention_mask[:, :length] if attention_mask is not None else None
        hidden = self.text_encoder(input_ids, attention_mask)
        x = eot_features(hidden, eot) @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: TokenBatch) -> Tuple[torch.Tensor, ...]:
        """(normalized image features, normalized text features, logit_scale.exp()), then logit_bias when
        the model has one: the loss's arguments after the targets, in the loss's order."""
        logit = (self.logit_scale.exp(),) + ((self.logit_bias,) if hasattr(self, 'logit_bias') else ())
        return (self.encode_image(images), self.encode_text(tokens)) + logit

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Full parameter names to exclude from weight decay beyond norms and biases.

        The official method prefixes the text encoder's names with `lang_encoder.`, a module that does
        not exist, so its token and position embeddings were decayed; these names are the real ones.
        """
        names = {'logit_scale'}
        names |= {f'text_encoder.{n}' for n in self.text_encoder.no_weight_decay()}
        names |= {f'image_encoder.{n}' for n in self.image_encoder.no_weight_decay()}
        return names


@torch.compiler.disable  # a graph break in any case (it reads the data); compiled code sees only the bucket
def trimmed_length(eot: torch.Tensor, multiple: int, available: int) -> int:
    """The tokens a batch with end-of-text tokens at `eot` keeps: up to the last one, in buckets of `multiple`."""
    return bucketed_length(int(eot.max()) + 1, multiple, available)


def bucketed_length(length: int, multiple: int, available: int) -> int:
    """`length` rounded up to a multiple of `multiple`, never past the `available` tokens. The padding this
    adds after every end-of-text token cannot reach the features: no state up to an end-of-text token
    attends to the tokens after it."""
    return min(-(-length // multiple) * multiple, available)


def build_unicl_model(config) -> UniCLModel:
    """A freshly initialized UniCL model for `config` (load weights with `model.checkpoint`), with the
    towers MODEL.LOCK_* names locked (model/lock.py)."""
    image_cfg = config.MODEL.IMAGE_ENCODER
    if image_cfg.TYPE == 'swin' and config.DATA.IMG_SIZE != image_cfg.IMG_SIZE:
        raise ValueError(f'DATA.IMG_SIZE ({config.DATA.IMG_SIZE}) and MODEL.IMAGE_ENCODER.IMG_SIZE '
                         f'({image_cfg.IMG_SIZE}) differ; Swin is built for one input size, set both')
    model = UniCLModel(config)
    apply_locks(model, config.MODEL)
    return model

"""The UniCL text encoder: CLIP's causal transformer, with the official parameter names.

Parameter names match the released checkpoints (`resblocks.N.attn.in_proj_weight`, `mlp.c_fc`, ...), so
`text_encoder.*` keys load without renaming. Attention runs through `scaled_dot_product_attention` with
`is_causal=True` instead of `nn.MultiheadAttention` with an additive -inf mask: the same function of the
same weights (tests compare with the explicit formula), but fused kernels on GPU and no mask tensor.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import trunc_normal_

from .tokenizer import VOCAB_SIZE


class LayerNorm(nn.LayerNorm):
    """LayerNorm with the official eps (1e-12), normalizing in fp32 and applying the affine map in the
    input's dtype, as the official TF-style LayerNorm does; fp16/bf16 inputs stay stable."""

    def __init__(self, width: int, eps: float = 1e-12):
        super().__init__(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalized = F.layer_norm(x.float(), self.normalized_shape, eps=self.eps).to(x.dtype)
        return self.weight * normalized + self.bias


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention holding `nn.MultiheadAttention`'s parameters under its names."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        if width % heads:
            raise ValueError(f'MODEL.TEXT_ENCODER.WIDTH ({width}) must be divisible by HEADS ({heads})')
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention initializes it

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        mask = None
        if key_padding_mask is not None:  # True marks padding, as in nn.MultiheadAttention
            mask = ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.attn = SelfAttention(width, heads, causal)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ('c_fc', nn.Linear(width, width * 4)),
            ('gelu', QuickGELU()),
            ('c_proj', nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_padding_mask)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Token + position embeddings, `layers` pre-norm blocks, final LayerNorm; returns per-token states."""

    def __init__(self, context_length: int = 77, vocab_size: int = VOCAB_SIZE, width: int = 512,
                 layers: int = 12, heads: int = 8, causal: bool = True):
        super().__init__()
        self.context_length = context_length
        self.width = width
        self.causal = causal
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])
        self.ln_final = LayerNorm(width)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # The official initialization: truncated normal (std 0.02) for embeddings and linear layers.
        trunc_normal_(self.positional_embedding, std=.02)
        trunc_normal_(self.token_embedding.weight, std=.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=.02)
                nn.init.zeros_(module.bias)

    @property
    def dim_out(self) -> int:
        return self.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'positional_embedding', 'token_embedding.weight'}

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`[B, L]` token ids (L <= context length) -> `[B, L, width]` hidden states.

        As in the official code, `attention_mask` is ignored by the causal (autoregressive) encoder;
        the bidirectional variant masks padding, which the official code marks as token id 0.
        """
        if input_ids.shape[1] > self.context_length:
            raise ValueError(f'{input_ids.shape[1]} tokens exceed the context length {self.context_length}')
        x = self.token_embedding(input_ids) + self.positional_embedding[:input_ids.shape[1]]
        key_padding_mask = None if self.causal else input_ids == 0
        for block in self.resblocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, key_padding_mask, use_reentrant=False)
            else:
                x = block(x, key_padding_mask)
        return self.ln_final(x)


def build_text_encoder(text_cfg) -> TextTransformer:
    if text_cfg.NAME != 'transformer':
        raise ValueError(f'MODEL.TEXT_ENCODER.NAME {text_cfg.NAME!r} is unknown; known: [\'transformer\']')
    return TextTransformer(
        context_length=text_cfg.CONTEXT_LENGTH,
        width=text_cfg.WIDTH,
        layers=text_cfg.LAYERS,
        heads=text_cfg.HEADS,
        causal=text_cfg.AUTOGRESSIVE,
    )


def eot_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """`[B]` index of each sequence's end-of-text token: the first occurrence of the largest id, 49407
    (padding repeats it)."""
    return input_ids.argmax(dim=-1)


def eot_features(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The hidden state at each sequence's end-of-text token (`positions` from `eot_positions`)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]


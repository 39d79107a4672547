"""Image encoders from timm, built from `MODEL.IMAGE_ENCODER`, with converters for the official weights.

An encoder is the timm module itself, so the checkpoint keys under `image_encoder.` are timm's; the
registry pairs each builder with the functions that move a state dict between the official layout and
timm's. `pooled_features` gives the pooled, final-norm features the projection consumes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict

import torch
from torch import nn
from timm.layers import resample_patch_embed, resize_rel_pos_bias_table
from timm.models import focalnet as timm_focalnet
from timm.models import swin_transformer as timm_swin

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ImageEncoderEntry:
    build: Callable[..., nn.Module]
    # official-layout state dict (keys without the `image_encoder.` prefix) -> this encoder's layout
    from_official: Callable[[StateDict, nn.Module], StateDict]
    # this encoder's state dict -> official layout; None when no official checkpoint of the type exists
    to_official: Callable[[StateDict, nn.Module], StateDict] | None


IMAGE_ENCODERS: Dict[str, ImageEncoderEntry] = {}


def register_image_encoder(name: str, from_official, to_official=None):
    def wrap(build):
        IMAGE_ENCODERS[name] = ImageEncoderEntry(build, from_official, to_official)
        return build
    return wrap


def get_image_encoder_entry(type_name: str) -> ImageEncoderEntry:
    if type_name not in IMAGE_ENCODERS:
        raise ValueError(f'MODEL.IMAGE_ENCODER.TYPE {type_name!r} is unknown; known: {sorted(IMAGE_ENCODERS)}')
    return IMAGE_ENCODERS[type_name]


def _require(condition: bool, key: str, why: str) -> None:
    if not condition:
        raise ValueError(f'MODEL.IMAGE_ENCODER.{key}: {why}')


def _swin_to_official(state_dict: StateDict, model: nn.Module) -> StateDict:
    # timm downsamples at the start of stage i+1; the official code at the end of stage i. The official
    # files also carry the relative-position index and shift masks, which timm keeps out of state_dict.
    out = {re.sub(r'^layers\.(\d+)\.downsample',
                  lambda m: f'layers.{int(m.group(1)) - 1}.downsample', k): v for k, v in state_dict.items()}
    for name, buffer in model.named_buffers():
        if buffer is not None and name.endswith(('relative_position_index', 'attn_mask')):
            out.setdefault(name, buffer.detach().clone())
    return out


def _swin_from_official(state_dict: StateDict, model: nn.Module) -> StateDict:
    """The official layout (or timm's own, which our checkpoints use) -> timm's Swin.

    The layout is told by the downsampling keys: only the official one has a downsample in stage 0. timm's
    own filter guessed from `head.fc.weight` up to 1.0.29, so it shifted the keys of every headless file,
    ours included; deciding here keeps loading independent of the timm version."""
    official = any(k.startswith('layers.0.downsample.') for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.endswith(('relative_position_index', 'attn_mask')):
            continue  # constants timm rebuilds and keeps out of its state dict
        if official:
            key = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) + 1}.downsample', key)
        if key.endswith('relative_position_bias_table'):
            target = model.get_submodule(key[:-len('.relative_position_bias_table')])
            if value.shape != target.relative_position_bias_table.shape:  # another window size
                value = resize_rel_pos_bias_table(value, new_window_size=target.window_size,
                                                  new_bias_shape=target.relative_position_bias_table.shape)
        if key == 'patch_embed.proj.weight' and value.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            value = resample_patch_embed(value, list(model.patch_embed.proj.weight.shape[-2:]),
                                         interpolation='bicubic', antialias=True, verbose=True)
        out[key] = value
    return out


@register_image_encoder('swin', from_official=_swin_from_official, to_official=_swin_to_official)
def build_swin(cfg) -> nn.Module:
    swin = cfg.SWIN
    head_dims = [swin.EMBED_DIM * 2 ** i // h for i, h in enumerate(swin.NUM_HEADS)]
    _require(swin.QK_SCALE is None or all(abs(swin.QK_SCALE - d ** -0.5) < 1e-12 for d in head_dims),
             'SWIN.QK_SCALE', 'timm scales attention by head_dim ** -0.5 only; leave it null')
    _require(not swin.APE, 'SWIN.APE', 'absolute position embedding is not in timm\'s Swin')
    _require(swin.PATCH_NORM, 'SWIN.PATCH_NORM', 'timm\'s Swin always normalizes patch embeddings')
    return timm_swin.SwinTransformer(
        img_size=cfg.IMG_SIZE,
        patch_size=swin.PATCH_SIZE,
        in_chans=swin.IN_CHANS,
        num_classes=0,
        embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        qkv_bias=swin.QKV_BIAS,
        # The official DROP_RATE drops inside blocks; timm's `drop_rate` would drop the pooled feature.
        proj_drop_rate=cfg.DROP_RATE,
        drop_path_rate=cfg.DROP_PATH_RATE,
    )


@register_image_encoder('focalnet', from_official=timm_focalnet.checkpoint_filter_fn)
def build_focalnet(cfg) -> nn.Module:
    focal = cfg.FOCAL
    _require(focal.PATCH_SIZE == 4, 'FOCAL.PATCH_SIZE', 'timm\'s FocalNet has a fixed 4x4 stem')
    _require(all(f == 2 for f in focal.FOCAL_FACTORS), 'FOCAL.FOCAL_FACTORS', 'timm\'s FocalNet uses factor 2')
    _require(focal.PATCH_NORM, 'FOCAL.PATCH_NORM', 'timm\'s FocalNet always normalizes the stem')
    return timm_focalnet.FocalNet(
        in_chans=focal.IN_CHANS,
        num_classes=0,
        embed_dim=focal.EMBED_DIM,
        depths=tuple(focal.DEPTHS),
        mlp_ratio=focal.MLP_RATIO,
        focal_levels=tuple(focal.FOCAL_LEVELS),
        focal_windows=tuple(focal.FOCAL_WINDOWS),
        use_overlap_down=focal.USE_CONV_EMBED,
        # UniCL's FocalNet USE_POSTLN is the LayerNorm inside the modulation (`modulation.ln`), not timm's
        # post-norm block (`use_post_norm`), which would move the block norms and drop `modulation.ln`.
        use_post_norm_in_modulation=focal.USE_POSTLN,
        layerscale_value=1e-4 if focal.USE_LAYERSCALE else None,
        proj_drop_rate=cfg.DROP_RATE,
        drop_path_rate=cfg.DROP_PATH_RATE,
    )


def build_image_encoder(image_cfg) -> nn.Module:
    """The timm encoder for `MODEL.IMAGE_ENCODER`."""
    return get_image_encoder_entry(image_cfg.TYPE).build(image_cfg)


def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Average-pooled features after the final norm: `[B, encoder.num_features]`."""
    return encoder.forward_head(encoder.forward_features(images), pre_logits=True)

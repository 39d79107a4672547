"""UniCL weights in any layout -> this project's model, and back to the official layout.

Layouts accepted by `load_pretrained`:
- a UniCL release or training file, `{'model': state_dict, ...}` with `image_encoder.*`,
  `text_encoder.*`, `image_projection`, `text_projection`, `logit_scale` (official Swin naming);
- a bare state dict with those keys (ours use timm's Swin naming; both convert);
- the K-LITE/ELEVATER layout: `visual.*`, `text.*`, `vision_projection`;
- any of the above under a DDP `module.` prefix.

The image encoders' own conversions live in their registry (model/image_encoder.py); files are read and
written by utils/checkpoint.py.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import Any, List, Optional, Tuple

from torch import nn

from utils.checkpoint import (DEFAULT_CACHE, CheckpointError, LoadReport, StateDict, extract_state_dict,
                              load_state_dict_checked, resolve_source, safe_load, save_atomic)

from .image_encoder import get_image_encoder_entry

_KLITE_PREFIXES = (('visual.', 'image_encoder.'), ('text.', 'text_encoder.'),
                   ('vision_projection', 'image_projection'))


def to_unicl_names(state_dict: StateDict) -> StateDict:
    """Strip a DDP `module.` prefix and map K-LITE/ELEVATER names onto UniCL's."""
    out = {}
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        for old, new in _KLITE_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def _split(state_dict: StateDict, prefix: str) -> Tuple[StateDict, StateDict]:
    inside = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    outside = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    return inside, outside


def to_model_layout(state_dict: StateDict, model: nn.Module, image_type: str) -> StateDict:
    """Any accepted layout -> the keys and shapes of `model` (a `UniCLModel`)."""
    state_dict = to_unicl_names(state_dict)
    image_sd, rest = _split(state_dict, 'image_encoder.')
    if image_sd:
        image_sd = get_image_encoder_entry(image_type).from_official(image_sd, model.image_encoder)
        # A converted key the encoder lacks means the encoder is built differently from the file's (an
        # option mapped wrong, say); loading the rest would give wrong features without an error.
        dropped = sorted(set(image_sd) - set(model.image_encoder.state_dict()))
        if dropped:
            raise CheckpointError(f'{len(dropped)} image encoder weights of the file have no place in this '
                                  f'{image_type} encoder (check MODEL.IMAGE_ENCODER): '
                                  + ', '.join(dropped[:5]))
    rest.update({'image_encoder.' + k: v for k, v in image_sd.items()})
    return rest


def to_official_layout(state_dict: StateDict, model: nn.Module, image_type: str) -> StateDict:
    """`model.state_dict()` -> the layout the official UniCL code loads."""
    entry = get_image_encoder_entry(image_type)
    if entry.to_official is None:
        raise CheckpointError(f'no official layout is known for MODEL.IMAGE_ENCODER.TYPE {image_type!r}')
    image_sd, rest = _split(state_dict, 'image_encoder.')
    rest.update({'image_encoder.' + k: v for k, v in entry.to_official(image_sd, model.image_encoder).items()})
    return rest


def load_pretrained(model: nn.Module, source: str, image_type: str, strict: bool = True,
                    sha256: Optional[str] = None, cache_dir: str = DEFAULT_CACHE) -> LoadReport:
    """Load model weights from a path or URL in any accepted layout into `model` (a `UniCLModel`)."""
    path = resolve_source(source, cache_dir=cache_dir, sha256=sha256)
    return load_loaded(model, safe_load(path), source, image_type, strict)


def load_loaded(model: nn.Module, obj: Any, source: str, image_type: str, strict: bool = True) -> LoadReport:
    """`load_pretrained` for a file already read with `safe_load` (`source` names it in messages)."""
    state_dict = extract_state_dict(obj, source)
    return load_state_dict_checked(model, to_model_layout(state_dict, model, image_type), source, strict)


def export_official(model: nn.Module, image_type: str, path: str) -> None:
    """Write `model` as `{'model': state_dict}` in the official layout, which the official code loads."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({'model': OrderedDict(to_official_layout(state_dict, model, image_type))}, path)


def _export_main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog='python -m model.checkpoint',
        description='Export a checkpoint of this project to the official UniCL layout ({"model": state_dict}).')
    parser.add_argument('--cfg', required=True, help='config the checkpoint was trained with')
    parser.add_argument('--checkpoint', required=True, help='path or URL of the checkpoint to convert')
    parser.add_argument('--output', required=True, help='file to write')
    parser.add_argument('--opts', nargs='+', default=None, help='config overrides, KEY VALUE pairs')
    args = parser.parse_args(argv)
    from configs import load_config

    from .unicl import build_unicl_model
    config = load_config(args.cfg, args.opts)
    model = build_unicl_model(config)
    load_pretrained(model, args.checkpoint, config.MODEL.IMAGE_ENCODER.TYPE)
    export_official(model, config.MODEL.IMAGE_ENCODER.TYPE, args.output)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    _export_main()

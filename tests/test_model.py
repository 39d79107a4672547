import math
import re

import pytest
import torch

from configs import ConfigError
from model import IMAGE_ENCODERS, build_unicl_model, tokenize
from tests.conftest import tiny_config


def test_forward_shapes_norms_and_scale(tiny_model, tokenizer):
    tokens = tokenize(tokenizer, ['a red circle', 'a blue square'])
    with torch.no_grad():
        image_features, text_features, scale = tiny_model(torch.randn(2, 3, 64, 64), dict(tokens))
    assert image_features.shape == text_features.shape == (2, 128)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(2))
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_text_feature_unchanged_by_dropping_padding(tiny_model, tokenizer):
    """encode_text runs the causal encoder only up to the batch's last end-of-text token; the features
    equal those of the full 77-token sequence, for the longest text and for the shorter ones."""
    tokens = tokenize(tokenizer, ['a photo of a large red striped star on a dark background', 'box'])
    seen = []
    hook = tiny_model.text_encoder.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        got = tiny_model.encode_text(tokens, normalize=False)
        full = tiny_model.text_encoder(tokens['input_ids'])
    hook.remove()
    expected = full[torch.arange(2), tokens['input_ids'].argmax(dim=-1)] @ tiny_model.text_projection
    assert seen == [int(tokens['input_ids'].argmax(dim=-1).max()) + 1, 77] and seen[0] < 20
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_image_feature_is_pooled_final_norm(tiny_model):
    images = torch.randn(2, 3, 64, 64)
    encoder = tiny_model.image_encoder
    with torch.no_grad():
        tokens = encoder.norm(encoder.layers(encoder.patch_embed(images)))  # [B, H, W, C] after the final norm
        expected = tokens.mean(dim=(1, 2)) @ tiny_model.image_projection
        got = tiny_model.encode_image(images, normalize=False)
    assert encoder.num_features == 256
    assert torch.allclose(got, expected, atol=1e-5)


def test_official_feature_widths():
    assert build_unicl_model(tiny_config('MODEL.IMAGE_ENCODER.SWIN.EMBED_DIM', '96')).image_encoder.num_features == 768


def test_no_weight_decay_names_real_parameters(tiny_model):
    names = tiny_model.no_weight_decay()
    params = dict(tiny_model.named_parameters())
    assert names <= set(params)
    assert {'logit_scale', 'text_encoder.token_embedding.weight', 'text_encoder.positional_embedding'} <= names
    assert any('relative_position_bias_table' in n for n in names)


def test_focalnet_type():
    model = build_unicl_model(tiny_config('MODEL.IMAGE_ENCODER.TYPE', 'focalnet',
                                          'MODEL.IMAGE_ENCODER.FOCAL.EMBED_DIM', '16',
                                          'MODEL.IMAGE_ENCODER.FOCAL.DEPTHS', '[1, 1, 1, 1]')).eval()
    with torch.no_grad():
        features = model.encode_image(torch.randn(2, 3, 64, 64))
    assert model.image_encoder.num_features == 128 and features.shape == (2, 128)
    assert 'focalnet' in IMAGE_ENCODERS and 'swin' in IMAGE_ENCODERS


def test_bad_model_configs():
    with pytest.raises(ValueError, match='TYPE .*vit.*known'):
        build_unicl_model(tiny_config('MODEL.IMAGE_ENCODER.TYPE', 'vit'))
    with pytest.raises(ValueError, match='DATA.IMG_SIZE'):
        build_unicl_model(tiny_config('DATA.IMG_SIZE', '96'))
    with pytest.raises(ValueError, match='SWIN.APE'):
        build_unicl_model(tiny_config('MODEL.IMAGE_ENCODER.SWIN.APE', 'True'))
    with pytest.raises(ConfigError):
        tiny_config('MODEL.TEXT_ENCODER.WIDTHS', '3')


def test_logit_scale_init_configurable():
    model = build_unicl_model(tiny_config('MODEL.LOGIT_SCALE_INIT', '1.0'))
    assert model.logit_scale.exp().item() == pytest.approx(math.e)


def _official_focalnet_layout(encoder_sd):
    """UniCL's FocalNet naming, written independently of the converter: `patch_embed`, downsampling at the
    end of stage i, `modulation.ln`, `gamma_1/2`, linear (not 1x1 conv) `f` and `proj`."""
    out = {}
    for key, value in encoder_sd.items():
        key = key.replace('stem.', 'patch_embed.').replace('modulation.norm.', 'modulation.ln.')
        key = re.sub(r'ls(\d)\.gamma', r'gamma_\1', key)
        key = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', key)
        if re.search(r'modulation\.(f|proj)\.weight$', key):
            value = value.flatten(1)
        out['image_encoder.' + key] = value.clone()
    return out


def test_focalnet_postln_is_the_modulation_norm_and_official_files_load(tmp_path):
    from model.checkpoint import load_pretrained
    from utils.checkpoint import CheckpointError
    opts = ['MODEL.IMAGE_ENCODER.TYPE', 'focalnet', 'MODEL.IMAGE_ENCODER.FOCAL.EMBED_DIM', '16',
            'MODEL.IMAGE_ENCODER.FOCAL.DEPTHS', '[1, 1, 1, 1]', 'MODEL.IMAGE_ENCODER.FOCAL.USE_LAYERSCALE', 'True']
    torch.manual_seed(0)
    source = build_unicl_model(tiny_config(*opts, 'MODEL.IMAGE_ENCODER.FOCAL.USE_POSTLN', 'True')).eval()
    block = source.image_encoder.layers[0].blocks[0]
    assert not isinstance(block.modulation.norm, torch.nn.Identity)  # the LayerNorm inside the modulation
    assert not isinstance(block.norm1, torch.nn.Identity)  # the block stays pre-norm
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    encoder_sd = source.image_encoder.state_dict()
    official = {**_official_focalnet_layout(encoder_sd),
                **{k: v for k, v in source.state_dict().items() if not k.startswith('image_encoder.')}}
    assert any('modulation.ln.' in k for k in official)
    path = str(tmp_path / 'focalnet.pth')
    torch.save({'model': official}, path)
    target = build_unicl_model(tiny_config(*opts, 'MODEL.IMAGE_ENCODER.FOCAL.USE_POSTLN', 'True')).eval()
    assert load_pretrained(target, path, 'focalnet').missing == []
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(source.encode_image(images), target.encode_image(images), atol=1e-5)
    # An encoder built without the option would silently drop modulation.ln: refused.
    with pytest.raises(CheckpointError, match='no place in this focalnet encoder.*modulation.norm'):
        load_pretrained(build_unicl_model(tiny_config(*opts)), path, 'focalnet', strict=False)


def _saved_bytes_and_grads(model, run):
    """Bytes of the tensors autograd keeps for backward during `run(model)`, and the gradients after it."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(model)
    out.square().sum().backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('encoder', ['image', 'text'])
def test_gradient_checkpointing_is_active_and_keeps_less(tiny_model, tokenizer, encoder):
    """TRAIN.USE_CHECKPOINT -> set_grad_checkpointing: each encoder keeps far fewer activations for
    backward (a no-op would keep as many) and the gradients stay the same."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    tokens = tokenize(tokenizer, ['a red circle on a dark background'] * 4)
    run = (lambda m: m.encode_image(images)) if encoder == 'image' else (lambda m: m.encode_text(tokens))
    model = tiny_model.train()
    plain_bytes, plain_grads = _saved_bytes_and_grads(model, run)
    model.set_grad_checkpointing(True)
    checkpointed_bytes, grads = _saved_bytes_and_grads(model, run)
    assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-6), name

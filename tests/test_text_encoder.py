"""The text encoder against a plain reference written here: explicit softmax attention with an additive
-inf causal mask, TF-style LayerNorm (eps inside the square root, fp32), QuickGELU."""
import math

import pytest
import torch

from model.text_encoder import TextTransformer


def reference_layer_norm(x, weight, bias, eps=1e-12):
    dtype = x.dtype
    x = x.float()
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return weight * ((x - mean) / torch.sqrt(var + eps)).to(dtype) + bias


def reference_forward(enc: TextTransformer, ids: torch.Tensor, causal=True):
    sd = enc.state_dict()
    x = sd['token_embedding.weight'][ids] + sd['positional_embedding'][:ids.shape[1]]
    length, width, heads = ids.shape[1], enc.width, enc.resblocks[0].attn.heads
    mask = torch.full((length, length), float('-inf')).triu(1) if causal else torch.zeros(length, length)
    if not causal:
        mask = mask + torch.where(ids == 0, float('-inf'), 0.0)[:, None, None, :]
    for i in range(len(enc.resblocks)):
        p = lambda name: sd[f'resblocks.{i}.{name}']  # noqa: E731
        h = reference_layer_norm(x, p('ln_1.weight'), p('ln_1.bias'))
        qkv = h @ p('attn.in_proj_weight').T + p('attn.in_proj_bias')
        q, k, v = (t.reshape(ids.shape[0], length, heads, -1).transpose(1, 2) for t in qkv.chunk(3, -1))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads) + mask, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(ids.shape[0], length, width)
        x = x + out @ p('attn.out_proj.weight').T + p('attn.out_proj.bias')
        h = reference_layer_norm(x, p('ln_2.weight'), p('ln_2.bias'))
        h = h @ p('mlp.c_fc.weight').T + p('mlp.c_fc.bias')
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ p('mlp.c_proj.weight').T + p('mlp.c_proj.bias')
    return reference_layer_norm(x, sd['ln_final.weight'], sd['ln_final.bias'])


def _randomized_encoder(causal):
    torch.manual_seed(0)
    enc = TextTransformer(context_length=77, width=64, layers=2, heads=4, causal=causal).eval()
    with torch.no_grad():
        for name, param in enc.named_parameters():
            if 'ln' in name:  # non-trivial norms, so the reference's affine placement is checked
                param.normal_(1.0 if name.endswith('weight') else 0.0, 0.2)
    return enc


@pytest.mark.parametrize('causal', [True, False])
def test_matches_reference(causal):
    enc = _randomized_encoder(causal)
    ids = torch.randint(1, 49406, (3, 77))
    ids[1, 20:] = 0  # padding, which only the bidirectional variant masks
    with torch.no_grad():
        assert torch.allclose(enc(ids), reference_forward(enc, ids, causal), atol=2e-5, rtol=1e-4)


def test_causal_feature_ignores_later_tokens():
    enc = _randomized_encoder(True)
    ids = torch.randint(1, 49406, (1, 77))
    changed = ids.clone()
    changed[0, 40:] = 7
    with torch.no_grad():
        assert torch.equal(enc(ids)[0, :40], enc(changed)[0, :40])
        assert not torch.allclose(enc(ids)[0, 40:], enc(changed)[0, 40:])


def test_official_parameter_names():
    names = set(TextTransformer(width=64, layers=1, heads=4).state_dict())
    assert {'token_embedding.weight', 'positional_embedding', 'resblocks.0.attn.in_proj_weight',
            'resblocks.0.attn.in_proj_bias', 'resblocks.0.attn.out_proj.weight', 'resblocks.0.attn.out_proj.bias',
            'resblocks.0.ln_1.weight', 'resblocks.0.ln_1.bias', 'resblocks.0.mlp.c_fc.weight',
            'resblocks.0.mlp.c_fc.bias', 'resblocks.0.mlp.c_proj.weight', 'resblocks.0.mlp.c_proj.bias',
            'resblocks.0.ln_2.weight', 'resblocks.0.ln_2.bias', 'ln_final.weight', 'ln_final.bias'} == names


def test_layer_norm_in_bf16_is_computed_in_fp32():
    enc = _randomized_encoder(True)
    x = (torch.randn(2, 5, 64) * 300 + 1000).bfloat16()  # large offset: a bf16 variance would be garbage
    ln = enc.ln_final
    expected = reference_layer_norm(x, ln.weight.bfloat16(), ln.bias.bfloat16())
    assert torch.equal(ln.to(torch.bfloat16)(x), expected)


def test_gradient_checkpointing_gives_same_gradients():
    enc = _randomized_encoder(True).train()
    ids = torch.randint(1, 49406, (2, 77))
    enc(ids).sum().backward()
    plain = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    enc(ids).sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, enc.parameters()))

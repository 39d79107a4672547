"""Checkpoint layouts, safe loading, atomic writes and the export command."""
import hashlib
import http.server
import os
import re
import threading

import pytest
import torch
from yacs.config import CfgNode

from tests.conftest import tiny_config
from model import build_unicl_model, tokenize
from model.checkpoint import export_official, load_pretrained
from utils.checkpoint import CheckpointError, resolve_source, safe_load, save_atomic


def official_layout(model):
    """What the official code saves: downsampling at the end of stage i (timm: start of stage i + 1), and
    the relative-position index and shift-mask buffers in the file. Written here independently."""
    out = {}
    for key, value in model.state_dict().items():
        out[re.sub(r'image_encoder\.layers\.(\d+)\.downsample',
                   lambda m: f'image_encoder.layers.{int(m.group(1)) - 1}.downsample', key)] = value.clone()
    for name, buffer in model.image_encoder.named_buffers():
        if name.endswith(('relative_position_index', 'attn_mask')):
            out['image_encoder.' + name] = buffer.clone()
    return out


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _outputs(model, tokenizer):
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 64)
    tokens = tokenize(tokenizer, ['a red circle', 'two blue squares'])
    with torch.no_grad():
        return model.eval()(images, tokens)


def _same_outputs(a, b):
    return all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


def test_official_release_file_loads_and_gives_same_outputs(tmp_path, tiny_cfg, tokenizer):
    source = _randomize(build_unicl_model(tiny_cfg))
    official = official_layout(source)
    assert 'image_encoder.layers.0.downsample.reduction.weight' in official
    path = str(tmp_path / 'release.pth')
    torch.save({'model': official}, path)
    target = build_unicl_model(tiny_cfg)
    report = load_pretrained(target, path, 'swin')
    assert report.missing == [] and report.unexpected == []
    assert _same_outputs(_outputs(source, tokenizer), _outputs(target, tokenizer))


def test_export_round_trips_to_official_layout(tmp_path, tiny_cfg):
    source = _randomize(build_unicl_model(tiny_cfg))
    export_official(source, 'swin', str(tmp_path / 'out.pth'))
    exported = torch.load(str(tmp_path / 'out.pth'), weights_only=True)['model']
    expected = official_layout(source)
    assert set(exported) == set(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


@pytest.mark.parametrize('layout', ['bare', 'ddp', 'klite', 'training'])
def test_other_layouts(tmp_path, tiny_cfg, tokenizer, layout):
    source = _randomize(build_unicl_model(tiny_cfg))
    sd = source.state_dict()
    if layout == 'ddp':
        sd = {'module.' + k: v for k, v in sd.items()}
    if layout == 'klite':
        sd = {k.replace('image_encoder.', 'visual.').replace('text_encoder.', 'text.')
              .replace('image_projection', 'vision_projection'): v for k, v in sd.items()}
    obj = sd
    if layout == 'training':  # the official training file: a yacs CfgNode rides along
        obj = {'model': official_layout(source), 'config': tiny_cfg, 'epoch': 3, 'max_accuracy': 12.5}
    path = str(tmp_path / 'ckpt.pth')
    torch.save(obj, path)
    target = build_unicl_model(tiny_cfg)
    load_pretrained(target, path, 'swin')
    assert _same_outputs(_outputs(source, tokenizer), _outputs(target, tokenizer))


class Exploit:
    def __reduce__(self):
        return (open, (os.environ['UNICL_TEST_MARKER'], 'w'))


def test_arbitrary_objects_are_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / 'marker'
    monkeypatch.setenv('UNICL_TEST_MARKER', str(marker))
    path = str(tmp_path / 'evil.pth')
    torch.save({'model': {'w': torch.ones(1)}, 'payload': Exploit()}, path)
    with pytest.raises(CheckpointError, match='refused to unpickle.*open'):
        safe_load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a plain unpickle does run it
    assert marker.exists()


def test_cfgnode_is_allowed(tmp_path):
    path = str(tmp_path / 'cfg.pth')
    torch.save({'config': CfgNode({'A': {'B': 1}}), 'w': torch.ones(2)}, path)
    loaded = safe_load(path)
    assert isinstance(loaded['config'], CfgNode) and loaded['config'].A.B == 1


def test_other_architecture_names_mismatched_shapes(tmp_path, tiny_cfg):
    other = build_unicl_model(tiny_config('MODEL.IMAGE_ENCODER.SWIN.EMBED_DIM', '48'))
    path = str(tmp_path / 'other.pth')
    torch.save({'model': other.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r'does not fit.*image_encoder\.\S+: \(48, 3, 4, 4\) in the file, '
                                              r'\(32, 3, 4, 4\) in the model'):
        load_pretrained(build_unicl_model(tiny_cfg), path, 'swin')


def test_missing_and_unexpected_keys(tmp_path, tiny_cfg):
    sd = build_unicl_model(tiny_cfg).state_dict()
    del sd['text_projection']
    sd['extra.weight'] = torch.ones(1)
    path = str(tmp_path / 'partial.pth')
    torch.save({'model': sd}, path)
    with pytest.raises(CheckpointError, match='lacks 1 weights.*text_projection'):
        load_pretrained(build_unicl_model(tiny_cfg), path, 'swin')
    report = load_pretrained(build_unicl_model(tiny_cfg), path, 'swin', strict=False)
    assert report.missing == ['text_projection'] and report.unexpected == ['extra.weight']


def test_not_a_state_dict(tmp_path, tiny_cfg):
    path = str(tmp_path / 'junk.pth')
    torch.save({'epoch': 3}, path)
    with pytest.raises(CheckpointError, match='no state dict'):
        load_pretrained(build_unicl_model(tiny_cfg), path, 'swin')
    with pytest.raises(CheckpointError, match='not found'):
        load_pretrained(build_unicl_model(tiny_cfg), str(tmp_path / 'absent.pth'), 'swin')


def test_url_downloaded_once_and_verified(tmp_path):
    served = tmp_path / 'served'
    served.mkdir()
    torch.save({'model': {'w': torch.arange(3.0)}}, str(served / 'release.pth'))
    digest = hashlib.sha256((served / 'release.pth').read_bytes()).hexdigest()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/release.pth'
        cache = str(tmp_path / 'cache')
        first = resolve_source(url, cache_dir=cache, sha256=digest)
        second = resolve_source(url, cache_dir=cache, sha256=digest)
        assert first == second and len(requests) == 1
        assert torch.equal(safe_load(first)['model']['w'], torch.arange(3.0))
        with pytest.raises(CheckpointError, match='sha256'):
            resolve_source(first, sha256='0' * 64)
    finally:
        server.shutdown()


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    save_atomic({'step': 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        save_atomic({'step': 2, 'bad': Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {'step': 1}
    assert os.listdir(tmp_path) == ['ckpt.pth']  # no temp file left behind


def _legacy_timm_swin_filter(state_dict, model):
    """timm <= 1.0.29's Swin filter as far as the layout goes: a file without `head.fc.weight` is taken for
    the official layout, so the downsample keys of any headless file move up one stage."""
    old_weights = 'head.fc.weight' not in state_dict
    return {(re.sub(r'layers.(\d+).downsample', lambda m: f'layers.{int(m.group(1)) + 1}.downsample', k)
             if old_weights else k): v
            for k, v in state_dict.items() if not k.endswith(('relative_position_index', 'attn_mask'))}


@pytest.fixture
def legacy_timm_swin_filter(monkeypatch):
    """The model package as imported next to timm <= 1.0.29 (its encoders registered afresh)."""
    import importlib

    import model.image_encoder
    from timm.models import swin_transformer
    monkeypatch.setattr(swin_transformer, 'checkpoint_filter_fn', _legacy_timm_swin_filter)
    importlib.reload(model.image_encoder)
    yield
    monkeypatch.undo()
    importlib.reload(model.image_encoder)


@pytest.mark.parametrize('layout', ['training-checkpoint', 'official'])
def test_own_and_official_checkpoints_load_under_old_timm(tmp_path, tiny_cfg, tokenizer, legacy_timm_swin_filter,
                                                          layout):
    """Our checkpoints are headless and in timm's layout; the layout is decided by our code, not timm's guess."""
    from utils.checkpoint import CheckpointManager
    source = _randomize(build_unicl_model(tiny_cfg))
    manager = CheckpointManager(str(tmp_path))
    weights = source.state_dict() if layout == 'training-checkpoint' else official_layout(source)
    path = manager.save({'model': weights, 'optimizer': {}, 'progress': {'step': 3}}, 3)
    target = build_unicl_model(tiny_cfg)
    report = load_pretrained(target, path, 'swin')
    assert report.missing == [] and report.unexpected == []
    assert _same_outputs(_outputs(source, tokenizer), _outputs(target, tokenizer))

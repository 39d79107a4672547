"""Zero-shot evaluation: the CLI's files, an independent recomputation, torchrun with 2 processes."""
import json
import os

import pytest
import torch

import evaluate
from data.classnames import imagenet_classnames, resolve_classnames, resolve_templates, zeroshot_templates
from data.transforms import build_eval_transform
from model import tokenize
from torchvision.datasets import ImageFolder
from tests.conftest import TINY_CONFIG, run_command, run_like_torchrun


def _run(folder, checkpoint, out, *extra):
    return evaluate.main(['zeroshot', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--data-path', folder,
                          '--output', out, '--batch-size', '4', '--num-workers', '0', '--device', 'cpu',
                          '--save-predictions', *extra])


def _read_predictions(out):
    with open(os.path.join(out, 'predictions.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_cli_writes_results_and_predictions(color_folder, checkpoint, tmp_path):
    out = str(tmp_path / 'out')
    summary = _run(color_folder, checkpoint, out, '--templates', 'single')
    with open(os.path.join(out, 'zeroshot_results.json')) as f:
        results = json.load(f)
    assert results == summary
    assert (results['num_images'], results['num_classes']) == (19, 6)
    assert results['checkpoint'] == checkpoint and results['config'] == TINY_CONFIG
    predictions = _read_predictions(out)
    samples = ImageFolder(color_folder).samples
    assert [p['path'] for p in predictions] == [os.path.relpath(s[0], color_folder) for s in samples]
    assert [p['label'] for p in predictions] == [s[1] for s in samples]
    assert all(len(p['top5']) == 5 and p['scores'] == sorted(p['scores'], reverse=True) for p in predictions)
    top1 = 100 * sum(p['top5'][0] == p['label'] for p in predictions) / 19
    top5 = 100 * sum(p['label'] in p['top5'] for p in predictions) / 19
    assert results['top1'] == pytest.approx(top1) and results['top5'] == pytest.approx(top5)


def test_matches_official_style_computation(color_folder, checkpoint, tmp_path, tiny_cfg, tiny_model, tokenizer):
    """Recompute as the official code does: one class at a time, all 81 templates, one image at a time."""
    out = str(tmp_path / 'out')
    _run(color_folder, checkpoint, out)
    tiny_model.load_state_dict(torch.load(checkpoint, weights_only=True)['model'])
    names = [line.strip() for line in open(os.path.join(color_folder, 'classnames.txt'))]
    with torch.no_grad():
        class_embeddings = []
        for name in names:
            tokens = tokenize(tokenizer, [t.format(name) for t in zeroshot_templates()])
            embedding = tiny_model.encode_text(tokens).mean(dim=0)
            class_embeddings.append(embedding / embedding.norm())
        class_embeddings = torch.stack(class_embeddings)
        dataset = ImageFolder(color_folder, transform=build_eval_transform(tiny_cfg))
        for prediction, (image, label) in zip(_read_predictions(out), dataset):
            logits = tiny_model.logit_scale.exp() * tiny_model.encode_image(image[None]) @ class_embeddings.T
            scores, top = logits[0].topk(5)
            assert prediction['top5'] == top.tolist()
            assert prediction['scores'] == pytest.approx(scores.tolist(), abs=1e-4)


def test_elevater_logit_scale_multiplies_the_cosines_by_100(color_folder, checkpoint, tmp_path):
    model_scale = torch.load(checkpoint, weights_only=True)['model']['logit_scale'].exp().item()
    own = _run(color_folder, checkpoint, str(tmp_path / 'own'), '--templates', 'single')
    fixed = _run(color_folder, checkpoint, str(tmp_path / 'fixed'), '--templates', 'single', '--logit-scale', '100')
    assert (own['logit_scale'], fixed['logit_scale']) == (None, 100.0) and fixed['top1'] == own['top1']
    for a, b in zip(_read_predictions(str(tmp_path / 'own')), _read_predictions(str(tmp_path / 'fixed'))):
        assert a['top5'] == b['top5']
        assert b['scores'] == pytest.approx([100 / model_scale * s for s in a['scores']], rel=1e-4, abs=1e-4)


def test_two_processes_count_each_image_once(color_folder, checkpoint, tmp_path):
    single, double = str(tmp_path / 'single'), str(tmp_path / 'double')
    _run(color_folder, checkpoint, single, '--templates', 'single')
    run_like_torchrun(evaluate.main, ['zeroshot', '--cfg', TINY_CONFIG, '--resume', checkpoint,
                                      '--data-path', color_folder, '--output', double, '--batch-size', '4',
                                      '--num-workers', '0', '--device', 'cpu', '--save-predictions',
                                      '--templates', 'single'])
    with open(os.path.join(single, 'zeroshot_results.json')) as f1, \
            open(os.path.join(double, 'zeroshot_results.json')) as f2:
        one, two = json.load(f1), json.load(f2)
    assert two['num_images'] == 19
    assert two['top1'] == pytest.approx(one['top1']) and two['top5'] == pytest.approx(one['top5'])
    a, b = _read_predictions(single), _read_predictions(double)
    assert [p['path'] for p in a] == [p['path'] for p in b]
    assert all(x['top5'] == y['top5'] and x['scores'] == pytest.approx(y['scores'], abs=1e-4) for x, y in zip(a, b))


def test_unreadable_image_is_a_clear_error(color_folder, checkpoint, tmp_path):
    bad = os.path.join(color_folder, 'red', 'broken.png')
    with open(bad, 'wb') as f:
        f.write(b'not a png')
    with pytest.raises(RuntimeError, match='cannot read image .*broken.png'):
        _run(color_folder, checkpoint, str(tmp_path / 'out'), '--templates', 'single')


def test_classname_resolution(tmp_path):
    names_file = tmp_path / 'names.txt'
    names_file.write_text('a\nb\n')
    assert resolve_classnames(2, explicit=str(names_file)) == ['a', 'b']
    with pytest.raises(ValueError, match='lists 2 class names for 3 classes'):
        resolve_classnames(3, explicit=str(names_file))
    assert resolve_classnames(1000) == imagenet_classnames() and len(imagenet_classnames()) == 1000
    assert resolve_classnames(2, folder_names=['golden_retriever', 'tabby']) == ['golden retriever', 'tabby']
    with pytest.raises(ValueError, match='no class names'):
        resolve_classnames(2, folder_names=['n01440764', 'n01443537'])


def test_templates(tmp_path):
    assert len(resolve_templates('imagenet')) == 81 and resolve_templates('single') == ['a photo of a {}.']
    good, bad = tmp_path / 'good.txt', tmp_path / 'bad.txt'
    good.write_text('a {} drawing\nitap of {}\n')
    bad.write_text('no placeholder\n')
    assert resolve_templates(str(good)) == ['a {} drawing', 'itap of {}']
    with pytest.raises(ValueError, match='placeholder|"\\{\\}"'):
        resolve_templates(str(bad))


def test_log_redirected_to_a_file_has_no_progress_bar_fragments(color_folder, checkpoint, tmp_path):
    run = run_command(evaluate.main, ['zeroshot', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--data-path',
                                      color_folder, '--batch-size', '2', '--num-workers', '0', '--device', 'cpu',
                                      '--templates', 'single'])
    assert run.returncode == 0, run.stderr
    text = run.stdout + run.stderr
    assert 'Acc@1' in text and '\r' not in text and 'it/s' not in text

"""Image-text retrieval: recalls by hand (ties counting against the query) and against a brute-force ranking,
the caption formats, the CLI."""
import io
import json
import os
import tarfile

import pytest
import torch
import torch.nn.functional as F

import evaluate
from evaluation.retrieval import read_captioned_images, retrieval_recalls
from tests.conftest import TINY_CONFIG, make_image_folder


def test_recalls_by_hand_with_several_captions_per_image():
    e = torch.eye(3)
    images = e  # I0, I1, I2
    texts = F.normalize(torch.stack([e[0], e[1], e[0] + 0.5 * e[1], e[2], e[2] + 0.2 * e[0]]), dim=1)
    owner = torch.tensor([0, 0, 1, 2, 2])  # c0, c1 describe I0; c2 I1; c3, c4 I2
    recalls = retrieval_recalls(images, texts, owner)
    # I0's best text is c0 (its own): hit. I1's best is c1 (I0's), its own c2 comes second: miss at 1.
    # I2's best is c3 (its own): hit.
    assert recalls['image_to_text_R@1'] == pytest.approx(200 / 3)
    # c0 -> I0 hit; c1 (= e1) -> I1 miss; c2 -> I0 (0.89 > 0.45) miss; c3 -> I2 hit; c4 -> I2 hit.
    # c1 scores 0 for its own I0 and for I2: that tie counts against it, rank 2, still within 5.
    assert recalls['text_to_image_R@1'] == pytest.approx(60.0)
    assert recalls['image_to_text_R@5'] == recalls['text_to_image_R@5'] == 100.0


def test_an_exact_tie_between_a_right_and_a_wrong_item_is_a_miss_at_1():
    e = torch.eye(2)
    # c0 and c1 are the same caption, of I0 and of I1: each image scores its own and the other's alike.
    # c2 (of I0) lies halfway between the images.
    texts = F.normalize(torch.stack([e[0] + e[1], e[0] + e[1], e[0] + e[1]]), dim=1)
    owner = torch.tensor([0, 1, 0])
    recalls = retrieval_recalls(e, texts, owner)
    assert recalls['image_to_text_R@1'] == 0.0 and recalls['text_to_image_R@1'] == 0.0
    assert recalls['image_to_text_R@5'] == recalls['text_to_image_R@5'] == 100.0
    # one step off the tie and the right item wins
    texts[2] = F.normalize(e[0] + 0.9 * e[1], dim=0)
    assert retrieval_recalls(e, texts, owner)['text_to_image_R@1'] == pytest.approx(100 / 3)


def test_a_collapsed_model_scores_at_or_below_chance():
    # every image embedding equal, every text embedding equal: all scores tie. Chance, a random ranking,
    # is R@K = K / 50 (2, 10, 20 %) with 50 images of one caption each; ties counting against the query give
    # 0 (each query has 49 wrong items tied with its right one). Counting only strictly higher wrong items
    # would give 100.
    images = F.normalize(torch.ones(50, 8), dim=1)
    texts = F.normalize(torch.arange(8.0).repeat(50, 1), dim=1)
    recalls = retrieval_recalls(images, texts, torch.arange(50), chunk=16)
    assert all(value == 0.0 for value in recalls.values()), recalls
    # several captions per image: 20 images x 5 captions, an image's chance at R@1 is 5 %, a caption's 5 %
    owner = torch.arange(20).repeat_interleave(5)
    recalls = retrieval_recalls(images[:20], texts[:1].repeat(100, 1), owner)
    assert recalls['image_to_text_R@1'] <= 5.0 and recalls['text_to_image_R@1'] <= 5.0


def brute_force(images, texts, owner, k):
    """Recall@k by the explicit rule: a query's rank is the number of wrong items scoring >= its best right
    one, one query and one candidate at a time."""
    i2t = []
    for i in range(len(images)):
        scores = (images[i] @ texts.T).tolist()
        best = max(s for j, s in enumerate(scores) if owner[j] == i)
        i2t.append(sum(1 for j, s in enumerate(scores) if owner[j] != i and s >= best) < k)
    t2i = []
    for j in range(len(texts)):
        scores = (texts[j] @ images.T).tolist()
        own = scores[owner[j]]
        t2i.append(sum(1 for i, s in enumerate(scores) if i != owner[j] and s >= own) < k)
    return 100 * sum(i2t) / len(i2t), 100 * sum(t2i) / len(t2i)


@pytest.mark.parametrize('ties', [False, True])
def test_recalls_match_a_brute_force_ranking_in_chunks(ties):
    g = torch.Generator().manual_seed(0)
    if ties:  # small integer embeddings: many scores tie exactly (integer dot products)
        images = torch.randint(-1, 2, (40, 4), generator=g).float()
    else:
        images = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    owner = torch.randint(0, 40, (100,), generator=g)
    owner[:40] = torch.arange(40)  # every image has a caption
    if ties:
        texts = images[owner] + torch.randint(-1, 2, (100, 4), generator=g).float()
    else:
        texts = F.normalize(images[owner] + 0.8 * torch.randn(100, 8, generator=g), dim=1)
    recalls = retrieval_recalls(images, texts, owner, chunk=7)
    for k in (1, 5, 10):
        i2t, t2i = brute_force(images, texts, owner.tolist(), k)
        assert recalls[f'image_to_text_R@{k}'] == pytest.approx(i2t)
        assert recalls[f'text_to_image_R@{k}'] == pytest.approx(t2i)


@pytest.fixture
def images(tmp_path):
    folder = make_image_folder(str(tmp_path / 'imgs'), per_class=1, extra=0)
    return {name: os.path.join(folder, name, '0.png') for name in ('red', 'green', 'blue')}


def test_tables_group_rows_sharing_an_image(tmp_path, images):
    tsv = tmp_path / 'captions.tsv'
    tsv.write_text('image\tcaption\n' + ''.join(f'{images[n]}\t{c}\n' for n, c in
                                                 (('red', 'a red square'), ('blue', 'blue'), ('red', 'crimson'))))
    data = read_captioned_images(str(tsv))
    assert data.images == [images['red'], images['blue']]
    assert data.captions == ['a red square', 'blue', 'crimson'] and data.caption_image == [0, 1, 0]
    csv_file = tmp_path / 'captions.csv'
    csv_file.write_text('caption,filepath\n"red, very red",imgs/red/0.png\n')
    data = read_captioned_images(str(csv_file))
    assert data.images == [str(tmp_path / 'imgs' / 'red' / '0.png')] and data.captions == ['red, very red']
    bad = tmp_path / 'bad.tsv'
    bad.write_text(f'image\tcaption\n{images["red"]}\t \n')
    with pytest.raises(ValueError, match='row 1 lacks'):
        read_captioned_images(str(bad))


def test_coco_karpathy_and_annotation_files(tmp_path, images):
    karpathy = {'images': [
        {'filepath': 'red', 'filename': '0.png', 'split': 'test', 'sentences': [{'raw': 'red'}, {'raw': 'scarlet'}]},
        {'filepath': 'blue', 'filename': '0.png', 'split': 'train', 'sentences': [{'raw': 'blue'}]}]}
    path = tmp_path / 'dataset_coco.json'
    path.write_text(json.dumps(karpathy))
    root = str(tmp_path / 'imgs')
    data = read_captioned_images(str(path), image_root=root)
    assert data.images == [images['red']] and data.captions == ['red', 'scarlet'] and data.caption_image == [0, 0]
    assert len(read_captioned_images(str(path), image_root=root, split='all').images) == 2
    annotations = {'images': [{'id': 7, 'file_name': 'green/0.png'}, {'id': 9, 'file_name': 'red/0.png'}],
                   'annotations': [{'image_id': 9, 'caption': 'red'}, {'image_id': 7, 'caption': 'green'},
                                   {'image_id': 9, 'caption': 'rosso'}]}
    path = tmp_path / 'captions_val2017.json'
    path.write_text(json.dumps(annotations))
    data = read_captioned_images(str(path), image_root=root)
    assert data.images == [images['red'], images['green']] and data.caption_image == [0, 1, 0]


def test_webdataset_shards(tmp_path, images):
    shard = tmp_path / 'shards' / '00000.tar'
    shard.parent.mkdir()
    with tarfile.open(shard, 'w') as tar:
        for key, name in (('000', 'red'), ('001', 'blue')):
            for ext, payload in (('png', open(images[name], 'rb').read()), ('txt', f'a {name} thing'.encode())):
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = read_captioned_images(str(shard.parent))
    assert data.captions == ['a red thing', 'a blue thing'] and data.caption_image == [0, 1]
    assert data.images[0][0] == open(images['red'], 'rb').read() and data.images[0][1].endswith('00000.tar#000')


def test_cli_writes_recalls(tmp_path, images, tiny_model):
    checkpoint = str(tmp_path / 'tiny.pth')
    torch.save({'model': tiny_model.state_dict()}, checkpoint)
    tsv = tmp_path / 'captions.tsv'
    tsv.write_text('image\tcaption\n' + ''.join(f'{p}\ta {n} picture\n{p}\t{n}\n' for n, p in images.items()))
    out = str(tmp_path / 'out')
    summary = evaluate.main(['retrieval', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--data-path', str(tsv),
                             '--output', out, '--batch-size', '2', '--num-workers', '0', '--device', 'cpu',
                             '--no-cache'])
    with open(os.path.join(out, 'retrieval_results.json')) as f:
        assert json.load(f) == summary
    assert (summary['num_images'], summary['num_texts']) == (3, 6)
    for direction in ('image_to_text', 'text_to_image'):
        r1, r5, r10 = (summary[f'{direction}_R@{k}'] for k in (1, 5, 10))
        assert 0 <= r1 <= r5 <= r10 == 100.0


def test_unreadable_image_is_named(tmp_path, images, tiny_model):
    checkpoint = str(tmp_path / 'tiny.pth')
    torch.save({'model': tiny_model.state_dict()}, checkpoint)
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'not a jpeg')
    tsv = tmp_path / 'captions.tsv'
    tsv.write_text(f'image\tcaption\n{images["red"]}\tred\n{broken}\tnothing\n')
    with pytest.raises(RuntimeError, match='cannot read image .*broken.jpg'):
        evaluate.main(['retrieval', '--cfg', TINY_CONFIG, '--resume', checkpoint, '--data-path', str(tsv),
                       '--num-workers', '0', '--device', 'cpu', '--no-cache'])

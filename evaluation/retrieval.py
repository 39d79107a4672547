"""Image-text retrieval: Recall@K in both directions over a captioned image set.

Sources: a TSV/CSV caption table (as training reads it), webdataset shards (img2dataset's KEY.jpg + KEY.txt),
or a COCO-style captions JSON: Karpathy's split file (`images[].filename`, `filepath`, `split`,
`sentences[].raw`) or COCO's own annotations (`images[].file_name`, `annotations[].caption`). Captions of the
same image (rows sharing an image path) belong to one image.

A query hits at K when a relevant item is among its K best: for an image, any of its captions; for a caption,
its image. The rank of a query is the number of irrelevant items scoring at least as high as its best relevant
one: ties count against the query (the pessimistic rank). A collapsed model whose scores all tie thus gets
Recall@K = 0 for K below the number of candidates, at or under chance (K / candidates, about what
CLIP_benchmark's arbitrary torch.topk pick among tied items gives), never the 100 that counting only strictly
higher items would give. Exact ties are otherwise rare, except between identical captions of different
images, which tie for every image query.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from data.sources import SourceSpec
from data.sources.caption_table import CaptionTableSource
from data.sources.webdataset_shards import IMAGE_EXTENSIONS, expand_shards
from data.text_prefix import TextPrefix

from .cache import FeatureCache
from .data import ImageItem, image_name
from .encoder import Encoder
from .errors import EvaluationInputError

RECALL_AT = (1, 5, 10)


@dataclass
class CaptionedImages:
    """Images and their captions: caption j describes image `caption_image[j]`."""
    images: List[ImageItem]
    captions: List[str]
    caption_image: List[int]


def _group_by_image(pairs: Sequence[Tuple[ImageItem, str]]) -> CaptionedImages:
    index: Dict[object, int] = {}
    images, captions, owner = [], [], []
    for image, caption in pairs:
        key = image_name(image)
        if key not in index:
            index[key] = len(images)
            images.append(image)
        captions.append(caption)
        owner.append(index[key])
    return CaptionedImages(images, captions, owner)


def _table_pairs(path: str, kind: str) -> List[Tuple[ImageItem, str]]:
    pairs = CaptionTableSource(SourceSpec(type=kind, path=path, name='retrieval')).pairs()
    for row, (image, caption) in enumerate(pairs, 1):
        if not image or not caption.strip():
            raise EvaluationInputError(f'{path}: data row {row} lacks an image path or a caption')
    return pairs


def _shard_pairs(pattern: str) -> List[Tuple[ImageItem, str]]:
    from webdataset.tariterators import tarfile_samples  # slow to import; only shard sources need it

    shards = expand_shards(pattern)
    if not shards:
        raise EvaluationInputError(f'no shards match {pattern}')
    pairs = []
    for url in shards:
        for sample in tarfile_samples([{'url': url}]):  # a broken shard raises, naming it
            where = f"{url}#{sample.get('__key__')}"
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            text = sample.get('txt', b'').decode('utf-8', errors='replace')
            if image is None or not text.strip():
                raise EvaluationInputError(f'{where}: a retrieval sample needs an image and a caption')
            pairs.append(((image, where), text))
    return pairs


def _coco_pairs(path: str, image_root: str, split: str) -> List[Tuple[ImageItem, str]]:
    with open(path, encoding='utf-8') as f:
        data = json.load(f)
    if 'annotations' in data:  # COCO's captions_*.json
        files = {image['id']: image['file_name'] for image in data['images']}
        return [(os.path.join(image_root, files[a['image_id']]), a['caption']) for a in data['annotations']]
    pairs = []  # Karpathy's dataset_coco.json / dataset_flickr30k.json
    for image in data['images']:
        if split != 'all' and image.get('split') != split:
            continue
        file = os.path.join(image_root, image.get('filepath', ''), image['filename'])
        pairs += [(file, sentence['raw']) for sentence in image['sentences']]
    if not pairs:
        raise EvaluationInputError(f'{path}: no images in split {split!r}')
    return pairs


def read_captioned_images(source: str, image_root: Optional[str] = None, split: str = 'test') -> CaptionedImages:
    """The captioned images of `source` (see the module docstring); `image_root` for COCO JSON (default: the
    JSON's folder), `split` for Karpathy files ('all' for every image)."""
    extension = os.path.splitext(source)[1].lower()
    if extension in ('.tsv', '.csv'):
        pairs = _table_pairs(source, extension[1:])
    elif extension == '.json':
        pairs = _coco_pairs(source, image_root or os.path.dirname(os.path.abspath(source)), split)
    else:
        pairs = _shard_pairs(source)
    return _group_by_image(pairs)


def _recalls(ranks: Tensor) -> Dict[int, float]:
    return {k: 100.0 * (ranks < k).double().mean().item() for k in RECALL_AT}


def retrieval_recalls(image_embeddings: Tensor, text_embeddings: Tensor, caption_image: Tensor,
                      chunk: int = 1024) -> Dict[str, float]:
    """`image_to_text_R@K` and `text_to_image_R@K` (percent) from normalized embeddings; `caption_image[j]` is
    the image of text j. A query's rank counts the wrong items scoring >= its best right one, so ties count
    against the query: an order-dependent tie-break would let a degenerate model (all scores equal) score
    R@1 = 100. Works through the similarity matrix in row chunks to bound memory."""
    num_images = image_embeddings.shape[0]
    image_ranks, text_ranks = [], []
    for start in range(0, num_images, chunk):
        rows = torch.arange(start, min(start + chunk, num_images), device=caption_image.device)
        similarity = image_embeddings[rows] @ text_embeddings.T
        relevant = caption_image[None, :] == rows[:, None]
        best = similarity.masked_fill(~relevant, float('-inf')).max(dim=1, keepdim=True).values
        image_ranks.append(((similarity >= best) & ~relevant).sum(dim=1))
    for start in range(0, text_embeddings.shape[0], chunk):
        similarity = text_embeddings[start:start + chunk] @ image_embeddings.T
        own_image = caption_image[start:start + chunk, None]
        own = similarity.gather(1, own_image)
        wrong = torch.ones_like(similarity, dtype=torch.bool).scatter_(1, own_image, False)
        text_ranks.append(((similarity >= own) & wrong).sum(dim=1))
    results = {f'image_to_text_R@{k}': v for k, v in _recalls(torch.cat(image_ranks)).items()}
    results.update({f'text_to_image_R@{k}': v for k, v in _recalls(torch.cat(text_ranks)).items()})
    return results


def run_retrieval(encoder: Encoder, source: str, image_root: Optional[str] = None, split: str = 'test',
                  cache: Optional[FeatureCache] = None) -> Dict[str, float]:
    """Recall@1/5/10 both ways over `source` (see `read_captioned_images`), with `num_images`, `num_texts`."""
    data = read_captioned_images(source, image_root, split)
    file_images = all(isinstance(item, str) for item in data.images)
    if file_images and cache is not None:  # shard images have no file to fingerprint
        images = encoder.cached_images(data.images, [0] * len(data.images), cache, desc='retrieval images')
    else:
        images = encoder.images(data.images, desc='retrieval images')
    prefix = TextPrefix.from_config(encoder.config).caption  # captions, as the image-text training data
    texts = encoder.texts([prefix + caption for caption in data.captions], desc='retrieval texts')
    results = {'num_images': len(data.images), 'num_texts': len(data.captions)}
    results.update(retrieval_recalls(images, texts, torch.tensor(data.caption_image, device=images.device)))
    return results

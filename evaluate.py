"""Evaluation of UniCL models.

    python evaluate.py zeroshot --cfg configs/unicl_swin_tiny.yaml --resume in21k_yfcc14m.pth \
        --data-path /data/imagenet/val

Zero-shot classification follows the official evaluation: the class embedding is the mean over prompt
templates of the normalized text features, renormalized; logits are `logit_scale.exp() * image @ class.T`.
Under torchrun the images are split across ranks without padding, so every image counts exactly once.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from tqdm import tqdm

from configs import load_config
from data.classnames import resolve_classnames, resolve_templates
from data.prompts import split_synonyms
from data.transforms import build_eval_transform
from model import UniCLModel, build_tokenizer, build_unicl_model
from utils.checkpoint import load_pretrained
from utils.distributed import all_gather_no_grad, all_reduce_sum, get_rank, get_world_size, init_distributed
from utils.logger import setup_logger

logger = logging.getLogger('unicl.evaluate')

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def _load_image(path: str):
    try:
        return default_loader(path)
    except Exception as e:  # PIL's messages rarely name the file
        raise RuntimeError(f'cannot read image {path}: {e}') from e


class IndexedImageFolder(ImageFolder):
    """ImageFolder whose items carry their dataset index, so predictions gathered from all ranks can be
    put back in dataset order. An unreadable image is an error naming it: skipping one would change the
    denominator of the accuracy."""

    def __init__(self, root: str, transform=None):
        super().__init__(root, transform=transform, loader=_load_image)

    def __getitem__(self, index: int):
        image, label = super().__getitem__(index)
        return image, label, index


class ShardedSampler(Sampler):
    """Indices `rank, rank + world, ...`: disjoint across ranks and, unlike DistributedSampler, never
    padded with repeats, so each image is counted exactly once."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def build_class_embeddings(model: UniCLModel, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                           device: torch.device, batch_size: int = 256, context_length: int = 77,
                           amp_dtype: Optional[torch.dtype] = None, progress: bool = True) -> torch.Tensor:
    """`[C, D]` class embeddings: per class, the renormalized mean of its normalized template features.

    Classes are split across ranks and gathered, so the 81,000 prompts of ImageNet cost 1/world each.
    """
    rank, world = get_rank(), get_world_size()
    own_classes = list(range(rank, len(classnames), world))
    texts = [t.format(classnames[c]) for c in own_classes for t in templates]
    features = []
    for start in tqdm(range(0, len(texts), batch_size), desc='class embeddings', disable=not progress,
                      leave=False):
        tokens = tokenizer(texts[start:start + batch_size], padding='max_length', truncation=True,
                           max_length=context_length, return_tensors='pt')
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            features.append(model.encode_text({k: v.to(device) for k, v in tokens.items()}).float())
    dim = model.text_projection.shape[1]
    own = (torch.cat(features) if features else torch.zeros(0, dim, device=device))
    own = own.view(len(own_classes), len(templates), dim).mean(dim=1)
    own = own / own.norm(dim=-1, keepdim=True)
    # Rank r holds classes r, r + world, ...: gather, then restore class order.
    order = torch.tensor(own_classes, device=device, dtype=torch.long)
    gathered, gathered_order = all_gather_no_grad(own), all_gather_no_grad(order)
    embeddings = torch.empty(len(classnames), dim, device=device)
    embeddings[gathered_order] = gathered
    return embeddings


@dataclass
class ZeroShotResult:
    top1: float
    top5: float
    num_images: int
    num_classes: int
    predictions: List[Dict] = field(default_factory=list)  # on rank 0, in dataset order, when asked for


@torch.inference_mode()
def classify_zeroshot(model: UniCLModel, loader: DataLoader, class_embeddings: torch.Tensor,
                      device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                      keep_predictions: bool = False, progress: bool = True) -> ZeroShotResult:
    """Top-1/top-5 accuracy (in %) of `model` on `loader`'s images against `class_embeddings`."""
    num_classes = class_embeddings.shape[0]
    k = min(5, num_classes)
    scale = model.logit_scale.exp().float()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@k, images
    predictions = []
    bar = tqdm(loader, desc='zero-shot', disable=not progress, leave=False)
    for images, labels, indices in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            image_features = model.encode_image(images).float()
        logits = scale * image_features @ class_embeddings.T
        scores, top = logits.topk(k, dim=-1)
        hits = top == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum(), torch.tensor(len(labels), device=device)])
        if keep_predictions:
            predictions += [{'index': int(i), 'label': int(y), 'top5': t.tolist(), 'scores': s.tolist()}
                            for i, y, t, s in zip(indices, labels.cpu(), top.cpu(), scores.cpu())]
        bar.set_postfix(acc1=f'{100 * counts[0].item() / max(counts[2].item(), 1):.2f}')
    counts = all_reduce_sum(counts)
    if keep_predictions and dist.is_available() and dist.is_initialized():
        gathered = [None] * get_world_size()
        dist.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    predictions.sort(key=lambda p: p['index'])
    images = int(counts[2].item())
    if images == 0:
        raise RuntimeError('zero-shot evaluation saw no images')
    return ZeroShotResult(top1=100 * counts[0].item() / images, top5=100 * counts[1].item() / images,
                          num_images=images, num_classes=num_classes,
                          predictions=predictions if get_rank() == 0 else [])


def build_zeroshot_loader(dataset: IndexedImageFolder, batch_size: int, num_workers: int,
                          pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      sampler=ShardedSampler(len(dataset), get_rank(), get_world_size()))


def run_zeroshot(model: UniCLModel, tokenizer, config, data_path: str, device: torch.device,
                 classnames_file: Optional[str] = None, templates: str = 'imagenet',
                 batch_size: Optional[int] = None, num_workers: Optional[int] = None,
                 amp_dtype: Optional[torch.dtype] = None, keep_predictions: bool = False,
                 progress: bool = True) -> ZeroShotResult:
    """Zero-shot top-1/top-5 of `model` on the ImageFolder tree `data_path` (also used by main.py)."""
    dataset = IndexedImageFolder(data_path, transform=build_eval_transform(config))
    # A class-name line may list synonyms ("dog; doggy"); the zero-shot classifier uses the first.
    classnames = [split_synonyms(line)[0] for line in resolve_classnames(
        len(dataset.classes), folder=data_path, explicit=classnames_file, folder_names=dataset.classes)]
    was_training = model.training
    model.eval()
    try:
        embeddings = build_class_embeddings(model, tokenizer, classnames, resolve_templates(templates), device,
                                            context_length=config.MODEL.TEXT_ENCODER.CONTEXT_LENGTH,
                                            amp_dtype=amp_dtype, progress=progress)
        loader = build_zeroshot_loader(dataset, batch_size or config.DATA.BATCH_SIZE,
                                       config.DATA.NUM_WORKERS if num_workers is None else num_workers,
                                       pin_memory=device.type == 'cuda')
        result = classify_zeroshot(model, loader, embeddings, device, amp_dtype, keep_predictions, progress)
    finally:
        model.train(was_training)  # main.py validates mid-training
    result.predictions = [{'path': os.path.relpath(dataset.samples[p['index']][0], data_path), 'label': p['label'],
                           'top5': p['top5'], 'scores': p['scores']} for p in result.predictions]
    return result


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def _device(local_rank: int, requested: Optional[str]) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')


def zeroshot_main(args: argparse.Namespace) -> Dict:
    rank, _, local_rank = init_distributed()
    setup_logger(args.output, rank)
    config = load_config(args.cfg, args.opts)
    device = _device(local_rank, args.device)
    model = build_unicl_model(config).to(device)
    report = load_pretrained(model, args.resume, config.MODEL.IMAGE_ENCODER.TYPE)
    logger.info(f'loaded {args.resume} ({len(report.unexpected)} unexpected keys ignored)')
    tokenizer = build_tokenizer(config.MODEL.TEXT_ENCODER)
    result = run_zeroshot(model, tokenizer, config, args.data_path, device, classnames_file=args.classnames,
                          templates=args.templates, batch_size=args.batch_size, num_workers=args.num_workers,
                          amp_dtype=AMP_DTYPES[args.amp], keep_predictions=args.save_predictions,
                          progress=rank == 0)
    summary = {'top1': result.top1, 'top5': result.top5, 'num_images': result.num_images,
               'num_classes': result.num_classes, 'checkpoint': args.resume, 'config': args.cfg,
               'templates': args.templates}
    if rank == 0:
        logger.info(f' * Acc@1 {result.top1:.3f} Acc@5 {result.top5:.3f} '
                    f'({result.num_images} images, {result.num_classes} classes)')
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            with open(os.path.join(args.output, 'zeroshot_results.json'), 'w') as f:
                json.dump(summary, f, indent=2)
            if args.save_predictions:
                with open(os.path.join(args.output, 'predictions.jsonl'), 'w') as f:
                    f.writelines(json.dumps(p) + '\n' for p in result.predictions)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='UniCL evaluation')
    commands = parser.add_subparsers(dest='command', required=True)
    zeroshot = commands.add_parser('zeroshot', help='zero-shot classification on an ImageFolder tree')
    zeroshot.add_argument('--cfg', required=True, help='model config (e.g. configs/unicl_swin_tiny.yaml)')
    zeroshot.add_argument('--resume', required=True, help='checkpoint path or URL')
    zeroshot.add_argument('--data-path', required=True, help='ImageFolder tree: one folder per class')
    zeroshot.add_argument('--classnames', help='class names, one per line in sorted-folder order '
                          '(default: DIR/classnames.txt, else the ImageNet-1K names for 1000 classes)')
    zeroshot.add_argument('--templates', default='imagenet', help='imagenet (81 official), single, or a file')
    zeroshot.add_argument('--batch-size', type=int, help='images per batch and process (default DATA.BATCH_SIZE)')
    zeroshot.add_argument('--num-workers', type=int, help='data loading workers (default DATA.NUM_WORKERS)')
    zeroshot.add_argument('--amp', choices=sorted(AMP_DTYPES), default='none', help='autocast dtype')
    zeroshot.add_argument('--device', help='e.g. cpu or cuda:0 (default: cuda when available)')
    zeroshot.add_argument('--output', help='folder for zeroshot_results.json (and predictions.jsonl)')
    zeroshot.add_argument('--save-predictions', action='store_true', help='write OUT/predictions.jsonl')
    zeroshot.add_argument('--opts', nargs='+', help='config overrides: KEY VALUE pairs')
    zeroshot.set_defaults(run=zeroshot_main)
    return parser


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'save_predictions', False) and not args.output:
        parser.error('--save-predictions needs --output')
    try:
        return args.run(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()

"""Frozen features: image features of a whole image set and text features of a list of texts, computed
data-parallel (each rank a disjoint share, nothing repeated) and returned in input order on every rank."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from model import UniCLModel, tokenize
from utils.distributed import all_gather_no_grad, get_rank, get_world_size
from utils.precision import autocast
from utils.progress import progress_bar

from .data import ImageItem, ImageList, sharded_loader


def _in_input_order(own: Tensor, own_indices: Tensor, total: int) -> Tensor:
    """Gather every rank's rows and put row i at position `own_indices[i]`."""
    gathered, order = all_gather_no_grad(own), all_gather_no_grad(own_indices)
    if gathered.shape[0] != total or torch.unique(order).numel() != total:
        raise RuntimeError(f'gathered {gathered.shape[0]} rows for {total} inputs: ranks disagree on the data')
    result = torch.empty((total,) + tuple(own.shape[1:]), dtype=own.dtype, device=own.device)
    result[order] = gathered
    return result


# no_grad rather than inference_mode: on torch 2.4, gloo's all_gather fills its output tensors outside
# the caller's inference mode and fails on inference tensors ("Inplace update to inference tensor").
@torch.no_grad()
def image_features(model: UniCLModel, items: Sequence[ImageItem], transform: Callable, device: torch.device,
                   batch_size: int, num_workers: int, amp_dtype: Optional[torch.dtype] = None,
                   desc: str = 'image features') -> Tensor:
    """`[N, D]` L2-normalized image embeddings (fp32), row i for `items[i]`."""
    loader = sharded_loader(ImageList(items, transform), batch_size, num_workers, device)
    features, indices = [], []
    for images, index in progress_bar(loader, desc, enabled=get_rank() == 0):
        with autocast(device, amp_dtype):
            features.append(model.encode_image(images.to(device, non_blocking=True)).float())
        indices.append(index.to(device))
    dim = model.image_projection.shape[1]
    own = torch.cat(features) if features else torch.zeros(0, dim, device=device)
    own_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    return _in_input_order(own, own_indices, len(items))


@torch.no_grad()
def text_features(model: UniCLModel, tokenizer, texts: Sequence[str], device: torch.device,
                  context_length: int = 77, batch_size: int = 256, amp_dtype: Optional[torch.dtype] = None,
                  desc: str = 'text features') -> Tensor:
    """`[T, D]` L2-normalized text embeddings (fp32), row i for `texts[i]`; rank r encodes texts r, r + world..."""
    own_indices = list(range(get_rank(), len(texts), get_world_size()))
    features = []
    starts = range(0, len(own_indices), batch_size)
    for start in progress_bar(starts, desc, enabled=get_rank() == 0):
        batch = [texts[i] for i in own_indices[start:start + batch_size]]
        tokens = tokenize(tokenizer, batch, context_length)
        with autocast(device, amp_dtype):
            features.append(model.encode_text({k: v.to(device) for k, v in tokens.items()}).float())
    dim = model.text_projection.shape[1]
    own = torch.cat(features) if features else torch.zeros(0, dim, device=device)
    return _in_input_order(own, torch.tensor(own_indices, dtype=torch.long, device=device), len(texts))

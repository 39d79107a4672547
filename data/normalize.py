"""Training images leave the loader workers as uint8 and are normalised on the training device.

The official transform ends in ToTensor -> Normalize -> RandomErasing, all in float32 in the workers: a
batch of 64 224-px images is 38.5 MB to build, to stack, to move through shared memory and to copy to
the GPU. `DeferredTail` replaces those three steps in the workers: the image becomes a uint8 tensor (a
quarter of the bytes) and timm's RandomErasing runs with its own code and random draws on a recorder
instead of the image, keeping only the patches it would write (their place and their values, drawn in the
worker as before). `ImageFinisher`, applied right after the (pinned, non-blocking) copy to the device,
does ToTensor's /255 and Normalize's (x - mean) / std with the same float32 operations in the same order
and pastes the patches in order: the batch is bit for bit the one the float path builds (on a GPU equal
to float32 rounding: CUDA divides by a scalar through its reciprocal). For a CPU device the workers apply
ImageFinisher to their whole batch themselves (data/build.py): cheaper than image by image, nothing to copy;
there it is one lookup per pixel in a table of those operations' results for the 256 values (data/lookup.c,
with the helper of data/jpeg_region.py), written straight into shared memory as default_collate does.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torchvision.transforms.functional as F
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor
from torch.utils.data import get_worker_info
from torchvision import transforms

from . import jpeg_region

# One erased patch: (rows, columns) slices of the image and the float values RandomErasing wrote there.
Patch = Tuple[slice, slice, torch.Tensor]


class BatchErasing(NamedTuple):
    """A batch's erased patches as the loader carries them to the training process: all their values in one
    tensor (one piece of shared memory, one copy to the device, rather than one per patch) and where each
    goes, in RandomErasing's order (a later patch of a sample overwrites an earlier one)."""
    values: torch.Tensor  # float32, every patch's values flattened and concatenated
    places: List[Tuple[int, slice, slice, Tuple[int, ...]]]  # (sample index, rows, columns, values' shape)

    @classmethod
    def of(cls, patches: Sequence[List[Patch]], shared: bool = True) -> 'BatchErasing':
        """The erasing of a batch from each sample's patches (DeferredTail's), in sample order; `shared`: as
        stack_images takes it."""
        pieces = [(index, patch) for index, sample in enumerate(patches) for patch in sample]
        if not pieces:
            return cls(torch.empty(0), [])
        values = [values.reshape(-1) for _, (_, _, values) in pieces]
        packed = torch.cat(values, out=batch_tensor((sum(v.numel() for v in values),), values[0].dtype, shared))
        return cls(packed, [(index, rows, columns, tuple(values.shape))
                            for index, (rows, columns, values) in pieces])

    def patches(self, device: torch.device) -> Iterator[Tuple[int, slice, slice, torch.Tensor]]:
        """(sample index, rows, columns, values on `device`) of each patch, in order."""
        values = self.values.to(device, non_blocking=True)
        offset = 0
        for index, rows, columns, shape in self.places:
            count = math.prod(shape)
            yield index, rows, columns, values[offset:offset + count].view(shape)
            offset += count


class _PatchRecorder:
    """Stands in for the image tensor RandomErasing writes to: keeps each write instead of doing it."""

    def __init__(self):
        self.patches: List[Patch] = []

    def __setitem__(self, key: Tuple[slice, slice, slice], values: torch.Tensor) -> None:
        _, rows, columns = key  # RandomErasing always writes all channels: img[:, top:.., left:..]
        self.patches.append((rows, columns, values))


class DeferredTail:
    """The workers' end of the training transform instead of ToTensor -> Normalize [-> RandomErasing]:
    image -> (uint8 CHW tensor, the patches RandomErasing drew for it)."""

    def __init__(self, normalize: transforms.Normalize, erasing: Optional[RandomErasing]):
        self.normalize, self.erasing = normalize, erasing

    def __call__(self, image: Image.Image) -> Tuple[torch.Tensor, List[Patch]]:
        if image.mode != 'RGB':  # to_tensor would scale other modes (I;16, F) differently
            raise ValueError(f'DeferredTail expects RGB images, got {image.mode}')
        pixels = F.pil_to_tensor(image)
        return pixels, self.record_erasing(*pixels.shape)

    def record_erasing(self, channels: int, height: int, width: int) -> List[Patch]:
        """The patches RandomErasing draws for an image of this shape; it needs no pixels (data/gpu_decode.py
        draws them before the image is decoded)."""
        recorder = _PatchRecorder()
        if self.erasing is not None:
            # timm's own _erase: the same draws in the same order (python random, then torch's normal_).
            self.erasing._erase(recorder, channels, height, width, torch.float32)
        return recorder.patches

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.normalize!r}, {self.erasing!r})'


def split_tail(steps: Sequence) -> Optional[Tuple[List, DeferredTail, 'ImageFinisher']]:
    """(steps before, DeferredTail, ImageFinisher) when `steps` end in ToTensor -> Normalize
    [-> RandomErasing], as timm's training transform does; else None (the float path stays)."""
    steps = list(steps)
    erasing = steps.pop() if steps and isinstance(steps[-1], RandomErasing) else None
    if len(steps) < 2 or type(steps[-2]) not in (transforms.ToTensor, MaybeToTensor) \
            or not isinstance(steps[-1], transforms.Normalize):
        return None
    if erasing is not None and str(erasing.device) != 'cpu':
        return None  # its patches would be drawn on that device in the workers; timm's training one is 'cpu'
    normalize = steps[-1]
    return steps[:-2], DeferredTail(normalize, erasing), ImageFinisher(normalize.mean, normalize.std)


TransformOutput = Union[torch.Tensor, Tuple[torch.Tensor, List[Patch]]]


def stack_images(outputs: Sequence[TransformOutput], shared: bool = True) -> Tuple[torch.Tensor, BatchErasing]:
    """A batch from the per-sample outputs of the training transform: float tensors as they are, or the
    uint8 tensors of DeferredTail with their erased patches. `shared`: the batch goes to the training process
    as it is, so a loader worker builds it in shared memory (batch_tensor)."""
    if outputs and isinstance(outputs[0], torch.Tensor):
        return _stack(list(outputs), shared), BatchErasing.of([])
    pixels = _stack([p for p, _ in outputs], shared)
    return pixels, BatchErasing.of([patches for _, patches in outputs], shared)


def batch_tensor(shape: Sequence[int], dtype: torch.dtype, shared: bool = True) -> torch.Tensor:
    """An uninitialised CPU tensor for a batch; with `shared`, in a DataLoader worker it lives in shared memory
    already, as default_collate allocates its batches, so handing it to the training process copies nothing
    (shared memory costs more to allocate: only for what leaves the worker)."""
    if not shared or get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device='cpu')
    return torch.empty(0, dtype=dtype).new(storage).view(*shape)


def _stack(tensors: List[torch.Tensor], shared: bool) -> torch.Tensor:
    if not tensors:
        return torch.stack(tensors)  # torch's own error
    return torch.stack(tensors, out=batch_tensor((len(tensors), *tensors[0].shape), tensors[0].dtype, shared))


class ImageFinisher:
    """uint8 batch [B,3,H,W] -> normalised float32 batch on `device`, with the erased patches."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        # As torchvision's Normalize builds them: float32 (it casts to the image's dtype) per channel.
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._on: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._lookup: Optional[torch.Tensor] = None

    def _constants(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = self.mean.to(device), self.std.to(device)
        return self._on[device]

    def __call__(self, images: torch.Tensor, erasing: BatchErasing,
                 device: Optional[torch.device] = None) -> torch.Tensor:
        if images.dtype != torch.uint8:  # the float path: already finished in the workers
            return images
        device = torch.device(device) if device is not None else images.device
        if device.type == 'cpu' and images.device.type == 'cpu':
            batch = self._on_cpu(images)
        else:
            batch = self._normalise(images.to(device, non_blocking=True), device)
        for index, rows, columns, values in erasing.patches(device):
            batch[index, :, rows, columns] = values
        return batch

    def _normalise(self, images: torch.Tensor, device: torch.device,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """to_tensor's .to(float32).div(255), then Normalize's .sub(mean).div(std): the same ops, in place."""
        mean, std = self._constants(device)
        batch = images.to(torch.float32) if out is None else out.copy_(images)
        return batch.div_(255).sub_(mean).div_(std)

    def _on_cpu(self, images: torch.Tensor) -> torch.Tensor:
        """The CPU batch, in shared memory in a loader worker (batch_tensor); with data/jpeg_region.py's helper
        one table lookup per pixel, the table being these ops' own results for the 256 values."""
        out = batch_tensor(images.shape, torch.float32)
        images = images.contiguous()
        if images.dim() == 4 and images.shape[1] == self.mean.numel():
            batch, channels, height, width = images.shape
            if jpeg_region.lookup_planes(images.data_ptr(), out.data_ptr(), batch * channels, height * width,
                                         channels, self._table().data_ptr()):
                return out
        return self._normalise(images, torch.device('cpu'), out)

    def _table(self) -> torch.Tensor:
        """float32 [C, 256]: _normalise of every uint8 value in every channel."""
        if self._lookup is None:
            values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, self.mean.numel(), 16, 16)
            self._lookup = self._normalise(values, torch.device('cpu')).reshape(-1, 256).contiguous()
        return self._lookup

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})'

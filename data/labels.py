"""Global label ids: class ids of all image-label sources side by side, caption ids above them all.

The loss treats equal labels in the gathered global batch as positives, so a caption's label must differ
from every other sample's in the global batch. By default it is a function of the caption's global
batch slot, `num_classes + (global_step * world_size + rank) * batch_size + slot`, which no other slot of
the run shares; no coordination between ranks is needed. With `DATA.MERGE_CAPTIONS` the label is a
62-bit hash of the normalized caption instead, so identical captions are positives of each other;
two different captions in a global batch of n collide with probability about n^2 / 2^63
(~1e-10 for n = 32768).
"""
from __future__ import annotations

import hashlib
from typing import List

from .sources import Source

HASH_BITS = 62  # leaves room for the class ids below within int64


def normalize_caption(text: str) -> str:
    """What "identical" means for merged captions: case and runs of whitespace are ignored."""
    return ' '.join(text.lower().split())


class LabelSpace:
    def __init__(self, sources: List[Source], world_size: int, batch_size: int, merge_captions: bool):
        self.class_offsets: List[int] = []
        offset = 0
        for source in sources:
            self.class_offsets.append(offset)
            offset += len(source.class_names) if source.is_labeled else 0
        self.num_classes = offset  # caption labels start here
        self.world_size, self.batch_size, self.merge_captions = world_size, batch_size, merge_captions

    def class_label(self, source_index: int, class_index: int) -> int:
        return self.class_offsets[source_index] + class_index

    def caption_label(self, caption: str, global_step: int, rank: int, slot: int) -> int:
        if self.merge_captions:
            digest = hashlib.blake2b(normalize_caption(caption).encode('utf-8'), digest_size=8).digest()
            return self.num_classes + (int.from_bytes(digest, 'little') >> (64 - HASH_BITS))
        return self.num_classes + (global_step * self.world_size + rank) * self.batch_size + slot

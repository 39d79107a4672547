"""Image-text pairs listed in a TSV or CSV file: one row per image, image path and caption."""
from __future__ import annotations

import csv
import itertools
import os
from typing import Iterator, List, Tuple

from ..packed import PackedStrings
from .base import MISSING, BadSample, MapSource, Record, SourceSpec, read_bytes, register_source

IMAGE_COLUMNS = ('image', 'image_path', 'filepath', 'file', 'filename', 'path')
CAPTION_COLUMNS = ('caption', 'text', 'title')


def _column_indices(first_row: List[str]) -> Tuple[int, int, bool]:
    """(image column, caption column, whether the first row is a header). Without a header naming both
    columns, the image path is column 0 and the caption column 1."""
    names = [cell.strip().lower() for cell in first_row]
    image = next((names.index(n) for n in IMAGE_COLUMNS if n in names), None)
    caption = next((names.index(n) for n in CAPTION_COLUMNS if n in names), None)
    if image is None or caption is None:
        return 0, 1, False
    return image, caption, True


@register_source('tsv', 'csv')
class CaptionTableSource(MapSource):
    """`tsv`: tab-separated, no quoting (captions may contain quotes); `csv`: comma-separated with
    standard quoting. An optional header row picks the columns by name (image|image_path|filepath|file|
    filename|path and caption|text|title). Relative image paths are relative to the table's folder.
    Rows with too few fields are kept and later skipped as bad samples, so they are counted."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        if not os.path.isfile(spec.path):
            raise ValueError(f'data source {spec.name!r}: {spec.path} not found')
        self.root = os.path.dirname(os.path.abspath(spec.path))
        images, captions = [], []
        for image, caption in self._rows():
            images.append(image)
            captions.append(caption)
        self._images = PackedStrings(images)
        self._captions = PackedStrings(captions)

    def _rows(self) -> Iterator[Tuple[str, str]]:
        if self.spec.type == 'tsv':
            options = dict(delimiter='\t', quoting=csv.QUOTE_NONE)
        else:
            options = dict(delimiter=',')
        with open(self.spec.path, encoding='utf-8', newline='') as f:
            rows = csv.reader(f, **options)
            first = next(rows, None)
            if first is None:
                return
            image, caption, header = _column_indices(first)
            if not header:
                rows = itertools.chain([first], rows)
            for row in rows:
                if not any(cell.strip() for cell in row):
                    continue
                yield (row[image].strip() if image < len(row) else '',
                       row[caption] if caption < len(row) else '')

    def pairs(self) -> List[Tuple[str, str]]:
        """(image path, caption) of every row, in file order, paths resolved against the table's folder
        ('' for a row without one)."""
        return [(os.path.join(self.root, self._images[i]) if self._images[i] else '', self._captions[i])
                for i in range(len(self._images))]

    @property
    def num_samples(self) -> int:
        return len(self._images)

    def read(self, index: int) -> Record:
        if not self._images[index]:
            raise BadSample(MISSING, f'{self.spec.path}: sample {index} has no image path')
        path = os.path.join(self.root, self._images[index])
        return Record(read_bytes(path), path, caption=self._captions[index])

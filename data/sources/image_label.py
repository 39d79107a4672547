"""Image-label sources in the official layouts: an ImageFolder tree and the zip + map-file pair."""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import List, Optional, Sequence

import numpy as np

from ..classnames import CLASSNAMES_FILE, resolve_classnames
from ..packed import PackedStrings
from ..prompts import split_synonyms
from .base import CORRUPT, MISSING, BadSample, MapSource, Record, SourceSpec, read_bytes, register_source

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def _class_names(spec: SourceSpec, num_classes: int, folders: Sequence[str],
                 folder_names: Optional[List[str]]) -> List[List[str]]:
    """First match: the spec's CLASSNAMES file, a classnames.txt in one of `folders` (split folder
    first), the ImageNet-1K names for 1000 classes, the folder names."""
    candidates = [spec.classnames] if spec.classnames else []
    candidates += [os.path.join(folder, CLASSNAMES_FILE) for folder in folders]
    explicit = next((p for p in candidates if p == spec.classnames or os.path.isfile(p)), None)
    try:
        lines = resolve_classnames(num_classes, explicit=explicit, folder_names=folder_names)
    except (ValueError, OSError) as exc:
        raise ValueError(f'data source {spec.name!r} ({spec.path}): {exc}') from None
    return [split_synonyms(line) for line in lines]


@register_source('imagefolder')
class ImageFolderSource(MapSource):
    """`PATH/train/<class>/**/<image>` (or `PATH/<class>/...` when there is no train folder); classes are
    the sorted folder names, indexed from 0 as torchvision's ImageFolder does."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        split = os.path.join(spec.path, 'train')
        self.root = split if os.path.isdir(split) else spec.path
        if not os.path.isdir(self.root):
            raise ValueError(f'data source {spec.name!r}: {spec.path} is not a directory')
        classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not classes:
            raise ValueError(f'data source {spec.name!r}: no class folders in {self.root}')
        paths, labels = [], []
        for index, name in enumerate(classes):
            for directory, _, files in sorted(os.walk(os.path.join(self.root, name), followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.relpath(os.path.join(directory, file), self.root))
                        labels.append(index)
        self._paths = PackedStrings(paths)
        self._labels = np.asarray(labels, dtype=np.int32)
        self.class_names = _class_names(spec, len(classes), [self.root, spec.path], classes)

    @property
    def num_samples(self) -> int:
        return len(self._paths)

    def read(self, index: int) -> Record:
        path = os.path.join(self.root, self._paths[index])
        return Record(read_bytes(path), path, class_index=int(self._labels[index]))


@register_source('zip')
class ZipSource(MapSource):
    """The official zip layout: `PATH/train.zip` with `PATH/train_map.txt` ("relpath<TAB>label" lines),
    or `PATH` = some `X.zip` with `X_map.txt` beside it."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        if spec.path.endswith('.zip'):
            self.zip_path, map_path = spec.path, spec.path[:-len('.zip')] + '_map.txt'
        else:
            self.zip_path = os.path.join(spec.path, 'train.zip')
            map_path = os.path.join(spec.path, 'train_map.txt')
        for required in (self.zip_path, map_path):
            if not os.path.isfile(required):
                raise ValueError(f'data source {spec.name!r}: {required} not found')
        members, labels = self._read_map(map_path)
        self._members = PackedStrings(members)
        self._labels = np.asarray(labels, dtype=np.int32)
        num_classes = int(self._labels.max()) + 1 if labels else 0
        # The folder of each class's first member doubles as its name when no names file exists.
        first_member = {}
        for member, label in zip(members, labels):
            first_member.setdefault(label, member)
        folder_names = [os.path.dirname(first_member[c]) if c in first_member else '' for c in range(num_classes)]
        self.class_names = _class_names(spec, num_classes, [os.path.dirname(self.zip_path)],
                                        folder_names if all(folder_names) else None)
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid = -1

    def _read_map(self, map_path: str):
        members, labels = [], []
        with open(map_path, encoding='utf-8') as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rstrip('\n').split('\t')
                if len(fields) != 2 or not fields[1].strip().isdigit():
                    raise ValueError(f'{map_path}:{number}: expected "relpath<TAB>label", got {line.strip()!r}')
                members.append(fields[0].lstrip('/'))
                labels.append(int(fields[1]))
        return members, labels

    def __getstate__(self):
        # An open ZipFile is neither picklable nor safe to share between processes.
        return {**self.__dict__, '_zip': None, '_zip_pid': -1}

    @property
    def num_samples(self) -> int:
        return len(self._members)

    def read(self, index: int) -> Record:
        if self._zip_pid != os.getpid():  # each loader worker needs its own file offset
            self._zip, self._zip_pid = zipfile.ZipFile(self.zip_path), os.getpid()
        member = self._members[index]
        where = f'{self.zip_path}@/{member}'
        try:
            data = self._zip.read(member)
        except KeyError:
            raise BadSample(MISSING, where) from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise BadSample(CORRUPT, where, f'{type(exc).__name__}: {exc}') from None
        return Record(data, where, class_index=int(self._labels[index]))

"""What every training source provides: raw records (image bytes + class index or caption), either by
index (map-style) or as a stream, and the registry that maps a config `TYPE` to its implementation."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

# Reasons a sample is skipped; the loader counts them per source.
MISSING = 'missing'              # the file or archive member does not exist
UNREADABLE = 'unreadable'        # the file exists but reading it failed (permissions, I/O error)
EMPTY = 'empty'                  # zero-byte image
CORRUPT = 'corrupt'              # not decodable, or truncated
TOO_LARGE = 'too_large'          # more pixels than PIL.Image.MAX_IMAGE_PIXELS (decompression bomb)
EMPTY_CAPTION = 'empty_caption'  # image-text sample without text
BROKEN_SHARD = 'broken_shard'    # a tar shard or member that could not be read
NO_IMAGE = 'no_image'            # a shard sample without an image member


class BadSample(Exception):
    """A sample that cannot be used; the loader skips and counts it instead of failing."""

    def __init__(self, reason: str, where: str, detail: str = ''):
        super().__init__(f'{reason}: {where}' + (f' ({detail})' if detail else ''))
        self.reason, self.where, self.detail = reason, where, detail


@dataclass(frozen=True)
class Record:
    """One undecoded sample. Image-label sources set `class_index`, image-text sources `caption`."""
    image: bytes
    where: str  # path, or shard url + key: what a log line names
    class_index: int = -1
    caption: Optional[str] = None


@dataclass(frozen=True)
class SourceSpec:
    """One entry of `DATA.SOURCES`, validated, with its path already resolved."""
    type: str
    path: str
    name: str
    weight: Optional[float] = None     # None: proportional to the source's size
    classnames: str = ''               # image-label sources: a class-names file overriding the defaults
    num_samples: Optional[int] = None  # stream sources: their size, when no stats files tell it
    shuffle_buffer: int = 1000         # stream sources: samples shuffled together within a shard


class Source(ABC):
    """A training source. `class_names` is set (one synonym list per class) iff it is image-label data."""

    is_stream = False

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.name = spec.name
        self.class_names: Optional[List[List[str]]] = None

    @property
    def is_labeled(self) -> bool:
        return self.class_names is not None

    @property
    @abstractmethod
    def num_samples(self) -> Optional[int]:
        """Samples in one pass over the source; None when a stream does not know."""

    def describe(self) -> str:
        size = 'unknown size' if self.num_samples is None else f'{self.num_samples} samples'
        kind = f'{len(self.class_names)} classes' if self.is_labeled else 'captions'
        return f'{self.name} ({self.spec.type} {self.spec.path}: {size}, {kind})'


class MapSource(Source):
    """Random access by index in [0, num_samples)."""

    @abstractmethod
    def read(self, index: int) -> Record:
        """The record at `index`; raises BadSample when it cannot be read."""


# A stream's position: [pass, shard index within the pass, samples emitted from that shard].
StreamPosition = List[int]


class StreamSource(Source):
    """Sequential reading, partitioned into `num_slots` disjoint slots (one per rank and loader worker)."""

    is_stream = True
    # What a saved position means; a new value makes positions saved under the old one count as another
    # data layout (the loader warns that the batches from there on differ).
    position_format = 1

    @abstractmethod
    def iterate(self, slot: int, num_slots: int, seed: int,
                position: StreamPosition) -> Iterator[Tuple[Union[Record, BadSample], StreamPosition]]:
        """Endless records of `slot` from `position`, each with the position just after it."""


SOURCE_TYPES: Dict[str, Type[Source]] = {}


def register_source(*type_names: str) -> Callable[[Type[Source]], Type[Source]]:
    """Class decorator: make a Source class available as `TYPE` in `DATA.SOURCES`."""
    def wrap(cls: Type[Source]) -> Type[Source]:
        for type_name in type_names:
            SOURCE_TYPES[type_name] = cls
        return cls
    return wrap


def build_source(spec: SourceSpec) -> Source:
    if spec.type not in SOURCE_TYPES:
        raise ValueError(f'data source {spec.name!r}: unknown TYPE {spec.type!r}; known: {sorted(SOURCE_TYPES)}')
    source = SOURCE_TYPES[spec.type](spec)
    if source.num_samples == 0:
        raise ValueError(f'data source {spec.name!r} has no samples: {source.describe()}')
    return source


def read_bytes(path: str) -> bytes:
    """A file's bytes; a missing or unreadable file is a BadSample, not an error."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        raise BadSample(MISSING, path) from None
    except OSError as exc:
        raise BadSample(UNREADABLE, path, f'{type(exc).__name__}: {exc}') from None

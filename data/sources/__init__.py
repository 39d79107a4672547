"""Training sources by `TYPE`: imagefolder, zip (image-label); tsv, csv, webdataset (image-text)."""
from . import caption_table, image_label, webdataset_shards  # noqa: F401  (they register their types)
from .base import (SOURCE_TYPES, BadSample, MapSource, Record, Source, SourceSpec, StreamSource, build_source,
                   register_source)

__all__ = ['SOURCE_TYPES', 'BadSample', 'MapSource', 'Record', 'Source', 'SourceSpec', 'StreamSource',
           'build_source', 'register_source']

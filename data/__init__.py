"""Training data: sources (image-label folders and zips, image-text shards and tables), their mixture,
and the loader training iterates. Class names, templates and transforms live in their own modules."""
from typing import Any

__all__ = ['SOURCE_TYPES', 'TrainLoader', 'build_train_loader', 'register_source']


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m data.builtin` and users of data.classnames do not pay
    # for importing torch and timm.
    if name == 'build_train_loader':
        from .build import build_train_loader
        return build_train_loader
    if name == 'TrainLoader':
        from .loader import TrainLoader
        return TrainLoader
    if name in ('SOURCE_TYPES', 'register_source'):
        from . import sources
        return getattr(sources, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
